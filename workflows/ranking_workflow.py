"""NVTabular ranking workflow: an event log with per-event actions -> one ranking sample per user.

Input: one row per event (a pandas DataFrame, or a CSV / Parquet file read like the session workflow reads it):

    <user_column>  <item_column>  <timestamp_column>  actions  [<watch_time_column>]  [contextual columns]

Actions are given either as one integer bitmask column (`action_column`, bit b set = action b happened) or as
several binary 0/1 columns (`action_names`, combined here into the bitmask: bit b <- action_names[b]).
`watch_time_column` is an optional continuous signal (seconds watched, a rating, ...). Contextual features are
per-user columns (e.g. age group) in the log or in a separate `user_features` table joined on the user column;
the user column itself may be listed as a contextual feature (it is then also Categorify-encoded).

One sample per user (reference-hstu.md section 5). With the user's n events in chronological order (a STABLE
sort on the timestamp: equal times keep input order):

    c           = min(K, n - min_uih_len)           candidates; the user is dropped when c < 1
    candidates  = events[n - c:]                     the last c events (K = num_candidates)
    UIH         = events[:n - c][-max_uih_len:]      the user interaction history, its most recent max_uih_len
    query_time  = max(UIH timestamps)                the time the candidates are ranked at

The reference truncates the UIH to its OLDEST max_uih_len events (`y[:max_len]`); we keep the most recent ones,
the events closest to the candidates (both are the same for users with <= max_uih_len + K events).

Output (`preprocess_ranking`) in `output_dir`:

    processed/      parquet + schema.pbtxt, one row per user, rows ordered by user id
    workflow/       the fitted nvtabular.Workflow (categories/ with the Categorify statistics)
    ranking.json    tasks, action names, K, max_uih_len, contextual features, table sizes, default split

| column                      | content                                          | tags (+ merlin_hstu_role)          |
|-----------------------------|--------------------------------------------------|------------------------------------|
| <user_column>               | raw user id                                      | USER, ID (user_id)                 |
| item_id-list                | UIH items, encoded, oldest first                 | ITEM, ID, LIST, CATEGORICAL (item) |
| action-list                 | UIH action bitmasks (NOT Categorify-encoded)     | LIST, CATEGORICAL (action)         |
| timestamp-list              | UIH unix seconds                                 | LIST, TIME, CONTINUOUS (timestamp) |
| watch_time-list             | UIH continuous signal (only with watch time)     | LIST, CONTINUOUS (watch_time)      |
| candidate_item_id-list      | the candidates' items, encoded                   | ITEM, LIST, CATEGORICAL (candidate_item) |
| candidate_action-list       | the candidates' bitmasks: the labels             | TARGET, BINARY_CLASSIFICATION, LIST (candidate_action) |
| candidate_watch_time-list   | the candidates' continuous signal                | TARGET, REGRESSION, LIST (candidate_watch_time) |
| query_time                  | max of the UIH timestamps                        | TIME, CONTINUOUS (query_time)      |
| length                      | UIH length                                       | (length)                           |
| num_candidates              | c                                                | (num_candidates)                   |
| context-<feature>           | Categorify id of a contextual feature            | CONTEXT, CATEGORICAL (contextual)  |

Items use Categorify (0 pad, 1 null, 2 OOV, real ids from 3) or, with item_encoding="raw", keep positive integer
ids (MovieLens, as the retrieval datasets do). Contextual features use Categorify; a user missing from the
`user_features` table gets the null id 1. The bitmask is kept as it is, because models read its bits.

Shape of the workflow (one branch after the Groupby; on CPU each extra branch would re-run the Groupby):

    [user] + (item >> Categorify | RawItemIds) + [time] + [action] + [watch_time] + (contextual >> Categorify)
        >> ChronologicalGroupby(user; lists, contextual: last) >> RankingSamples

Named public datasets (`RANKING_DATASETS`, `preprocess_ranking_dataset`): `ml-1m-prefix-ranking` /
`ml-1m-ranking` (MovieLens ratings -> actions, users.dat -> contextual) and `kuairand-1k` / `kuairand-27k` /
`kuairand-pure` (KuaiRand's 8 binary actions); see `load_movielens_ranking` and `load_kuairand` for the exact
recipes, and docs/ranking.md.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import pandas as pd

import merlin.dtypes as md
import nvtabular as nvt
from merlin.core.dispatch import DataFrameType, is_cpu_object
from merlin.dag import ColumnSelector
from merlin.io import Dataset
from merlin.schema import ColumnSchema, Schema, Tags
from merlin.schema.io.tensorflow_metadata import TensorflowMetadata
from nvtabular import ops
from nvtabular.ops import Operator

from merlin_hstu.common import schema as roles
from merlin_hstu.ranking.batch import RankingTask
from merlin_hstu.ranking.data import (
    CANDIDATE_ACTION_LIST,
    CANDIDATE_ITEM_LIST,
    CANDIDATE_WATCH_TIME_LIST,
    CONTEXT_PREFIX,
    META_FILE,
    META_VERSION,
    NUM_CANDIDATES,
    QUERY_TIME,
    WATCH_TIME_LIST,
    read_processed_frame,
)
from merlin_hstu.common.atomic_dir import publish_dir, staging_dir
from merlin_hstu.workflows.cluster import fit_transform
from merlin_hstu.workflows.ops import ChronologicalGroupby, RawItemIds
from merlin_hstu.workflows.session_workflow import (
    ITEM_ENCODINGS,
    ORIGIN_ATTR,
    EventLogError,
    LogOrigin,
    SessionWorkflowConfig,
    _relocate_paths,
    normalize_event_log,
    read_event_log,
    validate_event_log,
)

PathLike = Union[str, os.PathLike]

# ---- roles of the ranking-only columns (names: merlin_hstu.ranking.data) --------------------------------
ROLE_WATCH_TIME = roles.ROLE_WATCH_TIME
ROLE_CANDIDATE_ITEM = "candidate_item"
ROLE_CANDIDATE_ACTION = "candidate_action"
ROLE_CANDIDATE_WATCH_TIME = "candidate_watch_time"
ROLE_QUERY_TIME = "query_time"
ROLE_NUM_CANDIDATES = "num_candidates"
ROLE_CONTEXTUAL = "contextual"
ACTION_ENCODING_PROPERTY = "action_encoding"  # action-list / candidate_action-list: "bitmask"

MAX_ACTION_BITS = 62  # bitmasks are int64; keep clear of the sign bit

# Raw columns are renamed to these bases before the Groupby, whose `<base>-<agg>` naming gives the outputs.
_ITEM, _ACTION, _TIME, _WATCH = roles.ITEM_BASE, roles.ACTION_BASE, roles.TIME_BASE, roles.WATCH_TIME_BASE
_CONTEXT_AGG = "last"  # a contextual value that changes over time: the value at the user's latest event
assert (f"{_ITEM}-list", f"{_ACTION}-list", f"{_TIME}-list", f"{_WATCH}-list") == (
    roles.ITEM_LIST, roles.ACTION_LIST, roles.TIMESTAMP_LIST, WATCH_TIME_LIST)


class RankingDataError(EventLogError):
    """The ranking input cannot be processed; the message names the field / column and the fix."""


@dataclass
class RankingWorkflowConfig:
    """Raw column roles and the sample layout (K candidates, UIH length)."""

    user_column: str = roles.LOG_USER_ID
    item_column: str = roles.LOG_ITEM_ID
    timestamp_column: str = roles.LOG_TIMESTAMP  # unix seconds (or datetime64); required: samples are chronological
    action_column: Optional[str] = None  # an integer bitmask per event ...
    action_names: Tuple[str, ...] = ()  # ... or binary 0/1 columns, bit b <- action_names[b]; with
    # action_column these only NAME its bits (for the default tasks)
    watch_time_column: Optional[str] = None  # optional continuous signal per event
    contextual_columns: Tuple[str, ...] = ()  # per-user features (the user column may be one of them)
    num_candidates: int = 10  # K: the last K events of a user are the candidates
    max_uih_len: int = 200  # the UIH keeps its most recent max_uih_len events
    min_uih_len: int = 1  # a user needs at least min_uih_len history events + 1 candidate
    item_encoding: str = "categorify"  # "categorify" | "raw" (positive integer ids kept; MovieLens)
    csv_separator: Optional[str] = None  # None: sniffed from the CSV header
    row_group_size: int = 10_000  # users per Parquet row group: what a streaming reader (train.streaming) holds

    def __post_init__(self) -> None:
        self.action_names = tuple(self.action_names)
        self.contextual_columns = tuple(self.contextual_columns)
        if self.item_encoding not in ITEM_ENCODINGS:
            raise ValueError(f"RankingWorkflowConfig.item_encoding must be one of {ITEM_ENCODINGS}, "
                             f"got {self.item_encoding!r}")
        for name in ("user_column", "item_column", "timestamp_column"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"RankingWorkflowConfig.{name} must be a non-empty column name "
                                 "(ranking samples need users, items and event times)")
        for name, low in (("num_candidates", 1), ("max_uih_len", 1), ("min_uih_len", 1), ("row_group_size", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise ValueError(f"RankingWorkflowConfig.{name} must be an integer >= {low}, got {value!r}")
        if self.min_uih_len > self.max_uih_len:
            raise ValueError(f"RankingWorkflowConfig.min_uih_len={self.min_uih_len} exceeds "
                             f"max_uih_len={self.max_uih_len}")
        if self.action_column is None and not self.action_names:
            raise ValueError("RankingWorkflowConfig needs actions: set action_column (an integer bitmask column) "
                             "or action_names (binary 0/1 columns, bit b <- action_names[b])")
        if len(self.action_names) > MAX_ACTION_BITS:
            raise ValueError(f"RankingWorkflowConfig.action_names has {len(self.action_names)} names; "
                             f"at most {MAX_ACTION_BITS} bits fit the int64 bitmask")
        if len(set(self.action_names)) != len(self.action_names):
            raise ValueError(f"RankingWorkflowConfig.action_names must be distinct, got {self.action_names}")
        if len(set(self.contextual_columns)) != len(self.contextual_columns):
            raise ValueError(f"RankingWorkflowConfig.contextual_columns must be distinct, "
                             f"got {self.contextual_columns}")
        event_columns = [self.user_column, self.item_column, self.timestamp_column, self.action_column,
                         self.watch_time_column]
        event_columns = [c for c in event_columns if c] + (list(self.action_names) if self.action_column is None else [])
        if len(set(event_columns)) != len(event_columns):
            raise ValueError(f"RankingWorkflowConfig: the user / item / timestamp / action / watch-time columns "
                             f"must be distinct, got {event_columns}")
        clash = [c for c in self.contextual_columns if c in event_columns and c != self.user_column]
        if clash:
            raise ValueError(f"RankingWorkflowConfig.contextual_columns {clash} are event columns; a contextual "
                             "feature is a per-user attribute (only the user column may be both)")

    @property
    def action_bit_columns(self) -> Tuple[str, ...]:
        """The binary columns combined into the bitmask (empty when the log has a bitmask column)."""
        return () if self.action_column is not None else self.action_names

    def default_tasks(self) -> Tuple[RankingTask, ...]:
        """One binary task per named action bit."""
        return tuple(RankingTask(name, "binary", bit=b) for b, name in enumerate(self.action_names))


@dataclass
class RankingProcessed:
    """Where `preprocess_ranking` put its output, and what it says about itself."""

    output_dir: Path
    schema: Schema
    meta: dict
    num_rows: int

    @property
    def path(self) -> Path:
        return self.output_dir / "processed"

    @property
    def workflow_path(self) -> Path:
        return self.output_dir / "workflow"

    def to_pandas(self) -> pd.DataFrame:
        return read_processed_frame(self.output_dir)


# ---------------------------------------------------------------------------------------------------------
# the custom operator after the Groupby
# ---------------------------------------------------------------------------------------------------------
class RankingSamples(Operator):
    """Groupby output (chronological per-user lists) -> one ranking sample per user; see the module docstring.

    Input columns: the user column, `item_id-list`, `action-list`, `timestamp-list`, optional
    `watch_time-list`, and `context-<f>-last` per contextual feature. Pickled with the workflow, so it lives at
    an importable path (`merlin_hstu.workflows.ranking_workflow`).
    """

    def __init__(self, user_column: str, num_candidates: int, max_uih_len: int, min_uih_len: int,
                 contextual: Sequence[str] = (), num_action_bits: int = 0):
        super().__init__()
        self.user_column = user_column
        self.num_candidates = int(num_candidates)
        self.max_uih_len = int(max_uih_len)
        self.min_uih_len = int(min_uih_len)
        self.contextual = tuple(contextual)
        self.num_action_bits = int(num_action_bits)

    # ---- column bookkeeping --------------------------------------------------------------------------
    def _has_watch_time(self, names) -> bool:
        return WATCH_TIME_LIST in names

    def column_mapping(self, col_selector: ColumnSelector) -> Dict[str, List[str]]:
        names = list(col_selector.names)
        mapping = {self.user_column: [self.user_column]}
        for name in (roles.ITEM_LIST, roles.ACTION_LIST, roles.TIMESTAMP_LIST):
            mapping[name] = [name]
        mapping[CANDIDATE_ITEM_LIST] = [roles.ITEM_LIST]
        mapping[CANDIDATE_ACTION_LIST] = [roles.ACTION_LIST]
        if self._has_watch_time(names):
            mapping[WATCH_TIME_LIST] = [WATCH_TIME_LIST]
            mapping[CANDIDATE_WATCH_TIME_LIST] = [WATCH_TIME_LIST]
        mapping[QUERY_TIME] = [roles.TIMESTAMP_LIST]
        mapping[roles.LENGTH] = [roles.ITEM_LIST]
        mapping[NUM_CANDIDATES] = [roles.ITEM_LIST]
        for feature in self.contextual:
            mapping[CONTEXT_PREFIX + feature] = [_context_agg_name(feature)]
        return mapping

    def compute_output_schema(self, input_schema: Schema, col_selector: ColumnSelector,
                              prev_output_schema: Optional[Schema] = None) -> Schema:
        names = list(col_selector.names) if col_selector else list(input_schema.column_names)
        required = [self.user_column, roles.ITEM_LIST, roles.ACTION_LIST, roles.TIMESTAMP_LIST]
        required += [_context_agg_name(f) for f in self.contextual]
        missing = [n for n in required if n not in names]
        if missing:
            raise ValueError(f"RankingSamples expects the Groupby outputs {required}, missing {missing}")
        k, h = self.num_candidates, self.max_uih_len
        bitmask = {ACTION_ENCODING_PROPERTY: "bitmask",
                   "domain": {"min": 0, "max": max(2 ** self.num_action_bits - 1, 0), "name": roles.ROLE_ACTION}}
        item = input_schema[roles.ITEM_LIST]
        columns = [
            roles.with_role(input_schema[self.user_column], roles.ROLE_USER_ID),
            roles.with_role(_list(item, 1, h), roles.ROLE_ITEM),
            roles.with_role(_list(input_schema[roles.ACTION_LIST], 1, h, bitmask), roles.ROLE_ACTION),
            roles.with_role(_list(input_schema[roles.TIMESTAMP_LIST], 1, h), roles.ROLE_TIMESTAMP,
                            {roles.TIME_UNIT_PROPERTY: "s"}),
        ]
        if self._has_watch_time(names):
            columns.append(_tagged(_list(input_schema[WATCH_TIME_LIST], 1, h, dtype=md.float64),
                                   ROLE_WATCH_TIME, (Tags.LIST, Tags.CONTINUOUS)))
        columns += [
            _tagged(_list(item, 1, k, name=CANDIDATE_ITEM_LIST), ROLE_CANDIDATE_ITEM,
                    (Tags.ITEM, Tags.LIST, Tags.CATEGORICAL)),
            _tagged(_list(input_schema[roles.ACTION_LIST], 1, k, bitmask, name=CANDIDATE_ACTION_LIST),
                    ROLE_CANDIDATE_ACTION, (Tags.TARGET, Tags.BINARY_CLASSIFICATION, Tags.LIST)),
        ]
        if self._has_watch_time(names):
            columns.append(_tagged(_list(input_schema[WATCH_TIME_LIST], 1, k, name=CANDIDATE_WATCH_TIME_LIST,
                                         dtype=md.float64),
                                   ROLE_CANDIDATE_WATCH_TIME, (Tags.TARGET, Tags.REGRESSION, Tags.LIST)))
        columns += [
            _tagged(ColumnSchema(QUERY_TIME, dtype=md.int64), ROLE_QUERY_TIME, (Tags.TIME, Tags.CONTINUOUS),
                    {roles.TIME_UNIT_PROPERTY: "s"}),
            roles.with_role(ColumnSchema(roles.LENGTH, dtype=md.int64), roles.ROLE_LENGTH),
            _tagged(ColumnSchema(NUM_CANDIDATES, dtype=md.int64), ROLE_NUM_CANDIDATES, ()),
        ]
        for feature in self.contextual:
            source = input_schema[_context_agg_name(feature)]
            properties = {k_: v for k_, v in source.properties.items() if k_ != "value_count"}
            columns.append(_tagged(ColumnSchema(CONTEXT_PREFIX + feature, properties=properties, dtype=md.int64),
                                   ROLE_CONTEXTUAL, (Tags.CONTEXT, Tags.CATEGORICAL),
                                   {"contextual_feature": feature}))
        return Schema(columns)

    # ---- data ----------------------------------------------------------------------------------------
    def transform(self, col_selector: ColumnSelector, df: DataFrameType) -> DataFrameType:
        if not is_cpu_object(df):  # GPU (untested here): round-trip through pandas
            import cudf

            return cudf.from_pandas(self._transform_pandas(df.to_pandas()))
        return self._transform_pandas(df)

    def _transform_pandas(self, df: pd.DataFrame) -> pd.DataFrame:
        n = np.fromiter((len(v) for v in df[roles.ITEM_LIST]), dtype=np.int64, count=len(df))
        c = np.minimum(self.num_candidates, n - self.min_uih_len)  # candidates per user
        keep = c >= 1
        df = df.loc[keep].reset_index(drop=True)
        n, c = n[keep], c[keep]
        split = n - c  # events before the candidates
        uih_start = np.maximum(split - self.max_uih_len, 0)
        out = pd.DataFrame({self.user_column: df[self.user_column].to_numpy()})
        lists = [(roles.ITEM_LIST, CANDIDATE_ITEM_LIST, np.int64), (roles.ACTION_LIST, CANDIDATE_ACTION_LIST, np.int64)]
        has_watch = WATCH_TIME_LIST in df.columns
        if has_watch:
            lists.append((WATCH_TIME_LIST, CANDIDATE_WATCH_TIME_LIST, np.float64))
        times = [np.asarray(v, dtype=np.int64) for v in df[roles.TIMESTAMP_LIST]]
        for source, candidate_name, dtype in lists:
            values = [np.asarray(v, dtype=dtype) for v in df[source]]
            out[source] = [v[a:s] for v, a, s in zip(values, uih_start, split)]
            out[candidate_name] = [v[s:] for v, s in zip(values, split)]
        out[roles.TIMESTAMP_LIST] = [t[a:s] for t, a, s in zip(times, uih_start, split)]
        out[QUERY_TIME] = np.fromiter((t[a:s].max() for t, a, s in zip(times, uih_start, split)),
                                      dtype=np.int64, count=len(times))
        out[roles.LENGTH] = (split - uih_start).astype(np.int64)
        out[NUM_CANDIDATES] = c.astype(np.int64)
        for feature in self.contextual:
            out[CONTEXT_PREFIX + feature] = df[_context_agg_name(feature)].to_numpy().astype(np.int64)
        order = [self.user_column, roles.ITEM_LIST, roles.ACTION_LIST, roles.TIMESTAMP_LIST]
        order += [WATCH_TIME_LIST] if has_watch else []
        order += [CANDIDATE_ITEM_LIST, CANDIDATE_ACTION_LIST] + ([CANDIDATE_WATCH_TIME_LIST] if has_watch else [])
        order += [QUERY_TIME, roles.LENGTH, NUM_CANDIDATES] + [CONTEXT_PREFIX + f for f in self.contextual]
        return out[order]

    @property
    def dynamic_dtypes(self) -> bool:
        return False


def _context_agg_name(feature: str) -> str:
    return f"{CONTEXT_PREFIX}{feature}-{_CONTEXT_AGG}"


def _list(source: ColumnSchema, lo: int, hi: int, extra: Optional[dict] = None, name: Optional[str] = None,
          dtype=md.int64) -> ColumnSchema:
    """A ragged list column with `source`'s properties (Categorify / RawItemIds domain, cat_path) and lengths lo..hi."""
    properties = {k: v for k, v in source.properties.items() if k != "value_count"}
    properties.update(extra or {})
    return ColumnSchema(name or source.name, properties=properties, dtype=dtype, dims=(None, (lo, hi)))


