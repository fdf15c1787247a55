"""Ranking training loop, evaluation, baselines and the `bench --task ranking` command, on small in-memory
datasets (no NVTabular): evaluation against plain per-task loops, the baseline's pooled history against a loop,
learning a learnable synthetic task, bit-for-bit seeded runs, and the bench's outputs and errors."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from merlin_hstu.common import schema as roles
from merlin_hstu.cli.main import main
from merlin_hstu.ranking.baselines import DlrmBaseline, DlrmBaselineConfig, ItemPriorBaseline, build_dlrm_baseline
from merlin_hstu.ranking.batch import RankingTask
from merlin_hstu.ranking.data import (
    CANDIDATE_ACTION_LIST,
    CANDIDATE_ITEM_LIST,
    CANDIDATE_WATCH_TIME_LIST,
    QUERY_TIME,
    WATCH_TIME_LIST,
    RankingDataset,
)
from merlin_hstu.ranking.train import RankingTrainConfig, evaluate_ranking, train_ranking
from test_ranking_metrics import loop_gauc, pairwise_auc

NUM_ITEMS = 40  # ids 3..39 are real items


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def synthetic_frame(num_users: int = 120, k: int = 4, seed: int = 0):
    """Users with random histories; a candidate is 'good' (bit 0) when its item id is even, 'great' (bit 1) when
    it is also < 20 - learnable from the candidate item alone. Watch time = 2 * bit0 + noise."""
    rng = np.random.default_rng(seed)
    rows = []
    for user in range(num_users):
        n = int(rng.integers(3, 15))
        items = rng.integers(3, NUM_ITEMS, n + k)
        good = (items % 2 == 0).astype(np.int64)
        great = good & (items < 20)
        actions = good | (great << 1)
        watch = 2.0 * good + rng.random(n + k)
        times = np.sort(rng.integers(0, 10_000, n + k))
        rows.append({
            "user_id": 1000 + user,
            roles.ITEM_LIST: items[:n], roles.ACTION_LIST: actions[:n], roles.TIMESTAMP_LIST: times[:n],
            WATCH_TIME_LIST: watch[:n], CANDIDATE_ITEM_LIST: items[n:], CANDIDATE_ACTION_LIST: actions[n:],
            CANDIDATE_WATCH_TIME_LIST: watch[n:], QUERY_TIME: int(times[:n].max()), roles.LENGTH: n,
            "num_candidates": k, "context-age": int(rng.integers(3, 8)),
        })
    meta = {"format_version": 1, "user_column": "user_id", "num_candidates": k, "max_uih_len": 20, "min_uih_len": 1,
            "num_items": NUM_ITEMS, "action_names": ["good", "great"], "has_watch_time": True,
            "tasks": [{"name": "good", "kind": "binary", "bit": 0, "weight": 1.0},
                      {"name": "great", "kind": "binary", "bit": 1, "weight": 1.0}],
            "contextual_cardinalities": {"age": 8}, "split": {"kind": "users", "test_fraction": 0.25, "seed": 0}}
    return pd.DataFrame(rows), meta


@pytest.fixture(scope="module")
def dataset():
    df, meta = synthetic_frame()
    return RankingDataset.from_frame(df, meta)


def small_baseline(ds, **kwargs) -> DlrmBaseline:
    torch.manual_seed(0)
    return build_dlrm_baseline(ds, {"embedding_dim": 16, "hidden_dims": [32], **kwargs})


class FixedScores(torch.nn.Module):
    """A 'model' whose logits are a fixed function of the candidate item and task (for metric checks)."""

    def forward(self, batch):
        item = batch.candidate_item_ids.double()
        return torch.stack([torch.sin(item * (t + 1)) for t in range(len(batch.tasks))], dim=1)


def test_evaluate_ranking_matches_plain_loops(dataset):
    metrics = evaluate_ranking(FixedScores(), dataset.batches("test", 7))  # batches split users across them
    batch = dataset.batch(dataset.sample_index("test"))
    scores = FixedScores()(batch).numpy()
    labels, users = batch.labels.numpy(), batch.user_ids[batch.candidate_row].numpy()
    for t, task in enumerate(dataset.tasks):
        y, s = labels[:, t].tolist(), scores[:, t].tolist()
        p = 1 / (1 + np.exp(-scores[:, t]))
        logloss = float(-np.mean(labels[:, t] * np.log(p) + (1 - labels[:, t]) * np.log(1 - p)))
        base = labels[:, t].mean()
        entropy = -(base * np.log(base) + (1 - base) * np.log(1 - base))
        expected_gauc, counted, _ = loop_gauc(y, s, users.tolist())
        assert metrics[task.name]["auc"] == pytest.approx(pairwise_auc(y, s), abs=1e-12)
        assert metrics[task.name]["gauc"] == pytest.approx(expected_gauc, abs=1e-12)
        assert metrics[task.name]["gauc_users"] == counted
        assert metrics[task.name]["logloss"] == pytest.approx(logloss, rel=1e-6)  # predictions kept as float32
        assert metrics[task.name]["ne"] == pytest.approx(logloss / entropy, rel=1e-6)


def test_regression_task_metrics_and_shape_errors(dataset):
    df, meta = synthetic_frame(num_users=20)
    ds = RankingDataset.from_frame(df, meta, tasks=[RankingTask("watch", "regression")])
    batch = ds.batch(ds.sample_index("all"))
    assert batch.labels[:, 0].tolist() == pytest.approx(np.concatenate(df[CANDIDATE_WATCH_TIME_LIST]).tolist())
    out = evaluate_ranking(FixedScores(), ds.batches("all", 8))
    expected = float(np.mean((FixedScores()(batch)[:, 0].numpy() - batch.labels[:, 0].numpy()) ** 2))
    assert out["watch"]["mse"] == pytest.approx(expected) and out["watch"]["rmse"] == pytest.approx(expected ** 0.5)

    class WrongShape(torch.nn.Module):
        def forward(self, batch):
            return torch.zeros(batch.candidate_item_ids.numel(), 5)

    with pytest.raises(ValueError, match=r"must return \[num candidates, num tasks\]"):
        evaluate_ranking(WrongShape(), dataset.batches("test", 8))


def test_baseline_pooled_history_and_batch_independence(dataset):
    model = small_baseline(dataset).eval()
    samples = dataset.sample_index("test")
    batch = dataset.batch(samples)
    pooled = model.pooled_history(batch)
    for b in range(batch.batch_size):  # plain loop: mean over events of E_item[i] + sum of set bits' vectors
        lo, hi = batch.history_offsets[b], batch.history_offsets[b + 1]
        tokens = []
        for item, action in zip(batch.history_item_ids[lo:hi].tolist(), batch.history_actions[lo:hi].tolist()):
            vec = model.item_embedding.weight[item].clone()
            for bit in range(model.config.num_action_bits):
                if (action >> bit) & 1:
                    vec += model.action_embedding[bit]
            tokens.append(vec)
        torch.testing.assert_close(pooled[b], torch.stack(tokens).mean(0))
    full = model(batch)
    assert full.shape == (batch.candidate_item_ids.numel(), 2)
    # a user's scores do not depend on who else is in the batch
    first = model(dataset.batch(samples.take(np.array([0]))))
    torch.testing.assert_close(full[: first.shape[0]], first)
    with pytest.raises(ValueError, match="contextual_features"):
        build_dlrm_baseline(dataset, {"contextual_features": ["zip"]})
    with pytest.raises(ValueError, match="unknown dlrm-baseline option"):
        build_dlrm_baseline(dataset, {"width": 3})


def test_item_prior_counts_histories_and_training_candidates(dataset):
    prior = ItemPriorBaseline.fit(dataset, alpha=0.0)
    # plain count: every history event of every user + the candidates of training users
    counts, positives = np.zeros(NUM_ITEMS), np.zeros((NUM_ITEMS, 2))
    train = set(dataset.rows("train").tolist())
    for row in range(dataset.num_rows):
        lo, hi = dataset.row_offsets[row], dataset.row_offsets[row + 1]
        end = hi if row in train else lo + dataset.uih_lengths[row]
        for item, action in zip(dataset.items[lo:end], dataset.actions[lo:end]):
            counts[item] += 1
            positives[item] += [action & 1, (action >> 1) & 1]
    seen = counts > 0
    np.testing.assert_allclose(prior.rates[seen].numpy(), positives[seen] / counts[seen, None], rtol=1e-6)
    # never-seen items get the global rate (not 0/0), and a negative smoothing count is refused
    assert torch.isfinite(prior.rates).all()
    with pytest.raises(ValueError, match="alpha must be >= 0"):
        ItemPriorBaseline.fit(dataset, alpha=-1.0)
    metrics = evaluate_ranking(prior, dataset.batches("test", 16))
    assert metrics["good"]["auc"] > 0.99  # the synthetic label is a function of the item


def test_training_learns_and_is_reproducible(dataset):
    cfg = RankingTrainConfig(epochs=4, batch_size=16, learning_rate=3e-3, seed=3)
    logged = []
    first = train_ranking(small_baseline(dataset), dataset, cfg, progress=False,
                          log_epoch=lambda e, loss, m: logged.append((e, loss)))
    assert [e for e, _ in logged] == [1, 2, 3, 4] and len(first.epoch_metrics) == 4
    assert first.epoch_losses[-1] < first.epoch_losses[0]
    assert first.metrics["good"]["auc"] > 0.9 and first.metrics["great"]["auc"] > 0.8
    assert set(first.metrics["good"]) == {"auc", "gauc", "ne", "logloss", "gauc_users"}
    assert len(first.step_times) == 4 * dataset.num_batches("train", 16)
    second = train_ranking(small_baseline(dataset), dataset, cfg, progress=False)
    assert second.epoch_losses == first.epoch_losses  # bit for bit on CPU
    assert second.metrics == first.metrics
    smoke = train_ranking(small_baseline(dataset), dataset,
                          RankingTrainConfig(epochs=3, max_steps=2, eval_every=0), progress=False)
    assert len(smoke.step_times) == 2 and len(smoke.epoch_metrics) == 1


def test_train_config_errors():
    with pytest.raises(ValueError, match="optimizer"):
        RankingTrainConfig(optimizer="sgd")
    with pytest.raises(ValueError, match="batch_size"):
        RankingTrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="dropout"):
        DlrmBaselineConfig(dropout=1.5)


# ---------------------------------------------------------------------------------------------------------
# bench --task ranking
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    """The synthetic frame written as a preprocess-ranking directory (parquet + ranking.json)."""
    path = tmp_path_factory.mktemp("bench") / "synthetic"
    (path / "processed").mkdir(parents=True)
    df, meta = synthetic_frame()
    df.to_parquet(path / "processed" / "part_0.parquet")
    (path / "ranking.json").write_text(json.dumps(meta))
    return path


def test_bench_ranking_baseline_writes_its_record(dataset_dir, tmp_path, capsys):
    out = tmp_path / "bench"
    rc = main(["bench", "--task", "ranking", "--dataset", str(dataset_dir), "--model", "dlrm-baseline",
               "--epochs", "2", "--seeds", "2", "--output", str(out), "--no-progress",
               "--set", "model.embedding_dim=16", "--set", "train.batch_size=16", "--set", "data.train_windows=0"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "epoch   1  loss" in printed and "good: auc" in printed and "item prior (no learning)" in printed
    record = json.loads((out / "bench.json").read_text())
    assert [r["seed"] for r in record["runs"]] == [42, 43]
    assert record["model_config"]["embedding_dim"] == 16 and record["train_config"]["batch_size"] == 16
    assert record["data"]["train_windows"] == 0
    for task in ("good", "great"):
        values = [r["metrics"][task]["auc"] for r in record["runs"]]
        assert record["mean"][task]["auc"] == pytest.approx(np.mean(values))
        assert record["std"][task]["auc"] == pytest.approx(np.std(values, ddof=1))
        assert 0.0 <= record["item_prior"][task]["gauc"] <= 1.0
        assert len(record["runs"][0]["epoch_metrics"]) == 2
    assert record["timing"]["seconds_per_step"] > 0 and record["timing"]["peak_rss_gb"] > 0
    markdown = (out / "bench.md").read_text()
    assert "| dlrm-baseline (mean of 2) |" in markdown and "| good AUC | good GAUC | good NE |" in markdown
    assert "--set data.train_windows=0" in markdown
    pytest.importorskip("matplotlib")
    assert (out / "bench.png").stat().st_size > 0
    # the bench keeps its models: one run directory per seed, loadable like any trained run
    from merlin_hstu.train.run_dir import load_run

    run = load_run(out / "run-seed43")
    assert run.task == "ranking" and run.config.model_type == "dlrm-baseline"
    assert run.record["metrics"] == record["runs"][1]["metrics"]


def test_bench_ranking_dlrm_hstu_smoke(dataset_dir, tmp_path):
    pytest.importorskip("merlin_hstu.ranking.model")
    out = tmp_path / "hstu"
    rc = main(["bench", "--task", "ranking", "--dataset", str(dataset_dir), "--epochs", "1", "--max-steps", "2",
               "--output", str(out), "--no-progress", "--set", "model.embedding_dim=16", "--set", "model.num_blocks=1",
               "--set", "model.max_seq_len=64", "--precision", "bf16", "--device", "cpu"])
    assert rc == 0
    record = json.loads((out / "bench.json").read_text())
    assert record["model"] == "dlrm-hstu" and record["runs"][0]["steps"] == 2
    assert (record["train_config"]["precision"], record["train_config"]["device"]) == ("bf16", "cpu")
    assert set(record["mean"]) == {"good", "great"}


@pytest.mark.parametrize("extra, message", [
    (["--model", "gbdt"], "unknown ranking model 'gbdt'"),
    (["--set", "data.colour=1"], "unknown data option 'colour'"),
    (["--set", "optim.lr=1"], "sections"),
    (["--set", "train.momentum=0.9"], "unknown train"),
    (["--model", "dlrm-baseline", "--set", "model.depth=3"], "unknown dlrm-baseline option"),
])
def test_bench_ranking_errors(dataset_dir, tmp_path, capsys, extra, message):
    rc = main(["bench", "--task", "ranking", "--dataset", str(dataset_dir), "--output", str(tmp_path / "x"),
               "--no-progress", *extra])
    assert rc == 2
    assert message in capsys.readouterr().err


def test_bench_ranking_unknown_dataset(tmp_path, capsys):
    assert main(["bench", "--task", "ranking", "--dataset", "criteo-ranking", "--cache", str(tmp_path)]) == 2
    assert "unknown ranking dataset 'criteo-ranking'" in capsys.readouterr().err
