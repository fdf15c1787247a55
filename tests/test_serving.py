"""Serving: export -> real tritonserver (`merlin-hstu serve`) -> client; parity, protocol, bad requests, lifecycle.

One module-scoped server (started through the `serve` CLI, stopped by PID) serves the merlin-hstu repository and
the stock merlin-systems repository of a tiny model trained for one epoch on a small synthetic log.  Reference
numbers come from plain implementations written here: the fitted NVTabular workflow run in-process, the eager
PyTorch model, a numpy history window and a plain sort.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import time
from pathlib import Path
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
import pytest
from serving_helpers import cli_server, http_ready
import torch

from merlin_hstu.cli.main import main
from merlin_hstu.serving.client import ServingClient, ServingError, request_from_events
from merlin_hstu.serving.contract import BadRequest
from merlin_hstu.data.synthetic import SyntheticConfig, generate_event_log

H = 12  # history window of the tiny model (the synthetic users have up to 40 events: long histories occur)
TRAIN = ["--set", "train.epochs=1", "--set", f"data.max_history={H}", "--set", f"model.max_seq_len={H + 5}",
         "--set", "model.embedding_dim=16", "--set", "model.attention_dim=8", "--set", "model.linear_dim=8",
         "--set", "train.eval_every=0", "--set", "train.batch_size=64"]


# --- fixtures ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("serving")
    events = generate_event_log(SyntheticConfig(num_users=150, num_items=90, min_events=4, max_events=40, seed=5))
    log = root / "events.parquet"
    events.to_parquet(log)
    assert main(["preprocess", "--input", str(log), "--output", str(root / "data"), *TRAIN]) == 0
    assert main(["train", "--data", str(root / "data"), "--output", str(root / "run"), "--no-progress", *TRAIN]) == 0
    return {"root": root, "events": events, "run": root / "run", "data": root / "data"}


@pytest.fixture(scope="module")
def repos(trained):
    from merlin_hstu.serving.export import ExportConfig, export_repository
    from merlin_hstu.serving.stock import export_stock_repository

    repo = export_repository(trained["run"], trained["root"] / "repo", ExportConfig(top_k=10, entry_instances=4))
    stock = export_stock_repository(trained["run"], trained["root"] / "stock_repo", top_k=10)
    return repo, stock


@pytest.fixture(scope="module")
def server(repos, tmp_path_factory):
    """`merlin-hstu serve` as a subprocess on free ports >= 18000; stopped by PID (SIGTERM, then SIGKILL)."""
    with cli_server(list(repos), tmp_path_factory.mktemp("serve") / "serve.log") as handle:
        yield handle


@pytest.fixture(scope="module")
def client(server):
    with ServingClient(server["http"]) as c:
        yield c


@pytest.fixture(scope="module")
def reference(trained):
    """The independent reference: full fitted workflow in-process + eager model + plain ranking."""
    from merlin_hstu.retrieval.train import load_run
    from merlin_hstu.workflows.session_workflow import (
        SessionWorkflowConfig,
        load_item_id_mapping,
        load_serving_workflow,
        normalize_event_log,
    )

    model, cfg, record = load_run(trained["run"])
    workflow = load_serving_workflow(record["workflow"])
    mapping = load_item_id_mapping(record["workflow"])
    wf_cfg = SessionWorkflowConfig(max_length=cfg.data.max_history + 2)

    def topk(events: pd.DataFrame, k: int = 10, query: dict | None = None, exclude: bool = True):
        users = list(pd.unique(events["user_id"]))
        sessions = workflow._transform_df(normalize_event_log(events, wf_cfg)).set_index("user_id")
        ids_out, scores_out = [], []
        for user in users:
            items = np.asarray(sessions.loc[user, "item_id-list"], dtype=np.int64)[-H:]
            times = np.asarray(sessions.loc[user, "timestamp-list"], dtype=np.int64)[-H:]
            n = len(items)
            ids = torch.zeros(1, n + 1, dtype=torch.long)
            ts = torch.zeros(1, n + 1, dtype=torch.long)
            ids[0, :n], ts[0, :n] = torch.from_numpy(items), torch.from_numpy(times)
            ts[0, n] = int(query[user]) if query else int(times[-1])
            with torch.no_grad():
                scores = model.score_all_items(ids, torch.tensor([n]), ts)[0].numpy().astype(np.float64)
            scores[:3] = -np.inf
            if exclude:
                scores[items] = -np.inf
            order = np.lexsort((np.arange(len(scores)), -scores))[:k]  # by score, ties by id
            ids_out.append([mapping[i] for i in order])
            scores_out.append(scores[order])
        return np.array(ids_out, dtype=np.int64), np.array(scores_out)

    return {"topk": topk, "model": model, "cfg": cfg, "record": record, "mapping": mapping}


def _users(events: pd.DataFrame, picks) -> pd.DataFrame:
    users = pd.unique(events["user_id"])
    chosen = [users[i] for i in picks]
    return events[events["user_id"].isin(chosen)]


# --- no server needed -------------------------------------------------------------------------------
def test_scorer_matches_eager_model_on_jagged_batches(trained, reference):
    from merlin_hstu.serving.scorer import build_scorer, rankable_mask

    model = reference["model"]
    scorer = build_scorer(model, H, rankable_mask(model.config.num_items))
    rng = np.random.default_rng(0)
    for batch in (1, 4, 9):
        counts = rng.integers(1, 3 * H, batch)  # some rows longer than the window
        values = torch.from_numpy(rng.integers(3, model.config.num_items, counts.sum()))
        offsets = torch.from_numpy(np.concatenate([[0], np.cumsum(counts)]))
        times = torch.from_numpy(np.sort(rng.integers(1_600_000_000, 1_600_100_000, counts.sum())))
        query = torch.from_numpy(np.where(rng.random(batch) < 0.5, -1, 1_600_200_000))
        exclude = torch.from_numpy(rng.random(batch) < 0.5)
        scores, ids = scorer(values, offsets, times, query, 7, exclude)
        for b in range(batch):
            lo, hi = int(offsets[b]), int(offsets[b + 1])
            hist, t = values[lo:hi][-H:], times[lo:hi][-H:]
            n = len(hist)
            padded_ids = torch.cat([hist, torch.zeros(1, dtype=torch.long)]).unsqueeze(0)
            q = int(t[-1]) if query[b] < 0 else int(query[b])
            padded_t = torch.cat([t, torch.tensor([q])]).unsqueeze(0)
            with torch.no_grad():
                full = model.score_all_items(padded_ids, torch.tensor([n]), padded_t)[0]
            full[:3] = float("-inf")
            if exclude[b]:
                full[hist] = float("-inf")
            expected = torch.topk(full, 7)
            assert torch.equal(ids[b], expected.indices), f"row {b} of batch {batch}"
            assert torch.allclose(scores[b], expected.values, atol=1e-5)


def test_contract_rejects_bad_requests_with_named_errors(trained, repos):
    from merlin_hstu.serving.export import read_serving_record
    from merlin_hstu.serving.contract import contract_from_dict

    contract = contract_from_dict(read_serving_record(repos[0])["contract"])
    good = request_from_events(contract, _users(trained["events"], [0, 1]))
    assert contract.validate(good).batch_size == 2

    def rejects(change, *needles):
        arrays = {k: v.copy() for k, v in good.items()}
        change(arrays)
        with pytest.raises(BadRequest) as info:
            contract.validate(arrays)
        for needle in needles:
            assert needle in str(info.value), str(info.value)

    rejects(lambda a: a.pop("timestamp__values"), "missing", "timestamp__values")
    rejects(lambda a: a.__setitem__("item_id__values", a["item_id__values"].astype(np.float32)),
            "item_id__values", "integers")
    rejects(lambda a: a.__setitem__("timestamp__offsets", np.array([0, 1, len(a["timestamp__values"])], np.int32)),
            "ragged lists differ", "timestamp")
    rejects(lambda a: a.__setitem__("item_id__offsets", a["item_id__offsets"][:-1]), "item_id__offsets", "B + 1")
    rejects(lambda a: a.__setitem__("top_k", np.array([contract.max_k + 1], np.int32)), "top_k", "out of range")
    rejects(lambda a: a.__setitem__("query_timestamp", np.array([-5, 3], np.int64)), "query_timestamp", "negative")
    rejects(lambda a: a.pop("action__offsets"), "action__values", "partner")
    rejects(lambda a: a.__setitem__("bogus", np.zeros(1)), "unexpected", "bogus")
    empty = {k: v.copy() for k, v in good.items()}
    first = int(empty["item_id__offsets"][1])
    for col in ("item_id", "action", "timestamp"):
        empty[f"{col}__values"] = empty[f"{col}__values"][first:]
        empty[f"{col}__offsets"] = np.concatenate([[0, 0], empty[f"{col}__offsets"][2:] - first]).astype(np.int32)
    with pytest.raises(BadRequest, match="empty history"):
        contract.validate(empty)
    with pytest.raises(BadRequest, match="leading dimension of 1"):
        contract.validate(good, batched=True)


def test_export_is_self_contained(trained, tmp_path):
    """The repository serves after the run and its dataset are gone: nothing points back at training files,
    and ensemble.pkl holds no model or workflow (they are TorchScript / Workflow.save artifacts)."""
    from merlin_hstu.serving.contract import contract_from_dict
    from merlin_hstu.serving.core import ServingEnsemble
    from merlin_hstu.serving.export import export_repository, read_serving_record

    data, run = tmp_path / "data", tmp_path / "run"
    shutil.copytree(trained["data"], data)
    shutil.copytree(trained["run"], run)
    record = json.loads((run / "metrics.json").read_text())
    record.update(data=str(data), workflow=str(data / "workflow"))
    (run / "metrics.json").write_text(json.dumps(record))
    repo = export_repository(run, tmp_path / "repo")
    assert not any(p.name.startswith(".repo") for p in tmp_path.iterdir())  # no staging directory left
    with pytest.raises(FileExistsError, match="overwrite"):
        export_repository(run, tmp_path / "repo")
    shutil.rmtree(data)
    shutil.rmtree(run)
    ensemble_dir = repo / "hstu_topk_batched" / "1" / "ensemble"
    assert (ensemble_dir / "ensemble.pkl").stat().st_size < 200_000
    assert {"hstu_scorer.pt", "item_id_mapping.parquet", "workflow"} <= {p.name for p in ensemble_dir.iterdir()}
    contract = contract_from_dict(read_serving_record(repo)["contract"])
    served = ServingEnsemble.load(ensemble_dir, contract)
    ids, scores = served.run([contract.validate(request_from_events(contract, _users(trained["events"], [3])))])[0]
    assert ids.shape == (1, 10) and np.all(np.diff(scores[0]) <= 0)


def test_string_ids_without_timestamps_in_process(tmp_path):
    """A log with string user/item ids and no timestamps: the export serves raw string ids, no query time."""
    from merlin_hstu.retrieval.data import load_processed
    from merlin_hstu.serving.contract import contract_from_dict
    from merlin_hstu.serving.core import ServingEnsemble
    from merlin_hstu.serving.export import export_repository, read_serving_record
    from merlin_hstu.retrieval.train import load_run

    events = generate_event_log(SyntheticConfig(num_users=60, num_items=80, min_events=4, max_events=20, seed=9))
    events = events.drop(columns=["timestamp"]).assign(user_id=lambda d: "u" + d["user_id"].astype(str),
                                                        item_id=lambda d: "i" + d["item_id"].astype(str))
    events.to_csv(tmp_path / "log.csv", index=False)
    no_time = [*TRAIN, "--set", "data.timestamp_column=null", "--set", "model.time_bias=false"]
    assert main(["preprocess", "--input", str(tmp_path / "log.csv"), "--output", str(tmp_path / "data"), *no_time]) == 0
    assert main(["train", "--data", str(tmp_path / "data"), "--output", str(tmp_path / "run"), "--no-progress",
                 *no_time]) == 0
    repo = export_repository(tmp_path / "run", tmp_path / "repo")
    contract = contract_from_dict(read_serving_record(repo)["contract"])
    assert (contract.id_dtype, contract.item_dtype, contract.timestamp_column) == ("string", "string", None)
    served = ServingEnsemble.load(repo / "hstu_topk_batched" / "1" / "ensemble", contract)
    table = load_processed(tmp_path / "data")
    rows = [0, 7, 19]
    users = [table.keys[r] for r in rows]
    request = contract.validate(request_from_events(contract, events[events["user_id"].isin(users)]))
    ids, _ = served.run([request])[0]
    model, _, record = load_run(tmp_path / "run")
    from merlin_hstu.workflows.session_workflow import load_item_id_mapping

    mapping = load_item_id_mapping(record["workflow"])
    order = list(pd.unique(events[events["user_id"].isin(users)]["user_id"]))
    for b, user in enumerate(order):
        hist = torch.from_numpy(table.items[list(table.keys).index(user)][-H:])
        with torch.no_grad():
            scores = model.score_all_items(torch.cat([hist, torch.zeros(1, dtype=torch.long)])[None],
                                           torch.tensor([len(hist)]))[0]
        scores[:3] = float("-inf")
        scores[hist] = float("-inf")
        assert ids[b].tolist() == [mapping[i] for i in torch.topk(scores, 10).indices.tolist()]


def test_mol_run_exports_and_serves_the_offline_topk(tmp_path):
    """A mixture-of-logits run through the same export path: the served raw ids are the offline top-K module's
    ids (history filtered) mapped back to raw ids, and the TorchScript scorer gives the offline scores."""
    from merlin_hstu.retrieval.data import load_processed
    from merlin_hstu.serving.contract import contract_from_dict
    from merlin_hstu.serving.core import ServingEnsemble
    from merlin_hstu.serving.export import export_repository, read_serving_record
    from merlin_hstu.retrieval.topk import rankable_from_invalid
    from merlin_hstu.retrieval.train import load_run
    from merlin_hstu.workflows.session_workflow import load_item_id_mapping

    events = generate_event_log(SyntheticConfig(num_users=60, num_items=80, min_events=4, max_events=25, seed=11))
    events.to_parquet(tmp_path / "log.parquet")
    mol = [*TRAIN, "--set", "head.similarity=mol", "--set", "head.query_norm=layer_norm", "--set", "head.item_norm=none",
           "--set", "head.mol.query_hidden_dim=16", "--set", "head.mol.component_dim=8", "--set", "head.topk_chunk_size=32",
           "--set", "train.temperature=1.0", "--set", "train.mi_loss_weight=0.001"]
    assert main(["preprocess", "--input", str(tmp_path / "log.parquet"), "--output", str(tmp_path / "data"), *mol]) == 0
    assert main(["train", "--data", str(tmp_path / "data"), "--output", str(tmp_path / "run"), "--no-progress", *mol]) == 0
    repo = export_repository(tmp_path / "run", tmp_path / "repo")
    record = read_serving_record(repo)
    assert record["model"]["head"]["similarity"] == "mol"
    contract = contract_from_dict(record["contract"])
    served = ServingEnsemble.load(repo / "hstu_topk_batched" / "1" / "ensemble", contract)
    model, _, run_record = load_run(tmp_path / "run")
    assert model.head.is_mol
    mapping = load_item_id_mapping(run_record["workflow"])
    table = load_processed(tmp_path / "data")
    topk = model.topk(rankable_from_invalid(model.config.num_items, (0, 1, 2)))
    users = [table.keys[r] for r in (0, 9, 33)]
    request = contract.validate(request_from_events(contract, events[events["user_id"].isin(users)]))
    ids, scores = served.run([request])[0]
    for b, user in enumerate(pd.unique(events[events["user_id"].isin(users)]["user_id"])):
        row = list(table.keys).index(user)
        hist = torch.from_numpy(table.items[row][-H:].copy())
        times = torch.from_numpy(table.timestamps[row][-H:].copy())
        n = len(hist)
        with torch.no_grad():
            query = model.last_user_vector(torch.cat([hist, torch.zeros(1, dtype=torch.long)])[None],
                                           torch.tensor([n]), torch.cat([times, times[-1:]])[None])
            want_scores, want_ids = topk(query, 10, exclude=hist[None])
        assert ids[b].tolist() == [mapping[i] for i in want_ids[0].tolist()], f"user {user}"
        np.testing.assert_allclose(scores[b], want_scores[0].numpy(), rtol=1e-5, atol=1e-5)


def test_server_start_errors_explain_the_problem(tmp_path):
    from merlin_hstu.serving.server import ServerConfig, ServerStartError, TritonServer

    with pytest.raises(ServerStartError, match="does not exist"):
        TritonServer(ServerConfig([tmp_path / "nope"], http_port=0, grpc_port=0)).start()
    broken = tmp_path / "broken_repo" / "broken" / "1"
    broken.mkdir(parents=True)
    (broken.parent / "config.pbtxt").write_text('name: "broken"\nbackend: "python"\nmax_batch_size: 0\n'
                                                'input [ { name: "x" data_type: TYPE_INT64 dims: [ -1 ] } ]\n'
                                                'output [ { name: "y" data_type: TYPE_INT64 dims: [ -1 ] } ]\n')
    (broken / "model.py").write_text("raise RuntimeError('boom: this model cannot load')\n")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(ServerStartError, match=f"port {taken.getsockname()[1]}.*--http-port.*held by pid "
                                                   f"{os.getpid()} "):
            TritonServer(ServerConfig([broken.parent.parent], http_port=taken.getsockname()[1], grpc_port=0)).start()
    server = TritonServer(ServerConfig([broken.parent.parent], http_port=0, grpc_port=0, startup_timeout_s=120))
    with pytest.raises(ServerStartError) as info:
        server.start()
    assert "boom: this model cannot load" in str(info.value) and "broken" in str(info.value)
    assert server.process.poll() is not None  # nothing left running


# --- against the real server ------------------------------------------------------------------------
def test_served_topk_equals_workflow_plus_eager_model(trained, client, server, reference):
    events = _users(trained["events"], [0, 5, 17, 42, 99])
    expected_ids, expected_scores = reference["topk"](events)
    recs = client.recommend(events)
    assert list(recs.user_ids) == list(pd.unique(events["user_id"]))
    np.testing.assert_array_equal(recs.item_ids, expected_ids)
    np.testing.assert_allclose(recs.scores, expected_scores, atol=1e-5)
    # the same through the plain ragged model, over gRPC
    with ServingClient(server["grpc"], endpoint="ragged") as grpc_client:
        recs = grpc_client.recommend(events)
    np.testing.assert_array_equal(recs.item_ids, expected_ids)
    np.testing.assert_allclose(recs.scores, expected_scores, atol=1e-5)
    # query time and history filtering are honoured
    query = {u: 1_800_000_000 for u in pd.unique(events["user_id"])}
    ids, scores = reference["topk"](events, k=15, query=query, exclude=False)
    recs = client.recommend(events, query_timestamps=query, top_k=15, exclude_history=False)
    np.testing.assert_array_equal(recs.item_ids, ids)
    np.testing.assert_allclose(recs.scores, scores, atol=1e-5)


def test_hr10_through_server_equals_offline_evaluation(trained, client, reference):
    """Held-out protocol through the server: history = events before each user's last one, query time = the
    target's time.  The evaluation ranks the target even when it is in the history window, so for those users
    an unfiltered top-(10 + H) list is fetched and the window's other items removed client-side."""
    from merlin_hstu.retrieval.data import LeaveOneOut, history_window, load_processed
    from merlin_hstu.retrieval.metrics import target_ranks

    table = load_processed(trained["data"])
    split = LeaveOneOut(table, max_history=H)
    rows = np.arange(0, len(split.eval.lengths), 2)[:50]  # a held-out sample of 50 users
    batch = {"ids": torch.from_numpy(split.eval.ids[rows]), "lengths": torch.from_numpy(split.eval.lengths[rows]),
             "timestamps": torch.from_numpy(split.eval.timestamps[rows])}
    targets = batch["ids"][torch.arange(len(rows)), batch["lengths"]]
    with torch.no_grad():
        scores = reference["model"].score_all_items(batch["ids"], batch["lengths"], batch["timestamps"])
    offline_hits = (target_ranks(scores, targets, history_window(batch), invalid_ids=(0, 1, 2)) <= 10).numpy()

    mapping = reference["mapping"]
    keys = table.keys[split.eval.rows[rows]]
    log = trained["events"]
    log = log.iloc[np.argsort(log["timestamp"].to_numpy(), kind="stable")]
    history, query, target_raw, window_raw = [], {}, {}, {}
    for key, row, target in zip(keys, rows, targets.tolist()):
        user = log[log["user_id"] == key]
        history.append(user.iloc[:-1])
        query[key] = int(user["timestamp"].iloc[-1])
        target_raw[key] = mapping[target]
        assert user["item_id"].iloc[-1] == target_raw[key]
        window_raw[key] = {mapping[i] for i in split.eval.ids[row, : split.eval.lengths[row]]}
    history = pd.concat(history)
    filtered = client.recommend(history, query_timestamps=query, top_k=10)
    unfiltered = client.recommend(history, query_timestamps=query, top_k=10 + H, exclude_history=False)
    served_hits, repeats = [], 0
    for b, key in enumerate(keys):
        target = target_raw[key]
        if target in window_raw[key]:
            repeats += 1
            ranked = [i for i in unfiltered.item_ids[b] if i == target or i not in window_raw[key]][:10]
            served_hits.append(target in ranked)
        else:
            served_hits.append(target in filtered.item_ids[b])
    np.testing.assert_array_equal(np.array(served_hits), offline_hits)
    assert 0 < offline_hits.sum() < len(rows)  # the comparison is not vacuous