def _tagged(column: ColumnSchema, role: str, tags: Sequence[Tags], extra: Optional[dict] = None) -> ColumnSchema:
    """`column` with exactly `tags` and the role property (roles.with_role for the ranking-only roles)."""
    properties = {**column.properties, roles.ROLE_PROPERTY: role, **(extra or {})}
    properties.pop("value_count", None)
    return ColumnSchema(column.name, tags=list(tags), properties=properties, dtype=column.dtype,
                        is_list=column.is_list, is_ragged=column.is_ragged,
                        dims=column.shape.as_tuple if column.shape.dims is not None else None)


# ---------------------------------------------------------------------------------------------------------
# validation and normalisation of the event log
# ---------------------------------------------------------------------------------------------------------
def _session_config(config: RankingWorkflowConfig) -> SessionWorkflowConfig:
    """The session-workflow view of the id / item / time columns, to reuse its readers and checks."""
    return SessionWorkflowConfig(id_column=config.user_column, item_column=config.item_column, action_column=None,
                                 timestamp_column=config.timestamp_column, csv_separator=config.csv_separator,
                                 item_encoding=config.item_encoding,
                                 cli_flags={"id_column": "--user-column", "drop_nulls": None, "input_format": None,
                                            "timestamp_none": None})


def read_ranking_log(path: PathLike, config: RankingWorkflowConfig) -> pd.DataFrame:
    """A CSV (separator sniffed unless config.csv_separator) / Parquet file or folder, as the session workflow reads."""
    return read_event_log(path, _session_config(config))


