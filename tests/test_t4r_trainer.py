"""`tr.Trainer(data_loader_engine="merlin")` end to end on our own workflows' output, every model built from the
workflow's schema.pbtxt: HSTU retrieval (dot product, and MoL with in-batch negatives) on the session workflow,
DLRM-HSTU multi-task ranking on the ranking workflow, WuKong CTR on the Criteo workflow; and
`merlin-hstu bench t4r-vs-native` on tiny settings.

The numbers the Trainer reports are checked against independent computations on the native data path: the
retrieval metrics against `merlin_hstu.retrieval.metrics.target_ranks` on `LeaveOneOut` batches, and the ranking
metrics against `merlin_hstu.common.metrics` on `RankingDataset` batches of the same users.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import transformers4rec.torch as tr
from transformers4rec.config.trainer import T4RecTrainingArguments

from merlin_hstu.bench.t4r_vs_native import protocol_metrics, t4r_score_fn
from merlin_hstu.cli.main import main
from merlin_hstu.common import metrics as ranking_metrics
from merlin_hstu.common import schema as roles
from merlin_hstu.ctr.data import SyntheticCriteoConfig, generate_synthetic_criteo, write_criteo_tsv
from merlin_hstu.ctr.wukong import WukongConfig
from merlin_hstu.data.synthetic import SyntheticConfig, generate_event_log
from merlin_hstu.encoders.hstu import HSTUEncoderConfig
from merlin_hstu.ranking.batch import RankingTask, labels_from_bitmask
from merlin_hstu.ranking.data import (CANDIDATE_ACTION_LIST, CANDIDATE_ITEM_LIST, QUERY_TIME, RankingDataset,
                                      read_meta)
from merlin_hstu.retrieval.baselines import MostPopular
from merlin_hstu.retrieval.config import load_config
from merlin_hstu.retrieval.data import LeaveOneOut, load_processed, train_sequences
from merlin_hstu.t4r.ctr import wukong_ctr_model
from merlin_hstu.t4r.data import (check_max_sequence_length, parquet_files, ranking_trainer_splits, read_schema,
                                  retrieval_trainer_splits)
from merlin_hstu.t4r.ranking import (RankingSchemaSizes, DlrmHSTUHead, ranking_model_from_schema, trainer_schema)
from merlin_hstu.t4r.retrieval import GenerativeRetrievalTask, retrieval_model_from_schema
from merlin_hstu.workflows import ranking_workflow as rw
from merlin_hstu.workflows.criteo_workflow import CriteoWorkflowConfig, preprocess_criteo
from merlin_hstu.workflows.session_workflow import SessionWorkflowConfig, preprocess

DOC = Path(__file__).resolve().parents[1] / "docs" / "t4r.md"
H = 20  # history window of the retrieval samples
PROTOCOL = load_config("demo")  # only eval_batch_size and rank_cap are read by protocol_metrics


def trainer_args(tmp_path, max_sequence_length, epochs=2, lr=3e-3, batch=32, **kwargs):
    return T4RecTrainingArguments(
        output_dir=str(tmp_path / "trainer"), data_loader_engine="merlin", max_sequence_length=max_sequence_length,
        per_device_train_batch_size=batch, per_device_eval_batch_size=128, num_train_epochs=epochs,
        learning_rate=lr, lr_scheduler_type="constant", report_to=[], no_cuda=True, disable_tqdm=True,
        save_strategy="no", logging_strategy="epoch", seed=0, optim="adamw_torch", **kwargs)


def finite_metrics(metrics: dict, keys) -> None:
    for key in keys:
        assert key in metrics, f"{key} missing from {sorted(metrics)}"
        assert math.isfinite(metrics[key]), (key, metrics[key])


def epoch_losses(trainer) -> list:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


# ------------------------------------------------------------------------------------------------
# retrieval: session workflow -> leave-one-out splits -> HSTU + GenerativeRetrievalTask
# ------------------------------------------------------------------------------------------------
SESSION_LOG = SyntheticConfig(num_users=300, num_items=80, min_events=5, max_events=20, seed=3)  # the raw log


@pytest.fixture(scope="module")
def sessions(tmp_path_factory):
    root = tmp_path_factory.mktemp("sessions")
    log = generate_event_log(SESSION_LOG)
    processed = preprocess(log, root / "workflow", SessionWorkflowConfig(max_length=H + 2, min_length=3))
    splits = retrieval_trainer_splits(root / "workflow", root / "splits", max_history=H)
    return processed, splits


def small_encoder(**kwargs) -> HSTUEncoderConfig:
    values = dict(embedding_dim=16, num_blocks=1, num_heads=1, attention_dim=16, linear_dim=16, max_seq_len=H + 1,
                  linear_dropout=0.0, time_bias=True, kernel="pytorch")
    return HSTUEncoderConfig(**{**values, **kwargs})


def test_retrieval_splits_are_the_native_leave_one_out_samples(sessions):
    processed, splits = sessions
    native = LeaveOneOut(load_processed(processed.path), max_history=H)
    train, evaluation = (pd.read_parquet(parquet_files(d)[0]) for d in (splits.train, splits.eval))
    assert splits.num_rows == {"train": len(native.train.lengths), "eval": len(native.eval.lengths)} == {
        "train": len(train), "eval": len(evaluation)}
    for frame, samples in ((train, native.train), (evaluation, native.eval)):
        for i in (0, 7, len(frame) - 1):
            n = samples.lengths[i] + 1
            assert list(frame[roles.ITEM_LIST][i]) == list(samples.ids[i, :n])
            assert list(frame[roles.TIMESTAMP_LIST][i]) == list(samples.timestamps[i, :n])
    assert splits.max_sequence_length == H + 1
    assert splits.schema[roles.ITEM_LIST].int_domain.max == processed.schema[roles.ITEM_LIST].int_domain.max
    assert set(splits.schema.column_names) == {"user_id", roles.ITEM_LIST, roles.TIMESTAMP_LIST}
    with pytest.raises(ValueError, match=r"max_sequence_length=10 is shorter .*most recent values.*"
                                         r"max_sequence_length=21"):
        check_max_sequence_length(splits.schema, 10)


def test_hstu_retrieval_trains_with_the_trainer_and_reports_t4r_metrics(sessions, tmp_path, one_thread):
    processed, splits = sessions
    torch.manual_seed(0)
    model = retrieval_model_from_schema(processed.schema, small_encoder(), splits.max_sequence_length,
                                        task=GenerativeRetrievalTask(num_negatives=32))
    assert model.heads[0].prediction_task_dict["next-item"].first_item_id == roles.FIRST_REAL_ID  # Categorify
    trainer = tr.Trainer(model=model, args=trainer_args(tmp_path, splits.max_sequence_length, epochs=3,
                                                        predict_top_k=10),
                         schema=splits.schema, compute_metrics=True, train_dataset_or_path=parquet_files(splits.train),
                         eval_dataset_or_path=parquet_files(splits.eval))
    keys = [f"eval_/next-item/{m}_at_{k}" for m in ("ndcg", "recall", "avg_precision") for k in (10, 20)]
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    finite_metrics(after, keys + ["eval_/loss"])
    losses = epoch_losses(trainer)
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert after["eval_/loss"] < before["eval_/loss"]

    # the Trainer's numbers, recomputed from the native leave-one-out eval batches (all items ranked, as T4R does)
    split = LeaveOneOut(load_processed(processed.path), max_history=H)
    model.eval()
    recomputed = protocol_metrics(t4r_score_fn(model, roles.ITEM_LIST, roles.TIMESTAMP_LIST), split, PROTOCOL, False)
    assert after["eval_/next-item/recall_at_10"] == pytest.approx(recomputed["hr@10"], abs=1e-6)
    assert after["eval_/next-item/ndcg_at_10"] == pytest.approx(recomputed["ndcg@10"], abs=1e-5)
    popular = MostPopular().fit(train_sequences(split.train), num_items=split.table.num_items)
    baseline = protocol_metrics(lambda b: popular.scores(b["ids"].shape[0]), split, PROTOCOL, False)
    assert after["eval_/next-item/recall_at_10"] > baseline["hr@10"] + 0.05
    assert after["eval_/next-item/recall_at_10"] > before["eval_/next-item/recall_at_10"] + 0.05


def test_mol_retrieval_with_in_batch_negatives_trains_with_the_trainer(sessions, tmp_path, one_thread):
    processed, splits = sessions
    torch.manual_seed(0)
    task = GenerativeRetrievalTask(similarity="mol", negatives="in_batch", logq_correction=True, num_negatives=32,
                                   mol={"query_components": 2, "item_components": 2, "component_dim": 8,
                                        "query_hidden_dim": 16, "item_hidden_dim": 16})
    model = retrieval_model_from_schema(processed.schema, small_encoder(time_bias=False),
                                        splits.max_sequence_length, task=task)
    assert model.input_schema.column_names == [roles.ITEM_LIST]  # no time bias: no timestamps read
    trainer = tr.Trainer(model=model, args=trainer_args(tmp_path, splits.max_sequence_length, predict_top_k=10),
                         schema=splits.schema, compute_metrics=True,
                         train_dataset_or_path=parquet_files(splits.train),
                         eval_dataset_or_path=parquet_files(splits.eval))
    trainer.train()
    metrics = trainer.evaluate()
    finite_metrics(metrics, ["eval_/next-item/ndcg_at_10", "eval_/next-item/recall_at_10", "eval_/loss"])
    losses = epoch_losses(trainer)
    assert losses[-1] < losses[0]


def test_retrieval_model_from_schema_features_and_errors(sessions):
    processed, splits = sessions
    torch.manual_seed(0)
    model = retrieval_model_from_schema(processed.schema, small_encoder(), H + 1, features=[roles.ACTION_LIST])
    assert sorted(model.input_schema.column_names) == sorted([roles.ITEM_LIST, roles.ACTION_LIST,
                                                              roles.TIMESTAMP_LIST])
    row = processed.to_pandas().iloc[0]
    batch = {c: torch.tensor(np.array(row[c][-H:]))[None] for c in model.input_schema.column_names}
    scores = model.eval()(batch)
    assert scores.shape == (1, processed.schema[roles.ITEM_LIST].int_domain.max + 1)
    assert torch.isinf(scores[0, :roles.FIRST_REAL_ID]).all() and torch.isfinite(scores[0, roles.FIRST_REAL_ID:]).all()
    with pytest.raises(ValueError, match=r"max_sequence_length=30 exceeds encoder.max_seq_len=21"):
        retrieval_model_from_schema(processed.schema, small_encoder(), 30)
    with pytest.raises(ValueError, match="time_bias=True needs a timestamp list column"):
        retrieval_model_from_schema(processed.schema.excluding_by_name([roles.TIMESTAMP_LIST]), small_encoder(), H + 1)
    with pytest.raises(ValueError, match=r"features \['nope'\] are not in the schema"):
        retrieval_model_from_schema(processed.schema, small_encoder(), H + 1, features=["nope"])


# ------------------------------------------------------------------------------------------------
# ranking: ranking workflow -> per-user split -> DLRM-HSTU, multi-task targets through the Merlin loader
# ------------------------------------------------------------------------------------------------
RANKING_CONFIG = rw.RankingWorkflowConfig(action_names=("click", "like"), watch_time_column="watch",
                                          contextual_columns=("user_id", "age"), num_candidates=4, max_uih_len=12)
RANKING_TASKS = (RankingTask("click", "binary", bit=0), RankingTask("like", "binary", bit=1, weight=0.5),
                 RankingTask("watch", "regression"))
SMALL_DLRM = {"embedding_dim": 16, "num_blocks": 1, "num_heads": 1, "attention_dim": 8, "linear_dim": 8,
              "max_seq_len": 32, "multitask_hidden": 16, "action_embedding_dim": 4, "kernel": "pytorch"}


def ranking_log() -> pd.DataFrame:
    """400 users; clicks planted on even items, watch time on the item id, likes random (the raw log)."""
    rng = np.random.default_rng(0)
    n = 6000
    users = rng.integers(0, 400, n)
    items = rng.integers(0, 60, n)
    return pd.DataFrame({"user_id": users, "item_id": items, "timestamp": 1_700_000_000 + rng.integers(0, 10**6, n),
                         "click": (rng.random(n) < np.where(items % 2 == 0, 0.85, 0.15)).astype(np.int64),
                         "like": rng.integers(0, 2, n), "watch": (items % 7) + rng.random(n),
                         "age": np.array(["young", "old"])[users % 2]})


@pytest.fixture(scope="module")
def ranking(tmp_path_factory):
    """`ranking_log()` through the ranking workflow, and its trainer splits."""
    root = tmp_path_factory.mktemp("ranking")
    out = rw.preprocess_ranking(ranking_log(), root / "workflow", RANKING_CONFIG, tasks=RANKING_TASKS)
    splits = ranking_trainer_splits(out.output_dir, root / "splits")
    return out, splits


def test_ranking_splits_are_the_recorded_user_split(ranking):
    out, splits = ranking
    native = RankingDataset.load(out.output_dir)
    train, evaluation = (pd.read_parquet(parquet_files(d)[0]) for d in (splits.train, splits.eval))
    assert list(train["user_id"]) == list(native.raw_user_ids[native.rows("train")])
    assert list(evaluation["user_id"]) == list(native.raw_user_ids[native.rows("test")])
    assert splits.max_sequence_length == 12  # the longest list: the history (K = 4)
    sizes = RankingSchemaSizes.from_schema(read_schema(out.path), native.tasks)
    assert (sizes.num_items, sizes.contextual_cardinalities, sizes.num_action_bits) == (
        native.num_items, native.contextual_cardinalities, native.num_action_bits)
    assert sizes.contextual_columns == {"user_id": "context-user_id", "age": "context-age"}


def test_dlrm_hstu_ranking_trains_with_the_trainer_on_multitask_targets(ranking, tmp_path, one_thread):
    out, splits = ranking
    schema = read_schema(out.path)
    tasks = [RankingTask(**t) for t in read_meta(out.output_dir)["tasks"]]
    torch.manual_seed(0)
    model = ranking_model_from_schema(schema, tasks, SMALL_DLRM)
    files = dict(train_dataset_or_path=parquet_files(splits.train), eval_dataset_or_path=parquet_files(splits.eval))
    args = trainer_args(tmp_path, splits.max_sequence_length, epochs=8, lr=1e-2)

    # the workflow's schema as it is: the Merlin loader cannot pop ragged list labels (why trainer_schema exists)
    raw = tr.Trainer(model=model, args=args, schema=schema, compute_metrics=True, **files)
    with pytest.raises(KeyError, match=CANDIDATE_ACTION_LIST):
        raw.evaluate()

    trainer = tr.Trainer(model=model, args=args, schema=trainer_schema(schema), compute_metrics=True, **files)
    keys = ["eval_/click/binary_auc", "eval_/click/binary_log_loss", "eval_/like/binary_auc",
            "eval_/like/binary_log_loss", "eval_/watch/mean_squared_error", "eval_/loss"]
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    finite_metrics(after, keys)
    assert after["eval_/loss"] < before["eval_/loss"]
    assert after["eval_/click/binary_auc"] > 0.75  # the planted item-parity signal
    assert after["eval_/watch/mean_squared_error"] < before["eval_/watch/mean_squared_error"]

    # the same metrics on the native data path: RankingDataset's test users, the model's DlrmHSTU, plain metrics
    native = RankingDataset.load(out.output_dir)
    batch = native.batch(native.sample_index("test"))
    dlrm = model.heads[0].body.model.eval()
    with torch.no_grad():
        predictions = dlrm(batch)
    labels = batch.labels
    for t, task in enumerate(tasks):
        if task.kind == "binary":
            p = torch.sigmoid(predictions[:, t])
            assert after[f"eval_/{task.name}/binary_auc"] == pytest.approx(ranking_metrics.auc(labels[:, t], p),
                                                                           abs=1e-5)
            assert after[f"eval_/{task.name}/binary_log_loss"] == pytest.approx(
                ranking_metrics.log_loss(labels[:, t], p), abs=1e-5)
        else:
            mse = float(((predictions[:, t] - labels[:, t]) ** 2).mean())
            assert after[f"eval_/{task.name}/mean_squared_error"] == pytest.approx(mse, rel=1e-5)


def test_ranking_head_keeps_int64_bitmasks_and_names_a_missing_target(ranking):
    out, _ = ranking
    tasks = (RankingTask("low", "binary", bit=0), RankingTask("high", "binary", bit=30))
    torch.manual_seed(0)
    model = ranking_model_from_schema(read_schema(out.path), tasks, {**SMALL_DLRM, "num_action_bits": 31})
    assert isinstance(model.heads[0], DlrmHSTUHead)
    inputs = {roles.ITEM_LIST: torch.tensor([[3, 4, 5]]), roles.ACTION_LIST: torch.tensor([[1, 0, 1]]),
              roles.TIMESTAMP_LIST: torch.tensor([[10, 20, 30]]), CANDIDATE_ITEM_LIST: torch.tensor([[6, 7]]),
              QUERY_TIME: torch.tensor([30]), "context-user_id": torch.tensor([3]), "context-age": torch.tensor([3])}
    bitmask = torch.tensor([[(1 << 30) | 1, 1 << 30]])  # (2**30 + 1) is 2**30 in float32: bit 0 would be lost
    output = model(dict(inputs, **{CANDIDATE_ACTION_LIST: bitmask}), testing=True)
    want = labels_from_bitmask(bitmask.reshape(-1), tasks)
    assert output["labels"]["low"].tolist() == want[:, 0].tolist() == [1.0, 0.0]
    assert output["labels"]["high"].tolist() == want[:, 1].tolist() == [1.0, 1.0]
    same = model(dict(inputs), targets={CANDIDATE_ACTION_LIST: bitmask}, testing=True)  # targets given directly
    assert same["labels"]["low"].tolist() == [1.0, 0.0]
    wider = model(dict(inputs), targets={CANDIDATE_ACTION_LIST: torch.nn.functional.pad(bitmask, (0, 3))},
                  testing=True)  # a loader may pad the labels wider than the candidates
    assert wider["labels"]["high"].tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match="every candidate needs its label"):
        model(dict(inputs), targets={CANDIDATE_ACTION_LIST: bitmask[:, :1]}, testing=True)
    with pytest.raises(ValueError, match=rf"needs its target column '{CANDIDATE_ACTION_LIST}'.*trainer_schema"):
        model(dict(inputs), training=True)
    with pytest.raises(ValueError, match=r"lacks the ranking column\(s\) \['query_time'\]"):
        ranking_model_from_schema(read_schema(out.path).excluding_by_name([QUERY_TIME]), tasks)
    assert "target" not in {t.value for t in trainer_schema(read_schema(out.path))[CANDIDATE_ACTION_LIST].tags}


# ------------------------------------------------------------------------------------------------
# CTR: Criteo workflow (its own train / valid split) -> WuKong
# ------------------------------------------------------------------------------------------------
CRITEO_LOG = SyntheticCriteoConfig(num_rows=4000, seed=5, max_cardinality=100, order1=1.5)  # the raw lines


@pytest.fixture(scope="module")
def criteo(tmp_path_factory):
    """4,000 synthetic Criteo lines (a strong planted first-order signal) through the Criteo workflow."""
    root = tmp_path_factory.mktemp("criteo")
    tsv = write_criteo_tsv(generate_synthetic_criteo(CRITEO_LOG).frame, root / "day_0.tsv")
    return preprocess_criteo(tsv, root / "criteo", CriteoWorkflowConfig(freq_threshold=2, valid_fraction=0.25))


def test_wukong_ctr_trains_with_the_trainer_on_the_criteo_workflow(criteo, tmp_path, one_thread):
    data = criteo
    torch.manual_seed(0)
    model = wukong_ctr_model(data.schema, dim=8, tower=WukongConfig(num_layers=1, lcb_feature_num=4, fmb_feature_num=4,
                                                                    compressed_feature_num=4, fmb_mlp=(16,)),
                             top_mlp=(16,))
    trainer = tr.Trainer(model=model, args=trainer_args(tmp_path, None, epochs=2, lr=3e-3, batch=128), schema=data.schema,
                         compute_metrics=True, train_dataset_or_path=[str(p) for p in data.parquet_files("train")],
                         eval_dataset_or_path=[str(p) for p in data.parquet_files("valid")])
    prefix = "eval_/label/ctr_binary_classification_task"
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    finite_metrics(after, [f"{prefix}/binary_auc", f"{prefix}/binary_log_loss", "eval_/loss"])
    assert after["eval_/loss"] < before["eval_/loss"]
    # the trivial baseline: every valid row predicted at the training click rate
    rate = float(data.to_pandas("train")["label"].mean())
    valid = data.to_pandas("valid")["label"].to_numpy()
    constant = ranking_metrics.log_loss(valid, np.full(len(valid), rate))
    assert after[f"{prefix}/binary_log_loss"] < constant
    assert after[f"{prefix}/binary_auc"] > 0.65  # the planted first-order signal (order1=1.5)


# ------------------------------------------------------------------------------------------------
# docs/t4r.md, "Training with tr.Trainer on our workflows": the three snippets, run as written
# ------------------------------------------------------------------------------------------------
def trainer_section_snippets() -> list:
    text = DOC.read_text()
    section = text[text.index("## Training with tr.Trainer on our workflows"):]
    return re.findall(r"```py\n(.*?)```", section, flags=re.S)


def test_doc_trainer_snippets_run(sessions, ranking, criteo, tmp_path, monkeypatch, one_thread):
    blocks = trainer_section_snippets()
    assert len(blocks) == 3, "docs/t4r.md: expected the retrieval, ranking and CTR Trainer snippets"
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    namespace = {"workflow_dir": str(sessions[0].path.parent), "ranking_dir": str(ranking[0].output_dir),
                 "criteo_dir": str(criteo.path)}
    for block, keys in zip(blocks, (["eval_/next-item/ndcg_at_10", "eval_/next-item/recall_at_10"],
                                    ["eval_/click/binary_auc", "eval_/watch/mean_squared_error"],
                                    ["eval_/label/ctr_binary_classification_task/binary_auc"])):
        exec(compile(block, f"{DOC}:trainer", "exec"), namespace)
        finite_metrics(namespace["metrics"], keys + ["eval_/loss"])
    assert namespace["task"].output.head.is_mol


# ------------------------------------------------------------------------------------------------
# merlin-hstu bench t4r-vs-native
# ------------------------------------------------------------------------------------------------
def test_bench_t4r_vs_native_prints_both_rows(tmp_path, capsys):
    threads = torch.get_num_threads()
    try:
        code = main(["bench", "t4r-vs-native", "--synthetic-users", "100", "--epochs", "1", "--threads", "1",
                     "--cache", str(tmp_path / "cache"), "--output", str(tmp_path / "out"), "--no-progress",
                     "--set", "model.embedding_dim=16", "--set", "model.attention_dim=8", "--set", "model.linear_dim=8",
                     "--set", "model.num_blocks=1", "--set", "data.max_history=16", "--set", "model.max_seq_len=17",
                     "--set", "train.num_negatives=16"])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    printed = capsys.readouterr().out
    record = json.loads((tmp_path / "out" / "t4r_vs_native.json").read_text())
    rows = record["metrics"]
    for name in ("native loop, reference protocol", "native loop, all items", "tr.Trainer, reference protocol",
                 "tr.Trainer, all items", "tr.Trainer, T4R's own evaluate()"):
        assert name in printed
        assert 0.0 <= rows[name]["hr@10"] <= 1.0 and 0.0 <= rows[name]["ndcg@10"] <= rows[name]["hr@10"]
    # T4R's own evaluation ranks all items: it equals our all-items row for the same model
    own, ours = rows["tr.Trainer, T4R's own evaluate()"], rows["tr.Trainer, all items"]
    assert own["hr@10"] == pytest.approx(ours["hr@10"], abs=1e-6)
    assert own["ndcg@10"] == pytest.approx(ours["ndcg@10"], abs=1e-5)
    assert len(record["native_epoch_losses"]) == len(record["t4r_epoch_losses"]) == 1
    assert record["config"]["model"]["embedding_dim"] == 16
    assert record["input_stack"] == "native" and "T4R input stack native" in record["markdown"]
    assert "--input-stack" not in record["command"]  # the default is not spelled out


def test_bench_t4r_vs_native_input_stack_option(tmp_path, capsys):
    """--input-stack t4r trains T4R's stock feature block (and says so); a bad value is refused by name."""
    threads = torch.get_num_threads()
    try:
        code = main(["bench", "t4r-vs-native", "--synthetic-users", "100", "--epochs", "1", "--threads", "1",
                     "--max-steps", "1", "--input-stack", "t4r", "--cache", str(tmp_path / "cache"),
                     "--output", str(tmp_path / "out"), "--no-progress", "--set", "model.embedding_dim=16",
                     "--set", "model.attention_dim=8", "--set", "model.linear_dim=8", "--set", "model.num_blocks=1",
                     "--set", "data.max_history=16", "--set", "model.max_seq_len=17",
                     "--set", "train.num_negatives=16"])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    record = json.loads((tmp_path / "out" / "t4r_vs_native.json").read_text())
    assert record["input_stack"] == "t4r" and "--input-stack t4r" in record["command"]
    assert "T4R input stack t4r" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["bench", "t4r-vs-native", "--input-stack", "plain"])
    assert "invalid choice: 'plain'" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"input_stack must be one of \('native', 't4r'\).*'plain'"):
        retrieval_model_from_schema(read_schema(tmp_path / "cache" / "synthetic-u100-h16" / "processed"),
                                    small_encoder(max_seq_len=17), 17, input_stack="plain")