def test_bad_requests_get_error_responses_and_server_stays_ready(trained, client, server):
    good = request_from_events(client.contract, _users(trained["events"], [0, 1]))

    def expect_error(model, arrays, *needles):
        with pytest.raises(ServingError) as info:
            client.send(model, arrays)
        for needle in needles:
            assert needle in str(info.value), str(info.value)

    public, batched = client.contract.model_name, client.contract.batched_model_name
    no_ts = {k: v for k, v in good.items() if k != "timestamp__values"}
    expect_error(public, no_ts, "timestamp__values")  # Triton names the missing input
    wrong = dict(good, item_id__values=good["item_id__values"].astype(np.float32))
    expect_error(public, wrong, "item_id__values", "FP32")
    ragged = dict(good, timestamp__offsets=np.array([0, 1, len(good["timestamp__values"])], np.int32))
    expect_error(public, ragged, "ragged lists differ", "[400]")  # INVALID_ARG, not an internal error
    first = int(good["item_id__offsets"][1])
    empty = dict(good)
    for col in ("item_id", "action", "timestamp"):
        empty[f"{col}__values"] = good[f"{col}__values"][first:]
        empty[f"{col}__offsets"] = np.concatenate([[0, 0], good[f"{col}__offsets"][2:] - first]).astype(np.int32)
    expect_error(public, empty, "empty history")
    expect_error(public, dict(good, top_k=np.array([10_000], np.int32)), "top_k", "out of range")
    wire = client.contract.validate(good).to_wire(client.contract)
    expect_error(batched, {k: np.stack([v, v]) for k, v in wire.items()}, "leading dimension of 1")
    # a bad request in the same batch as good ones does not fail its neighbours
    events = _users(trained["events"], [7])
    with ThreadPoolExecutor(4) as pool:
        bad = [pool.submit(client.send, public, ragged) for _ in range(3)]
        fine = [pool.submit(client.recommend, events) for _ in range(3)]
        for f in bad:
            with pytest.raises(ServingError, match="ragged lists differ"):
                f.result()
        results = [f.result().item_ids for f in fine]
    assert all(np.array_equal(r, results[0]) for r in results)
    assert client.is_ready() and http_ready(server["http"])


