"""NVTabular session workflow: raw event logs -> one chronological sequence row per user or session.

Input (`read_event_log`): a Parquet file/directory, a CSV (optionally .gz/.xz/.bz2/.zst; the separator is
sniffed from the header line unless `csv_separator` is set) or a pandas DataFrame with one row per event:

    <id_column>  <item_column>  [<action_column>]  [<timestamp_column>]  [any extra columns: ignored]

The Merlin session layout (`user_session`, `item_id_list_seq`, optional `item_event_name_list_seq`,
`timestamp_first`) is detected and exploded into that event form first, keeping the list order. It has no
per-event time, so every event of a session gets the session's `timestamp_first`; the stable sort below
then keeps the list order inside a session and orders sessions sharing an id by their start time.

Output (`preprocess`), one row per id, rows ordered by id:

    <id_column>       raw id (not encoded), tags USER_ID or SESSION_ID
    item_id-list      int64 list, Categorify ids (or raw ids, see below), tags ITEM, ID, LIST, CATEGORICAL,
                      int_domain from Categorify (raw: [0, largest id])
    action-list       int64 list, Categorify ids, tags LIST, CATEGORICAL, property merlin_hstu_role="action"
    timestamp-list    int64 list, unix seconds, tags LIST, TIME, CONTINUOUS
    length            int64, events kept = min(n, max_length)
    interleaved-list  int64 list of 2*length tokens (only with interleave_actions=True, see below)

All lists of a row have the same length and are chronological: events are sorted by timestamp with a
stable sort (ties keep input order). A row is dropped when it has fewer than `min_length` events (counted
before truncation), then every list keeps its most recent `max_length` events.

Categorify (NVTabular 23.08, see `nvtabular/ops/categorify.py` PAD_OFFSET/NULL_OFFSET/OOV_OFFSET): 0 padding,
1 null, 2 out-of-vocabulary, real values 3 .. cardinality-1; `int_domain.max + 1` = embedding-table rows.
`load_item_id_mapping` / `load_action_mapping` invert it.

Raw item ids (`item_encoding="raw"`, op `RawItemIds`): positive integer item ids are kept as they are, as the
reference does for MovieLens; 0 stays padding, ids <= 0 are rejected, and int_domain.max = the largest id of the
data or of the candidate catalogue, so embedding rows = max id + 1 (ML-1M: 3952 + 1).

Candidate pool (`<output>/candidates.parquet`, one sorted int64 column `item_id`): the ENCODED ids a model scores
and samples negatives from. Default: every real item the workflow encodes (Categorify: 3 .. cardinality-1, which
includes items of rows dropped by min_length, since Categorify is fitted on every event; raw: every distinct id in
the log). `preprocess(..., candidates=raw_ids)` gives an explicit catalogue instead (e.g. all 3,883 ML-1M movies,
rated or not); every logged item must be in it, and with Categorify every catalogue item must occur in the log
(an unseen item has no Categorify id - use item_encoding="raw" for such catalogues).

Interleaving (`interleave_actions=True`) adds `interleaved-list` = [i_1, a_1 + K, i_2, a_2 + K, ...]:
item tokens keep their encoded ids, action tokens are shifted by K = item cardinality (item
`int_domain.max + 1`), so one embedding table of K + |actions| rows holds both and 0 stays padding.
K is stored in the column property `action_token_offset` (read it with `merlin_hstu.common.schema.action_token_offset`).
Token 2k and 2k+1 both happened at `timestamp-list[k]`; a model repeats timestamps (`repeat_interleave(2)`).
T4R's `MerlinDataLoader.from_schema(..., max_sequence_length=L)` pads AND cuts every LIST column to L (keeping
the first L values), so with interleaving pass L >= 2 * max_length or the interleaved list loses its newest tokens.

Timestamps must be integers (unix seconds), integral floats, or datetime64 (converted to unix seconds,
floored). Strings, negative values and non-integral floats are rejected rather than guessed at.

Shape of the workflow (single branch after the Groupby; on CPU each extra branch re-runs the Groupby):

    [id] + ([item] >> Rename >> Categorify) + ([action] >> Rename >> Categorify) + ([time] >> Rename)
        >> ChronologicalGroupby(id, list aggs; stable time sort inside) >> FinalizeSequences

Groupby works per partition, so `preprocess` hands NVTabular one in-memory partition: logs must fit in RAM.
"""
from __future__ import annotations

import bz2
import gzip
import io
import lzma
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import pandas as pd

import nvtabular as nvt
from merlin.io import Dataset
from merlin.schema import Schema
from merlin.schema.io.tensorflow_metadata import TensorflowMetadata
from nvtabular import ops

