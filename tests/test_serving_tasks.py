"""`train -> export -> serve -> query` through the CLI for a ranking run and a CTR run, one server for both.

Both runs are trained by `merlin-hstu train` (tiny configs, 3 steps), exported by `merlin-hstu export --run` (the task
read from the run), served together by one `merlin-hstu serve --repo A --repo B` process (started here on free ports
and stopped by PID), and queried with `merlin-hstu query` from JSON and Parquet request files.  The printed scores
must equal the offline model's (the run's model on the dataset's own tensors) to 1e-5; the requests are rebuilt from
the raw logs by plain loops written here, not by the serving code.
"""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from serving_helpers import cli_server
import torch

from merlin_hstu.cli.main import main

K, MAX_UIH = 3, 8
RANKING_TRAIN = ["--set", "model.embedding_dim=8", "--set", "model.num_blocks=2", "--set", "model.num_heads=2",
                 "--set", "model.attention_dim=4", "--set", "model.linear_dim=4", "--set", f"model.max_seq_len={2 + MAX_UIH + K}",
                 "--set", "model.action_embedding_dim=3", "--set", "model.multitask_hidden=8", "--set", "train.epochs=1",
                 "--set", "train.batch_size=8", "--set", "train.max_steps=3", "--set", "train.eval_every=0",
                 "--set", "train.threads=1"]
CTR_TRAIN = ["--set", "model.embedding_dim=8", "--set", "model.num_layers=1", "--set", "train.epochs=1",
             "--set", "train.batch_size=128", "--set", "train.max_steps=3", "--set", "train.threads=1"]

pytestmark = pytest.mark.usefixtures("one_thread")


def ranking_log(num_users: int = 50, seed: int = 0) -> pd.DataFrame:
    """String item ids, histories longer than MAX_UIH + K, time ties, an int and a string contextual feature."""
    rng = np.random.default_rng(seed)
    rows = []
    for user in range(num_users):
        n = int(rng.integers(2, 16))
        for item, t in zip(rng.integers(0, 25, n), 1_600_000_000 + rng.integers(0, 50, n) * 3600):
            click = int(item % 2 == 0)
            rows.append((user, f"v{item}", int(t), click, click & int(item < 10), int(20 + user % 5),
                         ["de", "fr", "us"][user % 3]))
    frame = pd.DataFrame(rows, columns=["uid", "item", "ts", "click", "like", "age", "country"])
    return frame.sample(frac=1.0, random_state=seed).reset_index(drop=True)


def plain_ranking_requests(log: pd.DataFrame, users) -> list:
    """Per user, as JSON objects: a stable sort by time; the last min(K, n-1) events are the candidates, all earlier
    events the history (the server keeps the latest MAX_UIH)."""
    out = []
    for user in users:
        rows = log[log["uid"] == user]
        events = sorted(zip(rows["ts"], range(len(rows)), rows["item"], rows["click"], rows["like"]))
        c = min(K, len(events) - 1)
        hist, cands = events[:-c], events[-c:]
        out.append({"history_item_ids": [e[2] for e in hist], "history_actions": [int(e[3] | (e[4] << 1)) for e in hist],
                    "history_timestamps": [int(e[0]) for e in hist], "candidate_item_ids": [e[2] for e in cands],
                    "contextual": {"age": int(rows["age"].iloc[0]), "country": rows["country"].iloc[0]}})
    return out


# --- fixtures: two CLI runs, their repositories, one server ---------------------------------------------
@pytest.fixture(scope="module")
def ranking(tmp_path_factory):
    root = tmp_path_factory.mktemp("ranking")
    log = ranking_log()
    log.to_parquet(root / "log.parquet")
    assert main(["preprocess-ranking", "--format", "events", "--input", str(root / "log.parquet"),
                 "--output", str(root / "data"), "--user-column", "uid", "--item-column", "item",
                 "--timestamp-column", "ts", "--action-names", "click,like", "--contextual", "age,country",
                 "--num-candidates", str(K), "--max-uih-len", str(MAX_UIH)]) == 0
    assert main(["train", "--task", "ranking", "--data", str(root / "data"), "--output", str(root / "run"),
                 "--no-progress", *RANKING_TRAIN]) == 0
    assert main(["export", "--run", str(root / "run"), "--output", str(root / "repo"), "--instances", "1"]) == 0
    return {"root": root, "log": log, "run": root / "run", "data": root / "data", "repo": root / "repo"}