def attach_user_features(events: pd.DataFrame, user_features: pd.DataFrame,
                         config: RankingWorkflowConfig) -> pd.DataFrame:
    """Left-join a per-user table (one row per user) onto the events; unknown users get nulls (Categorify: 1)."""
    if config.user_column not in user_features.columns:
        raise RankingDataError(f"user_features has no column {config.user_column!r} (RankingWorkflowConfig."
                               f"user_column; columns: {list(user_features.columns)}). Fix: rename its user id column.")
    wanted = [c for c in config.contextual_columns if c != config.user_column]
    missing = [c for c in wanted if c not in user_features.columns]
    if missing:
        raise RankingDataError(f"RankingWorkflowConfig.contextual_columns {missing} are not in user_features "
                               f"(columns: {list(user_features.columns)}). Fix: drop them from contextual_columns.")
    duplicated = user_features[config.user_column].duplicated()
    if duplicated.any():
        raise RankingDataError(f"user_features lists user {user_features[config.user_column][duplicated].iloc[0]!r} "
                               "more than once. Fix: keep one row per user.")
    overlap = [c for c in wanted if c in events.columns]
    if overlap:
        raise RankingDataError(f"contextual column(s) {overlap} are in both the event log and user_features. "
                               "Fix: drop them from one of the two.")
    merged = events.merge(user_features[[config.user_column, *wanted]], on=config.user_column, how="left",
                          sort=False)
    for col in wanted:
        if merged[col].isna().any() and pd.api.types.is_integer_dtype(user_features[col].dtype):
            # the join turned an integer feature into floats with NaN: keep the values exact, as strings
            merged[col] = merged[col].map(lambda v: None if pd.isna(v) else str(int(v))).astype(object)
    return merged


