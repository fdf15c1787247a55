"""A retrieval run on raw item ids (no Categorify: `ml-1m-prefix`, MovieLens movie ids kept) exports and serves.

The staged ml-1m-prefix files (shared/data/movielens-1m, via the `shared_data` fixture) are cut to their first ratings
and preprocessed as `merlin-hstu preprocess --dataset ml-1m-prefix` does (the same `preprocess_dataset`, without the
row-count check a slice cannot pass); `merlin-hstu train` runs 3 steps of a tiny `demo` config (which names an action
column the data does not have), then `merlin-hstu export`.  Requests carry raw movie ids, which are the model's ids.
Served top-K equals the eager model ranked by a plain loop over the catalogue (candidates.parquet); `bench serve`
(one tritonserver with this repository and the stock merlin-systems one) answers every request without an error and
with the same lists on all paths.
"""
from __future__ import annotations

import lzma
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from merlin_hstu.cli.main import main

H = 20
SLICE_LINES = 3000  # the first 3,000 ratings: users 1..~20 of ml-1m-prefix
TINY = ["--config", "demo", "--set", "train.epochs=1", "--set", "train.max_steps=3", "--set", f"data.max_history={H}",
        "--set", f"model.max_seq_len={H + 5}", "--set", "model.embedding_dim=16", "--set", "model.attention_dim=8",
        "--set", "model.linear_dim=8", "--set", "train.eval_every=0", "--set", "train.batch_size=16",
        "--set", "train.num_negatives=16", "--set", "train.threads=1"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ml1m(shared_data, tmp_path_factory):
    from merlin_hstu.workflows.datasets import load_dataset, preprocess_dataset

    src = shared_data / "movielens-1m"
    root = tmp_path_factory.mktemp("ml1m_prefix")
    staged = root / "input"
    staged.mkdir()
    with lzma.open(src / "ratings.prefix-487650.dat.xz", "rt", encoding="latin-1") as lines, \
            open(staged / "ratings.prefix-487650.dat", "w", encoding="latin-1") as out:
        for _, line in zip(range(SLICE_LINES), lines):
            out.write(line)
    for name in ("movies.dat.xz", "users.dat.xz"):
        shutil.copy(src / name, staged / name)
    preprocess_dataset("ml-1m-prefix", staged, root / "data", max_length=H + 2, check_counts=False)
    assert not (root / "data" / "workflow" / "categories").exists()  # raw ids: no Categorify statistics
    assert main(["train", "--data", str(root / "data"), "--output", str(root / "run"), "--no-progress", *TINY]) == 0
    assert main(["export", "--run", str(root / "run"), "--output", str(root / "repo")]) == 0
    events = load_dataset("ml-1m-prefix", staged, check_counts=False).events
    return {"root": root, "data": root / "data", "run": root / "run", "repo": root / "repo", "events": events}


def reference_topk(run, data, events: pd.DataFrame, k: int = 10):
    """Eager model + a plain loop: each user's last H events by time (stable), query time = the last event's,
    catalogue = candidates.parquet (raw ids), history excluded, ties by id."""
    from merlin_hstu.retrieval.train import load_run

    model, _, _ = load_run(run)
    catalogue = pd.read_parquet(data / "candidates.parquet")["item_id"].to_numpy()
    ids_out, scores_out = [], []
    for user in pd.unique(events["user_id"]):
        mine = events[events["user_id"] == user]
        mine = mine.iloc[np.argsort(mine["timestamp"].to_numpy(), kind="stable")].iloc[-H:]
        items, times = mine["item_id"].to_numpy(np.int64), mine["timestamp"].to_numpy(np.int64)
        n = len(items)
        ids = torch.zeros(1, n + 1, dtype=torch.long)
        ts = torch.zeros(1, n + 1, dtype=torch.long)
        ids[0, :n], ts[0, :n], ts[0, n] = torch.from_numpy(items), torch.from_numpy(times), int(times[-1])
        with torch.no_grad():
            full = model.score_all_items(ids, torch.tensor([n]), ts)[0].numpy().astype(np.float64)
        scores = np.full_like(full, -np.inf)
        scores[catalogue] = full[catalogue]
        scores[items] = -np.inf
        order = np.lexsort((np.arange(len(scores)), -scores))[:k]
        ids_out.append(order)
        scores_out.append(scores[order])
    return np.array(ids_out), np.array(scores_out)


def test_raw_id_run_exports_and_serves_the_eager_topk(ml1m):
    from merlin_hstu.serving.contract import BadRequest, request_from_events
    from merlin_hstu.serving.repository import open_repository, read_serving_record

    record = read_serving_record(ml1m["repo"])
    contract, served = open_repository(ml1m["repo"])  # what the batched Triton model loads
    assert (contract.item_encoding, contract.max_item_id) == ("raw", 3952)  # movies.dat's largest id
    assert contract.action_column is None and record["candidates"].endswith("candidates.parquet")
    events = ml1m["events"]
    users = pd.unique(events["user_id"])[[0, 3, 7]]
    request = events[events["user_id"].isin(users)]
    ids, scores = served.run([contract.validate(request_from_events(contract, request))])[0]
    want_ids, want_scores = reference_topk(ml1m["run"], ml1m["data"], request)
    np.testing.assert_array_equal(ids, want_ids)  # raw movie ids, no decoding table involved
    np.testing.assert_allclose(scores, want_scores, atol=1e-5, rtol=0)
    # raw ids have no out-of-vocabulary row: anything outside [1, 3952] is a bad request naming the tensor
    for bad in (0, 3953):
        wrong = request.assign(item_id=np.where(np.arange(len(request)) == 1, bad, request["item_id"]))
        with pytest.raises(BadRequest, match=rf"'item_id__values' holds item id {bad}, outside \[1, 3952\]"):
            contract.validate(request_from_events(contract, wrong))


def test_bench_serve_runs_on_a_raw_id_run(ml1m, tmp_path):
    from merlin_hstu.bench.serving import PATHS, BenchConfig, bench_serve

    config = BenchConfig(requests=8, concurrency=2, rounds=1, warmup=2, instances=1, entry_instances=2)
    summary = bench_serve(ml1m["run"], config, work_dir=tmp_path, log=lambda _: None)
    for path in PATHS:
        assert (summary[path]["requests"], summary[path]["errors"]) == (8, 0), path
    agree = summary["agreement"]
    assert agree["compared"] == 8 and agree["same_topk"] + agree["near_ties"] == 8
