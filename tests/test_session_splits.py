"""train.split=sessions: native retrieval training on the Merlin train / valid / test files (DATA/splits/, written by
`preprocess --split-layout merlin`), on the real Diginetica sample. Checked against plain Python / numpy: the
samples of each split, the final test metrics of a CLI run (scored with the trained model, ranked in numpy), no
leakage of valid / test sessions into training, prefix-expanded train rows trained on and never evaluated."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from merlin_hstu.common import schema as roles
from merlin_hstu.workflows.session_workflow import SPLITS_DIR, SessionWorkflowConfig, preprocess

SESSION = "session_id"
CONFIG = SessionWorkflowConfig(id_column=SESSION, id_kind="session", item_column="item", action_column=None,
                               timestamp_column="ts", max_length=12, min_length=2, split_layout="merlin")
TINY = ["model.embedding_dim=16", "model.num_blocks=1", "model.num_heads=1", "model.attention_dim=16",
        "model.linear_dim=16", "train.num_negatives=32", "train.batch_size=128", "train.eval_every=0",
        "train.threads=1", "train.ks=[5, 10, 50]"]


@pytest.fixture(scope="module")
def datasets(shared_data, tmp_path_factory):
    """The Diginetica sample preprocessed with the split layout, and again with train prefix expansion."""
    raw = pd.read_csv(shared_data / "diginetica-sample" / "sample_train-item-views.csv.xz", sep=";")
    times = pd.to_datetime(raw["eventdate"]) + pd.to_timedelta(raw["timeframe"], unit="ms")
    events = pd.DataFrame({SESSION: raw["session_id"].to_numpy(), "item": raw["item_id"].to_numpy(),
                           "ts": times.to_numpy("datetime64[ns]").astype(np.int64) // 10**9})
    root = tmp_path_factory.mktemp("sessions")
    preprocess(events, root / "plain", CONFIG)
    preprocess(events, root / "prefix", SessionWorkflowConfig(**{**vars(CONFIG), "prefix_expansion": True}))
    return root


def _cfg(*overrides):
    from merlin_hstu.retrieval.config import load_config

    return load_config("demo", [*TINY, "data.max_history=10", "model.max_seq_len=11", "model.time_bias=true",
                                "train.split=sessions", *overrides])


def _plain_samples(path, history: int):
    """Plain Python: per row of a split file with >= 2 events, (history = the last <= H items before the last one,
    target = the last item, their times, the session id)."""
    df = pd.read_parquet(path)
    out = []
    for key, items, times in zip(df[SESSION], df[roles.ITEM_LIST], df[roles.TIMESTAMP_LIST]):
        items, times = [int(v) for v in items], [int(v) for v in times]
        if len(items) >= 2:
            out.append((key, items[:-1][-history:], items[-1], times[:-1][-history:], times[-1]))
    return out


def _as_plain(padded, keys):
    out = []
    for r in range(len(padded.lengths)):
        n = int(padded.lengths[r])
        out.append((keys[padded.rows[r]], padded.ids[r, :n].tolist(), int(padded.ids[r, n]),
                    padded.timestamps[r, :n].tolist(), int(padded.timestamps[r, n])))
    return out


def test_samples_of_each_split_equal_plain_python(datasets):
    from merlin_hstu.retrieval.data import SessionSplits, load_session_splits

    tables = load_session_splits(datasets / "plain")
    split = SessionSplits(tables, max_history=10)
    folder = datasets / "plain" / SPLITS_DIR
    for name, samples, table in (("train", split.train, tables.train), ("valid", split.validation, tables.valid),
                                 ("test", split.eval, tables.test)):
        expected = _plain_samples(folder / f"{name}.parquet", 10)
        assert _as_plain(samples, table.keys) == expected and len(expected) > 100, name
    keys = [set(t.keys.tolist()) for t in (tables.train, tables.valid, tables.test)]
    assert not (keys[0] & keys[1] or keys[0] & keys[2] or keys[1] & keys[2])
    # one catalogue: the processed dataset's (schema size, candidates.parquet), shared by the three tables
    candidates = pd.read_parquet(datasets / "plain" / "candidates.parquet")[roles.CANDIDATES_COLUMN].to_numpy()
    assert np.array_equal(tables.candidate_ids.numpy(), np.sort(candidates))
    assert tables.train.num_items == tables.valid.num_items == tables.test.num_items == tables.num_items
    assert tables.summary().endswith("test sequences") and f"{len(tables.test.items):,} test" in tables.summary()


def test_prefix_expanded_rows_are_trained_on_never_evaluated(datasets, one_thread):
    from merlin_hstu.retrieval.data import SessionSplits, load_session_splits
    from merlin_hstu.retrieval.train import RetrievalTrainingTask, train_retrieval

    plain = SessionSplits(load_session_splits(datasets / "plain"), max_history=10)
    tables = load_session_splits(datasets / "prefix")
    split = SessionSplits(tables, max_history=10)
    expanded = _plain_samples(datasets / "prefix" / SPLITS_DIR / "train.parquet", 10)
    assert _as_plain(split.train, tables.train.keys) == expanded
    assert len(expanded) == sum(len(s) - 1 for s in plain.tables.train.items)  # prefixes of 2..n events
    # evaluation is untouched by the expansion: the same valid and test samples as without it
    for a, b in ((split.validation, plain.validation), (split.eval, plain.eval)):
        assert np.array_equal(a.ids, b.ids) and np.array_equal(a.lengths, b.lengths)
    # most-popular counts every train session once (its longest prefix = the session), not once per prefix
    once = split.popularity_samples()
    assert np.array_equal(once.ids, plain.train.ids) and np.array_equal(once.lengths, plain.train.lengths)
    # training reads every expanded row (one epoch's batches cover them once), through the one loop
    cfg = _cfg("train.epochs=1", "train.max_steps=2")
    task = RetrievalTrainingTask(split, cfg, torch.device("cpu"))
    rows = torch.cat([b["rows"] for b in task.epoch_batches(0)]).sort().values
    assert torch.equal(rows, torch.arange(len(expanded)))
    result = train_retrieval(tables, cfg, progress=False)
    assert result.fit.steps == 2 and len(result.split.eval.lengths) == len(plain.eval.lengths)


def test_valid_and_test_sessions_are_never_trained_on(datasets, tmp_path, one_thread):
    """Replacing every valid and test item by another catalogue item changes nothing in training (the same losses,
    the same weights), only the validation and test metrics."""
    from merlin_hstu.retrieval.data import load_session_splits
    from merlin_hstu.retrieval.train import train_retrieval

    other = tmp_path / "other"
    shutil.copytree(datasets / "plain", other)
    candidates = pd.read_parquet(other / "candidates.parquet")[roles.CANDIDATES_COLUMN].to_numpy()
    rng = np.random.default_rng(0)
    for name in ("valid", "test"):
        path = other / SPLITS_DIR / f"{name}.parquet"
        table = pq.read_table(path)
        df = table.to_pandas()
        df[roles.ITEM_LIST] = [rng.choice(candidates, size=len(v)) for v in df[roles.ITEM_LIST]]
        pq.write_table(pa.Table.from_pandas(df, preserve_index=False).cast(table.schema), path)
    cfg = _cfg("train.epochs=2")
    a = train_retrieval(load_session_splits(datasets / "plain"), cfg, progress=False)
    b = train_retrieval(load_session_splits(other), cfg, progress=False)
    assert a.epoch_losses == b.epoch_losses and a.fit.step_losses == b.fit.step_losses
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert len(a.fit.validation_metrics) == 2  # the valid sessions were evaluated after each epoch ...
    assert a.fit.validation_metrics != b.fit.validation_metrics  # ... and only they changed
    assert a.metrics["HSTU"] != b.metrics["HSTU"]


def _plain_metrics(model, folder, candidates: np.ndarray, history: int, ks, rank_cap: int) -> dict:
    """Score the test sessions' last items with the trained model and rank them in numpy (history filtered, ties
    by id, the rank capped at rank_cap + 1)."""
    samples = _plain_samples(folder / "test.parquet", history)
    width = max(len(s[1]) for s in samples) + 1
    ids = torch.zeros(len(samples), width, dtype=torch.long)
    ts = torch.zeros(len(samples), width, dtype=torch.long)
    for r, (_, hist, target, times, time) in enumerate(samples):
        ids[r, :len(hist) + 1] = torch.tensor(hist + [target])
        ts[r, :len(hist) + 1] = torch.tensor(times + [time])
    lengths = torch.tensor([len(s[1]) for s in samples])
    with torch.no_grad():
        users = model.last_user_vector(ids, lengths, ts).numpy().astype(np.float64)
        items = model.item_vectors().numpy().astype(np.float64)
    ranks = []
    for r, (_, hist, target, _, _) in enumerate(samples):
        scores = items @ users[r]
        rankable = np.zeros(len(items), dtype=bool)
        rankable[candidates] = True
        rankable[hist] = False
        ahead = (scores > scores[target]) | ((scores == scores[target]) & (np.arange(len(items)) < target))
        ranks.append(min(1 + int((ahead & rankable).sum()), rank_cap + 1))
    ranks = np.asarray(ranks, dtype=np.float64)
    out = {}
    for k in ks:
        out[f"hr@{k}"] = float(np.mean(ranks <= k))
        out[f"ndcg@{k}"] = float(np.mean(np.where(ranks <= k, 1.0 / np.log2(ranks + 1), 0.0)))
    out["mrr"] = float(np.mean(1.0 / ranks))
    return out


def test_cli_trains_on_the_splits_early_stops_on_valid_and_reports_test(datasets, tmp_path, capsys, one_thread):
    from merlin_hstu.cli.main import main
    from merlin_hstu.train.run_dir import load_run

    run = tmp_path / "run"
    sets = [a for o in TINY + ["train.epochs=12", "train.early_stopping_patience=1", "train.learning_rate=0.01"]
            for a in ("--set", o)]
    assert main(["train", "--data", str(datasets / "plain"), "--output", str(run), "--no-progress", *sets]) == 0
    printed = capsys.readouterr().out
    assert "holds the Merlin train / valid / test files, so training uses them (train.split=sessions)" in printed
    assert "train, " in printed and "test sequences" in printed
    record = json.loads((run / "metrics.json").read_text())
    info = json.loads((run / "run.json").read_text())
    split = record["split"]
    plain = {n: len(_plain_samples(datasets / "plain" / SPLITS_DIR / f"{n}.parquet", 10)) for n in ("train", "valid",
                                                                                                   "test")}
    assert {k: split[k] for k in plain} == plain and split["protocol"] == "sessions"
    # early stopping on the valid sessions: stopped after `patience` epochs without a better validation NDCG@10,
    # the kept weights those of the best one
    valid = [m["ndcg@5"] for m in split["validation_metrics"]]
    assert info["stopped_early"] and len(valid) < 12
    best = int(np.argmax(valid))
    assert len(valid) == best + 1 + 1 and best + 1 == info["best_epoch"]
    loaded = load_run(run)
    assert loaded.config.train.split == "sessions"
    model = loaded.model.eval()
    candidates = pd.read_parquet(datasets / "plain" / "candidates.parquet")[roles.CANDIDATES_COLUMN].to_numpy()
    folder = datasets / "plain" / SPLITS_DIR
    # the final metrics are the test sessions', recomputed independently with the saved (best-epoch) model
    expected = _plain_metrics(model, folder, candidates, 10, (5, 10, 50), loaded.config.train.rank_cap)
    got = record["metrics"]["HSTU"]
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-6), key
    # and the best epoch's validation numbers are the valid sessions' with the same weights
    shutil.copytree(datasets / "plain", tmp_path / "as_test")
    shutil.copyfile(folder / "valid.parquet", tmp_path / "as_test" / SPLITS_DIR / "test.parquet")
    on_valid = _plain_metrics(model, tmp_path / "as_test" / SPLITS_DIR, candidates, 10, (5, 10, 50), 2500)
    assert split["validation_metrics"][best]["ndcg@10"] == pytest.approx(on_valid["ndcg@10"], abs=1e-6)
    # `evaluate` on the run repeats the test-session protocol
    assert main(["evaluate", "--run", str(run), "--json", "--no-progress"]) == 0
    out = capsys.readouterr().out
    again = json.loads(out[out.index("{"):])
    assert again["HSTU"]["ndcg@10"] == pytest.approx(got["ndcg@10"], abs=1e-9)


def test_leave_one_out_override_and_errors(datasets, tmp_path, capsys, one_thread):
    from merlin_hstu.cli.main import main
    from merlin_hstu.retrieval.config import load_config
    from merlin_hstu.retrieval.data import load_processed
    from merlin_hstu.retrieval.train import train_retrieval, training_table

    sets = [a for o in TINY + ["train.epochs=1", "train.split=leave_one_out"] for a in ("--set", o)]
    assert main(["train", "--data", str(datasets / "plain"), "--output", str(tmp_path / "loo"), "--no-progress",
                 *sets]) == 0
    printed = capsys.readouterr().out
    assert "train.split=sessions" not in printed and "2,053 sequences" in printed
    assert "split" not in json.loads((tmp_path / "loo" / "metrics.json").read_text())
    # a dataset without splits: the error names the preprocess flag that writes them
    bare = tmp_path / "bare"
    shutil.copytree(datasets / "plain", bare)
    shutil.rmtree(bare / SPLITS_DIR)
    with pytest.raises(ValueError, match=r"has none\. Fix: re-run `merlin-hstu preprocess \.\.\. --split-layout merlin`"):
        training_table(bare, _cfg())
    assert main(["train", "--data", str(bare), "--output", str(tmp_path / "x"), "--set", "train.split=sessions"]) == 2
    assert "--split-layout merlin" in capsys.readouterr().err
    (datasets / "plain" / SPLITS_DIR / "valid.parquet").rename(tmp_path / "valid.parquet")
    try:
        with pytest.raises(ValueError, match=r"split layout without \['valid.parquet'\]"):
            training_table(datasets / "plain", _cfg())
    finally:
        (tmp_path / "valid.parquet").rename(datasets / "plain" / SPLITS_DIR / "valid.parquet")
    with pytest.raises(ValueError, match=r"train.split must be one of \['leave_one_out', 'sessions'\], got 'days'"):
        load_config("demo", ["train.split=days"])
    with pytest.raises(ValueError, match=r"valid sessions .* are the validation split: set train.validation_fraction=0"):
        _cfg("train.validation_fraction=1.0")
    with pytest.raises(ValueError, match=r"train.split=sessions reads the train / valid / test files in memory"):
        _cfg("train.streaming=true")
    with pytest.raises(ValueError, match=r"train.split=sessions but the data is a SequenceTable"):
        train_retrieval(load_processed(datasets / "plain"), _cfg(), progress=False)
    # leave-one-out configs dump as before: no train.split key unless it is set
    assert "split" not in load_config("demo").to_dict()["train"]
    assert _cfg().to_dict()["train"]["split"] == "sessions"


def test_bench_grid_reads_the_splits_with_the_sessions_protocol(datasets, tmp_path, capsys, one_thread):
    import argparse

    from merlin_hstu.bench.grid import experiment_config, grid_configs
    from merlin_hstu.cli.main import main, stopping_overrides
    from merlin_hstu.retrieval.data import load_session_splits
    from merlin_hstu.retrieval.train import train_retrieval

    tiny = ["--epochs", "1", "--dim", "16", "--blocks", "1", "--heads", "1", "--max-history", "10", "--no-progress",
            "--batch-size", "128", "--num-negatives", "16", "--threads", "1"]
    assert main(["bench", "grid", "--dataset", str(datasets / "plain"), "--configs", "hstu-sampled", "--output",
                 str(tmp_path / "g"), *tiny]) == 0
    record = json.loads((tmp_path / "g" / "grid.json").read_text())
    assert record["split"] == "sessions" and "--split sessions" in record["command"]
    assert "Protocol: Merlin session splits" in record["markdown"]
    # the row is train_retrieval on the three files with the row's config
    row = next(r for r in grid_configs() if r.name == "hstu-sampled")
    ns = argparse.Namespace(max_history=10, epochs=1, batch_size=128, num_negatives=16, threads=1, dim=16, blocks=1,
                            heads=1, overrides=[], split="sessions")
    cfg = experiment_config(row, ns)
    cfg.train.seed = 42
    direct = train_retrieval(load_session_splits(datasets / "plain"), cfg, progress=False, model_name=row.name)
    assert record["results"][row.name]["runs"][0]["metrics"]["ndcg@10"] == direct.metrics[row.name]["ndcg@10"]
    # the CLI's epochs-from-the-data on session splits: early stopping on valid, no leave-one-out holdout
    out = stopping_overrides(argparse.Namespace(config=None, overrides=[]), sessions=True)
    assert "train.early_stopping_patience=3" in out and not any("validation_fraction" in o for o in out)
    assert "the valid sessions' last items" in capsys.readouterr().out