#: the preprocess-ranking flag of each RankingWorkflowConfig column field (for the Fix of error messages)
_RANKING_FLAGS = {"user_column": "--user-column", "item_column": "--item-column", "timestamp_column": "--timestamp-column",
                  "action_column": "--action-column", "action_names": "--action-names",
                  "watch_time_column": "--watch-time-column", "contextual_columns": "--contextual"}


def validate_ranking_log(df: pd.DataFrame, config: RankingWorkflowConfig) -> None:
    """Raise RankingDataError naming the column and the fix; return None for a usable log."""
    if not isinstance(df, pd.DataFrame):
        raise RankingDataError(f"the event log must be a pandas DataFrame, got {type(df).__name__}")
    required = {"user_column": config.user_column, "item_column": config.item_column,
                "timestamp_column": config.timestamp_column}
    if config.action_column is not None:
        required["action_column"] = config.action_column
    for name in config.action_bit_columns:
        required[f"action_names[{config.action_names.index(name)}]"] = name
    if config.watch_time_column is not None:
        required["watch_time_column"] = config.watch_time_column
    for i, name in enumerate(config.contextual_columns):
        required[f"contextual_columns[{i}]"] = name
    missing = [(field_, col) for field_, col in required.items() if col not in df.columns]
    if missing:
        source = df.attrs[ORIGIN_ATTR].source if isinstance(df.attrs.get(ORIGIN_ATTR), LogOrigin) else "the event log"
        raise RankingDataError(
            f"{source} is missing column(s) {[c for _, c in missing]} (columns present: {list(df.columns)}). "
            "Fix: " + "; ".join(f"{_RANKING_FLAGS.get(f.split('[')[0], f)} NAME to name the log's column, or rename it "
                                f"to {c!r} (Python: RankingWorkflowConfig.{f})" for f, c in missing)
            + " (contextual columns may also come from --user-features)."
        )
    if len(df) == 0:
        raise RankingDataError("the event log is empty (0 rows). Fix: point preprocess-ranking at a non-empty log.")
    validate_event_log(df, _session_config(config))  # ids, items, timestamps: dtypes, nulls, sign
    if config.action_column is not None:
        values = _integral(df[config.action_column], config.action_column, "action_column")
        bad = (values < 0) | (values >= 2 ** MAX_ACTION_BITS)
        if bad.any():
            first = int(np.argmax(bad))
            raise RankingDataError(
                f"column {config.action_column!r} (action_column) has {int(bad.sum())} value(s) that are not a "
                f"bitmask in [0, 2**{MAX_ACTION_BITS}) (first at row {first}: {values[first]}). "
                "Fix: encode each event's actions as sum(2**bit) over the actions that happened."
            )
        if config.action_names and values.max() >= 2 ** len(config.action_names):
            raise RankingDataError(
                f"column {config.action_column!r} (action_column) sets bit {int(values.max()).bit_length() - 1}, "
                f"but action_names names only {len(config.action_names)} bit(s) {list(config.action_names)}. "
                "Fix: name every bit in RankingWorkflowConfig.action_names (or leave it empty)."
            )
    for name in config.action_bit_columns:
        values = _integral(df[name], name, f"action_names[{config.action_names.index(name)}]")
        bad = (values != 0) & (values != 1)
        if bad.any():
            first = int(np.argmax(bad))
            raise RankingDataError(
                f"action column {name!r} has {int(bad.sum())} value(s) other than 0/1 (first at row {first}: "
                f"{values[first]}); each action_names column is one binary signal. Fix: binarise it, e.g. "
                f"df[{name!r}] = (df[{name!r}] > 0).astype(int), or pass it as watch_time_column."
            )
    if config.watch_time_column is not None:
        col = config.watch_time_column
        series = df[col]
        if pd.api.types.is_bool_dtype(series.dtype) or not pd.api.types.is_numeric_dtype(series.dtype):
            raise RankingDataError(f"column {col!r} (watch_time_column) has dtype {series.dtype}; it must be "
                                   f"numeric. Fix: df[{col!r}] = pd.to_numeric(df[{col!r}]).")
        values = series.to_numpy(dtype=np.float64)
        bad = ~np.isfinite(values)
        if bad.any():
            raise RankingDataError(f"column {col!r} (watch_time_column) has {int(bad.sum())} missing or infinite "
                                   f"value(s) (first at row {int(np.argmax(bad))}). Fix: fill them, e.g. with 0.")
    for col in config.contextual_columns:
        kind = pd.api.types.infer_dtype(df[col], skipna=True)
        if kind not in ("integer", "string", "empty") and not pd.api.types.is_bool_dtype(df[col].dtype):
            raise RankingDataError(f"contextual column {col!r} holds {kind!r} values; contextual features are "
                                   f"categorical (integers or strings). Fix: df[{col!r}] = df[{col!r}].astype(str) "
                                   "or bucketise a continuous feature first.")