from merlin_hstu.common import schema as roles
from merlin_hstu.common.atomic_dir import publish_dir, staging_dir
from merlin_hstu.workflows.ops import ChronologicalGroupby, FinalizeSequences, RawItemIds

PathLike = Union[str, os.PathLike]

# Raw columns are renamed to these before the Groupby, whose `<name>-<agg>` naming yields the output names.
ITEM_BASE, ACTION_BASE, TIME_BASE = "item_id", "action", "timestamp"
GROUPBY_SEP = "-"
assert f"{ITEM_BASE}{GROUPBY_SEP}list" == roles.ITEM_LIST
assert f"{ACTION_BASE}{GROUPBY_SEP}list" == roles.ACTION_LIST
assert f"{TIME_BASE}{GROUPBY_SEP}list" == roles.TIMESTAMP_LIST

# Merlin session Parquet layout
MERLIN_SESSION_ID = "user_session"
MERLIN_SESSION_ITEMS = "item_id_list_seq"
MERLIN_SESSION_EVENTS = "item_event_name_list_seq"
MERLIN_SESSION_TIME = "timestamp_first"

ITEM_ENCODINGS = ("categorify", "raw")
CANDIDATES_FILE = "candidates.parquet"  # <output>/candidates.parquet: column CANDIDATES_COLUMN, sorted int64
CANDIDATES_COLUMN = "item_id"

_LIKELY_MILLISECONDS = 10**11  # unix seconds above this are past year 5000: probably milliseconds
_CSV_SUFFIXES = {".csv", ".tsv", ".txt"}
_PARQUET_SUFFIXES = {".parquet", ".pq"}
_COMPRESSION_SUFFIXES = {".gz", ".xz", ".bz2", ".zst"}


class EventLogError(ValueError):
    """The raw event log cannot be processed; the message names the column and the fix."""


@dataclass
class SessionWorkflowConfig:
    """How raw log columns map to roles, and the sequence limits."""

    id_column: str = "user_id"  # user or session id column of the raw log
    id_kind: str = "user"  # "user" -> Tags.USER_ID, "session" -> Tags.SESSION_ID
    item_column: str = "item_id"
    action_column: Optional[str] = "action"  # None: no actions
    timestamp_column: Optional[str] = "timestamp"  # None: no timestamps (lists omitted, input order kept)
    max_length: int = 200  # keep the most recent max_length events
    min_length: int = 2  # drop sequences with fewer events (counted before truncation)
    interleave_actions: bool = False
    csv_separator: Optional[str] = None  # None: sniffed from the CSV header line
    item_encoding: str = "categorify"  # "categorify" (0 pad, 1 null, 2 OOV, items 3..) or "raw" (ids >= 1 kept)

    def __post_init__(self) -> None:
        if self.item_encoding not in ITEM_ENCODINGS:
            raise ValueError(
                f"SessionWorkflowConfig.item_encoding must be one of {ITEM_ENCODINGS}, got {self.item_encoding!r}"
            )
        if self.id_kind not in ("user", "session"):
            raise ValueError(f"SessionWorkflowConfig.id_kind must be 'user' or 'session', got {self.id_kind!r}")
        for name in ("id_column", "item_column"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"SessionWorkflowConfig.{name} must be a non-empty column name")
        for name in ("max_length", "min_length"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"SessionWorkflowConfig.{name} must be an integer >= 1, got {value!r}")
        if self.interleave_actions and self.action_column is None:
            raise ValueError("SessionWorkflowConfig.interleave_actions=True needs action_column (it is None)")
        raw = [c for c in (self.id_column, self.item_column, self.action_column, self.timestamp_column) if c]
        if len(set(raw)) != len(raw):
            raise ValueError(f"SessionWorkflowConfig columns must be distinct, got {raw}")
        reserved = {ITEM_BASE, ACTION_BASE, TIME_BASE, roles.ITEM_LIST, roles.ACTION_LIST,
                    roles.TIMESTAMP_LIST, roles.LENGTH, roles.INTERLEAVED_LIST}
        if self.id_column in reserved:
            raise ValueError(
                f"SessionWorkflowConfig.id_column={self.id_column!r} clashes with a name the workflow uses "
                f"({sorted(reserved)}); rename the id column in the log."
            )

    @property
    def id_role(self) -> str:
        return roles.ROLE_USER_ID if self.id_kind == "user" else roles.ROLE_SESSION_ID

    def role_columns(self) -> List[Tuple[str, str]]:
        """(config field, raw column) for every configured role, id first."""
        pairs = [("id_column", self.id_column), ("item_column", self.item_column)]
        if self.action_column is not None:
            pairs.append(("action_column", self.action_column))
        if self.timestamp_column is not None:
            pairs.append(("timestamp_column", self.timestamp_column))
        return pairs


