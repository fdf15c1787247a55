"""Models trained with `tr.Trainer` on our workflows, exported the Merlin way (the stock merlin-systems graph) and
through merlin-hstu's endpoint, all six repositories served by one real tritonserver (`merlin-hstu serve`, free
ports, stopped by PID): served == offline for retrieval, ranking and CTR, raw ids in and out.

Offline is computed here without the serving code: the fitted NVTabular workflow applied in-process to the raw
rows, the T4R model in eager PyTorch on its output, and (retrieval) a plain numpy history mask and ranking.
The workflow outputs and the raw logs are those of tests/test_t4r_trainer.py; each model trains one epoch.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import transformers4rec.torch as tr
from serving_helpers import cli_server
from test_t4r_trainer import (  # noqa: F401  (criteo, ranking, sessions: the module fixtures reused here)
    CRITEO_LOG,
    RANKING_CONFIG,
    SESSION_LOG,
    SMALL_DLRM,
    criteo,
    ranking,
    ranking_log,
    sessions,
    small_encoder,
    trainer_args,
)

from merlin_hstu.cli.main import main
from merlin_hstu.common import schema as roles
from merlin_hstu.ctr.data import generate_synthetic_criteo, write_criteo_tsv
from merlin_hstu.ctr.wukong import WukongConfig
from merlin_hstu.data.synthetic import generate_event_log
from merlin_hstu.ranking.batch import RankingTask
from merlin_hstu.ranking.data import CANDIDATE_ITEM_LIST, CONTEXT_PREFIX, QUERY_TIME, read_meta
from merlin_hstu.serving.client import ServingClient
from merlin_hstu.serving.contract import QUERY_TIMESTAMP, BadRequest, request_from_events
from merlin_hstu.serving.ctr_contract import OUTPUT, CTRRequest
from merlin_hstu.serving.ranking_contract import RankingRequest
from merlin_hstu.serving.repository import ExportConfig, open_repository
from merlin_hstu.serving.t4r_export import CANDIDATE_IDS, MODES, STOCK_NAMES, export_t4r_model, stock_request
from merlin_hstu.t4r.ctr import wukong_ctr_model
from merlin_hstu.t4r.data import parquet_files, read_schema
from merlin_hstu.t4r.ranking import ranking_model_from_schema, trainer_schema
from merlin_hstu.t4r.retrieval import GenerativeRetrievalTask, retrieval_model_from_schema
from merlin_hstu.workflows.criteo_workflow import LABEL, CriteoWorkflowConfig, read_criteo_tsv
from merlin_hstu.workflows.ranking_workflow import normalize_ranking_log
from merlin_hstu.workflows.session_workflow import (SessionWorkflowConfig, load_item_id_mapping, load_serving_workflow,
                                                    normalize_event_log)

K = 10
EXPORT = ExportConfig(top_k=K, instances=1, entry_instances=1)


# --- fixtures ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(sessions, ranking, criteo, tmp_path_factory):
    """One tiny model per task, trained with tr.Trainer for one epoch; -> {task: (model, workflow output dir)}."""
    root = tmp_path_factory.mktemp("t4r_trained")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        processed, splits = sessions
        retrieval = retrieval_model_from_schema(processed.schema, small_encoder(), splits.max_sequence_length,
                                                task=GenerativeRetrievalTask(num_negatives=32))
        tr.Trainer(model=retrieval, args=trainer_args(root / "retrieval", splits.max_sequence_length, epochs=1),
                   schema=splits.schema, train_dataset_or_path=parquet_files(splits.train)).train()
        out, ranking_splits = ranking
        schema = read_schema(out.path)
        ranker = ranking_model_from_schema(schema, [RankingTask(**t) for t in read_meta(out.output_dir)["tasks"]],
                                           SMALL_DLRM)
        tr.Trainer(model=ranker, args=trainer_args(root / "ranking", ranking_splits.max_sequence_length, epochs=1,
                                                   lr=1e-2),
                   schema=trainer_schema(schema), train_dataset_or_path=parquet_files(ranking_splits.train)).train()
        ctr = wukong_ctr_model(criteo.schema, dim=8, top_mlp=(16,),
                               tower=WukongConfig(num_layers=1, lcb_feature_num=4, fmb_feature_num=4,
                                                  compressed_feature_num=4, fmb_mlp=(16,)))
        tr.Trainer(model=ctr, args=trainer_args(root / "ctr", None, epochs=1, batch=128), schema=criteo.schema,
                   train_dataset_or_path=[str(p) for p in criteo.parquet_files("train")]).train()
    finally:
        torch.set_num_threads(threads)
    return {"retrieval": (retrieval.eval(), processed.path.parent), "ranking": (ranker.eval(), out.output_dir),
            "ctr": (ctr.eval(), criteo.path)}


@pytest.fixture(scope="module")
def repos(trained, tmp_path_factory):
    root = tmp_path_factory.mktemp("t4r_repos")
    return {(task, mode): export_t4r_model(model, data, root / f"{task}-{mode}", mode=mode, config=EXPORT)
            for task, (model, data) in trained.items() for mode in MODES}


@pytest.fixture(scope="module")
def server(repos, tmp_path_factory):
    with cli_server(list(repos.values()), tmp_path_factory.mktemp("t4r_serve") / "serve.log") as handle:
        yield handle


def stock_infer(server, task: str, frame: pd.DataFrame) -> dict:
    """The stock executor's answer to the raw rows `frame` (plain tritonclient, inputs from the model config)."""
    import tritonclient.http as th

    from merlin_hstu.bench.serving import _infer_inputs

    name = STOCK_NAMES[task]
    with th.InferenceServerClient(server["http"]) as client:
        arrays = stock_request(client.get_model_config(name), frame)
        reply = client.infer(name, _infer_inputs(th, arrays))
        return {o["name"]: reply.as_numpy(o["name"]) for o in client.get_model_config(name)["output"]}


