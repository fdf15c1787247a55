"""ONNX export (merlin_hstu.serving.onnx_export, `merlin-hstu export --format onnx`): every task's graphs run in
onnxruntime and equal the eager PyTorch model to 1e-5 on inputs of other shapes than the traced ones; the CLI
writes a self-contained folder (graphs, manifest, fitted workflow, item id mapping) atomically and refuses to
replace one without --overwrite."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from merlin_hstu.cli.main import main
from merlin_hstu.serving.onnx_export import ctr_graphs, export_graph, ranking_graphs, retrieval_graphs

ort = pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def run_graph(path: Path, feeds: dict) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {k: np.asarray(v) for k, v in feeds.items()})[0]


# --- graphs of each model family -----------------------------------------------------------------------------
def retrieval_model(encoder: str, similarity: str = "dot"):
    from merlin_hstu.encoders.hstu import HSTUEncoderConfig
    from merlin_hstu.encoders.sasrec import SASRecEncoderConfig
    from merlin_hstu.retrieval.model import HSTURetrievalModel, RetrievalModelConfig
    from merlin_hstu.retrieval.similarity import RetrievalHeadConfig

    torch.manual_seed(0)
    enc = (HSTUEncoderConfig(embedding_dim=16, attention_dim=8, linear_dim=8, max_seq_len=17, kernel="pytorch")
           if encoder == "hstu" else SASRecEncoderConfig(embedding_dim=16, max_seq_len=17))
    head = RetrievalHeadConfig(similarity=similarity)
    return HSTURetrievalModel(RetrievalModelConfig(num_items=90, encoder=enc, head=head)).eval()


@pytest.mark.parametrize("encoder,similarity", [("hstu", "dot"), ("sasrec", "dot"), ("hstu", "mol")])
def test_retrieval_graphs_equal_the_model_on_other_users(encoder, similarity, tmp_path):
    model = retrieval_model(encoder, similarity)
    tower, scores = retrieval_graphs(model, max_history=12)
    for graph in (tower, scores):
        record = export_graph(graph, tmp_path / f"{graph.name}.onnx")
        assert record["max_abs_diff_vs_pytorch"] <= 1e-5
    # Independent of the graphs' own check: fresh users of every length 1..12, through both graphs, against the
    # eager model's score_all_items (the function offline evaluation ranks with).
    g = torch.Generator().manual_seed(7)
    lengths = torch.arange(1, 13)
    ids = torch.zeros(12, 13, dtype=torch.long)
    for b, n in enumerate(lengths.tolist()):
        ids[b, :n] = torch.randint(3, 90, (n,), generator=g)
    times = torch.randint(1, 5000, (12, 13), generator=g).cumsum(1) + 1_600_000_000
    feeds = {"ids": ids.numpy(), "lengths": lengths.numpy(), "timestamps": times.numpy()}
    feeds = {k: feeds[k] for k in tower.input_names}
    assert ("timestamps" in feeds) == (encoder == "hstu")  # SASRec has no time bias, so no timestamps input
    query = run_graph(tmp_path / "user_tower.onnx", feeds)
    got = run_graph(tmp_path / "item_scores.onnx", {"query": query})
    with torch.no_grad():
        want = model.score_all_items(ids, lengths, times).numpy()
    assert got.shape == (12, 90)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert (np.argsort(-got[:, 3:], 1)[:, :5] == np.argsort(-want[:, 3:], 1)[:, :5]).mean() > 0.95


def ranking_model(**kw):
    from merlin_hstu.ranking.model import DlrmHSTU, DlrmHSTUConfig
    from merlin_hstu.ranking.batch import RankingTask

    torch.manual_seed(0)
    tasks = (RankingTask("click", bit=0), RankingTask("like", bit=1), RankingTask("watch", kind="regression"))
    config = DlrmHSTUConfig(embedding_dim=16, attention_dim=8, linear_dim=8, max_seq_len=24, num_action_bits=2,
                            multitask_hidden=8, kernel="pytorch", **kw)
    return DlrmHSTU(config, num_items=60, contextual_cardinalities={"age": 4, "city": 3}, tasks=tasks).eval()


@pytest.mark.parametrize("kw", [{}, {"interleave": True}, {"interaction": "wukong"}], ids=["mlp", "interleave",
                                                                                          "wukong"])
def test_ranking_graph_equals_the_model_on_other_batches(kw, tmp_path):
    from merlin_hstu.serving.ranking import _example

    model = ranking_model(**kw)
    (graph,) = ranking_graphs(model)
    export_graph(graph, tmp_path / "ranking.onnx")
    for seed, history, cands in [(3, [2, 5, 1, 4], [3, 1, 2, 2]), (4, [6], [1])]:
        inputs = _example(model, history, cands, seed)
        got = run_graph(tmp_path / "ranking.onnx", dict(zip(graph.input_names, [t.numpy() for t in inputs])))
        with torch.no_grad():
            want = graph.module(*inputs).numpy()
        assert got.shape == (sum(cands), len(model.tasks))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["wukong", "dlrm", "logreg"])
def test_ctr_graph_equals_the_model(name, tmp_path):
    from merlin_hstu.ctr.train import build_ctr_model

    torch.manual_seed(0)
    model = build_ctr_model(name, [5, 7, 9], 4).eval()
    (graph,) = ctr_graphs(model, 4, [5, 7, 9])
    export_graph(graph, tmp_path / "ctr.onnx")
    dense = torch.rand(11, 4) * 5
    sparse = torch.stack([torch.randint(0, c, (11,)) for c in (5, 7, 9)], 1)
    got = run_graph(tmp_path / "ctr.onnx", {"dense": dense.numpy(), "sparse": sparse.numpy()})
    with torch.no_grad():
        want = model(dense, sparse).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


# --- the CLI on trained runs of the three tasks ---------------------------------------------------------------
H = 10
SMALL = ["--set", "train.epochs=1", "--set", f"data.max_history={H}", "--set", f"model.max_seq_len={H + 5}",
         "--set", "model.embedding_dim=16", "--set", "model.attention_dim=8", "--set", "model.linear_dim=8",
         "--set", "train.eval_every=0", "--set", "train.batch_size=64"]


@pytest.fixture(scope="module")
def retrieval_run(tmp_path_factory):
    from merlin_hstu.data.synthetic import SyntheticConfig, generate_event_log

    root = tmp_path_factory.mktemp("onnx_retrieval")
    events = generate_event_log(SyntheticConfig(num_users=80, num_items=90, min_events=3, max_events=25, seed=2))
    events.to_parquet(root / "events.parquet")
    assert main(["preprocess", "--input", str(root / "events.parquet"), "--output", str(root / "data"), *SMALL]) == 0
    assert main(["train", "--data", str(root / "data"), "--output", str(root / "run"), "--no-progress", *SMALL]) == 0
    return root


def test_cli_exports_a_retrieval_run_whose_graphs_rank_as_the_model(retrieval_run, tmp_path, capsys):
    from merlin_hstu.retrieval.train import load_run
    from merlin_hstu.workflows.session_workflow import load_item_id_mapping

    out = tmp_path / "onnx"
    assert main(["export", "--run", str(retrieval_run / "run"), "--output", str(out), "--format", "onnx"]) == 0
    printed = capsys.readouterr().out
    assert "user_tower.onnx" in printed and "item_scores.onnx" in printed and "onnxruntime == PyTorch" in printed
    manifest = json.loads((out / "onnx.json").read_text())
    assert manifest["task"] == "retrieval" and set(manifest["graphs"]) == {"user_tower", "item_scores"}
    assert manifest["max_history"] == H and manifest["first_item_id"] == 3 and manifest["workflow"] == "workflow"
    assert (out / "workflow" / "workflow.pkl").is_file()
    tower_inputs = manifest["graphs"]["user_tower"]["inputs"]
    assert [i["name"] for i in tower_inputs] == ["ids", "lengths", "timestamps"]
    assert tower_inputs[0]["shape"] == ["batch", H + 1] and tower_inputs[0]["dtype"] == "int64"
    # the id mapping is the workflow's
    model, cfg, record = load_run(retrieval_run / "run")
    mapping = load_item_id_mapping(record["workflow"])
    ids = pd.read_parquet(out / "item_ids.parquet")
    assert ids["encoded_id"].tolist() == list(range(3, model.config.num_items))
    assert [str(v) for v in ids["raw_id"]] == [str(v) for v in mapping[3:]]
    # users of the training data, through the graphs == the model
    data = pd.read_parquet(retrieval_run / "data" / "processed" / "part_0.parquet")
    item_list, time_list = "item_id-list", "timestamp-list"
    rows = data.head(6)
    batch = np.zeros((len(rows), H + 1), dtype=np.int64)
    times = np.zeros_like(batch)
    lengths = np.zeros(len(rows), dtype=np.int64)
    for b, (items, ts) in enumerate(zip(rows[item_list], rows[time_list])):
        items, ts = np.asarray(items)[-H:], np.asarray(ts)[-H:]
        n = len(items)
        batch[b, :n], times[b, :n], times[b, n], lengths[b] = items, ts, ts[-1], n
    query = run_graph(out / "user_tower.onnx", {"ids": batch, "lengths": lengths, "timestamps": times})
    got = run_graph(out / "item_scores.onnx", {"query": query})
    with torch.no_grad():
        want = model.score_all_items(torch.from_numpy(batch), torch.from_numpy(lengths),
                                     torch.from_numpy(times)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # no silent replacement; flags of the Triton repository are refused; nothing half-written is left
    assert main(["export", "--run", str(retrieval_run / "run"), "--output", str(out), "--format", "onnx"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["export", "--run", str(retrieval_run / "run"), "--output", str(tmp_path / "x"), "--format", "onnx",
                 "--top-k", "5"]) == 2
    assert "--top-k configure a Triton repository" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["onnx"]
    assert main(["export", "--run", str(retrieval_run / "run"), "--output", str(out), "--format", "onnx",
                 "--overwrite"]) == 0


def test_cli_exports_ranking_and_ctr_runs(tmp_path, capsys):
    sys.path.insert(0, str(Path(__file__).parent))
    from test_cli_tasks import RANKING_SMALL
    from test_ranking_export import CONFIG, event_log

    from merlin_hstu.ctr.data import SyntheticCriteoConfig, generate_synthetic_criteo, write_criteo_tsv
    from merlin_hstu.train.run_dir import load_run
    from merlin_hstu.workflows import ranking_workflow as rw
    from merlin_hstu.workflows.criteo_workflow import CriteoWorkflowConfig, preprocess_criteo

    ranking_data = rw.preprocess_ranking(event_log(num_users=30), tmp_path / "rdata", CONFIG).output_dir
    assert main(["train", "--task", "ranking", "--data", str(ranking_data), "--output", str(tmp_path / "rank"),
                 "--kernel", "pytorch", *RANKING_SMALL]) == 0
    frame = generate_synthetic_criteo(SyntheticCriteoConfig(num_rows=400, seed=4, max_cardinality=40)).frame
    src = write_criteo_tsv(frame, tmp_path / "day_0.tsv")
    criteo = preprocess_criteo(src, tmp_path / "criteo", CriteoWorkflowConfig(freq_threshold=2, valid_fraction=0.25))
    assert main(["train", "--task", "ctr", "--data", str(criteo.path), "--output", str(tmp_path / "ctr"),
                 "--config", "wukong", "--set", "model.embedding_dim=4", "--set", "train.epochs=1",
                 "--no-progress"]) == 0
    capsys.readouterr()
    for task, graph in [("rank", "ranking"), ("ctr", "ctr")]:
        out = tmp_path / f"{task}_onnx"
        assert main(["export", "--run", str(tmp_path / task), "--output", str(out), "--format", "onnx"]) == 0
        manifest = json.loads((out / "onnx.json").read_text())
        assert list(manifest["graphs"]) == [graph] and manifest["workflow"] == "workflow"
        assert manifest["graphs"][graph]["max_abs_diff_vs_pytorch"] <= 1e-5
        assert (out / f"{graph}.onnx").is_file() and (out / "workflow").is_dir()
    # the ranking graph on a batch of real ranking rows: the trained model's logits
    from merlin_hstu.serving.ranking import _example

    model = load_run(tmp_path / "rank").model
    inputs = _example(model, [3, 1, 2], [2, 2, 1], 9)
    names = [i["name"] for i in json.loads((tmp_path / "rank_onnx" / "onnx.json").read_text())
             ["graphs"]["ranking"]["inputs"]]
    got = run_graph(tmp_path / "rank_onnx" / "ranking.onnx", dict(zip(names, [t.numpy() for t in inputs])))
    (graph,) = ranking_graphs(model)
    with torch.no_grad():
        want = graph.module(*inputs).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    ctr = json.loads((tmp_path / "ctr_onnx" / "onnx.json").read_text())
    assert len(ctr["sparse_names"]) == len(ctr["cardinalities"]) > 0