def test_documented_behaviours_unknown_ids_long_histories_batches(trained, client, reference):
    events = _users(trained["events"], [3, 8, 11])
    # unknown item ids (and actions) map to the OOV id: served like the in-process workflow does it
    unknown = events.copy()
    unknown.iloc[::4, unknown.columns.get_loc("item_id")] = 987_654_321
    unknown.iloc[::3, unknown.columns.get_loc("action")] = "never-seen-action"
    expected_ids, _ = reference["topk"](unknown)
    recs = client.recommend(unknown)
    np.testing.assert_array_equal(recs.item_ids, expected_ids)
    assert 987_654_321 not in recs.item_ids
    # a history longer than the window keeps its most recent H events
    user = events[events["user_id"] == events["user_id"].iloc[0]].sort_values("timestamp", kind="stable")
    assert len(user) > H
    np.testing.assert_array_equal(client.recommend(user).item_ids, client.recommend(user.iloc[-H:]).item_ids)
    # a batch of several users = each user alone; the same user twice gets two independent rows
    together = client.recommend(events)
    for b, uid in enumerate(together.user_ids):
        alone = client.recommend(events[events["user_id"] == uid])
        np.testing.assert_array_equal(alone.item_ids[0], together.item_ids[b])
    twice = pd.concat([user, user.assign(user_id=-1)])
    recs = client.recommend(twice)
    np.testing.assert_array_equal(recs.item_ids[0], recs.item_ids[1])