@pytest.fixture(scope="module")
def ctr(tmp_path_factory):
    from merlin_hstu.ctr.data import SyntheticCriteoConfig, generate_synthetic_criteo, write_criteo_tsv
    from merlin_hstu.workflows.criteo_workflow import CriteoWorkflowConfig, preprocess_criteo

    root = tmp_path_factory.mktemp("ctr")
    frame = generate_synthetic_criteo(SyntheticCriteoConfig(num_rows=600, seed=3, max_cardinality=100)).frame
    tsv = write_criteo_tsv(frame, root / "day_0.tsv")
    data = preprocess_criteo(tsv, root / "criteo", CriteoWorkflowConfig(freq_threshold=2, valid_fraction=0.25)).path
    assert main(["train", "--task", "ctr", "--data", str(data), "--output", str(root / "run"), "--no-progress",
                 *CTR_TRAIN]) == 0
    assert main(["export", "--run", str(root / "run"), "--output", str(root / "repo"), "--task", "ctr",
                 "--instances", "1"]) == 0
    return {"root": root, "tsv": tsv, "run": root / "run", "data": data, "repo": root / "repo"}


@pytest.fixture(scope="module")
def server(ranking, ctr, tmp_path_factory):
    """`merlin-hstu serve --repo RANKING --repo CTR` as a subprocess on free ports; stopped by PID."""
    with cli_server(["--repo", ranking["repo"], "--repo", ctr["repo"]],
                    tmp_path_factory.mktemp("serve") / "serve.log") as handle:
        yield handle


def _query_json(capsys, *args) -> list:
    capsys.readouterr()
    assert main(["query", *args, "--json"]) == 0, capsys.readouterr().err
    return [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]


# --- ranking --------------------------------------------------------------------------------------------
def test_ranking_cli_round_trip_serves_the_offline_scores(ranking, server, tmp_path, capsys):
    from merlin_hstu.ranking.train import predict_ranking
    from merlin_hstu.train.run_dir import load_run

    run = load_run(ranking["run"])
    assert run.task == "ranking"
    ds = run.config.data.load(ranking["data"])
    logits, labels, _, tasks = predict_ranking(run.model, ds.batches("test", batch_size=64))
    offline = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
    requests = plain_ranking_requests(ranking["log"], ds.raw_user_ids[ds.rows("test")])
    assert max(len(r["history_item_ids"]) for r in requests) > MAX_UIH  # the history window is exercised
    counts = [len(r["candidate_item_ids"]) for r in requests]
    assert sum(counts) == len(labels)

    # JSON: contextual as an object; Parquet: one row per user, the contextual features as columns of their own
    (tmp_path / "requests.json").write_text(json.dumps(requests))
    flat = pd.DataFrame([{**{k: v for k, v in r.items() if k != "contextual"}, **r["contextual"]} for r in requests])
    flat.to_parquet(tmp_path / "requests.parquet")
    for path in (tmp_path / "requests.json", tmp_path / "requests.parquet"):
        lines = _query_json(capsys, "--url", server["http"], "--model-name", "hstu_ranking", "--request", str(path))
        assert [line["request"] for line in lines] == list(range(len(requests)))
        assert [line["candidate_item_ids"] for line in lines] == [r["candidate_item_ids"] for r in requests]
        for t, task in enumerate(tasks):
            served = np.concatenate([line["scores"][task.name] for line in lines])
            np.testing.assert_allclose(served, offline[:, t], atol=1e-5, rtol=0)
    # the table form prints one line per candidate with every task's score
    capsys.readouterr()
    assert main(["query", "--url", server["http"], "--model-name", "hstu_ranking", "--request",
                 str(tmp_path / "requests.json")]) == 0
    text = capsys.readouterr().out
    assert text.count("click ") == len(labels) and text.startswith(f"request 0: {counts[0]} candidate(s)")


def test_ranking_query_errors_name_the_field(ranking, server, tmp_path, capsys):
    bad = plain_ranking_requests(ranking["log"], [0])
    bad[0]["candidate_item_ids"] = ["v1"] * 20  # longer than the model's max_seq_len allows
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    capsys.readouterr()
    assert main(["query", "--url", server["http"], "--model-name", "hstu_ranking", "--request",
                 str(tmp_path / "bad.json")]) == 2
    assert "max_seq_len=13; send at most" in capsys.readouterr().err
    (tmp_path / "typo.json").write_text(json.dumps([{**plain_ranking_requests(ranking["log"], [0])[0], "cuntry": 1}]))
    assert main(["query", "--url", server["http"], "--model-name", "hstu_ranking", "--request",
                 str(tmp_path / "typo.json")]) == 2
    assert "unknown field(s) ['cuntry']" in capsys.readouterr().err
    assert main(["query", "--url", server["http"], "--model-name", "hstu_ranking", "--request",
                 str(tmp_path / "bad.json"), "--top-k", "3"]) == 2
    assert "--top-k apply to retrieval models only" in capsys.readouterr().err


