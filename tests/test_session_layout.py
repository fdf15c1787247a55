"""The Merlin session Parquet layout: per-event timestamps (with the `timestamp_first` fallback and its warning),
train / valid / test files (read and written) and prefix expansion, on the real Diginetica sample."""
from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
from test_workflow import _as_lists  # list cells as Python lists, one definition for both files

from merlin_hstu.common import schema as roles
from merlin_hstu.workflows.session_workflow import (
    MERLIN_SESSION_ID,
    MERLIN_SESSION_ITEMS,
    MERLIN_SESSION_TIME,
    EventLogError,
    SPLITS,
    SPLITS_DIR,
    SessionWorkflowConfig,
    expand_prefixes,
    preprocess,
    read_event_log,
    split_layout_files,
)

SESSION = "session_id"
CONFIG = SessionWorkflowConfig(id_column=SESSION, id_kind="session", item_column="item", action_column=None,
                               timestamp_column="ts", max_length=20, min_length=2)



@pytest.fixture(scope="module")
def diginetica_events(shared_data) -> pd.DataFrame:
    """The Diginetica sample as events: session, item, unix seconds (day + offset in ms, floored), file order."""
    raw = pd.read_csv(shared_data / "diginetica-sample" / "sample_train-item-views.csv.xz", sep=";")
    assert len(raw) == 12391
    times = pd.to_datetime(raw["eventdate"]) + pd.to_timedelta(raw["timeframe"], unit="ms")
    seconds = times.to_numpy("datetime64[ns]").astype(np.int64) // 10**9
    return pd.DataFrame({SESSION: raw["session_id"].to_numpy(), "item": raw["item_id"].to_numpy(), "ts": seconds})