# ---------------------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------------------
def read_event_log(
    path_or_df: Union[PathLike, pd.DataFrame], config: Optional[SessionWorkflowConfig] = None
) -> pd.DataFrame:
    """Load an event log (CSV / Parquet / DataFrame); a Merlin session layout is exploded to events."""
    config = config or SessionWorkflowConfig()
    if isinstance(path_or_df, pd.DataFrame):
        df = path_or_df
    elif isinstance(path_or_df, (str, os.PathLike)):
        df = _read_file(Path(path_or_df), config)
    else:
        raise EventLogError(
            f"read_event_log takes a path or a pandas DataFrame, got {type(path_or_df).__name__}"
        )
    if is_merlin_session_layout(df):
        df = merlin_sessions_to_event_log(df, config)
    return df


def _read_file(path: Path, config: SessionWorkflowConfig) -> pd.DataFrame:
    if not path.exists():
        raise EventLogError(f"event log {str(path)!r} does not exist")
    if path.is_dir():  # e.g. an NVTabular output: part_*.parquet next to schema.pbtxt / _metadata
        parts = sorted(path.glob("*.parquet"), key=lambda p: (len(p.name), p.name))
        if not parts:
            raise EventLogError(f"directory {str(path)!r} holds no *.parquet files")
        return pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True)
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in _COMPRESSION_SUFFIXES:
        suffixes = suffixes[:-1]
    kind = suffixes[-1] if suffixes else ""
    if kind in _PARQUET_SUFFIXES:
        return pd.read_parquet(path)
    if kind in _CSV_SUFFIXES:
        sep = config.csv_separator or _sniff_separator(path)
        return pd.read_csv(path, sep=sep)
    raise EventLogError(
        f"cannot tell the format of {str(path)!r}: use a .csv/.tsv/.txt (optionally .gz/.xz/.bz2/.zst), "
        ".parquet file, a Parquet directory, or pass a pandas DataFrame"
    )


def _sniff_separator(path: Path) -> str:
    """The most frequent of , ; TAB | in the header line (',' if none appears)."""
    openers = {".gz": gzip.open, ".xz": lzma.open, ".bz2": bz2.open}
    suffix = path.suffix.lower()
    if suffix == ".zst":
        raise EventLogError(f"cannot sniff the separator of {str(path)!r}: set SessionWorkflowConfig.csv_separator")
    opener = openers.get(suffix, open)
    with opener(path, "rb") as raw:
        header = io.TextIOWrapper(raw, encoding="utf-8", errors="replace").readline()
    counts = {sep: header.count(sep) for sep in (",", ";", "\t", "|")}
    best = max(counts, key=counts.get)
    return best if counts[best] > 0 else ","


def is_merlin_session_layout(df: pd.DataFrame) -> bool:
    """True for the Merlin session Parquet layout (one row per session, `item_id_list_seq` lists)."""
    return MERLIN_SESSION_ITEMS in df.columns


def merlin_sessions_to_event_log(df: pd.DataFrame, config: SessionWorkflowConfig) -> pd.DataFrame:
    """Explode the Merlin session layout into one row per event, named after `config`'s columns.

    Every event of a session gets the session's `timestamp_first` (the layout has no per-event time);
    list order is kept. Sessions with empty lists have no events and so produce no rows.
    """
    wanted = [(MERLIN_SESSION_ID, "id_column"), (MERLIN_SESSION_ITEMS, "item_column")]
    if config.action_column is not None:
        wanted.append((MERLIN_SESSION_EVENTS, "action_column"))
    if config.timestamp_column is not None:
        wanted.append((MERLIN_SESSION_TIME, "timestamp_column"))
    missing = [(col, fld) for col, fld in wanted if col not in df.columns]
    if missing:
        fixes = [
            f"set SessionWorkflowConfig.{fld}=None" if fld in ("action_column", "timestamp_column")
            else "add it to the session Parquet"
            for _, fld in missing
        ]
        raise EventLogError(
            f"Merlin session layout (found {MERLIN_SESSION_ITEMS!r}) is missing column(s) "
            f"{[c for c, _ in missing]} (columns present: {list(df.columns)}). Fix: {'; '.join(fixes)}."
        )
    for list_col in [MERLIN_SESSION_ITEMS] + ([MERLIN_SESSION_EVENTS] if config.action_column else []):
        nulls = df[list_col].isna().to_numpy()
        if nulls.any():
            raise EventLogError(
                f"column {list_col!r} has {int(nulls.sum())} null list(s) (first at row {int(np.argmax(nulls))}). "
                "Fix: drop those sessions or store an empty list."
            )
    lengths = np.fromiter((len(v) for v in df[MERLIN_SESSION_ITEMS]), dtype=np.int64, count=len(df))
    if config.action_column is not None:
        event_lengths = np.fromiter((len(v) for v in df[MERLIN_SESSION_EVENTS]), dtype=np.int64, count=len(df))
        bad = np.flatnonzero(event_lengths != lengths)
        if len(bad):
            raise EventLogError(
                f"columns {MERLIN_SESSION_ITEMS!r} and {MERLIN_SESSION_EVENTS!r} differ in length in "
                f"{len(bad)} row(s) (first at row {int(bad[0])}: {lengths[bad[0]]} vs {event_lengths[bad[0]]}). "
                "Fix: every item needs exactly one event name."
            )
    events = {
        config.id_column: np.repeat(df[MERLIN_SESSION_ID].to_numpy(), lengths),
        config.item_column: _flatten(df[MERLIN_SESSION_ITEMS]),
    }
    if config.action_column is not None:
        events[config.action_column] = _flatten(df[MERLIN_SESSION_EVENTS])
    if config.timestamp_column is not None:
        events[config.timestamp_column] = np.repeat(df[MERLIN_SESSION_TIME].to_numpy(), lengths)
    return pd.DataFrame(events)