def assert_same_topk(ids, scores, want_ids, want_scores) -> None:
    """Equal top-K lists and scores (1e-5); two ids may swap only where their offline scores tie within 1e-5."""
    np.testing.assert_allclose(scores, want_scores, atol=1e-5, rtol=1e-5)
    differ = np.asarray(ids) != np.asarray(want_ids)
    for row, col in zip(*np.nonzero(differ)):
        neighbours = want_scores[row, max(col - 1, 0):col + 2]
        assert np.ptp(neighbours) < 1e-5, (row, col, ids[row], want_ids[row], want_scores[row])


# --- offline references -----------------------------------------------------------------------------
def retrieval_offline(model, data, events: pd.DataFrame, exclude: bool = True):
    """-> {raw user id: (raw item ids [K], scores [K])}: workflow in-process, the most recent L events, eager model,
    numpy mask of the window and ranking (ties by id)."""
    workflow = load_serving_workflow(data / "workflow")
    rows = workflow._transform_df(normalize_event_log(events, SessionWorkflowConfig()))
    width = model.max_sequence_length
    items = [np.asarray(v, dtype=np.int64)[-width:] for v in rows[roles.ITEM_LIST]]
    times = [np.asarray(v, dtype=np.int64)[-width:] for v in rows[roles.TIMESTAMP_LIST]]
    offsets = torch.tensor(np.concatenate([[0], np.cumsum([len(v) for v in items])]))
    batch = {f"{roles.ITEM_LIST}__values": torch.from_numpy(np.concatenate(items)),
             f"{roles.ITEM_LIST}__offsets": offsets,
             f"{roles.TIMESTAMP_LIST}__values": torch.from_numpy(np.concatenate(times)),
             f"{roles.TIMESTAMP_LIST}__offsets": offsets}
    with torch.no_grad():
        scores = model(batch).numpy().astype(np.float64)
    if exclude:
        for b, window in enumerate(items):
            scores[b, window] = -np.inf
    order = np.argsort(-scores, axis=1, kind="stable")[:, :K]
    mapping = load_item_id_mapping(data / "workflow")
    return {user: (np.array([mapping[i] for i in order[b]], dtype=np.int64), scores[b, order[b]])
            for b, user in enumerate(rows["user_id"])}