def _integral(series: pd.Series, col: str, field_: str) -> np.ndarray:
    if pd.api.types.is_bool_dtype(series.dtype):
        return series.to_numpy().astype(np.int64)
    values = series.to_numpy()
    if series.isna().any():
        raise RankingDataError(f"column {col!r} ({field_}) has {int(series.isna().sum())} null value(s). "
                               f"Fix: fill them, e.g. df[{col!r}] = df[{col!r}].fillna(0).")
    if not pd.api.types.is_numeric_dtype(series.dtype):
        raise RankingDataError(f"column {col!r} ({field_}) has dtype {series.dtype}; actions must be integers. "
                               f"Fix: df[{col!r}] = df[{col!r}].astype('int64').")
    as_float = values.astype(np.float64)
    if (as_float != np.floor(as_float)).any():
        raise RankingDataError(f"column {col!r} ({field_}) has non-integral values; actions must be integers.")
    return values.astype(np.int64)


def action_bitmask(df: pd.DataFrame, columns: Sequence[str]) -> np.ndarray:
    """sum_b col_b * 2**b over the binary columns (bit b <- columns[b])."""
    mask = np.zeros(len(df), dtype=np.int64)
    for bit, col in enumerate(columns):
        mask |= (df[col].to_numpy().astype(np.int64) != 0).astype(np.int64) << bit
    return mask


def normalize_ranking_log(df: pd.DataFrame, config: RankingWorkflowConfig) -> pd.DataFrame:
    """The workflow input: user, item_id, timestamp (int64 s), action (int64 bitmask), [watch_time], context-*."""
    base = normalize_event_log(df, _session_config(config))  # user / item / time with the session checks' casts
    out = pd.DataFrame({
        config.user_column: base[config.user_column].to_numpy(),
        _ITEM: base[config.item_column].to_numpy(),
        _TIME: base[config.timestamp_column].to_numpy(),
        _ACTION: (df[config.action_column].to_numpy().astype(np.int64) if config.action_column is not None
                  else action_bitmask(df, config.action_bit_columns)),
    })
    if config.watch_time_column is not None:
        out[_WATCH] = df[config.watch_time_column].to_numpy(dtype=np.float64)
    for col in config.contextual_columns:
        values = base[config.user_column] if col == config.user_column else df[col]
        if pd.api.types.is_bool_dtype(values.dtype):
            values = values.astype(np.int64)
        elif not pd.api.types.is_integer_dtype(values.dtype):
            values = values.map(lambda v: None if pd.isna(v) else str(v)).astype(object)  # one type; None -> null id
        out[CONTEXT_PREFIX + col] = values.to_numpy()
    return out