def _flatten(lists: pd.Series) -> pd.Series:
    """Concatenate a column of lists, keeping element types (pandas infers int64 / object)."""
    return pd.Series(list(chain.from_iterable(lists)))


# ---------------------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------------------
def validate_event_log(df: pd.DataFrame, config: SessionWorkflowConfig) -> None:
    """Raise `EventLogError` naming the column and the fix; return None for a usable log.

    Checks, in order: it is a DataFrame, it has rows, the configured columns exist, no nulls in them,
    ids/items/actions are integers or strings, timestamps are numeric (or datetime64), integral and >= 0.
    Extra columns are not checked: they are not used.
    """
    if not isinstance(df, pd.DataFrame):
        raise EventLogError(f"event log must be a pandas DataFrame, got {type(df).__name__}")
    expected = [col for _, col in config.role_columns()]
    if len(df) == 0:
        raise EventLogError(
            f"event log is empty (0 rows; columns {list(df.columns)}); expected one row per event with "
            f"columns {expected}. Fix: point preprocess at a non-empty log."
        )
    missing = [(fld, col) for fld, col in config.role_columns() if col not in df.columns]
    if missing:
        fixes = []
        for fld, col in missing:
            fix = f"rename the log's column to {col!r} or set SessionWorkflowConfig.{fld} to its name"
            if fld in ("action_column", "timestamp_column"):
                fix += f", or set {fld}=None if the log has none"
            fixes.append(fix)
        raise EventLogError(
            f"event log is missing column(s) {[c for _, c in missing]} (columns present: {list(df.columns)}). "
            f"Fix: {'; '.join(fixes)}."
        )
    for fld, col in config.role_columns():
        nulls = df[col].isna().to_numpy()
        if nulls.any():
            raise EventLogError(
                f"column {col!r} ({fld}) has {int(nulls.sum())} null value(s) (first at row "
                f"{int(np.argmax(nulls))}). Fix: drop or fill them, e.g. df.dropna(subset=[{col!r}])."
            )
    for fld, col in config.role_columns():
        if fld == "timestamp_column":
            _timestamps_to_seconds(df[col], col)  # raises on bad timestamps
        else:
            _check_id_dtype(df[col], col, fld)
    if config.item_encoding == "raw":
        _check_raw_item_ids(df[config.item_column], config.item_column)


def _check_raw_item_ids(series: pd.Series, col: str) -> None:
    """item_encoding='raw': ids must be integers >= 1 (0 is the padding id)."""
    if not (pd.api.types.is_integer_dtype(series.dtype) or pd.api.types.infer_dtype(series) == "integer"):
        raise EventLogError(
            f"column {col!r} (item_column) holds {pd.api.types.infer_dtype(series)!r} values, but "
            "item_encoding='raw' keeps item ids as they are, so they must be integers >= 1. "
            f"Fix: df[{col!r}] = df[{col!r}].astype('int64'), or use item_encoding='categorify'."
        )
    values = series.to_numpy().astype(np.int64)
    bad = values < 1
    if bad.any():
        first = int(np.argmax(bad))
        raise EventLogError(
            f"column {col!r} (item_column) has {int(bad.sum())} id(s) <= 0 (first at row {first}: {values[first]}); "
            "with item_encoding='raw' 0 is the padding id, so ids must be >= 1. "
            "Fix: shift the ids by +1 or use item_encoding='categorify'."
        )


