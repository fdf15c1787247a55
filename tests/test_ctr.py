"""WuKong in Transformers4Rec (merlin_hstu.t4r.ctr), the CTR bench (`bench --task ctr`), export and serving of a
WuKong model with its Criteo workflow (merlin_hstu.serving.ctr, a real tritonserver), the ml-1m CTR table."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

import transformers4rec.torch as tr
from merlin.dag.runtime import Runtime
from merlin.dataloader.torch import Loader
from merlin.io import Dataset
from transformers4rec.config.trainer import T4RecTrainingArguments

from merlin_hstu.common import metrics as ranking_metrics
from merlin_hstu.cli.main import main
from merlin_hstu.bench.ctr import parse_overrides
from merlin_hstu.ctr.train import CTRTrainConfig, build_ctr_model, predict_logits, train_ctr
from merlin_hstu.ctr.data import (ML1M_CTR_CATEGORICAL, SyntheticCriteoConfig, encode_ml1m_ctr,
                                  generate_synthetic_criteo, load_criteo_tensors, ml1m_ctr_frame, write_criteo_tsv)
from merlin_hstu.serving.client import ServingClient
from merlin_hstu.serving.contract import BadRequest
from merlin_hstu.serving.ctr import OUTPUT, build_ctr_ensemble, export_ctr_ensemble
from merlin_hstu.serving.ctr_contract import CTRRequest
from merlin_hstu.serving.server import ServerConfig, TritonServer
from merlin_hstu.t4r.ctr import CTRBinaryClassificationTask, WukongBlock, wukong_ctr_model
from merlin_hstu.ctr.wukong import WukongConfig
from merlin_hstu.workflows.criteo_workflow import (CATEGORICAL_COLUMNS, CriteoWorkflowConfig, preprocess_criteo,
                                                   read_criteo_tsv)

SMALL_TOWER = WukongConfig(num_layers=2, lcb_feature_num=4, fmb_feature_num=4, compressed_feature_num=4,
                           fmb_mlp=(16,))


@pytest.fixture(scope="module")
def criteo_dir(tmp_path_factory):
    """2,000 synthetic Criteo-layout lines through the NVTabular Criteo workflow (1,500 train / 500 valid)."""
    root = tmp_path_factory.mktemp("ctr")
    frame = generate_synthetic_criteo(SyntheticCriteoConfig(num_rows=2000, seed=3, max_cardinality=200)).frame
    src = write_criteo_tsv(frame, root / "day_0.tsv")
    return preprocess_criteo(src, root / "criteo", CriteoWorkflowConfig(freq_threshold=2, valid_fraction=0.25))



# ------------------------------------------------------------------------------------------------
# T4R
# ------------------------------------------------------------------------------------------------
def test_t4r_wukong_model_trains_with_trainer_and_reports_auc_logloss(criteo_dir, tmp_path, one_thread):
    torch.manual_seed(0)
    model = wukong_ctr_model(criteo_dir.schema, dim=8, tower=SMALL_TOWER, top_mlp=(16,))
    body = model.heads[0].body
    block = body[-1]
    assert isinstance(block, WukongBlock) and len(block.feature_names) == 39  # 13 dense + 26 categorical
    assert sorted(block.projections) == sorted(f"I{i}" for i in range(1, 14))  # dense values projected to d
    assert body.output_size()[-1] == 16
    assert "label" not in model.input_schema.column_names
    before = [p.detach().clone() for p in block.tower.parameters()]

    args = T4RecTrainingArguments(output_dir=str(tmp_path / "t4r"), data_loader_engine="merlin",
                                  per_device_train_batch_size=128, per_device_eval_batch_size=256, max_steps=8,
                                  learning_rate=3e-3, report_to=[], logging_steps=4, no_cuda=True,
                                  disable_tqdm=True, save_strategy="no")
    trainer = tr.Trainer(model=model, args=args, schema=criteo_dir.schema, compute_metrics=True)
    trainer.train_dataset_or_path = [str(p) for p in criteo_dir.parquet_files("train")]
    trainer.eval_dataset_or_path = [str(p) for p in criteo_dir.parquet_files("valid")]
    trainer.train()
    assert trainer.state.global_step == 8
    assert any(not torch.equal(a, b) for a, b in zip(before, block.tower.parameters()))
    metrics = trainer.evaluate(metric_key_prefix="eval")
    auc_key = "eval_/label/ctr_binary_classification_task/binary_auc"
    logloss_key = "eval_/label/ctr_binary_classification_task/binary_log_loss"

    # the same numbers from the model's inference outputs over the validation rows
    model.eval()
    probs, labels = [], []
    with torch.no_grad():
        for x, y in Loader(Dataset([str(p) for p in criteo_dir.parquet_files("valid")], cpu=True), batch_size=256):
            out = model(x)
            probs.append(out if isinstance(out, torch.Tensor) else next(iter(out.values())))
            labels.append(y)
    p, y = torch.cat(probs), torch.cat(labels)
    assert p.shape == (500,) and bool(((p > 0) & (p < 1)).all())
    assert metrics[auc_key] == pytest.approx(ranking_metrics.auc(y, p), abs=1e-6)
    assert metrics[logloss_key] == pytest.approx(ranking_metrics.log_loss(y, p), abs=1e-5)
    assert metrics["eval_/loss"] == pytest.approx(metrics[logloss_key], abs=1e-4)  # BCE loss = log loss


def test_wukong_block_needs_per_feature_inputs(criteo_dir):
    concat = tr.TabularFeatures.from_schema(criteo_dir.schema.excluding_by_name(["label"]), aggregation="concat",
                                            embedding_dim_default=8)
    with pytest.raises(ValueError, match=r"aggregation=None"):
        tr.SequentialBlock(concat, WukongBlock(8, SMALL_TOWER))
    with pytest.raises(ValueError, match="top_mlp needs at least one width"):
        WukongBlock(8, SMALL_TOWER, top_mlp=())
    task = CTRBinaryClassificationTask("label")
    assert [type(m).__name__ for m in task.metrics] == ["BinaryAUC", "BinaryLogLoss"]


# ------------------------------------------------------------------------------------------------
# bench --task ctr
# ------------------------------------------------------------------------------------------------
def test_bench_ctr_runs_models_side_by_side_and_writes_json_and_markdown(criteo_dir, tmp_path, capsys):
    threads = torch.get_num_threads()
    try:
        code = main(["bench", "--task", "ctr", "--dataset", str(criteo_dir.path), "--model", "wukong,dlrm,logreg",
                     "--epochs", "1", "--max-steps", "3", "--threads", "1", "--no-progress", "--output",
                     str(tmp_path / "b"), "--set", "model.num_layers=1", "--set", "model.embedding_dim=8",
                     "--set", "train.batch_size=256"])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    record = json.loads((tmp_path / "b" / "ctr_bench.json").read_text())
    assert set(record["summary"]) == {"wukong", "dlrm", "logreg"}
    for name, s in record["summary"].items():
        assert 0.0 <= s["auc"] <= 1.0 and s["logloss"] > 0 and s["parameters"] > 0
        assert record["runs"][name][0]["steps"] == 3
    assert record["train"]["batch_size"] == 256 and record["model_overrides"]["num_layers"] == 1
    markdown = (tmp_path / "b" / "ctr_bench.md").read_text()
    assert "| wukong |" in markdown and "WuKong / DLRM step time" in markdown
    assert "--set model.num_layers=1" in markdown
    assert not list((tmp_path / "b").glob(".*"))  # temp files renamed away
    from merlin_hstu.train.run_dir import load_run  # the bench keeps its models as run directories

    for name in ("wukong", "dlrm", "logreg"):
        run = load_run(tmp_path / "b" / f"run-{name}-seed42", expected_task="ctr")
        assert run.config.model_type == name and run.record["metrics"]["auc"] == record["runs"][name][0]["auc"]


def test_bench_ctr_scaling_writes_png(criteo_dir, tmp_path):
    threads = torch.get_num_threads()
    try:
        code = main(["bench", "--task", "ctr", "--dataset", str(criteo_dir.path), "--model", "wukong",
                     "--epochs", "1", "--max-steps", "2", "--threads", "1", "--no-progress", "--output",
                     str(tmp_path / "s"), "--set", "scaling=true", "--set", "scaling.layers=[1,2]",
                     "--set", "scaling.widths=[2]", "--set", "model.embedding_dim=4"])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    record = json.loads((tmp_path / "s" / "scaling.json").read_text())
    assert [(p["layers"], p["width"]) for p in record["points"]] == [(1, 2), (2, 2)]
    assert record["points"][1]["dense_parameters"] > record["points"][0]["dense_parameters"]
    assert set(record["baselines"]) == {"logreg", "dlrm"}
    assert (tmp_path / "s" / "scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_ctr_bad_arguments(tmp_path, capsys):
    assert main(["bench", "--task", "ctr", "--dataset", "synthetic-criteo", "--model", "xgboost"]) == 2
    assert "CTR models are wukong, dlrm, logreg" in capsys.readouterr().err
    assert main(["bench", "--task", "ctr", "--dataset", str(tmp_path), "--model", "wukong"]) == 2
    assert "unknown CTR dataset" in capsys.readouterr().err
    with pytest.raises(ValueError, match="section.key=value"):
        parse_overrides(["num_layers"])
    with pytest.raises(ValueError, match="the sections are model.<key>, train.<key>"):
        parse_overrides(["optimizer.lr=1"])
    assert parse_overrides(["model.fmb_mlp=[32, 16]", "scaling=true"]) == {
        "model": {"fmb_mlp": (32, 16)}, "train": {}, "data": {}, "scaling": {"enabled": True}}


# ------------------------------------------------------------------------------------------------
# export + serve
# ------------------------------------------------------------------------------------------------
def test_exported_wukong_serves_offline_predictions_and_auc(criteo_dir, tmp_path, one_thread):
    data = load_criteo_tensors(criteo_dir.path)
    torch.manual_seed(0)
    model = build_ctr_model("wukong", data.cardinalities, data.num_dense,
                            {"embedding_dim": 8, "num_layers": 2, "lcb_feature_num": 4, "fmb_feature_num": 4})
    train_ctr(model, data, CTRTrainConfig(epochs=1, batch_size=128))
    offline = torch.sigmoid(predict_logits(model, data.valid)).numpy()
    raw = read_criteo_tsv(criteo_dir.path.parent / "day_0.tsv").iloc[len(data.train):].reset_index(drop=True)
    labels = raw.pop("label").to_numpy()
    np.testing.assert_array_equal(labels, data.valid.labels.numpy())

    # in process: the same graph through merlin.dag's runtime
    in_process = build_ctr_ensemble(model, criteo_dir.path).transform(raw, runtime=Runtime())
    np.testing.assert_allclose(in_process[OUTPUT].to_numpy(), offline, rtol=1e-5, atol=1e-6)

    repo = export_ctr_ensemble(model, criteo_dir.path, tmp_path / "repo")
    assert (repo / "ctr" / "config.pbtxt").is_file()
    with TritonServer(ServerConfig([repo], http_port=0, grpc_port=0)) as server, \
            ServingClient(server.http_url) as client:
        assert client.task == "ctr"
        served = client.predict(CTRRequest(raw))
        # one row per request: its missing fields are columns missing in every row (Categorify alone fails there)
        sparse_rows = np.flatnonzero(raw[CATEGORICAL_COLUMNS].isna().any(axis=1).to_numpy())[:3]
        assert len(sparse_rows) == 3
        one_by_one = [client.predict(CTRRequest(raw.iloc[[i]]))[0] for i in sparse_rows]
        with pytest.raises(BadRequest, match=r"lacks column\(s\) \['C26'\]"):
            client.predict(CTRRequest(raw.drop(columns=["C26"])))
    np.testing.assert_allclose(served, offline, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(one_by_one, offline[sparse_rows], rtol=1e-5, atol=1e-6)
    assert ranking_metrics.auc(labels, served) == pytest.approx(ranking_metrics.auc(labels, offline), abs=1e-9)
    assert ranking_metrics.log_loss(labels, served) == pytest.approx(ranking_metrics.log_loss(labels, offline),
                                                                     abs=1e-6)


# ------------------------------------------------------------------------------------------------
# ml-1m-prefix CTR table (hand-made MovieLens rows; the bench reads the staged files)
# ------------------------------------------------------------------------------------------------
def test_ml1m_ctr_table_labels_features_and_time_split():
    events = pd.DataFrame({
        "user_id": [1, 1, 1, 1, 1, 2, 2, 2],
        "item_id": [10, 11, 12, 13, 10, 11, 14, 10],
        "rating": [5, 3, 4, 1, 4, 2, 5, 4],
        # user 1's last two ratings by time are rows 3 and 1 (tie at 500 keeps input order)
        "timestamp": [100, 500, 200, 500, 300, 978300760, 978300761, 978300762],
    })
    users = pd.DataFrame({"user_id": [1, 2], "gender": ["F", "M"], "age": [1, 25], "occupation": [10, 4],
                          "zip_code": ["48067", "70072"]})
    movies = pd.DataFrame({"item_id": [10, 11, 12, 13, 14],
                           "title": ["A (1995)", "B (1990)", "C (2000)", "D", "E (1980)"],
                           "genres": ["Comedy|Drama", "Action", "Drama", "Horror|Comedy", "Drama"]})
    df = ml1m_ctr_frame(events, users, movies)
    assert df["label"].tolist() == (df["rating"] >= 4).astype(int).tolist()
    by_user = {u: g for u, g in df.groupby("user_id")}
    # ceil(20%) of 5 ratings = 1 -> user 1's latest rating (row 3, t=500 after row 1 at t=500); 3 ratings -> 1
    assert by_user[1].loc[by_user[1]["split"] == "valid", "item_id"].tolist() == [13]
    assert by_user[2].loc[by_user[2]["split"] == "valid", "item_id"].tolist() == [10]
    for _, g in by_user.items():
        assert g.loc[g["split"] == "valid", "timestamp"].min() >= g.loc[g["split"] == "train", "timestamp"].max()
    row = df[(df["user_id"] == 2) & (df["item_id"] == 11)].iloc[0]
    assert (row["zip_prefix"], row["genre_1"], row["genre_2"], row["hour"], row["weekday"]) == \
        ("700", "Action", "none", 22, 6)  # 978300760 = Sunday 2000-12-31 22:12:40 UTC
    assert np.isnan(df.loc[df["item_id"] == 13, "release_year"]).all()  # "D" has no year

    data = encode_ml1m_ctr(df)
    assert (len(data.train), len(data.valid)) == (6, 2)
    items = ML1M_CTR_CATEGORICAL.index("item_id")
    assert data.cardinalities[items] == 5  # items 10, 11, 12, 14 seen in train, plus 0 for unseen
    assert data.valid.sparse[:, items].tolist() == [0, data.train.sparse[0, items].item()]  # item 13 unseen
    dense = data.train.dense.numpy()
    np.testing.assert_allclose(dense.mean(0), 0.0, atol=1e-6)  # standardised with train statistics
    np.testing.assert_allclose(dense.std(0), 1.0, atol=1e-5)
