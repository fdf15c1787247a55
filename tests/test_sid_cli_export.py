"""`merlin-hstu export` on a semantic-ID run, through the CLI entry point: the run is recognised, exported as a
retrieval repository around its beam search (the same flags and atomic write as the other tasks), options that do
not apply are refused with the reason, and the repository served by a real tritonserver and queried with
`merlin-hstu query` answers the offline beam lists (merlin_hstu.sid.train.recommend_sid)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from test_sid import clustered_embeddings, processed, single_thread, synthetic_events  # noqa: F401  (fixtures)

from merlin_hstu.cli.main import main

HISTORY = 6
USERS = [2, 5, 9, 40]


@pytest.fixture(scope="module")
def sid_run(processed, tmp_path_factory):  # noqa: F811
    """A tiny SID run trained on the session-workflow output `processed`, which it records."""
    from merlin_hstu.retrieval.data import load_processed
    from merlin_hstu.sid.config import SIDConfig
    from merlin_hstu.sid.tokenizer import TokenizerConfig, fit_tokenizer
    from merlin_hstu.sid.train import save_sid_run, train_sid

    table = load_processed(processed)
    catalogue = table.candidate_ids.numpy()
    x, _ = clustered_embeddings(len(catalogue), 6, 5)
    sids = fit_tokenizer(catalogue, x, TokenizerConfig(levels=2, codebook_size=6))
    cfg = SIDConfig.from_dict({"model": {"embedding_dim": 16, "num_blocks": 1, "num_heads": 2, "attention_dim": 8,
                                         "linear_dim": 8},
                               "data": {"max_history": HISTORY}, "decode": {"beam_width": 10},
                               "train": {"epochs": 1, "ks": [5, 10]}})
    run = tmp_path_factory.mktemp("sid_cli") / "run"
    save_sid_run(run, train_sid(table, sids, cfg, progress=False), cfg, data_dir=processed)
    return run


def test_export_refuses_what_does_not_apply_to_a_sid_run(sid_run, tmp_path, capsys):
    repo = tmp_path / "repo"
    cases = [(["--format", "onnx"], "beam search"),
             (["--keep-unused-inputs"], "drop --keep-unused-inputs"),
             (["--task", "retrieval"], "is a sid run, not a retrieval run"),
             (["--top-k", "8", "--beam-width", "12"], "--beam-width")]  # a beam of 12 leaves 12 - 6 items
    for extra, reason in cases:
        assert main(["export", "--run", str(sid_run), "--output", str(repo), *extra]) == 2, extra
        err = capsys.readouterr().err
        assert reason in err, (extra, err)
        assert not repo.exists()  # nothing written, nothing half-written beside it
    assert not [p for p in tmp_path.iterdir()]


def test_cli_export_of_a_sid_run_serves_the_offline_beam_lists(sid_run, processed, tmp_path, capsys):  # noqa: F811
    from serving_helpers import cli_server

    from merlin_hstu.retrieval.data import load_processed
    from merlin_hstu.sid.train import load_sid_run, recommend_sid
    from merlin_hstu.workflows.session_workflow import load_item_id_mapping

    repo = tmp_path / "repo"
    # the run records its dataset: no --data; the default model name is sid_topk
    assert main(["export", "--run", str(sid_run), "--output", str(repo), "--top-k", "5"]) == 0
    out = capsys.readouterr().out
    assert f"exported the semantic-ID run {sid_run}" in out and "sid_topk, sid_topk_batched" in out
    record = json.loads((repo / "serving.json").read_text())
    assert record["task"] == "retrieval" and record["source"] == "merlin_hstu.sid"
    assert record["beam_width"] == max(10, 5 + HISTORY) and record["contract"]["max_k"] == 11 - HISTORY
    # an existing repository is kept unless --overwrite; with it, the new settings replace it
    assert main(["export", "--run", str(sid_run), "--output", str(repo), "--top-k", "5"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["export", "--model", str(sid_run), "--output", str(repo), "--overwrite", "--top-k", "4",
                 "--beam-width", "13", "--name", "sid", "--task", "sid"]) == 0
    capsys.readouterr()
    record = json.loads((repo / "serving.json").read_text())
    assert record["beam_width"] == 13 and record["model_name"] == "sid"
    assert record["contract"]["default_k"] == 4 and record["contract"]["max_k"] == 13 - HISTORY
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo"]  # no staging directory left behind

    events = synthetic_events()
    request = tmp_path / "events.parquet"
    events[events["user_id"].isin(USERS)].to_parquet(request)
    with cli_server([repo], tmp_path / "serve.log") as server:
        assert main(["query", "--url", server["http"], "--request", str(request), "--json"]) == 0
        answers = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]

    table = load_processed(processed)
    model, sids, _, _ = load_sid_run(sid_run)
    raw = load_item_id_mapping(processed / "workflow")
    assert sorted(a["user_id"] for a in answers) == USERS
    rows = [int(np.flatnonzero(table.keys == a["user_id"])[0]) for a in answers]
    offline = recommend_sid(model, sids, [table.items[r] for r in rows], k=4, beam_width=13)
    assert [a["item_ids"] for a in answers] == [[int(raw[i]) for i in items] for items in offline]
    for a in answers:
        assert len(a["item_ids"]) == 4 and np.all(np.diff(a["scores"]) <= 0) and np.all(np.isfinite(a["scores"]))