def ranking_offline(model, data, normalized: pd.DataFrame):
    """-> (workflow rows, {task: [scores of each row's candidates]}): workflow in-process, eager T4R model."""
    import nvtabular as nvt

    rows = nvt.Workflow.load(str(data / "workflow"))._transform_df(normalized).reset_index(drop=True)
    inputs = {}
    for column in (roles.ITEM_LIST, roles.ACTION_LIST, roles.TIMESTAMP_LIST, CANDIDATE_ITEM_LIST):
        lists = [np.asarray(v, dtype=np.int64) for v in rows[column]]
        inputs[f"{column}__values"] = torch.from_numpy(np.concatenate(lists))
        inputs[f"{column}__offsets"] = torch.tensor(np.concatenate([[0], np.cumsum([len(v) for v in lists])]))
    for column in [QUERY_TIME] + [CONTEXT_PREFIX + c for c in RANKING_CONFIG.contextual_columns]:
        inputs[column] = torch.from_numpy(rows[column].to_numpy(dtype=np.int64))
    with torch.no_grad():
        out = model(inputs)
    counts = rows[CANDIDATE_ITEM_LIST].map(len).to_numpy()
    return rows, {task: [out[task][b, :n].numpy() for b, n in enumerate(counts)] for task in out}


def ctr_offline(model, data, raw: pd.DataFrame) -> np.ndarray:
    from merlin_hstu.serving.ctr import _features  # the label-free fitted workflow, as training encoded it

    workflow = _features(data)[0]
    features = workflow._transform_df(raw[workflow.input_schema.column_names].reset_index(drop=True))
    inputs = {c: torch.from_numpy(features[c].to_numpy()) for c in model.input_schema.column_names}
    with torch.no_grad():
        return model(inputs).numpy()


def retrieval_events() -> pd.DataFrame:
    """Six users of the raw log; the second one's history is made longer than the model's window (L = 21 events):
    the events of the user with the most, moved before its own, under its id."""
    log = generate_event_log(SESSION_LOG)
    users = pd.unique(log["user_id"])[:6]
    events = log[log["user_id"].isin(users)]
    earlier = log[log["user_id"] == log["user_id"].value_counts().index[0]]
    shift = events.loc[events["user_id"] == users[1], "timestamp"].min() - earlier["timestamp"].max() - 60
    earlier = earlier.assign(user_id=users[1], timestamp=earlier["timestamp"] + shift)
    out = pd.concat([events, earlier], ignore_index=True)
    assert (out["user_id"] == users[1]).sum() > 21
    return out


# --- no server needed -------------------------------------------------------------------------------
def test_exports_are_the_standard_graph_and_our_format(repos, trained, capsys):
    stock = repos[("ranking", "stock")]
    name = STOCK_NAMES["ranking"]
    assert sorted(p.name for p in stock.iterdir()) == [name, f"{name}_0_transformworkflowtriton",
                                                       f"{name}_1_predictpytorchtriton"]
    assert 'platform: "merlin_executor"' in (stock / name / "config.pbtxt").read_text()
    assert 'backend: "python"' in (stock / f"{name}_1_predictpytorchtriton" / "config.pbtxt").read_text()
    assert (stock / f"{name}_1_predictpytorchtriton" / "1" / "model.pt").is_file()
    assert "utf8_workflow_model" in (stock / f"{name}_0_transformworkflowtriton" / "1" / "model.py").read_text()
    assert (repos[("ctr", "merlin-hstu")] / "serving.json").is_file()

    contract, graph = open_repository(repos[("retrieval", "merlin-hstu")])
    assert contract.max_history == trained["retrieval"][0].max_sequence_length and not contract.query_time
    arrays = request_from_events(contract, retrieval_events())
    with pytest.raises(BadRequest, match=r"'query_timestamp' was sent, but this model \(trained with tr.Trainer\)"):
        contract.validate({**arrays, QUERY_TIMESTAMP: np.full(len(arrays["user_id"]), 1_700_000_000)})
    ids, _ = graph.run([contract.validate(arrays)])[0]  # the graph in-process: raw ids out
    assert ids.shape == (6, K) and set(ids.reshape(-1)) <= set(generate_event_log(SESSION_LOG)["item_id"])

    model, data = trained["ranking"]
    with pytest.raises(ValueError, match="is a ranking model .* not retrieval"):
        export_t4r_model(model, data, repos[("ranking", "stock")].parent / "x", task="retrieval")
    with pytest.raises(ValueError, match="mode must be one of"):
        export_t4r_model(model, data, repos[("ranking", "stock")].parent / "x", mode="libtorch")
    with pytest.raises(FileExistsError, match="already exists"):
        export_t4r_model(model, data, repos[("ranking", "stock")], mode="stock")
    assert main(["bench", "serve", "--run", "RUN", "--data", str(data)]) == 2  # --data goes with --t4r
    assert "--data goes with --t4r" in capsys.readouterr().err


