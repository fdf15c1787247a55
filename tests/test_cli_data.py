"""A user's own data through the CLI: the data report and the sizing from the data (checked against plain pandas
on MovieLens latest-small), the sequence-per-line input (Amazon Beauty in S3-Rec form), ids beyond int64,
--drop-nulls, and `train` taking / checking the data's history window."""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import yaml

from merlin_hstu.cli.main import main
from merlin_hstu.common import schema as roles
from merlin_hstu.workflows.session_workflow import DATA_REPORT_FILE, load_item_id_mapping

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


TINY = ["--no-progress", "--set", "train.epochs=1", "--set", "train.max_steps=1", "--set", "model.embedding_dim=8",
        "--set", "model.attention_dim=4", "--set", "model.linear_dim=4", "--set", "train.num_negatives=8"]


def _report(out) -> dict:
    return json.loads((out / DATA_REPORT_FILE).read_text())


def _processed(out) -> pd.DataFrame:
    return pd.concat([pd.read_parquet(p) for p in sorted((out / "processed").glob("*.parquet"))], ignore_index=True)


def test_movielens_latest_small_is_sized_from_the_data(shared_data, tmp_path, capsys):
    """Default settings on ml-latest-small (the issue's log): every event's user kept, the window from the data, and
    report and output equal a plain pandas computation."""
    src = shared_data / "movielens-latest-small" / "ratings.csv.xz"
    out = tmp_path / "mls"
    assert main(["preprocess", "--input", str(src), "--output", str(out), "--id-column", "userId",
                 "--item-column", "movieId", "--action-column", "none"]) == 0
    printed = capsys.readouterr().out
    report = _report(out)

    raw = pd.read_csv(src)
    n = raw.groupby("userId").size()
    histories = n.to_numpy() - 1
    p95 = int(np.percentile(histories, 95, method="higher"))
    # the demo preset's budget by hand: 128 per batch x 2 blocks x (4 x 2 heads + 2) x 4 bytes per (query, key) pair
    seq_cap = math.isqrt(2 * 1024**3 // (128 * 2 * (4 * 2 + 2) * 4))
    cap = (seq_cap - 11) // 8 * 8  # the demo preset's 11 output slots (max_seq_len 61 - max_history 50)
    history = min(-(-p95 // 8) * 8, cap)
    keep = history + 2
    assert report["max_history"]["value"] == history == 440 and report["max_history"]["max_length"] == keep
    assert "p95 of the history lengths = 612" in report["max_history"]["chosen_by"]
    assert report["in"] == {"sequences": 610, "events": 100_836}
    assert report["dropped"]["too_short"]["sequences"] == 0 and report["dropped"]["nulls"]["events"] == 0
    assert report["truncated"]["events"] == int(np.maximum(n - keep, 0).sum())
    assert report["truncated"]["sequences"] == int((n > keep).sum())
    assert report["out"] == {"sequences": 610, "events": int(np.minimum(n, keep).sum())}
    assert report["catalogue"]["items_in_log"] == raw["movieId"].nunique() == 9_724
    for q in (50, 90, 95, 99):
        assert report["history_length"][f"p{q}"] == int(np.percentile(histories, q, method="higher"))
    assert report["history_length"]["max"] == int(histories.max())
    assert f"max history {history}" in printed and "capped at 440" in printed

    # the kept lists are each user's most recent `keep` movies (stable sort on time: ties keep the file order)
    df = _processed(out)
    ordered = raw.sort_values("timestamp", kind="stable").groupby("userId")["movieId"].agg(list)
    mapping = load_item_id_mapping(out / "workflow")
    for user, items in zip(df["userId"], df[roles.ITEM_LIST]):
        assert [mapping[i] for i in items] == ordered[user][-keep:]


def test_sequence_per_line_file_is_detected(shared_data, tmp_path, capsys):
    """Amazon Beauty in S3-Rec form (`user item item ...`): detected, user ids from the first token, no time."""
    src = shared_data / "amazon2014-s3rec" / "Beauty.txt.xz"
    out = tmp_path / "beauty"
    assert main(["preprocess", "--input", str(src), "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "sequence-per-line file" in printed and "first token of each line is read as its user id" in printed
    report = _report(out)
    assert report["input_format"] == "sequences"
    assert report["in"] == {"sequences": 22_363, "events": 198_502}
    assert report["catalogue"]["items_in_log"] == 12_101
    keep = report["max_history"]["max_length"]
    df = _processed(out)
    assert roles.TIMESTAMP_LIST not in df.columns and roles.ACTION_LIST not in df.columns
    mapping = load_item_id_mapping(out / "workflow")
    import lzma

    with lzma.open(src, "rt") as handle:
        lines = [next(handle).split() for _ in range(3)]
    by_user = dict(zip(df["user_id"], df[roles.ITEM_LIST]))
    for tokens in lines:
        assert [mapping[i] for i in by_user[int(tokens[0])]] == [int(t) for t in tokens[1:]][-keep:]


def test_sequences_without_user_ids_and_explicit_format(tmp_path, capsys):
    src = tmp_path / "seqs.dat"
    src.write_text("5 6 7\n5 8\n\n9 5 6 7\n")  # first tokens repeat: no user ids; line numbers are the ids
    out = tmp_path / "out"
    assert main(["preprocess", "--input", str(src), "--output", str(out), "--input-format", "sequences",
                 "--min-length", "2"]) == 0
    assert "the line number is the user id" in capsys.readouterr().out
    df = _processed(out)
    mapping = load_item_id_mapping(out / "workflow")
    got = {u: [mapping[i] for i in items] for u, items in zip(df["user_id"], df[roles.ITEM_LIST])}
    assert got == {1: [5, 6, 7], 2: [5, 8], 4: [9, 5, 6, 7]}
    assert _report(out)["max_history"]["value"] == 8  # p95 of (2, 1, 3) = 3 -> rounded up to 8
    assert _report(out)["columns"]["timestamp"] is None
    # train follows the data: no timestamps, so the default config's time bias goes off (not a model error)
    assert main(["train", "--data", str(out), "--output", str(tmp_path / "run"), *TINY]) == 0
    assert "time bias is switched off" in capsys.readouterr().out


def test_ids_beyond_int64_are_read_as_strings(tmp_path, capsys):
    big = 2**64 - 5
    log = pd.DataFrame({"user_id": [1, 1, 1, 2, 2, 2], "item_id": [big, big + 1, 7, 7, big, big + 2],
                        "timestamp": [1, 2, 3, 4, 5, 6]})
    src = tmp_path / "log.csv"
    src.write_text(log.to_csv(index=False))
    out = tmp_path / "out"
    assert main(["preprocess", "--input", str(src), "--output", str(out), "--action-column", "none"]) == 0
    assert "do not fit int64" in capsys.readouterr().out
    mapping = load_item_id_mapping(out / "workflow")
    df = _processed(out)
    assert [mapping[i] for i in df[roles.ITEM_LIST][0]] == [str(big), str(big + 1), "7"]


def test_drop_nulls_are_counted(tmp_path):
    log = pd.DataFrame({"user_id": [1, 1, 1, 1, 2, 2, 2], "item_id": [5, None, 6, 7, 5, 5, None],
                        "action": ["v"] * 7, "timestamp": [1, 2, 3, 4, 5, 6, 7]})
    src = tmp_path / "log.csv"
    log.to_csv(src, index=False)
    out = tmp_path / "out"
    assert main(["preprocess", "--input", str(src), "--output", str(out), "--drop-nulls", "--min-length", "2"]) == 0
    report = _report(out)
    assert report["in"]["events"] == 7 and report["dropped"]["nulls"]["events"] == 2
    assert report["dropped"]["nulls"]["by_column"] == {"item_id": 2}
    assert report["out"]["events"] == 5
    # the item column was read as floats only because of the empty fields: the ids stay integers
    assert sorted(v for v in load_item_id_mapping(out / "workflow") if v is not None) == [5, 6, 7]

    sessions = pd.DataFrame({"user_session": ["a", "b", "c"], "item_id_list_seq": [[1, 2], [3, None, 4], None],
                             "timestamp_first": [1, 2, 3]})
    src = tmp_path / "sessions.parquet"
    sessions.to_parquet(src)
    out = tmp_path / "sessions"
    assert main(["preprocess", "--input", str(src), "--output", str(out), "--drop-nulls", "--min-length", "2",
                 "--action-column", "none"]) == 0
    report = _report(out)
    assert report["input_format"] == "sessions"
    assert report["dropped"]["nulls"]["events"] == 1 and report["dropped"]["nulls"]["sessions"] == 1
    assert report["out"] == {"sequences": 2, "events": 4}


def test_train_takes_or_checks_the_data_history(tmp_path, capsys):
    rng = np.random.default_rng(0)
    log = pd.DataFrame({"user_id": np.repeat(np.arange(30), 12), "item_id": rng.integers(0, 40, 360),
                        "action": "view", "timestamp": np.tile(np.arange(12), 30)})
    src = tmp_path / "log.parquet"
    log.to_parquet(src)
    data = tmp_path / "data"
    assert main(["preprocess", "--input", str(src), "--output", str(data), "--max-history", "16"]) == 0
    assert _report(data)["max_history"]["chosen_by"] == "--max-history 16"
    # no --config / --max-history: the model takes the data's window (and the demo preset's 11 output slots)
    assert main(["train", "--data", str(data), "--output", str(tmp_path / "run"), *TINY]) == 0
    assert "max history 16: the data's" in capsys.readouterr().out
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["data"]["max_history"] == 16 and saved["model"]["max_seq_len"] == 27
    # a different window is refused (the bad-input suite checks the message), unless asked for
    assert main(["train", "--data", str(data), "--output", str(tmp_path / "run8"), "--max-history", "8", *TINY]) == 2
    assert not (tmp_path / "run8").exists()
    assert main(["train", "--data", str(data), "--output", str(tmp_path / "run8"), "--max-history", "8",
                 "--allow-history-mismatch", *TINY]) == 0
    assert "differs from the data's 16" in capsys.readouterr().out
    saved = yaml.safe_load((tmp_path / "run8" / "config.yaml").read_text())
    assert saved["data"]["max_history"] == 8 and saved["model"]["max_seq_len"] == 19
