"""The Merlin session Parquet layout: per-event timestamps (with the `timestamp_first` fallback and its warning),
train / valid / test files (read and written) and prefix expansion, on the real Diginetica sample."""
from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest

from merlin_hstu.common import schema as roles
from merlin_hstu.workflows.session_workflow import (
    MERLIN_SESSION_ID,
    MERLIN_SESSION_ITEMS,
    MERLIN_SESSION_TIME,
    EventLogError,
    SessionWorkflowConfig,
    load_item_id_mapping,
    preprocess,
    read_event_log,
)

SESSION = "session_id"
CONFIG = SessionWorkflowConfig(id_column=SESSION, id_kind="session", item_column="item", action_column=None,
                               timestamp_column="ts", max_length=20, min_length=2)


def _as_lists(df: pd.DataFrame) -> pd.DataFrame:
    out = df.copy()
    for col in out.columns:
        if out[col].dtype == object and len(out) and not isinstance(out[col].iloc[0], str):
            out[col] = [list(map(int, v)) for v in out[col]]
    return out.reset_index(drop=True)


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