# --- CTR ------------------------------------------------------------------------------------------------
def test_ctr_cli_round_trip_serves_the_offline_probabilities(ctr, server, tmp_path, capsys):
    from merlin_hstu.ctr.data import load_criteo_tensors
    from merlin_hstu.ctr.train import predict_logits
    from merlin_hstu.train.run_dir import load_run
    from merlin_hstu.workflows.criteo_workflow import CATEGORICAL_COLUMNS, read_criteo_tsv

    run = load_run(ctr["run"])
    assert run.task == "ctr"
    data = load_criteo_tensors(ctr["data"])
    offline = torch.sigmoid(predict_logits(run.model, data.valid)).numpy()
    raw = read_criteo_tsv(ctr["tsv"]).iloc[len(data.train):].reset_index(drop=True)
    np.testing.assert_array_equal(raw.pop("label").to_numpy(), data.valid.labels.numpy())
    assert raw[CATEGORICAL_COLUMNS].iloc[1].isna().any()  # row 1 has missing fields (sent alone below)

    raw.to_parquet(tmp_path / "rows.parquet")
    raw.iloc[:5].to_json(tmp_path / "rows.json", orient="records")  # NaN / None -> null
    lines = _query_json(capsys, "--url", server["http"], "--model-name", "ctr", "--request",
                        str(tmp_path / "rows.parquet"))
    assert [line["row"] for line in lines] == list(range(len(raw)))
    np.testing.assert_allclose([line["click_probability"] for line in lines], offline, atol=1e-5, rtol=0)
    lines = _query_json(capsys, "--url", server["http"], "--model-name", "ctr", "--request", str(tmp_path / "rows.json"))
    np.testing.assert_allclose([line["click_probability"] for line in lines], offline[:5], atol=1e-5, rtol=0)
    # one row per request: a column missing in every row of a request (NVTabular's Categorify alone fails there)
    raw.iloc[[1]].to_parquet(tmp_path / "one.parquet")
    lines = _query_json(capsys, "--url", server["http"], "--model-name", "ctr", "--request",
                        str(tmp_path / "one.parquet"))
    np.testing.assert_allclose(lines[0]["click_probability"], offline[1], atol=1e-5, rtol=0)

    raw.drop(columns=["C7"]).iloc[:2].to_parquet(tmp_path / "short.parquet")
    assert main(["query", "--url", server["http"], "--model-name", "ctr", "--request",
                 str(tmp_path / "short.parquet")]) == 2
    assert "lacks column(s) ['C7']" in capsys.readouterr().err