# ---------------------------------------------------------------------------------------------------------
# workflow and preprocess
# ---------------------------------------------------------------------------------------------------------
def build_ranking_workflow(config: RankingWorkflowConfig, categories_dir: Optional[PathLike] = None, *,
                           raw_item_max_id: Optional[int] = None, has_watch_time: Optional[bool] = None
                           ) -> nvt.Workflow:
    """The NVTabular workflow (unfitted); input: `normalize_ranking_log`'s frame."""
    out_path = str(categories_dir) if categories_dir is not None else tempfile.mkdtemp(prefix="merlin_hstu_ranking_")
    if raw_item_max_id is not None and config.item_encoding != "raw":
        raise ValueError("build_ranking_workflow(raw_item_max_id=...) needs RankingWorkflowConfig.item_encoding='raw'")
    has_watch_time = config.watch_time_column is not None if has_watch_time is None else has_watch_time
    item_op = RawItemIds(min_max_id=raw_item_max_id) if config.item_encoding == "raw" \
        else ops.Categorify(out_path=out_path)
    events = [config.user_column] + ([_ITEM] >> item_op) + [_TIME, _ACTION]
    aggs = {_ITEM: ["list"], _TIME: ["list"], _ACTION: ["list"]}
    if has_watch_time:
        events = events + [_WATCH]
        aggs[_WATCH] = ["list"]
    context = [CONTEXT_PREFIX + c for c in config.contextual_columns]
    if context:
        events = events + (context >> ops.Categorify(out_path=out_path))
        aggs.update({c: [_CONTEXT_AGG] for c in context})
    grouped = events >> ChronologicalGroupby(groupby_cols=[config.user_column], time_column=_TIME, aggs=aggs,
                                             name_sep="-")
    samples = grouped >> RankingSamples(config.user_column, config.num_candidates, config.max_uih_len,
                                        config.min_uih_len, config.contextual_columns,
                                        num_action_bits=len(config.action_names) or MAX_ACTION_BITS)
    return nvt.Workflow(samples)