def _check_id_dtype(series: pd.Series, col: str, fld: str) -> None:
    dtype = series.dtype
    if pd.api.types.is_bool_dtype(dtype) or not (
        pd.api.types.is_integer_dtype(dtype) or pd.api.types.is_string_dtype(dtype) or dtype == object
    ):
        raise EventLogError(
            f"column {col!r} ({fld}) has dtype {dtype}; ids must be integers or strings. Fix: cast it, e.g. "
            f"df[{col!r}] = df[{col!r}].astype('int64') (or .astype(str)); float ids usually mean missing values."
        )
    if pd.api.types.is_unsigned_integer_dtype(dtype) and series.max() > np.iinfo(np.int64).max:
        raise EventLogError(
            f"column {col!r} ({fld}) has unsigned ids beyond the int64 range. "
            f"Fix: df[{col!r}] = df[{col!r}].astype(str)."
        )
    if dtype == object or pd.api.types.is_string_dtype(dtype):
        kind = pd.api.types.infer_dtype(series, skipna=False)
        if kind not in ("string", "integer"):
            raise EventLogError(
                f"column {col!r} ({fld}) holds {kind!r} values; ids must be all integers or all strings. "
                f"Fix: df[{col!r}] = df[{col!r}].astype(str)."
            )


def _timestamps_to_seconds(series: pd.Series, col: str) -> np.ndarray:
    """Validated unix seconds as int64: ints as-is, integral floats cast, datetime64 floored to seconds."""
    dtype = series.dtype
    fix_text = (
        f"Fix: give unix seconds as integers, e.g. df[{col!r}] = pd.to_datetime(df[{col!r}]).astype('int64') // 10**9"
    )
    if pd.api.types.is_datetime64_any_dtype(dtype):
        if getattr(dtype, "tz", None) is not None:
            series = series.dt.tz_convert("UTC").dt.tz_localize(None)
        seconds = series.to_numpy(dtype="datetime64[ns]").astype(np.int64) // 10**9
    elif pd.api.types.is_bool_dtype(dtype):
        raise EventLogError(f"column {col!r} (timestamp_column) has dtype bool; timestamps must be numeric. {fix_text}")
    elif pd.api.types.is_integer_dtype(dtype):
        values = series.to_numpy()
        if values.dtype.kind == "u" and len(values) and values.max() > np.iinfo(np.int64).max:
            raise EventLogError(f"column {col!r} (timestamp_column) has values beyond int64. {fix_text}")
        seconds = values.astype(np.int64)
    elif pd.api.types.is_float_dtype(dtype):
        values = series.to_numpy(dtype=np.float64)
        bad = ~np.isfinite(values) | (values != np.floor(values)) | (np.abs(values) >= 2.0**63)
        if bad.any():
            first = int(np.argmax(bad))
            raise EventLogError(
                f"column {col!r} (timestamp_column) has {int(bad.sum())} non-integral or non-finite float "
                f"value(s) (first at row {first}: {values[first]!r}); timestamps are whole unix seconds. "
                f"Fix: round explicitly, e.g. df[{col!r}] = np.floor(df[{col!r}]).astype('int64')."
            )
        seconds = values.astype(np.int64)
    elif dtype == object and pd.api.types.infer_dtype(series, skipna=False) == "integer":
        seconds = series.to_numpy().astype(np.int64)
    else:
        kind = pd.api.types.infer_dtype(series, skipna=False)
        raise EventLogError(
            f"column {col!r} (timestamp_column) is non-numeric (dtype {dtype}, values {kind!r}, e.g. "
            f"{series.iloc[0]!r}); timestamps must be unix seconds or datetime64. {fix_text}"
        )
    negative = seconds < 0
    if negative.any():
        first = int(np.argmax(negative))
        raise EventLogError(
            f"column {col!r} (timestamp_column) has {int(negative.sum())} negative value(s) (first at row "
            f"{first}: {seconds[first]}); timestamps are unix seconds >= 0. Fix: correct or drop those rows."
        )
    if len(seconds) and seconds.max() > _LIKELY_MILLISECONDS:
        warnings.warn(
            f"column {col!r} has values up to {seconds.max()}, which look like milliseconds; "
            "timestamp-list is meant to hold unix seconds (divide by 1000 if so).",
            stacklevel=3,
        )
    return seconds