# --- discovery and the commands' own checks ---------------------------------------------------------------
def test_query_needs_a_model_name_when_the_server_holds_several(ranking, server, tmp_path, capsys):
    (tmp_path / "r.json").write_text(json.dumps(plain_ranking_requests(ranking["log"], [0])))
    capsys.readouterr()
    assert main(["query", "--url", server["http"], "--request", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err
    assert "['ctr', 'hstu_ranking']" in err and "--model-name" in err


def test_export_checks_the_task_and_the_flags(ranking, ctr, tmp_path, capsys):
    capsys.readouterr()
    assert main(["export", "--run", str(ranking["run"]), "--output", str(tmp_path / "a"), "--task", "ctr"]) == 2
    assert "is a ranking run, not a ctr run" in capsys.readouterr().err
    assert main(["export", "--run", str(ctr["run"]), "--output", str(tmp_path / "b"), "--top-k", "5"]) == 2
    assert "--top-k apply to retrieval runs only" in capsys.readouterr().err
    assert main(["export", "--run", str(ctr["run"]), "--output", str(ctr["repo"])]) == 2  # exists
    assert "--overwrite" in capsys.readouterr().err
    # a dataset that is not the one the run was trained on is refused, naming what differs
    other = ctr["root"] / "criteo_other"
    from merlin_hstu.workflows.criteo_workflow import CriteoWorkflowConfig, preprocess_criteo

    preprocess_criteo(ctr["tsv"], other, CriteoWorkflowConfig(freq_threshold=1, valid_fraction=0.25))
    assert main(["export", "--run", str(ctr["run"]), "--output", str(tmp_path / "c"), "--data", str(other)]) == 2
    assert "is not the dataset" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing half-written


def test_serving_json_records_the_task_contract_and_source(ranking, ctr):
    from merlin_hstu.serving.contract import contract_from_dict
    from merlin_hstu.serving.ctr_contract import CTRContract
    from merlin_hstu.serving.ranking_contract import RankingContract
    from merlin_hstu.serving.repository import read_serving_record

    for fixture, cls, name in ((ranking, RankingContract, "hstu_ranking"), (ctr, CTRContract, "ctr")):
        record = read_serving_record(fixture["repo"])
        assert record["format"] == 2 and record["models"] == [name] and record["model_name"] == name
        assert record["run_dir"] == str(fixture["run"].resolve()) and record["data"] == str(fixture["data"].resolve())
        assert {"python", "torch", "nvtabular", "merlin-systems"} <= set(record["versions"])
        contract = contract_from_dict(record["contract"])
        assert isinstance(contract, cls) and contract.task == record["task"] == cls.task
        config = (fixture["repo"] / name / "config.pbtxt").read_text()
        for spec in contract.inputs():  # the Triton config declares exactly the contract's tensors
            assert f'name: "{spec.name}" data_type: {spec.dtype}' in config


@pytest.mark.parametrize("command", [["export"], ["serve"], ["query"]])
def test_help_names_every_task(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([*command, "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert "--repo" in text if command == ["serve"] else all(t in text for t in ("retrieval", "ranking", "ctr"))


def test_contracts_are_declared_and_validated_the_same_way():
    """The three contracts, built by hand: the shared checks (unknown / missing tensors, dtypes, ragged offsets) give
    the same messages for every task, each task's own rules name their field, and every contract survives its JSON."""
    from merlin_hstu.serving.contract import BadRequest, RequestContract, contract_from_dict
    from merlin_hstu.serving.ctr_contract import CTRContract, CTRRequest
    from merlin_hstu.serving.ranking_contract import RankingContract, RankingRequest

    ranking = RankingContract(item_dtype="int64", contextual={"age": "int64", "city": "string"},
                              tasks=[["click", "binary"]], max_uih_len=4, max_seq_len=9, tokens_per_event=1,
                              item_encoding="raw", max_item_id=50)
    ctr = CTRContract(["I1", "I2"], ["C1"])
    retrieval = RequestContract("user_id", "int64", "item_id", "int64", timestamp_column="timestamp")
    for contract in (ranking, ctr, retrieval):
        assert contract_from_dict(contract.to_dict()) == contract
    good_ranking = ranking.request_arrays([RankingRequest([3, 4, 5, 6, 7, 8], [1, 0, 1, 0, 1, 0], list(range(6)),
                                                          [9, 10], {"age": 30, "city": None}),
                                           RankingRequest([3], [2], [7], [4], {"age": 31, "city": "x"})])
    valid = ranking.validate(good_ranking)
    assert valid.batch_size == 2 and valid.candidate_offsets.tolist() == [0, 2, 3]
    assert good_ranking["city"].tolist() == [b"", b"x"]  # None: missing, the null id on the server
    good_ctr = ctr.request_arrays(CTRRequest(pd.DataFrame({"I1": [1, None], "I2": [0.5, 2], "C1": ["a", None],
                                                           "label": [0, 1]})))
    assert ctr.validate(good_ctr).batch_size == 2 and np.isnan(good_ctr["I1"][1]) and good_ctr["C1"][1] == b""

    def rejects(contract, arrays, change, *needles):
        arrays = {k: v.copy() for k, v in arrays.items()}
        change(arrays)
        with pytest.raises(BadRequest) as info:
            contract.validate(arrays)
        for needle in needles:
            assert needle in str(info.value), str(info.value)

    for contract, arrays, some in ((ranking, good_ranking, "history_timestamp__values"), (ctr, good_ctr, "I2")):
        rejects(contract, arrays, lambda a: a.__setitem__("bogus", np.zeros(1)), "unexpected input tensor(s) ['bogus']")
        rejects(contract, arrays, lambda a: a.pop(some), f"missing input tensor(s) ['{some}']")
        rejects(contract, arrays, lambda a: a.__setitem__(some, a[some].astype(str)), f"'{some}' must hold")
    rejects(ranking, good_ranking, lambda a: a.__setitem__("candidate_item_id__offsets", np.array([0, 3], np.int32)),
            "'candidate_item_id__offsets' has 2 entries for 2 request row(s); it needs B + 1 = 3")
    rejects(ranking, good_ranking, lambda a: a.__setitem__("history_action__offsets", np.array([0, 5, 7], np.int32)),
            "ragged lists differ in length: request row 0 has 6 history_item_id value(s) but 5 history_action")
    rejects(ranking, good_ranking, lambda a: a.__setitem__("candidate_item_id__values", np.array([9, 51, 4])),
            "'candidate_item_id__values' holds item id 51, outside [1, 50]")
    rejects(ranking, good_ranking, lambda a: a.__setitem__("age", np.array([30])),
            "contextual feature 'age' has 1 value(s) for 2 request row(s)")
    # user 0 keeps its last 4 of 6 history events: 2 contextual + 4 + 2 candidates = 8 <= 9; a 4th candidate is not
    rejects(ranking, ranking.request_arrays([RankingRequest([3] * 6, [0] * 6, list(range(6)), [9, 10, 11, 12],
                                                            {"age": 1, "city": "x"})]), lambda a: None,
            "has 10 tokens > the model's max_seq_len=9; send at most 3 candidates")
    rejects(ctr, good_ctr, lambda a: a.__setitem__("C1", a["C1"][:1]), "column 'C1' has 1 value(s) but 'I1' has 2")
    with pytest.raises(BadRequest, match=r"request 0: contextual feature\(s\) \['town'\] are not inputs"):
        ranking.request_arrays(RankingRequest([3], [0], [1], [4], {"age": 1, "city": "x", "town": "y"}))


def test_ranking_run_on_raw_item_ids_exports_and_scores_as_offline(tmp_path):
    """`preprocess-ranking --item-encoding raw` (integer ids kept, no Categorify): the export serves (in-process, as
    its Triton model loads it) the offline scores, and an id outside the trained range is a bad request."""
    from merlin_hstu.ranking.train import predict_ranking
    from merlin_hstu.serving.contract import BadRequest
    from merlin_hstu.serving.ranking_contract import RankingRequest
    from merlin_hstu.serving.repository import open_repository
    from merlin_hstu.train.run_dir import load_run

    log = ranking_log(num_users=40, seed=1)
    log["item"] = log["item"].str[1:].astype(np.int64) + 1  # v0.. -> 1..
    log.to_parquet(tmp_path / "log.parquet")
    assert main(["preprocess-ranking", "--format", "events", "--input", str(tmp_path / "log.parquet"),
                 "--output", str(tmp_path / "data"), "--user-column", "uid", "--item-column", "item",
                 "--timestamp-column", "ts", "--action-names", "click,like", "--contextual", "age,country",
                 "--num-candidates", str(K), "--max-uih-len", str(MAX_UIH), "--item-encoding", "raw"]) == 0
    assert main(["train", "--task", "ranking", "--data", str(tmp_path / "data"), "--output", str(tmp_path / "run"),
                 "--no-progress", *RANKING_TRAIN]) == 0
    assert main(["export", "--run", str(tmp_path / "run"), "--output", str(tmp_path / "repo")]) == 0
    contract, served = open_repository(tmp_path / "repo")
    top = int(log["item"].max())
    assert (contract.item_encoding, contract.item_dtype, contract.max_item_id) == ("raw", "int64", top)
    run = load_run(tmp_path / "run")
    ds = run.config.data.load(tmp_path / "data")
    logits, _, _, tasks = predict_ranking(run.model, ds.batches("test", batch_size=64))
    requests = [RankingRequest(**r) for r in plain_ranking_requests(log, ds.raw_user_ids[ds.rows("test")])]
    outputs = served.run([contract.validate(contract.request_arrays(requests))])[0]
    for t in range(len(tasks)):
        np.testing.assert_allclose(outputs[2 * t], 1.0 / (1.0 + np.exp(-logits[:, t].astype(np.float64))),
                                   atol=1e-5, rtol=0)
    with pytest.raises(BadRequest, match=rf"'candidate_item_id__values' holds item id {top + 1}, outside \[1, {top}\]"):
        contract.validate(contract.request_arrays(RankingRequest([1], [0], [5], [top + 1], requests[0].contextual)))