# --- served == offline ------------------------------------------------------------------------------
def test_retrieval_served_equals_offline(trained, server):
    model, data = trained["retrieval"]
    events = retrieval_events()
    for exclude in (True, False):
        want = retrieval_offline(model, data, events, exclude)
        with ServingClient(server["http"], model_name=EXPORT.name_for("retrieval"),
                           endpoint="batched" if exclude else "ragged") as client:
            recs = client.recommend(events, exclude_history=exclude)
        assert list(recs.user_ids) == list(pd.unique(events["user_id"])) and recs.item_ids.shape == (6, K)
        assert_same_topk(recs.item_ids, recs.scores, np.stack([want[u][0] for u in recs.user_ids]),
                         np.stack([want[u][1] for u in recs.user_ids]))
    # the stock executor: raw event rows in, raw ids out, the history excluded (fixed at export); rows in the
    # workflow's user order
    want = retrieval_offline(model, data, events, exclude=True)
    out = stock_infer(server, "retrieval", events)
    assert out["item_ids"].shape == (6, K)
    assert_same_topk(out["item_ids"], out["scores"], np.stack([v[0] for v in want.values()]),
                     np.stack([v[1] for v in want.values()]))


def test_ranking_served_equals_offline(trained, server):
    model, data = trained["ranking"]
    log = ranking_log()
    users = pd.unique(log["user_id"])[:8]
    events = log[log["user_id"].isin(users)].reset_index(drop=True)
    normalized = normalize_ranking_log(events, RANKING_CONFIG)
    rows, want = ranking_offline(model, data, normalized)
    assert len(rows) == 8
    mapping = load_item_id_mapping(data / "workflow")

    # merlin-hstu: each user's history and named candidates (the events the workflow took as candidates), raw
    requests = []
    for b, user in enumerate(rows["user_id"]):
        mine = normalized[normalized["user_id"] == user].sort_values("timestamp", kind="stable")
        c = len(rows[CANDIDATE_ITEM_LIST][b])
        history, candidates = mine.iloc[:-c], mine.iloc[-c:]
        context = {f: mine[CONTEXT_PREFIX + f].iloc[0] for f in RANKING_CONFIG.contextual_columns}
        requests.append(RankingRequest(history["item_id"].tolist(), history["action"].tolist(),
                                       history["timestamp"].tolist(), candidates["item_id"].tolist(), context))
        assert candidates["item_id"].tolist() == [mapping[i] for i in rows[CANDIDATE_ITEM_LIST][b]]
    with ServingClient(server["http"], model_name=EXPORT.name_for("ranking")) as client:
        served = client.predict(requests)
    for b in range(len(rows)):
        for task, scores in served.user(b).items():
            np.testing.assert_allclose(scores, want[task][b], atol=1e-5, rtol=1e-5)

    # stock: the workflow's raw input rows in (one per event; it takes each user's last events as candidates)
    out = stock_infer(server, "ranking", normalized)
    offsets = out[f"{CANDIDATE_IDS}__offsets"]
    assert out[f"{CANDIDATE_IDS}__values"].tolist() == [mapping[i] for v in rows[CANDIDATE_ITEM_LIST] for i in v]
    for task in want:
        np.testing.assert_array_equal(out[f"{task}__offsets"], offsets)
        np.testing.assert_allclose(out[f"{task}__values"], np.concatenate(want[task]), atol=1e-5, rtol=1e-5)


def test_ctr_served_equals_offline(trained, server, tmp_path):
    model, data = trained["ctr"]
    tsv = write_criteo_tsv(generate_synthetic_criteo(CRITEO_LOG).frame.iloc[:48], tmp_path / "rows.tsv")
    raw = read_criteo_tsv(tsv, CriteoWorkflowConfig())
    assert raw.isna().any().any()  # missing fields are part of the parity
    want = ctr_offline(model, data, raw)
    with ServingClient(server["http"], model_name=EXPORT.name_for("ctr")) as client:
        np.testing.assert_allclose(client.predict(CTRRequest(raw)), want, atol=1e-6)
    out = stock_infer(server, "ctr", raw.drop(columns=[LABEL]))
    np.testing.assert_allclose(out[OUTPUT], want, atol=1e-6)