def preprocess_ranking(source: Union[PathLike, pd.DataFrame], output_dir: PathLike,
                       config: RankingWorkflowConfig, *, tasks: Optional[Sequence[RankingTask]] = None,
                       user_features: Optional[pd.DataFrame] = None, raw_item_max_id: Optional[int] = None,
                       test_fraction: float = 0.25, split_seed: int = 0, description: str = "",
                       overwrite: bool = False) -> RankingProcessed:
    """Read, validate, fit + transform; write output_dir/{processed/, workflow/, ranking.json} atomically.

    `tasks` (default: one binary task per action name) and the default train/test split (a seeded per-user
    split, `test_fraction` of the users in test) are recorded in ranking.json for the loader.
    """
    output_dir = Path(output_dir).resolve()
    if output_dir.exists() and not overwrite:
        raise FileExistsError(f"{output_dir} already exists; remove it or pass overwrite=True (--overwrite)")
    tasks = tuple(tasks) if tasks is not None else config.default_tasks()
    check_tasks(tasks, config)
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    raw = source if isinstance(source, pd.DataFrame) else read_ranking_log(source, config)
    if user_features is not None:
        raw = attach_user_features(raw, user_features, config)
    validate_ranking_log(raw, config)
    events = normalize_ranking_log(raw, config)

    staging = staging_dir(output_dir)
    try:
        workflow_dir, processed_dir = staging / "workflow", staging / "processed"
        workflow = build_ranking_workflow(config, categories_dir=workflow_dir, raw_item_max_id=raw_item_max_id)
        # one partition, or on a Dask cluster partitions cut at user boundaries (workflows/cluster.py)
        result = fit_transform(workflow, events, keys=[config.user_column])
        if len(result) == 0:
            raise RankingDataError(
                f"no user has the min_uih_len + 1 = {config.min_uih_len + 1} events a ranking sample needs, so "
                "the output would be empty. Fix: lower RankingWorkflowConfig.min_uih_len or use a longer log."
            )
        out_schema = _relocate_paths(workflow.output_schema, str(staging), str(output_dir))
        Dataset(result, cpu=True, schema=out_schema).to_parquet(str(processed_dir), output_files=1,
                                                                row_group_size=config.row_group_size)
        workflow.save(str(workflow_dir))
        meta = _meta(config, tasks, out_schema, result, test_fraction, split_seed, description)
        (staging / META_FILE).write_text(json.dumps(meta, indent=2))
        publish_dir(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    schema = TensorflowMetadata.from_proto_text_file(str(output_dir / "processed")).to_merlin_schema()
    return RankingProcessed(output_dir=output_dir, schema=schema, meta=meta, num_rows=len(result))


def check_tasks(tasks: Sequence[RankingTask], config: RankingWorkflowConfig) -> None:
    if not tasks:
        raise ValueError("a ranking dataset needs at least one task: name the action bits "
                         "(RankingWorkflowConfig.action_names) or pass tasks=[RankingTask(name, 'binary', bit=b)]")
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise ValueError(f"task names must be distinct, got {names}")
    n_bits = len(config.action_names) if config.action_names else MAX_ACTION_BITS
    for task in tasks:
        if task.kind == "binary" and task.bit >= n_bits:
            raise ValueError(f"task {task.name!r} reads bit {task.bit}, but the actions have {n_bits} bit(s) "
                             f"({list(config.action_names)})")
        if task.kind == "regression" and config.watch_time_column is None:
            raise ValueError(f"regression task {task.name!r} needs RankingWorkflowConfig.watch_time_column "
                             "(its label is the candidate's continuous signal)")


def _meta(config, tasks, schema: Schema, result: pd.DataFrame, test_fraction: float, split_seed: int,
          description: str) -> dict:
    item_rows = roles.embedding_table_size(schema, roles.ITEM_LIST)
    contextual = {f: roles.embedding_table_size(schema, CONTEXT_PREFIX + f) for f in config.contextual_columns}
    return {
        "format_version": META_VERSION,
        "description": description,
        "user_column": config.user_column,
        "num_candidates": config.num_candidates,
        "max_uih_len": config.max_uih_len,
        "min_uih_len": config.min_uih_len,
        "item_encoding": config.item_encoding,
        "num_items": item_rows,  # item embedding rows = item int_domain.max + 1
        "action_names": list(config.action_names),
        "tasks": [asdict(t) for t in tasks],
        "has_watch_time": config.watch_time_column is not None,
        "watch_time_source": config.watch_time_column,
        "contextual_cardinalities": contextual,  # embedding rows per contextual feature
        "split": {"kind": "users", "test_fraction": test_fraction, "seed": split_seed},
        "num_rows": int(len(result)),
        "num_candidates_total": int(result[NUM_CANDIDATES].sum()),
        "query_time": "max of the UIH timestamps",
    }


# ---------------------------------------------------------------------------------------------------------
# public datasets
# ---------------------------------------------------------------------------------------------------------
@dataclass
class RankingSource:
    """A dataset read into the ranking input form, plus how it must be preprocessed."""

    name: str
    events: pd.DataFrame
    config: RankingWorkflowConfig
    tasks: Tuple[RankingTask, ...]
    user_features: Optional[pd.DataFrame] = None
    raw_item_max_id: Optional[int] = None
    description: str = ""
    files: Tuple[Path, ...] = field(default_factory=tuple)


# MovieLens: actions from the rating (bit 0 is constant, so it is no task)
ML_ACTION_NAMES = ("rated", "liked", "loved")  # bit 0: every rating; bit 1: rating >= 4; bit 2: rating == 5
ML_CONTEXTUAL = (roles.LOG_USER_ID, "sex", "age_group", "occupation", "zip_code")


def movielens_ranking_source(name: str, input_dir: PathLike, *, num_candidates: int = 10, max_uih_len: int = 200,
                             rating_task: bool = False, check_counts: bool = True) -> RankingSource:
    """ML-1M (`ml-1m`) or its staged prefix (`ml-1m-prefix`) as a ranking dataset.

    Per rating event: action bitmask bit 0 = rated (always set), bit 1 = liked (rating >= 4), bit 2 = loved
    (rating == 5); the continuous signal (`watch_time`) is the rating itself (1..5). Tasks: liked and loved
    (binary), plus with `rating_task` a regression task "rating". Contextual features from users.dat: user_id,
    sex, age_group, occupation, zip_code. Movie ids are kept raw (table rows = 3952 + 1), as for retrieval.
    """
    from merlin_hstu.workflows.datasets import load_dataset

    loaded = load_dataset(name, input_dir, check_counts=check_counts)
    rating = loaded.events[roles.LOG_RATING].to_numpy()
    events = pd.DataFrame({
        roles.LOG_USER_ID: loaded.events[roles.LOG_USER_ID].to_numpy(),
        roles.LOG_ITEM_ID: loaded.events[roles.LOG_ITEM_ID].to_numpy(),
        roles.LOG_TIMESTAMP: loaded.events[roles.LOG_TIMESTAMP].to_numpy(),
        "rated": np.ones(len(rating), dtype=np.int64),
        "liked": (rating >= 4).astype(np.int64),
        "loved": (rating == 5).astype(np.int64),
        roles.LOG_RATING: rating.astype(np.float64),
    })
    users = loaded.user_features.rename(columns={"gender": "sex", "age": "age_group"})
    config = RankingWorkflowConfig(user_column=roles.LOG_USER_ID, item_column=roles.LOG_ITEM_ID,
                                   timestamp_column=roles.LOG_TIMESTAMP,
                                   action_names=ML_ACTION_NAMES, watch_time_column=roles.LOG_RATING,
                                   contextual_columns=ML_CONTEXTUAL, num_candidates=num_candidates,
                                   max_uih_len=max_uih_len, item_encoding="raw")
    tasks = (RankingTask("liked", "binary", bit=1), RankingTask("loved", "binary", bit=2))
    if rating_task:
        tasks += (RankingTask("rating", "regression"),)
    max_id = int(loaded.candidates.max()) if loaded.candidates is not None else None
    return RankingSource(name=f"{name}-ranking", events=events, config=config, tasks=tasks, user_features=users,
                         raw_item_max_id=max_id, files=loaded.files,
                         description=f"{name} ratings as ranking events: bits rated / liked (>=4) / loved (==5); "
                                     "users.dat as contextual features")


# KuaiRand (Gao et al., CIKM 2022; https://kuairand.com): standard logs + user features
KUAIRAND_ACTIONS = ("is_click", "is_like", "is_follow", "is_comment", "is_forward", "is_hate", "long_view",
                    "is_profile_enter")  # bit b <- KUAIRAND_ACTIONS[b]: weights 1, 2, 4, ..., 128
KUAIRAND_LOG_COLUMNS = (roles.LOG_USER_ID, "video_id", "time_ms", *KUAIRAND_ACTIONS, "play_time_ms")
KUAIRAND_CONTEXTUAL = (roles.LOG_USER_ID, "user_active_degree", "follow_user_num_range", "fans_user_num_range",
                       "friend_user_num_range", "register_days_range")
KUAIRAND_SIZES = ("1k", "27k", "pure")


def _kuairand_files(input_path: Path, size: Optional[str]) -> Tuple[List[Path], Optional[Path]]:
    from merlin_hstu.workflows.datasets import COMPRESSIONS

    if not input_path.is_dir():
        raise RankingDataError(f"kuairand: --input {str(input_path)!r} must be the directory holding the "
                               "log_standard_*.csv files (and user_features_*.csv)")
    def matches(p: Path, stem: str) -> bool:
        return any(p.name.endswith(f".csv{s}") for s in COMPRESSIONS) and p.name.startswith(stem) and (
            size is None or p.name.split(".csv")[0].endswith(f"_{size}"))

    logs = sorted(p for p in input_path.iterdir() if matches(p, "log_standard_"))
    users = sorted(p for p in input_path.iterdir() if matches(p, "user_features"))
    if not logs:
        raise RankingDataError(
            f"kuairand: no log_standard_*{'_' + size if size else ''}.csv[.xz|.gz|.bz2] in {str(input_path)!r} "
            f"(it holds {sorted(p.name for p in input_path.iterdir())[:12]}). Fix: point --input at KuaiRand's "
            "data/ directory (e.g. KuaiRand-1K/data)."
        )
    suffixes = {p.name.split(".csv")[0].rsplit("_", 1)[-1] for p in logs}
    if len(suffixes) > 1:
        raise RankingDataError(f"kuairand: logs of several releases in {str(input_path)!r} ({sorted(suffixes)}). "
                               "Fix: pass the size (1k / 27k / pure).")
    if len(users) > 1:
        raise RankingDataError(f"kuairand: several user feature files in {str(input_path)!r}: "
                               f"{[p.name for p in users]}. Fix: pass the size (1k / 27k / pure).")
    return logs, (users[0] if users else None)


def read_kuairand_log(path: Path) -> pd.DataFrame:
    """One KuaiRand log_standard_*.csv (header line, comma-separated); only the columns used are checked."""
    df = pd.read_csv(path)
    missing = [c for c in KUAIRAND_LOG_COLUMNS if c not in df.columns]
    if missing:
        raise RankingDataError(f"{path}: not a KuaiRand log: missing column(s) {missing} (header: "
                               f"{list(df.columns)[:20]}). Expected at least {list(KUAIRAND_LOG_COLUMNS)}.")
    for col in KUAIRAND_LOG_COLUMNS:
        if df[col].isna().any():
            raise RankingDataError(f"{path}: column {col!r} has {int(df[col].isna().sum())} empty value(s)")
        if not pd.api.types.is_numeric_dtype(df[col].dtype):
            raise RankingDataError(f"{path}: column {col!r} must be numeric, found {df[col].dtype} "
                                   f"(e.g. {df[col].iloc[0]!r})")
    return df[list(KUAIRAND_LOG_COLUMNS)]


def kuairand_ranking_source(input_dir: PathLike, size: Optional[str] = None, *, num_candidates: int = 10,
                            max_uih_len: int = 200) -> RankingSource:
    """KuaiRand (1K / 27K / Pure) as a ranking dataset.

    Reads every `log_standard_*[_<size>].csv` of the directory (KuaiRand's two standard logs, 4/08-4/21 and
    4/22-5/08; the `log_random_*` exposures are not used) and `user_features_<size>.csv` when present.
    Event: item = video_id; time = time_ms // 1000 (unix seconds; events are ordered by time_ms first, so the
    millisecond order survives equal seconds); bitmask bit b = KUAIRAND_ACTIONS[b] (is_click 1, is_like 2,
    is_follow 4, is_comment 8, is_forward 16, is_hate 32, long_view 64, is_profile_enter 128); watch time =
    play_time_ms / 1000 (seconds). Tasks: the 8 binary actions. Contextual: user_id and, with the user-feature
    file, user_active_degree and the follow / fans / friend / register-days range buckets (the reference's set).
    """
    input_path = Path(input_dir)
    if size is not None and size not in KUAIRAND_SIZES:
        raise ValueError(f"kuairand size must be one of {KUAIRAND_SIZES}, got {size!r}")
    logs, users_path = _kuairand_files(input_path, size)
    raw = pd.concat([read_kuairand_log(p) for p in logs], ignore_index=True)
    raw = raw.iloc[np.argsort(raw["time_ms"].to_numpy(), kind="stable")].reset_index(drop=True)
    events = pd.DataFrame({
        roles.LOG_USER_ID: raw[roles.LOG_USER_ID].to_numpy().astype(np.int64),
        roles.LOG_ITEM_ID: raw["video_id"].to_numpy().astype(np.int64),
        roles.LOG_TIMESTAMP: raw["time_ms"].to_numpy().astype(np.int64) // 1000,
        **{name: raw[name].to_numpy() for name in KUAIRAND_ACTIONS},
        roles.LOG_WATCH_TIME: raw["play_time_ms"].to_numpy().astype(np.float64) / 1000.0,
    })
    contextual: Tuple[str, ...] = (roles.LOG_USER_ID,)
    users = None
    if users_path is not None:
        users = pd.read_csv(users_path)
        missing = [c for c in KUAIRAND_CONTEXTUAL if c not in users.columns]
        if missing:
            raise RankingDataError(f"{users_path}: not a KuaiRand user-feature file: missing {missing}")
        users = users[list(KUAIRAND_CONTEXTUAL)]
        contextual = KUAIRAND_CONTEXTUAL
    config = RankingWorkflowConfig(user_column=roles.LOG_USER_ID, item_column=roles.LOG_ITEM_ID,
                                   timestamp_column=roles.LOG_TIMESTAMP,
                                   action_names=KUAIRAND_ACTIONS, watch_time_column=roles.LOG_WATCH_TIME,
                                   contextual_columns=contextual, num_candidates=num_candidates,
                                   max_uih_len=max_uih_len, item_encoding="categorify")
    name = f"kuairand-{size}" if size else "kuairand"
    return RankingSource(name=name, events=events, config=config, tasks=config.default_tasks(),
                         user_features=users, files=tuple(logs) + ((users_path,) if users_path else ()),
                         description=f"KuaiRand ({', '.join(p.name for p in logs)}): 8 binary actions as bits")


@dataclass(frozen=True)
class RankingDatasetSpec:
    name: str
    description: str
    staged: Optional[str]  # folder under shared/data with a copy, if any
    load: Callable[[Path, int, int], "RankingSource"]  # (input_dir, num_candidates, max_uih_len)


RANKING_DATASETS: Dict[str, RankingDatasetSpec] = {
    "ml-1m-prefix-ranking": RankingDatasetSpec(
        "ml-1m-prefix-ranking", "staged ML-1M prefix (users 1-2999): liked / loved tasks, users.dat contextual",
        "movielens-1m", lambda d, k, h: movielens_ranking_source("ml-1m-prefix", d, num_candidates=k, max_uih_len=h)),
    "ml-1m-ranking": RankingDatasetSpec(
        "ml-1m-ranking", "full ML-1M (ratings.dat, movies.dat, users.dat): liked / loved tasks", None,
        lambda d, k, h: movielens_ranking_source("ml-1m", d, num_candidates=k, max_uih_len=h)),
    **{f"kuairand-{s}": RankingDatasetSpec(
        f"kuairand-{s}", f"KuaiRand-{s.upper() if s != 'pure' else 'Pure'} data/ directory: 8 binary actions", None,
        (lambda size: lambda d, k, h: kuairand_ranking_source(d, size, num_candidates=k, max_uih_len=h))(s))
       for s in KUAIRAND_SIZES},
}


def ranking_dataset_source(name: str, input_dir: Optional[PathLike], num_candidates: int = 10,
                           max_uih_len: int = 200) -> RankingSource:
    """Read named dataset `name` (RANKING_DATASETS) from `input_dir` (default: its staged copy)."""
    spec = RANKING_DATASETS.get(name)
    if spec is None:
        raise ValueError(f"unknown ranking dataset {name!r}; known: {sorted(RANKING_DATASETS)} "
                         "(or pass a directory written by preprocess-ranking)")
    if input_dir is None:
        from merlin_hstu.workflows.datasets import SHARED_DATA

        staged = SHARED_DATA / spec.staged if spec.staged else None
        if staged is None or not staged.is_dir():
            raise ValueError(f"ranking dataset {name!r} is not staged here: pass --input DIR with its files")
        input_dir = staged
    return spec.load(Path(input_dir), num_candidates, max_uih_len)


def preprocess_source(source: RankingSource, output_dir: PathLike, *, test_fraction: float = 0.25,
                      split_seed: int = 0, overwrite: bool = False) -> RankingProcessed:
    """`preprocess_ranking` with a RankingSource's events, config, tasks and user features."""
    return preprocess_ranking(source.events, output_dir, source.config, tasks=source.tasks,
                              user_features=source.user_features, raw_item_max_id=source.raw_item_max_id,
                              test_fraction=test_fraction, split_seed=split_seed,
                              description=source.description, overwrite=overwrite)


def preprocess_ranking_dataset(name: str, input_dir: Optional[PathLike], output_dir: PathLike, *,
                               num_candidates: int = 10, max_uih_len: int = 200, test_fraction: float = 0.25,
                               split_seed: int = 0, overwrite: bool = False) -> RankingProcessed:
    """Load named dataset `name` and write its ranking samples to `output_dir`."""
    source = ranking_dataset_source(name, input_dir, num_candidates, max_uih_len)
    return preprocess_source(source, output_dir, test_fraction=test_fraction, split_seed=split_seed,
                             overwrite=overwrite)