def test_concurrent_mixed_requests_are_batched_but_answered_individually(trained, client):
    """Requests with different users, K and history settings share batches in the server; each answer must
    equal the same request sent alone."""
    cases = [(_users(trained["events"], [i, i + 20]), 5 + i % 4, bool(i % 2)) for i in range(16)]
    alone = [client.recommend(ev, top_k=k, exclude_history=ex).item_ids for ev, k, ex in cases]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda c: client.recommend(c[0], top_k=c[1], exclude_history=c[2]).item_ids, cases))
    for a, t, (_, k, _) in zip(alone, together, cases):
        assert t.shape == (2, k)
        np.testing.assert_array_equal(a, t)


def test_stock_merlin_systems_path_agrees_and_load_runs_clean(trained, client, server, repos):
    import tritonclient.http as th

    from merlin_hstu.bench.serving import _infer_inputs, _stock_arrays, run_load

    events = trained["events"]
    users = pd.unique(events["user_id"])[:12]
    stock_inputs = [_infer_inputs(th, _stock_arrays(client.contract, events[events["user_id"] == u])) for u in users]
    mapping = json.loads((repos[0] / "serving.json").read_text())["workflow"]
    from merlin_hstu.workflows.session_workflow import load_item_id_mapping

    raw = load_item_id_mapping(mapping)
    answers = {}

    def send(c, i):
        answers[i] = c.infer("executor_model", stock_inputs[i]).as_numpy("item_ids")[0]

    result = run_load(send, lambda: th.InferenceServerClient(server["http"]), list(range(len(users))), 4)
    assert result.errors == [] and len(result.latencies_s) == len(users)
    for i, u in enumerate(users):
        ours = client.recommend(events[events["user_id"] == u]).item_ids[0]
        assert [raw[int(v)] for v in answers[i]] == ours.tolist()