def _session_frame(events: pd.DataFrame, time_list: str = roles.TIMESTAMP_LIST, reverse: bool = False) -> pd.DataFrame:
    """The Merlin session layout of `events` (plain pandas): one row per session, lists in file order (or reversed,
    so that only the per-event times can restore the order), the session start as timestamp_first."""
    rows = []
    for key, group in events.groupby(SESSION, sort=True):
        items, ts = group["item"].tolist(), group["ts"].tolist()
        if reverse:
            items, ts = items[::-1], ts[::-1]
        rows.append({MERLIN_SESSION_ID: key, MERLIN_SESSION_ITEMS: items, time_list: ts,
                     MERLIN_SESSION_TIME: min(ts)})
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------------------------
# 1. per-event timestamps
# ---------------------------------------------------------------------------------------------------------------
def test_per_event_timestamps_kept_on_diginetica(diginetica_events, tmp_path):
    """Session Parquet with a per-event time list == the same events as an event log; the output's
    timestamp-list holds each event's own second, not the session start."""
    sessions = _session_frame(diginetica_events, reverse=True)
    path = tmp_path / "sessions.parquet"
    sessions.to_parquet(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no timestamp_first fallback warning: the per-event list is found
        exploded = read_event_log(path, CONFIG)
    assert len(exploded) == 12391
    from_sessions = preprocess(path, tmp_path / "s", CONFIG).to_pandas()
    # the same events in the same (reversed) list order: ties in time keep input order on both paths
    events = sessions.explode([MERLIN_SESSION_ITEMS, roles.TIMESTAMP_LIST])
    events = pd.DataFrame({SESSION: events[MERLIN_SESSION_ID].to_numpy(),
                           "item": events[MERLIN_SESSION_ITEMS].to_numpy(np.int64),
                           "ts": events[roles.TIMESTAMP_LIST].to_numpy(np.int64)})
    from_events = preprocess(events, tmp_path / "e", CONFIG).to_pandas()
    pd.testing.assert_frame_equal(_as_lists(from_sessions), _as_lists(from_events))
    # plain reference: per session, events by time (stable on file order), the last 20
    ordered = diginetica_events.sort_values("ts", kind="stable")
    ref = {k: g["ts"].tolist()[-20:] for k, g in ordered.groupby(SESSION) if len(g) >= 2}
    got = dict(zip(from_sessions[SESSION], from_sessions[roles.TIMESTAMP_LIST]))
    assert set(got) == set(ref) and len(ref) == 2053
    assert all(list(map(int, got[k])) == ref[k] for k in ref)
    within = [np.ptp(v) for v in got.values()]
    assert sum(t > 0 for t in within) > 1500  # real time gaps inside sessions (timestamp_first would give 0)


def test_timestamp_first_fallback_warns_and_names_the_column(diginetica_events, tmp_path):
    sessions = _session_frame(diginetica_events).drop(columns=[roles.TIMESTAMP_LIST])
    with pytest.warns(UserWarning, match=r"no per-event timestamp list.*'timestamp_first'.*--session-time-column"):
        result = preprocess(sessions, tmp_path / "out", CONFIG)
    df = result.to_pandas()
    starts = dict(zip(sessions[MERLIN_SESSION_ID], sessions[MERLIN_SESSION_TIME]))
    assert all(set(map(int, ts)) == {starts[k]} for k, ts in zip(df[SESSION], df[roles.TIMESTAMP_LIST]))
    assert any("timestamp_first" in note for note in result.report["notes"])


def test_session_time_column_names_the_list_or_the_start(diginetica_events, tmp_path):
    sessions = _session_frame(diginetica_events, time_list="event_seconds")  # a name detection does not pick
    with pytest.warns(UserWarning, match="no per-event timestamp list"):
        read_event_log(sessions, CONFIG)
    named = SessionWorkflowConfig(**{**vars(CONFIG), "session_time_column": "event_seconds", "cli_flags": None})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        per_event = read_event_log(sessions, named)
        start = read_event_log(sessions, SessionWorkflowConfig(**{**vars(named), "session_time_column":
                                                                  MERLIN_SESSION_TIME}))
    assert per_event["ts"].tolist() == np.concatenate(sessions["event_seconds"].to_numpy()).tolist()
    assert start["ts"].tolist() == np.repeat(sessions[MERLIN_SESSION_TIME], sessions[MERLIN_SESSION_ITEMS].map(len)
                                             ).tolist()
    with pytest.raises(EventLogError, match=r"--session-time-column 'nope'.*no such column"):
        read_event_log(sessions, SessionWorkflowConfig(**{**vars(named), "session_time_column": "nope"}))


def test_misaligned_timestamp_list_names_session_and_lengths():
    sessions = pd.DataFrame({MERLIN_SESSION_ID: ["a", "b"], MERLIN_SESSION_ITEMS: [[1, 2], [3, 4, 5]],
                             roles.TIMESTAMP_LIST: [[10, 11], [20, 21]], MERLIN_SESSION_TIME: [10, 20]})
    with pytest.raises(EventLogError, match=r"'item_id_list_seq' and 'timestamp-list' differ in length at 1 "
                                            r"session\(s\), the first session 'b' .*3 items vs 2 timestamps"):
        read_event_log(sessions, CONFIG)


def test_ambiguous_and_derived_time_lists():
    base = {MERLIN_SESSION_ID: ["a"], MERLIN_SESSION_ITEMS: [[1, 2]], MERLIN_SESSION_TIME: [10]}
    two = pd.DataFrame({**base, "timestamp-list": [[10, 11]], "timestamp_seq": [[10, 12]]})
    with pytest.raises(EventLogError, match=r"several per-event timestamp lists.*--session-time-column"):
        read_event_log(two, CONFIG)
    # T4R's derived time features are floats (days, sin/cos), not unix seconds: never taken as event times
    derived = pd.DataFrame({**base, "timestamp/age_days-list": [[0.5, 0.25]]})
    with pytest.warns(UserWarning, match="no per-event timestamp list"):
        assert read_event_log(derived, CONFIG)["ts"].tolist() == [10, 10]


# ---------------------------------------------------------------------------------------------------------------
# 2. the train / valid / test files of the Merlin session layout
# ---------------------------------------------------------------------------------------------------------------
SPLIT_CONFIG = SessionWorkflowConfig(**{**vars(CONFIG), "split_layout": "merlin", "cli_flags": None})


def _read_split(folder, split) -> pd.DataFrame:
    return _as_lists(pd.read_parquet(folder / f"{split}.parquet"))


def test_written_split_layout_is_a_time_split_of_the_processed_rows(diginetica_events, tmp_path):
    result = preprocess(diginetica_events, tmp_path / "out", SPLIT_CONFIG)
    folder = tmp_path / "out" / SPLITS_DIR
    assert sorted(p.name for p in folder.iterdir()) == ["schema.pbtxt", "test.parquet", "train.parquet",
                                                        "valid.parquet"]
    parts = {s: _read_split(folder, s) for s in SPLITS}
    n = result.num_rows
    assert n == 2053
    assert [len(parts[s]) for s in SPLITS] == [n - 2 * round(n * 0.1), round(n * 0.1), round(n * 0.1)]
    # plain reference: the processed rows ordered by their first kept event's time (ties: id order), cut 80/10/10
    rows = _as_lists(result.to_pandas())
    order = np.argsort([t[0] for t in rows[roles.TIMESTAMP_LIST]], kind="stable")
    cut = [0, n - 2 * round(n * 0.1), n - round(n * 0.1), n]
    for k, split in enumerate(SPLITS):
        expected = rows.iloc[order[cut[k]:cut[k + 1]]].reset_index(drop=True)
        pd.testing.assert_frame_equal(parts[split], expected, check_dtype=False)
    starts = {s: [t[0] for t in parts[s][roles.TIMESTAMP_LIST]] for s in SPLITS}
    assert max(starts["train"]) <= min(starts["valid"]) and max(starts["valid"]) <= min(starts["test"])
    keys = [set(parts[s][SESSION]) for s in SPLITS]
    assert not (keys[0] & keys[1] or keys[0] & keys[2] or keys[1] & keys[2])  # no session in two splits
    assert result.report["splits"]["test"]["sequences"] == round(n * 0.1)
    # the folder reads back as a Merlin dataset with the workflow's schema (tags, int_domain)
    from merlin.io import Dataset

    schema = Dataset(str(folder / "train.parquet"), engine="parquet", cpu=True,
                     schema=result.schema).schema
    assert roles.item_list_column(schema) == roles.ITEM_LIST
    assert (folder / "schema.pbtxt").read_text() == (result.path / "schema.pbtxt").read_text()


def _write_layout(events: pd.DataFrame, root, per_day: bool):
    """Diginetica as T4R writes sessions: per-day folders 1/, 2/ (or one folder), each with train / valid / test."""
    sessions = _session_frame(events).sort_values(MERLIN_SESSION_TIME, kind="stable").reset_index(drop=True)
    n = len(sessions)
    bounds = {"train": (0, int(n * 0.8)), "valid": (int(n * 0.8), int(n * 0.9)), "test": (int(n * 0.9), n)}
    for split, (lo, hi) in bounds.items():
        part = sessions.iloc[lo:hi]
        if per_day:
            half = (lo + hi) // 2
            for day, (a, b) in (("1", (lo, half)), ("2", (half, hi))):
                (root / day).mkdir(parents=True, exist_ok=True)
                sessions.iloc[a:b].to_parquet(root / day / f"{split}.parquet")
        else:
            root.mkdir(parents=True, exist_ok=True)
            part.to_parquet(root / f"{split}.parquet")
    return sessions, bounds


@pytest.mark.parametrize("per_day", [False, True])
def test_split_layout_input_keeps_its_split(diginetica_events, tmp_path, per_day):
    sessions, bounds = _write_layout(diginetica_events, tmp_path / "layout", per_day)
    assert split_layout_files(tmp_path / "layout")[0][0] == "train"
    result = preprocess(tmp_path / "layout", tmp_path / "out", CONFIG)  # no --split-layout: the input has one
    folder = tmp_path / "out" / SPLITS_DIR
    for split, (lo, hi) in bounds.items():
        wanted = {k for k, items in zip(sessions[MERLIN_SESSION_ID][lo:hi], sessions[MERLIN_SESSION_ITEMS][lo:hi])
                  if len(items) >= 2}
        assert set(pd.read_parquet(folder / f"{split}.parquet")[SESSION]) == wanted
    assert result.report["splits"]["how"] == "the input's own train / valid / test files"
    assert sum(result.report["splits"][s]["sequences"] for s in SPLITS) == result.num_rows


def test_split_layout_input_errors(diginetica_events, tmp_path):
    sessions, _ = _write_layout(diginetica_events, tmp_path / "a", per_day=False)
    sessions.iloc[:5].drop(columns=[MERLIN_SESSION_TIME]).to_parquet(tmp_path / "a" / "valid.parquet")
    with pytest.raises(EventLogError, match=r"valid.parquet: its schema disagrees with .*train.parquet.*"
                                            r"only in train.parquet: \['timestamp_first'\]"):
        read_event_log(tmp_path / "a", CONFIG)
    _write_layout(diginetica_events, tmp_path / "b", per_day=False)
    sessions.iloc[:3].to_parquet(tmp_path / "b" / "test.parquet")  # train sessions again: leakage
    with pytest.raises(EventLogError, match=r"appear in more than one split file, e\.g\. \d+ in \['train', 'test'\]"):
        read_event_log(tmp_path / "b", CONFIG)
    (tmp_path / "b" / "valid.parquet").unlink()
    with pytest.raises(EventLogError, match=r"needs train.parquet, valid.parquet and test.parquet.*'valid.parquet'"):
        read_event_log(tmp_path / "b", CONFIG)


# ---------------------------------------------------------------------------------------------------------------
# 3. prefix expansion
# ---------------------------------------------------------------------------------------------------------------
def test_prefix_expansion_equals_plain_python(diginetica_events, tmp_path):
    config = SessionWorkflowConfig(**{**vars(SPLIT_CONFIG), "prefix_expansion": True})
    result = preprocess(diginetica_events, tmp_path / "out", config)
    folder = tmp_path / "out" / SPLITS_DIR
    preprocess(diginetica_events, tmp_path / "plain", SPLIT_CONFIG)  # the same data, not expanded
    base = _read_split(tmp_path / "plain" / SPLITS_DIR, "train")
    expected = []  # plain Python: every train row of n events -> prefixes of 2..n events, in order
    for _, row in base.iterrows():
        for k in range(2, row[roles.LENGTH] + 1):
            expected.append((row[SESSION], row[roles.ITEM_LIST][:k], row[roles.TIMESTAMP_LIST][:k], k))
    train = _read_split(folder, "train")
    got = list(zip(train[SESSION], train[roles.ITEM_LIST], train[roles.TIMESTAMP_LIST], train[roles.LENGTH]))
    assert got == expected
    assert len(train) == int((base[roles.LENGTH] - 1).sum()) == result.report["splits"]["prefix_expansion"][
        "train_rows"]
    for split in ("valid", "test"):  # evaluation files are not expanded
        pd.testing.assert_frame_equal(_read_split(folder, split), _read_split(tmp_path / "plain" / SPLITS_DIR, split))
    with pytest.raises(EventLogError, match=r"TRAIN split only.*--split-layout merlin"):
        preprocess(diginetica_events, tmp_path / "x", SessionWorkflowConfig(**{**vars(CONFIG), "cli_flags": None,
                                                                               "prefix_expansion": True}))


def test_prefix_expansion_cuts_interleaved_and_action_lists():
    rows = pd.DataFrame({"u": [7, 8], roles.ITEM_LIST: [np.array([3, 4, 5]), np.array([6])],
                         roles.ACTION_LIST: [np.array([1, 2, 1]), np.array([2])],
                         roles.INTERLEAVED_LIST: [np.array([3, 11, 4, 12, 5, 11]), np.array([6, 12])],
                         roles.LENGTH: [3, 1]})
    out = expand_prefixes(rows)
    assert out["u"].tolist() == [7, 7] and out[roles.LENGTH].tolist() == [2, 3]
    assert [list(v) for v in out[roles.INTERLEAVED_LIST]] == [[3, 11, 4, 12], [3, 11, 4, 12, 5, 11]]
    assert [list(v) for v in out[roles.ACTION_LIST]] == [[1, 2], [1, 2, 1]]


def test_cli_writes_the_split_layout_with_prefixes(diginetica_events, tmp_path, capsys):
    from merlin_hstu.cli.main import main

    log = tmp_path / "log.csv"
    diginetica_events.to_csv(log, index=False)
    code = main(["preprocess", "--input", str(log), "--output", str(tmp_path / "out"), "--id-column", SESSION,
                 "--id-kind", "session", "--item-column", "item", "--action-column", "none", "--timestamp-column",
                 "ts", "--min-length", "2", "--max-history", "18", "--split-layout", "merlin", "--test-fraction",
                 "0.2", "--prefix-expansion"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "splits     splits/: train 1,437, valid 205, test 411 sessions" in printed
    assert "prefix rows" in printed
    test = pd.read_parquet(tmp_path / "out" / SPLITS_DIR / "test.parquet")
    assert len(test) == round(2053 * 0.2)


def test_t4r_merlin_dataloader_reads_the_written_splits(diginetica_events, tmp_path):
    """T4R's own data path on our output: the Merlin dataloader built from splits/schema.pbtxt pads the train file's
    lists to max_sequence_length, as T4R's examples feed tr.Trainer(train_paths=..., eval_paths=...)."""
    from transformers4rec.torch.utils.data_utils import MerlinDataLoader

    from merlin_hstu.t4r.data import read_schema

    result = preprocess(diginetica_events, tmp_path / "out", SPLIT_CONFIG)
    folder = tmp_path / "out" / SPLITS_DIR
    schema = read_schema(folder).select_by_name([roles.ITEM_LIST, roles.TIMESTAMP_LIST])
    loader = MerlinDataLoader.from_schema(schema, str(folder / "valid.parquet"), batch_size=64,
                                          max_sequence_length=20, shuffle=False)
    inputs, _ = next(iter(loader))
    valid = _read_split(folder, "valid")
    items = inputs[roles.ITEM_LIST]
    assert tuple(items.shape) == (64, 20)
    assert items[0, : len(valid[roles.ITEM_LIST][0])].tolist() == valid[roles.ITEM_LIST][0]
    assert result.report["splits"]["valid"]["sequences"] == len(valid)
