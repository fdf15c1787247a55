"""Export of a DLRM-HSTU ranking model with its fitted ranking workflow (merlin_hstu.serving.ranking), served by a
real tritonserver and queried with `ServingClient`: served per-task scores equal the offline model's on the test
users, so do the AUCs; unseen raw ids score as the OOV id; bad requests fail with a message naming the field, in
the client (BadRequest) and in the server (HTTP 400)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from merlin_hstu.common import metrics as ranking_metrics
from merlin_hstu.ranking.model import DlrmHSTU, DlrmHSTUConfig
from merlin_hstu.ranking.batch import RankingBatch
from merlin_hstu.ranking.data import RankingDataset
from merlin_hstu.ranking.train import RankingTrainConfig, predict_ranking, train_ranking
from merlin_hstu.serving.client import ServingClient, ServingError
from merlin_hstu.serving.contract import BadRequest
from merlin_hstu.serving.ranking import export_ranking_ensemble
from merlin_hstu.serving.ranking_contract import RankingRequest
from merlin_hstu.serving.repository import read_serving_record
from merlin_hstu.serving.server import ServerConfig, TritonServer
from merlin_hstu.workflows import ranking_workflow as rw

K, MAX_UIH = 3, 8
CONFIG = rw.RankingWorkflowConfig(user_column="uid", item_column="item", timestamp_column="ts",
                                  action_names=("click", "like"), contextual_columns=("age", "country"),
                                  num_candidates=K, max_uih_len=MAX_UIH)


def event_log(num_users: int = 60, seed: int = 0) -> pd.DataFrame:
    """String item ids, some users longer than MAX_UIH + K (their history is truncated), time ties, contextual
    int and string features; clicks on even items, likes on even items below 10."""
    rng = np.random.default_rng(seed)
    rows = []
    for user in range(num_users):
        n = int(rng.integers(2, 16))
        items = rng.integers(0, 25, n)
        times = 1_600_000_000 + rng.integers(0, 50, n) * 3600  # ties happen
        for item, t in zip(items, times):
            click = int(item % 2 == 0)
            rows.append((user, f"v{item}", int(t), click, click & int(item < 10), int(20 + user % 5),
                         ["de", "fr", "us"][user % 3]))
    frame = pd.DataFrame(rows, columns=["uid", "item", "ts", "click", "like", "age", "country"])
    return frame.sample(frac=1.0, random_state=seed).reset_index(drop=True)  # input order != time order


def plain_requests(log: pd.DataFrame, users) -> list:
    """Per user: a stable sort by time, the last min(K, n-1) events are candidates, ALL earlier events the history
    (untruncated: the server keeps the latest MAX_UIH); labels per candidate.  A plain loop, not the workflow."""
    out = []
    for user in users:
        rows = log[log["uid"] == user]
        events = sorted(zip(rows["ts"], range(len(rows)), rows["item"], rows["click"], rows["like"]))
        c = min(K, len(events) - 1)
        hist, cands = events[:-c], events[-c:]
        request = RankingRequest(history_item_ids=[e[2] for e in hist],
                                 history_actions=[e[3] | (e[4] << 1) for e in hist],
                                 history_timestamps=[int(e[0]) for e in hist],
                                 candidate_item_ids=[e[2] for e in cands],
                                 contextual={"age": int(rows["age"].iloc[0]), "country": rows["country"].iloc[0]})
        out.append((request, np.array([[e[3], e[4]] for e in cands], dtype=np.float32)))
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("ranking_export")
    log = event_log()
    processed = rw.preprocess_ranking(log, root / "data", CONFIG)
    ds = RankingDataset.load(processed.output_dir)
    config = DlrmHSTUConfig(embedding_dim=8, num_blocks=2, num_heads=2, attention_dim=4, linear_dim=4,
                            max_seq_len=2 + MAX_UIH + K, action_embedding_dim=3, dropout=0.0, input_dropout=0.0,
                            multitask_hidden=8, kernel="pytorch")
    torch.manual_seed(0)
    model = DlrmHSTU(config, ds.num_items, ds.contextual_cardinalities, ds.tasks)
    train_ranking(model, ds, RankingTrainConfig(epochs=1, batch_size=8, max_steps=6, eval_every=0))
    return log, ds, model.eval(), root


def test_served_scores_and_auc_equal_offline(trained, tmp_path):
    log, ds, model, root = trained
    logits, labels, _, tasks = predict_ranking(model, ds.batches("test", batch_size=64))
    offline = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
    users = ds.raw_user_ids[ds.rows("test")]
    requests = plain_requests(log, users)
    np.testing.assert_array_equal(np.concatenate([y for _, y in requests]), labels)  # the same candidates
    assert max(len(r.history_item_ids) for r, _ in requests) > MAX_UIH  # truncation is exercised

    repo = export_ranking_ensemble(model, ds.path, tmp_path / "repo")
    assert (repo / "hstu_ranking" / "config.pbtxt").is_file()
    record = read_serving_record(repo)
    assert record["task"] == "ranking" and record["models"] == ["hstu_ranking"]
    assert record["contract"]["tasks"] == [["click", "binary"], ["like", "binary"]]
    assert record["contract"]["contextual"] == {"age": "int64", "country": "string"}
    assert not list(tmp_path.glob(".repo.partial-*"))

    # one request with raw ids the workflow never saw: they must score as the OOV id 2 (Categorify's rule)
    seen, _ = requests[0]
    latest = max(seen.history_timestamps) + 1
    unseen = RankingRequest(list(seen.history_item_ids) + ["nope"], list(seen.history_actions) + [1],
                            list(seen.history_timestamps) + [latest], ["nope", seen.candidate_item_ids[0]],
                            {"age": 99, "country": "xx"}, query_timestamp=1_700_000_000)
    with TritonServer(ServerConfig([repo], http_port=0, grpc_port=0)) as server, \
            ServingClient(server.http_url) as client:
        assert client.task == "ranking" and client.model_name == "hstu_ranking"
        served = client.predict([r for r, _ in requests])
        oov = client.predict(unseen)
        with pytest.raises(BadRequest, match=r"request 1: history_timestamps has 0 values"):
            client.predict([seen, RankingRequest(["v1"], [0], [], ["v2"], seen.contextual)])
        with pytest.raises(BadRequest, match=r"contextual lacks \['country'\]"):
            client.predict(RankingRequest(["v1"], [0], [5], ["v2"], {"age": 20}))
        too_many = RankingRequest(["v1"], [0], [5], ["v2"] * 20, seen.contextual)
        with pytest.raises(BadRequest, match=r"max_seq_len=13; send at most 10 candidates"):
            client.predict(too_many)
        # the server runs the same checks on what it is sent: HTTP 400 with the same message
        with pytest.raises(ServingError, match=r"\[400\] bad request: .*max_seq_len=13; send at most 10 candidates"):
            client.send(client.model_name, client.contract.request_arrays(too_many))
        assert client.is_ready()

    assert np.diff(served.offsets).tolist() == [len(r.candidate_item_ids) for r, _ in requests]
    for t, task in enumerate(tasks):
        np.testing.assert_allclose(served.scores[task.name], offline[:, t], atol=1e-5, rtol=0)
        assert ranking_metrics.auc(labels[:, t], served.scores[task.name]) == pytest.approx(
            ranking_metrics.auc(labels[:, t], offline[:, t]), abs=1e-9)

    # the OOV request, offline: the unseen event is the latest, the history keeps the last MAX_UIH events
    row = int(np.flatnonzero(ds.raw_user_ids == users[0])[0])
    start, end = ds.row_offsets[row], ds.row_offsets[row] + ds.uih_lengths[row]
    hist_items = np.concatenate([ds.items[start:end], [2]])[-MAX_UIH:]
    hist_acts = np.concatenate([ds.actions[start:end], [1]])[-MAX_UIH:]
    hist_times = np.concatenate([ds.timestamps[start:end], [latest]])[-MAX_UIH:]
    first_candidate = int(ds.items[end])
    batch = RankingBatch(torch.tensor(hist_items), torch.tensor(hist_acts), torch.tensor(hist_times),
                         torch.tensor([0, len(hist_items)]), torch.tensor([2, first_candidate]),
                         torch.full((2,), 1_700_000_000), torch.tensor([0, 2]), torch.zeros(2, 2), ds.tasks,
                         {"age": torch.tensor([2]), "country": torch.tensor([2])})
    with torch.no_grad():
        expected = torch.sigmoid(model(batch)).numpy()
    for t, task in enumerate(tasks):
        np.testing.assert_allclose(oov.scores[task.name], expected[:, t], atol=1e-5, rtol=0)


def test_export_rejects_what_it_cannot_serve(trained, tmp_path):
    _, ds, model, _ = trained
    with pytest.raises(ValueError, match="needs a trained merlin_hstu.ranking.model.DlrmHSTU"):
        export_ranking_ensemble(torch.nn.Linear(2, 2), ds.path, tmp_path / "a")
    other = DlrmHSTU(model.config, ds.num_items, {"age": 8}, ds.tasks)
    with pytest.raises(ValueError, match=r"contextual features \['age'\] differ from the dataset's"):
        export_ranking_ensemble(other, ds.path, tmp_path / "b")
    (tmp_path / "c").mkdir()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export_ranking_ensemble(model, ds.path, tmp_path / "c")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]  # nothing half-written