def test_cli_query_prints_served_recommendations(trained, client, server, tmp_path, capsys):
    events = _users(trained["events"], [2, 4])
    path = tmp_path / "events.csv"
    events.to_csv(path, index=False)
    capsys.readouterr()
    assert main(["query", "--url", server["http"], "--events", str(path), "--json", "--top-k", "6"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    recs = client.recommend(events, top_k=6)
    assert [line["user_id"] for line in lines] == list(recs.user_ids)
    assert [line["item_ids"] for line in lines] == recs.item_ids.tolist()
    assert main(["query", "--url", server["http"], "--events", str(path), "--top-k", "100000"]) == 2
    assert "top_k" in capsys.readouterr().err


def test_demo_serving_exports_serves_queries_and_stops(trained, tmp_path, capsys):
    from merlin_hstu.serving import demo_serving

    demo_serving(trained["run"], tmp_path, _users(trained["events"], [1, 2, 3, 4]), k=5)
    out = capsys.readouterr().out
    served = [line for line in out.splitlines() if "served user" in line]
    assert len(served) == 3 and all(line.count(",") >= 4 for line in served)
    assert "tritonserver stopped" in out and (tmp_path / "triton_repo" / "serving.json").is_file()


@pytest.mark.parametrize("command", [["export"], ["serve"], ["query"], ["bench", "serve"]])
def test_serving_subcommands_have_help(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([*command, "--help"])
    assert info.value.code == 0
    assert f"merlin-hstu {' '.join(command)}" in capsys.readouterr().out


def test_serve_stops_cleanly_on_sigterm(server, client):
    """Last test of the module: the `serve` process forwards SIGTERM as a graceful tritonserver shutdown.
    (tritonserver first waits for open HTTP connections, so every client here is closed first.)"""
    client.close()
    proc = server["proc"]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=70) == 0
    text = server["log"].read_text()
    assert "ready: HTTP http://127.0.0.1:" in text
    assert "stopped (tritonserver exit code 0)" in text, text[-3000:]
    with pytest.raises(ProcessLookupError):
        os.kill(server["triton_pid"], 0)


def test_free_ports_avoid_the_ephemeral_range_and_garbled_probes_mean_not_ready(tmp_path):
    """A readiness probe to a port in the ephemeral range can connect to itself and read its own request back
    (http.client.BadStatusLine); ports come from below that range, and such an answer counts as "not ready"."""
    import threading

    from merlin_hstu.serving.server import ServerConfig, TritonServer, _ephemeral_range_start, free_port

    ports = {free_port() for _ in range(20)}
    assert all(20000 <= p < _ephemeral_range_start() for p in ports)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as echo:  # answers with the request it got
        echo.bind(("127.0.0.1", 0))
        echo.listen(1)

        def serve_once():
            conn, _ = echo.accept()
            with conn:
                conn.sendall(conn.recv(4096))

        thread = threading.Thread(target=serve_once, daemon=True)
        thread.start()
        server = TritonServer(ServerConfig([tmp_path], http_port=echo.getsockname()[1], grpc_port=0))
        assert server.is_ready() is False
        thread.join(timeout=5)


def test_killed_launcher_takes_tritonserver_and_its_temp_folder_with_it(tmp_path):
    """SIGKILL of `merlin-hstu serve` (no handler runs): the watchdog stops tritonserver's whole process group,
    removes the temporary backend folder, and the ports are free again."""
    model = tmp_path / "repo" / "echo"
    (model / "1").mkdir(parents=True)
    (model / "config.pbtxt").write_text('name: "echo"\nbackend: "python"\nmax_batch_size: 0\n'
                                        'input [ { name: "x" data_type: TYPE_INT64 dims: [ -1 ] } ]\n'
                                        'output [ { name: "y" data_type: TYPE_INT64 dims: [ -1 ] } ]\n')
    (model / "1" / "model.py").write_text(
        "import triton_python_backend_utils as pb\n"
        "class TritonPythonModel:\n"
        "    def execute(self, requests):\n"
        "        return [pb.InferenceResponse([pb.Tensor('y', pb.get_input_tensor_by_name(r, 'x').as_numpy())])\n"
        "                for r in requests]\n")
    with cli_server(["--repo", tmp_path / "repo"], tmp_path / "serve.log") as handle:
        triton = handle["triton_pid"]
        cmdline = Path(f"/proc/{triton}/cmdline").read_bytes().split(b"\0")
        backend_dir = Path(next(a for a in cmdline if a.startswith(b"--backend-directory=")).split(b"=", 1)[1].decode())
        assert backend_dir.is_dir()
        handle["proc"].kill()  # SIGKILL: the launcher's own cleanup never runs
        handle["proc"].wait(timeout=10)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                os.killpg(triton, 0)  # the server or any of its stubs still alive
            except ProcessLookupError:
                break
            time.sleep(0.5)
        with pytest.raises(ProcessLookupError):
            os.killpg(triton, 0)
        for _ in range(20):  # the watchdog removes the folder right after the group is gone
            if not backend_dir.exists():
                break
            time.sleep(0.25)
        assert not backend_dir.exists()
        assert not http_ready(handle["http"])
        port = int(handle["http"].rsplit(":", 1)[1])
        with socket.socket() as s:
            # SO_REUSEADDR as servers bind (tritonserver does): TIME_WAIT connections of the probes above do not
            # count, a live listener still does
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", port))  # free again