def normalize_event_log(df: pd.DataFrame, config: SessionWorkflowConfig) -> pd.DataFrame:
    """The workflow's input: only the role columns, timestamps as int64 unix seconds, ids as int64 or str.

    Call after `validate_event_log`; the casts here are lossless by then.
    """
    out = {}
    for fld, col in config.role_columns():
        series = df[col]
        if fld == "timestamp_column":
            out[col] = _timestamps_to_seconds(series, col)
        elif pd.api.types.is_integer_dtype(series.dtype) or pd.api.types.infer_dtype(series) == "integer":
            out[col] = series.to_numpy().astype(np.int64)
        else:
            out[col] = series.astype(str).to_numpy(dtype=object)
    return pd.DataFrame(out)


# ---------------------------------------------------------------------------------------------------------
# workflow
# ---------------------------------------------------------------------------------------------------------
def build_session_workflow(
    config: SessionWorkflowConfig,
    categories_dir: Optional[PathLike] = None,
    *,
    raw_item_max_id: Optional[int] = None,
) -> nvt.Workflow:
    """The NVTabular workflow (unfitted). Input: a normalized event log (`normalize_event_log`).

    `categories_dir` is where Categorify writes its statistics during fit (default: a fresh temporary
    directory, never the current directory); `Workflow.save` copies them next to the saved workflow.
    `raw_item_max_id` (item_encoding='raw' only): a lower bound for the item int_domain.max, so that a
    catalogue with larger ids than the log (unrated items) still fits the embedding table.
    """
    out_path = str(categories_dir) if categories_dir is not None else tempfile.mkdtemp(prefix="merlin_hstu_categorify_")
    if raw_item_max_id is not None and config.item_encoding != "raw":
        raise ValueError("build_session_workflow(raw_item_max_id=...) needs SessionWorkflowConfig.item_encoding='raw'")

    def renamed(raw: str, base: str):
        return [raw] >> ops.Rename(name=base) if raw != base else [raw]

    if config.item_encoding == "raw":
        item_op = RawItemIds(min_max_id=raw_item_max_id)
    else:
        item_op = ops.Categorify(out_path=out_path)
    events = [config.id_column] + (renamed(config.item_column, ITEM_BASE) >> item_op)
    aggs = {ITEM_BASE: ["list"]}
    if config.action_column is not None:
        events = events + (renamed(config.action_column, ACTION_BASE) >> ops.Categorify(out_path=out_path))
        aggs[ACTION_BASE] = ["list"]
    if config.timestamp_column is not None:
        events = events + renamed(config.timestamp_column, TIME_BASE)
        aggs[TIME_BASE] = ["list"]
    sessions = events >> ChronologicalGroupby(
        groupby_cols=[config.id_column],
        time_column=TIME_BASE if config.timestamp_column is not None else None,
        aggs=aggs,
        name_sep=GROUPBY_SEP,
    )
    final = sessions >> FinalizeSequences(
        id_column=config.id_column,
        id_role=config.id_role,
        max_length=config.max_length,
        min_length=config.min_length,
        interleave=config.interleave_actions,
    )
    return nvt.Workflow(final)


@dataclass
class ProcessedDataset:
    """Where `preprocess` put its output, and the schema it wrote (read back from processed/schema.pbtxt)."""

    path: Path  # output_dir/processed: parquet + schema.pbtxt
    schema: Schema
    workflow_path: Path  # output_dir/workflow: Workflow.save (workflow.pkl, categories/)
    num_rows: int
    candidates_path: Optional[Path] = None  # output_dir/candidates.parquet: encoded candidate ids, sorted

    def candidate_ids(self) -> np.ndarray:
        """The encoded ids to score and to sample negatives from (int64, sorted ascending)."""
        if self.candidates_path is None:
            raise FileNotFoundError(f"no {CANDIDATES_FILE} recorded for {self.path}; re-run preprocess")
        return read_candidates(self.candidates_path)

    @property
    def parquet_files(self) -> List[Path]:
        """The data files, in row order (the directory also holds schema.pbtxt and metadata)."""
        return sorted(self.path.glob("*.parquet"), key=lambda p: (len(p.name), p.name))

    def to_pandas(self) -> pd.DataFrame:
        return pd.concat([pd.read_parquet(p) for p in self.parquet_files], ignore_index=True)


