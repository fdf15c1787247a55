"""Session workflow: exact output on a hand-made log, input formats, the Merlin session layout, interleaving,
real Diginetica data against plain pandas, bad input, and atomic output."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from merlin.io import Dataset
from merlin.schema import ColumnSchema, Schema, Tags
from merlin.schema.io.tensorflow_metadata import TensorflowMetadata

from merlin_hstu.common import schema as roles
from merlin_hstu.workflows.session_workflow import (
    EventLogError,
    SessionWorkflowConfig,
    build_session_workflow,
    load_action_mapping,
    load_item_id_mapping,
    load_serving_workflow,
    normalize_event_log,
    preprocess,
    read_event_log,
    validate_event_log,
)
from merlin_hstu.workflows.ops import ChronologicalGroupby

# Events of four users, rows of different users interleaved; input order is NOT time order.
# user 10: ties at t=100 (x before z in input), user 3: tie at t=7 (a before b), user 1: tie at t=9,
# user 7 has one event (dropped by min_length=2), user 10 has 5 events (truncated to max_length=4).
HAND_ROWS = [
    # user, item, action, timestamp
    (10, "x", "view", 100),
    (3, "a", "click", 7),
    (10, "y", "click", 50),
    (7, "m", "view", 1),
    (10, "z", "view", 100),
    (3, "b", "view", 7),
    (1, "p", "view", 9),
    (10, "w", "buy", 75),
    (3, "c", "view", 5),
    (1, "q", "buy", 9),
    (10, "v", "view", 120),
]
HAND_CONFIG = SessionWorkflowConfig(max_length=4, min_length=2)
# written by hand from the rows above: stable chronological order, most recent 4, ids ascending
HAND_EXPECTED = {
    1: (["p", "q"], ["view", "buy"], [9, 9]),
    3: (["c", "a", "b"], ["view", "click", "view"], [5, 7, 7]),
    10: (["w", "x", "z", "v"], ["buy", "view", "view", "view"], [75, 100, 100, 120]),
}


def hand_log() -> pd.DataFrame:
    df = pd.DataFrame(HAND_ROWS, columns=["user_id", "item_id", "action", "timestamp"])
    df["note"] = [f"extra {i}" for i in range(len(df))]  # extra columns are ignored
    return df


def decoded(processed: pd.DataFrame, item_map, action_map) -> dict:
    """{id: (raw items, raw actions, timestamps)} of a preprocess output."""
    return {
        ident: ([item_map[i] for i in items], [action_map[a] for a in actions], [int(t) for t in times])
        for ident, items, actions, times in zip(
            processed.iloc[:, 0],
            processed[roles.ITEM_LIST],
            processed[roles.ACTION_LIST],
            processed[roles.TIMESTAMP_LIST],
        )
    }


@pytest.fixture(scope="module")
def hand_result(tmp_path_factory):
    return preprocess(hand_log(), tmp_path_factory.mktemp("hand") / "out", HAND_CONFIG)


@pytest.fixture(scope="module")
def hand_frame(hand_result):
    return hand_result.to_pandas()


# ---------------------------------------------------------------------------------------------------------
# exact output
# ---------------------------------------------------------------------------------------------------------
def test_hand_log_exact_output(hand_result, hand_frame):
    df = hand_frame
    assert list(df.columns) == ["user_id", roles.ITEM_LIST, roles.ACTION_LIST, roles.TIMESTAMP_LIST, roles.LENGTH]
    assert df["user_id"].tolist() == [1, 3, 10]  # rows ordered by id, user 7 (1 event) dropped
    assert hand_result.num_rows == 3
    item_map = load_item_id_mapping(hand_result.workflow_path)
    action_map = load_action_mapping(hand_result.workflow_path)
    assert decoded(df, item_map, action_map) == HAND_EXPECTED
    assert df[roles.LENGTH].tolist() == [2, 3, 4]
    assert df[roles.LENGTH].dtype == np.int64
    for col in (roles.ITEM_LIST, roles.ACTION_LIST, roles.TIMESTAMP_LIST):
        assert all(np.asarray(v).dtype == np.int64 for v in df[col])
        assert [len(v) for v in df[col]] == df[roles.LENGTH].tolist()


def test_categorify_layout_pad_null_oov_then_real_ids(hand_result, hand_frame):
    """NVTabular 23.08: 0 pad, 1 null, 2 OOV, real ids from 3; int_domain.max + 1 = table size."""
    item_map = load_item_id_mapping(hand_result.workflow_path)
    n_items = len({r[1] for r in HAND_ROWS})  # Categorify is fitted on every event, also user 7's
    assert list(item_map[:3]) == [None, None, None]
    assert sorted(item_map[3:]) == sorted({r[1] for r in HAND_ROWS})
    assert len(item_map) == 3 + n_items
    assert roles.embedding_table_size(hand_result.schema, roles.ITEM_LIST) == 3 + n_items
    codes = np.concatenate(hand_frame[roles.ITEM_LIST].to_numpy())
    assert codes.min() >= roles.FIRST_REAL_ID and codes.max() < len(item_map)
    action_map = load_action_mapping(hand_result.workflow_path)
    assert list(action_map[:3]) == [None, None, None]
    assert sorted(action_map[3:]) == ["buy", "click", "view"]
    assert roles.embedding_table_size(hand_result.schema, roles.ACTION_LIST) == 6


def test_item_ids_follow_count_then_value_so_every_cpu_assigns_the_same(hand_result):
    """Ids by count, descending, and equal counts by raw value, ascending (workflows/cluster.py
    canonical_categories): NVTabular leaves ties to numpy's quicksort, which orders them differently with and
    without AVX-512."""
    counts = pd.Series([r[1] for r in HAND_ROWS]).value_counts()
    expected = sorted(counts.index, key=lambda item: (-counts[item], item))
    assert list(load_item_id_mapping(hand_result.workflow_path)[3:]) == expected
    assert len(set(counts.values)) < len(counts)  # the log has ties, so the order is really chosen here


def test_canonical_categories_undo_the_sort_kernels_tie_order(tmp_path, monkeypatch):
    """Two fits whose size sort breaks ties in opposite orders (as the AVX-512 and the plain quicksort do) write
    different vocabularies; canonical_categories makes them the same file and the same encoded column."""
    import nvtabular as nvt
    from nvtabular import ops

    from merlin_hstu.workflows.cluster import canonical_categories

    frame = pd.DataFrame({"item": [5, 9, 2, 9, 7, 2, 4, 5, 8, 1]})  # counts: 2 x {2, 5, 9}, 1 x {1, 4, 7, 8}
    plain_sort = pd.DataFrame.sort_values

    def ties_reversed(self, by, *args, **kwargs):  # a stable sort of the reversed rows: ties by value, descending
        if isinstance(by, str) and by.endswith("_size") and kwargs.get("ascending") is False:
            return plain_sort(self.iloc[::-1], by, *args, **{**kwargs, "kind": "stable"})
        return plain_sort(self, by, *args, **kwargs)

    def fit(name, tie_order):
        workflow = nvt.Workflow(["item"] >> ops.Categorify(out_path=str(tmp_path / name)))
        with monkeypatch.context() as patch:
            if tie_order == "reversed":
                patch.setattr(pd.DataFrame, "sort_values", ties_reversed)
            workflow.fit(Dataset(frame, cpu=True))
        return workflow, tmp_path / name / "categories" / "unique.item.parquet"

    (first, first_file), (second, second_file) = fit("a", "stable"), fit("b", "reversed")
    assert not pd.read_parquet(first_file).equals(pd.read_parquet(second_file))  # the kernels disagree on ties
    assert canonical_categories(first) + canonical_categories(second) >= 1
    a, b = pd.read_parquet(first_file), pd.read_parquet(second_file)
    pd.testing.assert_frame_equal(a, b)
    assert a["item"].tolist() == [2, 5, 9, 1, 4, 7, 8] and a.index.tolist() == list(range(3, 10))
    encoded = [w.transform(Dataset(frame, cpu=True)).to_ddf().compute()["item"].tolist() for w in (first, second)]
    assert encoded[0] == encoded[1] == [4, 5, 3, 5, 8, 3, 7, 4, 9, 6]
    assert canonical_categories(first) == 0  # already canonical: nothing rewritten


def test_schema_tags_read_back_from_disk(hand_result):
    path = hand_result.path
    assert (path / "schema.pbtxt").exists()
    from_pbtxt = TensorflowMetadata.from_proto_text_file(str(path)).to_merlin_schema()
    from_dataset = Dataset(str(path), engine="parquet").schema
    for schema in (from_pbtxt, from_dataset, hand_result.schema):
        assert set(schema["user_id"].tags) == {Tags.USER, Tags.ID}
        assert set(schema[roles.ITEM_LIST].tags) == {Tags.ITEM, Tags.ID, Tags.LIST, Tags.CATEGORICAL}
        assert set(schema[roles.ACTION_LIST].tags) == {Tags.LIST, Tags.CATEGORICAL}
        assert schema[roles.ACTION_LIST].properties[roles.ACTION_PROPERTY] == "action"
        assert set(schema[roles.TIMESTAMP_LIST].tags) == {Tags.LIST, Tags.TIME, Tags.CONTINUOUS}
        assert set(schema[roles.LENGTH].tags) == set()
        assert schema[roles.ITEM_LIST].int_domain.max == 2 + len({r[1] for r in HAND_ROWS})
        assert schema[roles.ITEM_LIST].is_list and schema[roles.ITEM_LIST].is_ragged
        assert schema[roles.ITEM_LIST].value_count.max == HAND_CONFIG.max_length
        assert schema.select_by_tag(Tags.ITEM_ID).column_names == [roles.ITEM_LIST]
        assert roles.item_list_column(schema) == roles.ITEM_LIST
        assert roles.action_list_column(schema) == roles.ACTION_LIST
        assert roles.timestamp_list_column(schema) == roles.TIMESTAMP_LIST
        assert roles.length_column(schema) == roles.LENGTH
        assert roles.id_column(schema) == "user_id"
        assert roles.interleaved_list_column(schema) is None
        # the Categorify file path points into the final output, not the staging directory
        cat_path = Path(schema[roles.ITEM_LIST].properties["cat_path"])
        assert cat_path.is_file() and cat_path.parent.parent == hand_result.workflow_path


def test_saved_workflow_reloads_and_serving_variant_keeps_short_histories(hand_result, hand_frame):
    import nvtabular as nvt

    config = HAND_CONFIG
    raw = Dataset(normalize_event_log(hand_log(), config), cpu=True)
    again = nvt.Workflow.load(str(hand_result.workflow_path)).transform(raw).compute()
    pd.testing.assert_frame_equal(_as_lists(again), _as_lists(hand_frame))

    serving = load_serving_workflow(hand_result.workflow_path)
    served = _as_lists(serving.transform(raw).compute())
    assert served["user_id"].tolist() == [1, 3, 7, 10]
    assert served.loc[served["user_id"] == 7, roles.LENGTH].item() == 1
    pd.testing.assert_frame_equal(
        served[served["user_id"] != 7].reset_index(drop=True), _as_lists(hand_frame)
    )
    assert serving.output_schema[roles.ITEM_LIST].value_count.min == 1


def test_workflow_is_single_branch_after_groupby(tmp_path):
    """One Groupby, consumed by exactly one node: on CPU each extra consumer re-runs the Groupby."""
    workflow = build_session_workflow(HAND_CONFIG, categories_dir=tmp_path)
    nodes, stack = [], [workflow.output_node]
    while stack:
        node = stack.pop()
        if any(node is n for n in nodes):
            continue
        nodes.append(node)
        stack.extend(node.parents_with_dependencies)
    groupbys = [n for n in nodes if isinstance(n.op, ChronologicalGroupby)]
    assert len(groupbys) == 1
    consumers = [n for n in nodes if any(p is groupbys[0] for p in n.parents_with_dependencies)]
    assert len(consumers) == 1


def _as_lists(df: pd.DataFrame) -> pd.DataFrame:
    """List cells as Python lists, so frames from parquet and from memory compare equal."""
    out = df.copy()
    for col in out.columns:
        if out[col].dtype == object and len(out) and not isinstance(out[col].iloc[0], str):
            out[col] = [list(map(int, v)) for v in out[col]]
    return out.reset_index(drop=True)


# ---------------------------------------------------------------------------------------------------------
# input formats
# ---------------------------------------------------------------------------------------------------------
def test_csv_and_parquet_inputs_give_the_same_output(tmp_path, hand_frame):
    log = hand_log()
    csv = tmp_path / "events.csv"
    log.to_csv(csv, sep=";", index=False)  # separator is sniffed from the header
    parquet = tmp_path / "events.parquet"
    log.to_parquet(parquet)
    from_csv = preprocess(csv, tmp_path / "from_csv", HAND_CONFIG).to_pandas()
    from_parquet = preprocess(parquet, tmp_path / "from_parquet", HAND_CONFIG).to_pandas()
    pd.testing.assert_frame_equal(_as_lists(from_csv), _as_lists(hand_frame))
    pd.testing.assert_frame_equal(_as_lists(from_parquet), _as_lists(hand_frame))


def test_merlin_session_layout_matches_equivalent_event_log(tmp_path):
    sessions = pd.DataFrame(
        {
            "user_session": ["s2", "s1", "s3", "s1"],  # s1 appears twice: its two parts are merged by start time
            "item_id_list_seq": [[5, 6, 5], [1, 2], [9], [3]],
            "item_event_name_list_seq": [["view", "cart", "buy"], ["view", "view"], ["view"], ["cart"]],
            "timestamp_first": [300, 200, 50, 100],
            "day_index": [1, 1, 1, 1],  # extra column
        }
    )
    path = tmp_path / "sessions.parquet"
    sessions.to_parquet(path)
    # the same events written out by hand; every event carries its session's timestamp_first
    events = pd.DataFrame(
        [
            ("s2", 5, "view", 300), ("s2", 6, "cart", 300), ("s2", 5, "buy", 300),
            ("s1", 1, "view", 200), ("s1", 2, "view", 200),
            ("s3", 9, "view", 50),
            ("s1", 3, "cart", 100),
        ],
        columns=["session_id", "item", "event", "ts"],
    )
    config = SessionWorkflowConfig(
        id_column="session_id", id_kind="session", item_column="item", action_column="event",
        timestamp_column="ts", max_length=10, min_length=1,
    )
    exploded = read_event_log(path, config)
    pd.testing.assert_frame_equal(exploded, events)
    # the same layout as a Parquet directory (two parts plus a schema file, as NVTabular writes it)
    directory = tmp_path / "sessions_dir"
    directory.mkdir()
    sessions.iloc[:2].to_parquet(directory / "part_0.parquet")
    sessions.iloc[2:].to_parquet(directory / "part_1.parquet")
    (directory / "schema.pbtxt").write_text("")
    pd.testing.assert_frame_equal(read_event_log(directory, config), events)
    from_layout = preprocess(path, tmp_path / "layout", config)
    from_events = preprocess(events, tmp_path / "events", config)
    a, b = from_layout.to_pandas(), from_events.to_pandas()
    pd.testing.assert_frame_equal(_as_lists(a), _as_lists(b))
    item_map = load_item_id_mapping(from_layout.workflow_path)
    got = {sid: [item_map[i] for i in items] for sid, items in zip(a["session_id"], a[roles.ITEM_LIST])}
    assert got == {"s1": [3, 1, 2], "s2": [5, 6, 5], "s3": [9]}
    assert set(from_layout.schema["session_id"].tags) == {Tags.SESSION, Tags.ID}


def test_merlin_session_layout_with_mismatched_lists_is_rejected():
    bad = pd.DataFrame(
        {
            "user_session": ["s"],
            "item_id_list_seq": [[1, 2]],
            "item_event_name_list_seq": [["view"]],
            "timestamp_first": [1],
        }
    )
    config = SessionWorkflowConfig(
        id_column="session_id", id_kind="session", action_column="event", timestamp_column="ts"
    )
    with pytest.raises(EventLogError, match="item_event_name_list_seq"):
        read_event_log(bad, config)


def test_without_timestamps_input_order_is_kept(tmp_path):
    config = SessionWorkflowConfig(action_column=None, timestamp_column=None, max_length=3, min_length=1)
    result = preprocess(hand_log().drop(columns=["action", "timestamp"]), tmp_path / "out", config)
    df = result.to_pandas()
    assert list(df.columns) == ["user_id", roles.ITEM_LIST, roles.LENGTH]
    item_map = load_item_id_mapping(result.workflow_path)
    got = {u: [item_map[i] for i in items] for u, items in zip(df["user_id"], df[roles.ITEM_LIST])}
    assert got == {1: ["p", "q"], 3: ["a", "b", "c"], 7: ["m"], 10: ["z", "w", "v"]}
    assert roles.timestamp_list_column(result.schema) is None
    assert roles.action_list_column(result.schema) is None


# ---------------------------------------------------------------------------------------------------------
# interleaving
# ---------------------------------------------------------------------------------------------------------
def test_interleaved_tokens(tmp_path, hand_frame):
    config = SessionWorkflowConfig(max_length=4, min_length=2, interleave_actions=True)
    result = preprocess(hand_log(), tmp_path / "out", config)
    df = result.to_pandas()
    pd.testing.assert_frame_equal(_as_lists(df.drop(columns=[roles.INTERLEAVED_LIST])), _as_lists(hand_frame))

    offset = roles.action_token_offset(result.schema)
    item_rows = roles.embedding_table_size(result.schema, roles.ITEM_LIST)
    action_rows = roles.embedding_table_size(result.schema, roles.ACTION_LIST)
    assert offset == item_rows
    assert roles.embedding_table_size(result.schema, roles.INTERLEAVED_LIST) == item_rows + action_rows
    assert roles.interleaved_list_column(result.schema) == roles.INTERLEAVED_LIST
    assert Tags.CATEGORICAL not in result.schema[roles.INTERLEAVED_LIST].tags

    item_map, action_map = load_item_id_mapping(result.workflow_path), load_action_mapping(result.workflow_path)
    for user, item_ids, action_ids, tokens in zip(
        df["user_id"], df[roles.ITEM_LIST], df[roles.ACTION_LIST], df[roles.INTERLEAVED_LIST]
    ):
        tokens = [int(t) for t in tokens]
        expected = []
        for item, action in zip(item_ids, action_ids):
            expected += [int(item), int(action) + offset]
        assert tokens == expected
        # decode: even positions are items, odd positions actions shifted by the offset
        items, actions, _ = HAND_EXPECTED[user]
        assert [item_map[t] for t in tokens[0::2]] == items
        assert [action_map[t - offset] for t in tokens[1::2]] == actions


# ---------------------------------------------------------------------------------------------------------
# real data: Diginetica sample vs plain pandas
# ---------------------------------------------------------------------------------------------------------
def test_diginetica_sample_matches_pandas(shared_data, tmp_path):
    source = shared_data / "diginetica-sample" / "sample_train-item-views.csv.xz"
    config = SessionWorkflowConfig(
        id_column="session_id", id_kind="session", item_column="item_id",
        action_column=None, timestamp_column="event_time", max_length=10, min_length=2,
    )
    raw = read_event_log(source, SessionWorkflowConfig(id_column="session_id", action_column=None,
                                                       timestamp_column="timeframe"))
    assert list(raw.columns) == ["session_id", "user_id", "item_id", "timeframe", "eventdate"]
    assert len(raw) == 12391
    # event time = day + offset in ms, as datetime64 (converted to unix seconds by the workflow)
    raw["event_time"] = pd.to_datetime(raw["eventdate"]) + pd.to_timedelta(raw["timeframe"], unit="ms")
    result = preprocess(raw, tmp_path / "out", config)
    df = result.to_pandas()

    # plain pandas reference
    seconds = raw["event_time"].to_numpy("datetime64[ns]").astype(np.int64) // 10**9
    ref = raw.assign(sec=seconds).sort_values("sec", kind="stable")
    groups = ref.groupby("session_id", sort=True)
    ref_items, ref_times = groups["item_id"].agg(list), groups["sec"].agg(list)
    keep = ref_items.map(len) >= 2
    ref_items, ref_times = ref_items[keep], ref_times[keep]

    assert result.num_rows == len(df) == int(keep.sum()) == 2053
    assert df["session_id"].tolist() == ref_items.index.tolist()
    item_map = load_item_id_mapping(result.workflow_path)
    assert len(item_map) == 3 + raw["item_id"].nunique()
    rows = zip(df["session_id"], df[roles.ITEM_LIST], df[roles.TIMESTAMP_LIST], df[roles.LENGTH])
    for sid, items, times, length in rows:
        assert [item_map[i] for i in items] == ref_items[sid][-10:]
        assert list(times) == ref_times[sid][-10:]
        assert length == min(len(ref_items[sid]), 10) == len(items) == len(times)
        assert np.all(np.diff(times) >= 0)
    assert df[roles.LENGTH].max() == 10  # truncation happened (longest session has 54 views)


# ---------------------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------------------
BAD_CASES = {
    "missing column": (lambda d: d.drop(columns=["action"]), "action"),
    "wrong dtype (float items)": (lambda d: d.assign(item_id=np.arange(len(d)) + 0.5), "item_id"),
    "wrong dtype (bool ids)": (lambda d: d.assign(user_id=d["user_id"] > 3), "user_id"),
    "mixed-type ids": (lambda d: d.assign(item_id=[1 if i % 2 else "a" for i in range(len(d))]), "item_id"),
    "null ids": (lambda d: d.assign(user_id=d["user_id"].where(d.index != 4)), "user_id"),
    "null items": (lambda d: d.assign(item_id=d["item_id"].where(d.index != 2)), "item_id"),
    "non-numeric timestamps": (lambda d: d.assign(timestamp="2020-01-01"), "timestamp"),
    "negative timestamps": (lambda d: d.assign(timestamp=d["timestamp"] - 60), "timestamp"),
    "fractional timestamps": (lambda d: d.assign(timestamp=d["timestamp"] + 0.25), "timestamp"),
    "empty input": (lambda d: d.iloc[:0], "empty"),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_input_names_the_column(case):
    change, column = BAD_CASES[case]
    with pytest.raises(EventLogError) as info:
        validate_event_log(change(hand_log()), HAND_CONFIG)
    message = str(info.value)
    assert (column if column == "empty" else repr(column)) in message
    assert "Fix" in message


def test_valid_variants_are_accepted():
    log = hand_log()
    validate_event_log(log.assign(timestamp=log["timestamp"].astype(float)), HAND_CONFIG)  # integral floats
    validate_event_log(log.assign(timestamp=pd.to_datetime(log["timestamp"], unit="s")), HAND_CONFIG)
    validate_event_log(log.assign(user_id=log["user_id"].astype(str)), HAND_CONFIG)
    validate_event_log(log.assign(note=None), HAND_CONFIG)  # extra columns are not checked
    utc = log.assign(timestamp=pd.to_datetime(log["timestamp"], unit="s", utc=True))
    seconds = normalize_event_log(utc, HAND_CONFIG)
    assert seconds["timestamp"].tolist() == log["timestamp"].tolist()


def _leftovers(parent: Path) -> list:
    return sorted(p.name for p in parent.iterdir())


def test_failed_runs_leave_no_output_directory(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(EventLogError, match="timestamp"):
        preprocess(hand_log().assign(timestamp=-1), target, HAND_CONFIG)
    assert _leftovers(tmp_path) == []
    # fails after fitting (every sequence is too short): the staging directory is removed too
    with pytest.raises(EventLogError, match="min_length"):
        preprocess(hand_log(), target, SessionWorkflowConfig(max_length=4, min_length=50))
    assert _leftovers(tmp_path) == []


def test_existing_output_needs_overwrite(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("old")
    with pytest.raises(FileExistsError):
        preprocess(hand_log(), target, HAND_CONFIG)
    assert (target / "keep.txt").exists()
    result = preprocess(hand_log(), target, HAND_CONFIG, overwrite=True)
    assert _leftovers(tmp_path) == ["out"]
    assert sorted(os.listdir(target)) == ["candidates.parquet", "data_report.json", "processed", "workflow"]
    assert result.num_rows == 3


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(interleave_actions=True, action_column=None), "interleave_actions"),
        (dict(min_length=0), "min_length"),
        (dict(max_length=0), "max_length"),
        (dict(id_kind="device"), "id_kind"),
        (dict(id_column="length"), "id_column"),
        (dict(item_column="user_id"), "distinct"),
    ],
)
def test_bad_config(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SessionWorkflowConfig(**kwargs)


# ---------------------------------------------------------------------------------------------------------
# schema role lookups on hand-built schemas
# ---------------------------------------------------------------------------------------------------------
def test_role_lookup_errors_and_tag_fallback():
    items = ColumnSchema("items", tags=[Tags.ITEM, Tags.ID, Tags.LIST], is_list=True, is_ragged=True)
    times = ColumnSchema("times", tags=[Tags.TIME, Tags.LIST], is_list=True, is_ragged=True)
    schema = Schema([items, times, ColumnSchema("user", tags=[Tags.USER_ID])])
    assert roles.item_list_column(schema) == "items"  # tag fallback for schemas made elsewhere
    assert roles.timestamp_list_column(schema) == "times"
    assert roles.action_list_column(schema) is None
    assert roles.id_column(schema) == "user"
    with pytest.raises(roles.SchemaRoleError, match="no item column"):
        roles.item_list_column(Schema([times]))
    twice = Schema([items, items.with_name("more_items")])
    with pytest.raises(roles.SchemaRoleError, match="ambiguous"):
        roles.item_list_column(twice)
    actions = [roles.with_role(ColumnSchema(n, is_list=True, is_ragged=True), roles.ROLE_ACTION) for n in ("a", "b")]
    with pytest.raises(roles.SchemaRoleError, match="ambiguous action"):
        roles.action_list_column(Schema(actions))
    with pytest.raises(roles.SchemaRoleError, match="interleav"):
        roles.action_token_offset(schema)