def preprocess(
    source: Union[PathLike, pd.DataFrame],
    output_dir: PathLike,
    config: Optional[SessionWorkflowConfig] = None,
    *,
    overwrite: bool = False,
    candidates: Optional[Union[Sequence, np.ndarray, pd.Series]] = None,
) -> ProcessedDataset:
    """Read, validate, fit + transform; write output_dir/{processed/, workflow/, candidates.parquet} atomically.

    `candidates`: the item catalogue as RAW item ids (None: every item of the log, see the module docstring).
    Everything is written into a hidden sibling temp directory that is renamed to `output_dir` only after
    every file is complete; on any error it is removed, so no half-written output directory is left.
    An existing `output_dir` is an error unless `overwrite=True` (then it is replaced after success).
    """
    config = config or SessionWorkflowConfig()
    output_dir = Path(output_dir).resolve()
    if output_dir.exists() and not overwrite:
        raise FileExistsError(f"{output_dir} already exists; remove it or pass overwrite=True")

    raw = read_event_log(source, config)
    validate_event_log(raw, config)
    events = normalize_event_log(raw, config)
    catalogue = None
    if candidates is not None:
        catalogue = _validate_catalogue(candidates, events[config.item_column], config)

    staging = staging_dir(output_dir)
    try:
        workflow_dir, processed_dir = staging / "workflow", staging / "processed"
        raw_max = int(catalogue.max()) if catalogue is not None and config.item_encoding == "raw" else None
        workflow = build_session_workflow(config, categories_dir=workflow_dir, raw_item_max_id=raw_max)
        dataset = Dataset(events, cpu=True, npartitions=1)
        workflow.fit(dataset)
        result = workflow.transform(dataset).to_ddf().compute()
        if len(result) == 0:
            raise EventLogError(
                f"no {config.id_kind} in column {config.id_column!r} has at least min_length={config.min_length} "
                f"events, so the output would be empty. Fix: lower SessionWorkflowConfig.min_length."
            )
        out_schema = _relocate_paths(workflow.output_schema, str(staging), str(output_dir))
        encoded = _encoded_candidates(config, workflow_dir, events[config.item_column], catalogue)
        Dataset(result, cpu=True, schema=out_schema).to_parquet(str(processed_dir), output_files=1)
        workflow.save(str(workflow_dir))
        pd.DataFrame({CANDIDATES_COLUMN: encoded}).to_parquet(staging / CANDIDATES_FILE, index=False)
        publish_dir(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise

    processed = output_dir / "processed"
    schema = TensorflowMetadata.from_proto_text_file(str(processed)).to_merlin_schema()
    return ProcessedDataset(path=processed, schema=schema, workflow_path=output_dir / "workflow",
                            num_rows=len(result), candidates_path=output_dir / CANDIDATES_FILE)


def read_candidates(path: PathLike) -> np.ndarray:
    """The encoded candidate ids of a preprocess output (its directory or the candidates.parquet file)."""
    path = Path(path)
    if path.is_dir():
        path = path / CANDIDATES_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no candidate pool at {path}; it is written by preprocess (re-run it)")
    ids = pd.read_parquet(path)[CANDIDATES_COLUMN].to_numpy()
    return ids.astype(np.int64, copy=False)


def _validate_catalogue(candidates, items: pd.Series, config: SessionWorkflowConfig) -> np.ndarray:
    """The raw catalogue as a sorted array; every logged item must be in it (no item silently left out)."""
    values = pd.Series(np.asarray(candidates).ravel() if not isinstance(candidates, pd.Series) else candidates)
    where = "preprocess(candidates=...)"
    if len(values) == 0:
        raise EventLogError(f"{where} is empty. Fix: pass the item catalogue, or None to use the logged items.")
    if values.isna().any():
        raise EventLogError(f"{where} has {int(values.isna().sum())} null id(s). Fix: drop them.")
    integer_items = pd.api.types.is_integer_dtype(items.dtype)
    kind = pd.api.types.infer_dtype(values, skipna=False)
    if integer_items and kind != "integer":
        raise EventLogError(
            f"{where} holds {kind!r} values but column {config.item_column!r} has integer ids. "
            "Fix: pass integer item ids, the same ids as in the log."
        )
    if not integer_items and kind != "string":
        raise EventLogError(
            f"{where} holds {kind!r} values but column {config.item_column!r} has string ids. "
            "Fix: pass the catalogue as strings, e.g. [str(i) for i in ids]."
        )
    values = values.to_numpy().astype(np.int64 if integer_items else object)
    unique = pd.unique(values)
    if len(unique) != len(values):
        duplicated = pd.Series(values)[pd.Series(values).duplicated()].iloc[0]
        raise EventLogError(
            f"{where} lists {len(values) - len(unique)} id(s) more than once (e.g. {duplicated!r}). "
            "Fix: pass each catalogue item once."
        )
    if config.item_encoding == "raw" and unique.min() < 1:
        raise EventLogError(
            f"{where} holds id {unique.min()}; with item_encoding='raw' ids must be >= 1 (0 is padding)."
        )
    missing = np.setdiff1d(pd.unique(items.to_numpy()), unique)
    if len(missing):
        raise EventLogError(
            f"{len(missing)} item id(s) of column {config.item_column!r} are not in {where} (e.g. "
            f"{missing[:5].tolist()}). Fix: pass the full catalogue, or drop those events first."
        )
    return np.sort(unique)


def _encoded_candidates(
    config: SessionWorkflowConfig, workflow_dir: Path, items: pd.Series, catalogue: Optional[np.ndarray]
) -> np.ndarray:
    """Encoded, sorted candidate ids: raw ids kept as they are, or mapped through the fitted Categorify."""
    if config.item_encoding == "raw":
        source = catalogue if catalogue is not None else pd.unique(items.to_numpy())
        return np.sort(np.asarray(source, dtype=np.int64))
    mapping = _load_category_mapping(workflow_dir, ITEM_BASE)
    first = int(np.flatnonzero(pd.notna(mapping))[0])
    if catalogue is None:
        return np.arange(first, len(mapping), dtype=np.int64)
    code_of = {raw: code for code, raw in enumerate(mapping) if code >= first}
    unseen = [raw for raw in catalogue if raw not in code_of]
    if unseen:
        raise EventLogError(
            f"{len(unseen)} catalogue item(s) in preprocess(candidates=...) never occur in column "
            f"{config.item_column!r} (e.g. {unseen[:5]}), so Categorify has no id for them. Fix: use "
            "SessionWorkflowConfig(item_encoding='raw') to keep catalogue ids, or drop them from the catalogue."
        )
    return np.sort(np.fromiter((code_of[raw] for raw in catalogue), dtype=np.int64, count=len(catalogue)))


def _relocate_paths(schema: Schema, old_root: str, new_root: str) -> Schema:
    """Categorify records absolute `cat_path`s; point them at where the files will live after the rename."""
    columns = []
    for col in schema:
        path = col.properties.get("cat_path")
        if isinstance(path, str) and path.startswith(old_root):
            col = col.with_properties({**col.properties, "cat_path": new_root + path[len(old_root):]})
        columns.append(col)
    return Schema(columns)


# ---------------------------------------------------------------------------------------------------------
# after fitting
# ---------------------------------------------------------------------------------------------------------
def load_item_id_mapping(workflow_path: PathLike) -> np.ndarray:
    """Raw item id for each encoded id: `mapping[encoded] == raw`.

    An object array of length = item cardinality. Entries 0, 1, 2 (padding, null, OOV) are None.
    """
    return _load_category_mapping(workflow_path, ITEM_BASE)


def load_action_mapping(workflow_path: PathLike) -> np.ndarray:
    """Raw action for each encoded action id; entries 0, 1, 2 (padding, null, OOV) are None."""
    return _load_category_mapping(workflow_path, ACTION_BASE)


def _load_category_mapping(workflow_path: PathLike, column: str) -> np.ndarray:
    categories = Path(workflow_path) / "categories"
    unique_path = categories / f"unique.{column}.parquet"
    if not unique_path.exists():
        raise FileNotFoundError(
            f"no Categorify statistics for {column!r} at {unique_path}; pass the workflow/ directory written "
            "by preprocess (for actions: one that was built with an action_column). With "
            "item_encoding='raw' there is no item mapping: encoded item ids are the raw ids."
        )
    uniques = pd.read_parquet(unique_path)
    first = roles.FIRST_REAL_ID
    meta_path = categories / f"meta.{column}.parquet"
    if meta_path.exists():
        meta = pd.read_parquet(meta_path)
        first = int(meta.loc[meta["kind"] == "unique", "offset"].iloc[0])
    n = len(uniques)
    index = uniques.index.to_numpy()
    if not (np.array_equal(index, np.arange(first, first + n)) or np.array_equal(index, np.arange(n))):
        raise ValueError(
            f"unexpected Categorify layout in {unique_path}: index {index[:5]}..., expected {first}..{first + n - 1}"
        )
    mapping = np.empty(first + n, dtype=object)
    mapping[:first] = None
    mapping[first:] = uniques[column].to_numpy(dtype=object)
    return mapping


def load_serving_workflow(workflow_path: PathLike) -> nvt.Workflow:
    """Load a saved session workflow for inference: same encoding, but the min-length filter is off.

    At serving time every request must produce a row, also for users with a single event.
    """
    workflow = nvt.Workflow.load(str(workflow_path))
    finals = [node.op for node in _iter_nodes(workflow.output_node) if isinstance(node.op, FinalizeSequences)]
    if len(finals) != 1:
        raise ValueError(f"{workflow_path} is not a session workflow (found {len(finals)} FinalizeSequences ops)")
    finals[0].min_length = 1
    workflow.graph.construct_schema(workflow.input_schema, preserve_dtypes=True)
    return workflow


def _iter_nodes(node):
    seen, stack = set(), [node]
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        stack.extend(current.parents_with_dependencies)
