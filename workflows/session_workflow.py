"""NVTabular session workflow: raw event logs -> one chronological sequence row per user or session.

Input (`read_event_log`): a Parquet file/directory, a CSV (optionally .gz/.xz/.bz2/.zst; the separator is
sniffed from the header line unless `csv_separator` is set) or a pandas DataFrame with one row per event:

    <id_column>  <item_column>  [<action_column>]  [<timestamp_column>]  [any extra columns: ignored]

The Merlin session layout (`user_session`, `item_id_list_seq`, optional `item_event_name_list_seq`, a per-event
timestamp list and/or `timestamp_first`) is detected and exploded into that event form first, keeping the list
order. Each event keeps its own time when the file has a list column of per-event unix seconds aligned with the
item list (`SessionWorkflowConfig.session_time_column`, CLI `--session-time-column`; by default found by name:
the one integer/datetime list column whose name contains "timestamp", e.g. `timestamp-list`, or a list column
tagged TIME in the folder's schema.pbtxt). Only without one does every event get the session's `timestamp_first`,
with a warning naming the column to provide; the stable sort below then keeps the list order inside a session
and orders sessions sharing an id by their start time.

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
import json
import lzma
import os
import shutil
import tempfile
import warnings
import zlib
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import pandas as pd

import nvtabular as nvt
from merlin.io import Dataset
from merlin.schema import Schema
from merlin.schema.io.tensorflow_metadata import TensorflowMetadata
from nvtabular import ops

from merlin_hstu.common import schema as roles
from merlin_hstu.common.atomic_dir import publish_dir, staging_dir
from merlin_hstu.workflows.cluster import fit_transform
from merlin_hstu.workflows.ops import ChronologicalGroupby, FinalizeSequences, RawItemIds

PathLike = Union[str, os.PathLike]

# Raw columns are renamed to these before the Groupby, whose `<name>-<agg>` naming yields the output names.
ITEM_BASE, ACTION_BASE, TIME_BASE = roles.ITEM_BASE, roles.ACTION_BASE, roles.TIME_BASE
GROUPBY_SEP = roles.LIST_SUFFIX[0]
assert f"{ITEM_BASE}{GROUPBY_SEP}list" == roles.ITEM_LIST
assert f"{ACTION_BASE}{GROUPBY_SEP}list" == roles.ACTION_LIST
assert f"{TIME_BASE}{GROUPBY_SEP}list" == roles.TIMESTAMP_LIST

# Merlin session Parquet layout
# Merlin session Parquet layout (names in merlin_hstu.common.schema)
MERLIN_SESSION_ID, MERLIN_SESSION_ITEMS = roles.MERLIN_SESSION_ID, roles.MERLIN_SESSION_ITEMS
MERLIN_SESSION_EVENTS, MERLIN_SESSION_TIME = roles.MERLIN_SESSION_EVENTS, roles.MERLIN_SESSION_TIME
MERLIN_SESSION_TIME_HINT = roles.MERLIN_SESSION_TIME_HINT

ITEM_ENCODINGS = ("categorify", "raw")
CANDIDATES_FILE = "candidates.parquet"  # <output>/candidates.parquet: column CANDIDATES_COLUMN, sorted int64
CANDIDATES_COLUMN = roles.CANDIDATES_COLUMN

_LIKELY_MILLISECONDS = 10**11  # unix seconds above this are past year 5000: probably milliseconds
_CSV_SUFFIXES = {".csv", ".tsv", ".txt"}
_PARQUET_SUFFIXES = {".parquet", ".pq"}
_COMPRESSION_SUFFIXES = {".gz", ".xz", ".bz2", ".zst"}


class EventLogError(ValueError):
    """The raw event log cannot be processed; the message names the file, the column, the row as the user counts
    it, the offending value and the fix (the CLI flag first, the Python equivalent after it)."""


#: the CLI flag of each setting, for the "Fix:" of error messages. `SessionWorkflowConfig.cli_flags` overrides
#: entries for commands that spell them differently (preprocess-ranking: --user-column; demo: --data).
CLI_FLAGS = {
    "input": "--input", "id_column": "--id-column", "item_column": "--item-column",
    "action_column": "--action-column", "timestamp_column": "--timestamp-column", "min_length": "--min-length",
    "max_length": "--max-history", "csv_separator": "--separator", "drop_nulls": "--drop-nulls",
    "timestamp_none": "--timestamp-column none",
    "input_format": "--input-format", "sequence_user_ids": "--sequence-user-ids",
    "session_time_column": "--session-time-column", "split_layout": "--split-layout",
    "valid_fraction": "--valid-fraction", "test_fraction": "--test-fraction", "prefix_expansion": "--prefix-expansion",
}
INPUT_FORMATS = ("auto", "events", "sessions", "sequences")
SPLIT_LAYOUTS = ("none", "merlin")
#: the Merlin split layout: <dir>/{train,valid,test}.parquet, or per-day folders <dir>/<day>/{train,...}.parquet as
#: T4R's preprocessing writes them; preprocess writes <output>/splits/{train,valid,test}.parquet + schema.pbtxt
SPLITS = ("train", "valid", "test")
SPLITS_DIR = "splits"
SPLITS_ATTR = "merlin_hstu_splits"  # DataFrame.attrs key: {id value: split name} of a log read from the layout
_ROLE_NAMES = {"id_column": "id", "item_column": "item id", "action_column": roles.ROLE_ACTION,
               "timestamp_column": roles.ROLE_TIMESTAMP}


@dataclass
class SessionWorkflowConfig:
    """How raw log columns map to roles, how the file is read, and the sequence limits."""

    id_column: str = roles.LOG_USER_ID  # user or session id column of the raw log
    id_kind: str = "user"  # "user" -> Tags.USER_ID, "session" -> Tags.SESSION_ID
    item_column: str = roles.LOG_ITEM_ID
    action_column: Optional[str] = roles.LOG_ACTION  # None: no actions
    timestamp_column: Optional[str] = roles.LOG_TIMESTAMP  # None: no timestamps (lists omitted, input order kept)
    max_length: int = 200  # keep the most recent max_length events
    min_length: int = 2  # drop sequences with fewer events (counted before truncation)
    interleave_actions: bool = False
    csv_separator: Optional[str] = None  # None: sniffed from the CSV header line
    item_encoding: str = "categorify"  # "categorify" (0 pad, 1 null, 2 OOV, items 3..) or "raw" (ids >= 1 kept)
    drop_nulls: bool = False  # drop events with an empty id / item / action / timestamp (counted), else an error
    input_format: str = "auto"  # auto | events (CSV/Parquet rows) | sessions (Merlin layout) | sequences (text)
    sequence_user_ids: Optional[bool] = None  # sequences: is the first token of a line its user id? None: detect
    # sessions: the per-event time column (a list aligned with item_id_list_seq), or a per-session column repeated
    # for every event (e.g. timestamp_first); None: detected (see merlin_session_time_column)
    session_time_column: Optional[str] = None
    # the Merlin split layout: "none", or "merlin" = also write <output>/splits/{train,valid,test}.parquet, sessions
    # split by start time (an input that already has the layout keeps its own split)
    split_layout: str = "none"
    valid_fraction: float = 0.1  # split_layout="merlin": the share of sequences in valid.parquet ...
    test_fraction: float = 0.1  # ... and in test.parquet (the latest ones)
    prefix_expansion: bool = False  # every train sequence of n events -> its prefixes of 2..n events (train only)
    cli_flags: Optional[Dict[str, str]] = field(default=None, compare=False, repr=False)  # CLI_FLAGS overrides

    def __post_init__(self) -> None:
        if self.item_encoding not in ITEM_ENCODINGS:
            raise ValueError(
                f"SessionWorkflowConfig.item_encoding must be one of {ITEM_ENCODINGS}, got {self.item_encoding!r}"
            )
        if self.id_kind not in ("user", "session"):
            raise ValueError(f"SessionWorkflowConfig.id_kind must be 'user' or 'session', got {self.id_kind!r}")
        if self.input_format not in INPUT_FORMATS:
            raise ValueError(f"SessionWorkflowConfig.input_format must be one of {INPUT_FORMATS} "
                             f"({self.flag('input_format')}), got {self.input_format!r}")
        for name in ("id_column", "item_column"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"SessionWorkflowConfig.{name} must be a non-empty column name ({self.flag(name)})")
        for name in ("max_length", "min_length"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"SessionWorkflowConfig.{name} must be an integer >= 1, got {value!r}")
        if self.split_layout not in SPLIT_LAYOUTS:
            raise ValueError(f"SessionWorkflowConfig.split_layout must be one of {SPLIT_LAYOUTS} "
                             f"({self.flag('split_layout')}), got {self.split_layout!r}")
        for name in ("valid_fraction", "test_fraction"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
                raise ValueError(f"SessionWorkflowConfig.{name} must be a number in (0, 1) ({self.flag(name)}), "
                                 f"got {value!r}")
        if self.valid_fraction + self.test_fraction >= 1.0:
            raise ValueError(f"SessionWorkflowConfig.valid_fraction + test_fraction must be < 1 (train needs the rest), "
                             f"got {self.valid_fraction} + {self.test_fraction}")
        if self.interleave_actions and self.action_column is None:
            raise ValueError("SessionWorkflowConfig.interleave_actions=True needs action_column (it is None)")
        raw = [c for c in (self.id_column, self.item_column, self.action_column, self.timestamp_column) if c]
        if len(set(raw)) != len(raw):
            raise ValueError(f"SessionWorkflowConfig columns must be distinct, got {raw} (flags "
                             f"{self.flag('id_column')}, {self.flag('item_column')}, {self.flag('action_column')}, "
                             f"{self.flag('timestamp_column')})")
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

    def flag(self, setting: str) -> str:
        """The CLI flag of a setting (a field name, or "input"), for error messages."""
        return (self.cli_flags or {}).get(setting, CLI_FLAGS.get(setting, setting))  # None: the command has none

    def role_columns(self) -> List[Tuple[str, str]]:
        """(config field, raw column) for every configured role, id first."""
        pairs = [("id_column", self.id_column), ("item_column", self.item_column)]
        if self.action_column is not None:
            pairs.append(("action_column", self.action_column))
        if self.timestamp_column is not None:
            pairs.append(("timestamp_column", self.timestamp_column))
        return pairs


# ---------------------------------------------------------------------------------------------------------
# where rows come from (for messages that name the row as the user counts it)
# ---------------------------------------------------------------------------------------------------------
ORIGIN_ATTR = "merlin_hstu_origin"  # DataFrame.attrs key: the LogOrigin of a frame read by read_event_log
NOTES_ATTR = "merlin_hstu_notes"  # DataFrame.attrs key: notes on what reading did (ids read as strings, ...)


class LogOrigin:
    """Names the rows and columns of an event-log frame as the user sees them in the file.

    events CSV: "line N" (1-based, the header is line 1; blank lines counted as in the file); Parquet: "row N"
    (1-based, with pandas' 0-based index); Merlin session layout: "session KEY (row N), list item M" and the list
    column (`item_id_list_seq`), not the exploded one; sequence text: "line N"; a DataFrame: its index label.
    Row arguments are index labels of the frame `read_event_log` returned (its RangeIndex).
    """

    def __init__(self, source: str, layout: str, *, path: Optional[Path] = None, parts=None, lines=None,
                 sessions: Optional[dict] = None):
        self.source, self.layout, self.path = source, layout, path
        self.parts = parts  # Parquet folder: [(file name, first row)]
        self.lines = lines  # sequences: file line of every event
        self.sessions = sessions  # sessions: base origin, session row / list position of every event, columns
        self._csv_lines: Optional[np.ndarray] = None

    @classmethod
    def of(cls, df: pd.DataFrame) -> "LogOrigin":
        origin = df.attrs.get(ORIGIN_ATTR)
        return origin if isinstance(origin, LogOrigin) else cls("the DataFrame", "dataframe")

    def column(self, col: str) -> str:
        """The column's name in the input (the session layout's list column for an exploded column)."""
        if self.sessions is not None:
            return self.sessions["columns"].get(col, col)
        return col

    def where(self, label, col: Optional[str] = None) -> str:
        if self.sessions is not None:
            s = self.sessions
            base = s["base"].where(s["row"][label])
            text = f"session {_short(s['keys'][label])} ({base})"
            if col is None or col in s["list_columns"]:
                text += f", list item {int(s['pos'][label]) + 1}"
            return text
        if self.layout == "csv":
            line = self._csv_line(int(label))
            return f"line {line}" if line is not None else f"data row {int(label) + 1}"
        if self.layout == "parquet":
            if self.parts:
                starts = [start for _, start in self.parts]
                k = int(np.searchsorted(starts, int(label), side="right")) - 1
                name, start = self.parts[k]
                return f"{name} row {int(label) - start + 1} (0-based {int(label) - start})"
            return f"row {int(label) + 1} (0-based {int(label)})"
        if self.layout == "sequences" and self.lines is not None:
            return f"line {int(self.lines[int(label)])}"
        return f"row {label!r}"

    def _csv_line(self, row: int) -> Optional[int]:
        """1-based file line of data row `row` (pandas skips blank lines; the header is the first line)."""
        if self._csv_lines is None:
            try:
                with _open_text(self.path) as handle:
                    numbers = [n for n, line in enumerate(handle, start=1) if line.strip()]
            except (OSError, EOFError, ValueError, ImportError):
                return None
            self._csv_lines = np.asarray(numbers[1:], dtype=np.int64)
        return int(self._csv_lines[row]) if 0 <= row < len(self._csv_lines) else None


def _short(value, limit: int = 60) -> str:
    text = repr(value.item() if isinstance(value, np.generic) else value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _error(origin: LogOrigin, col: str, fld: str, problem: str, fix: str) -> EventLogError:
    role = _ROLE_NAMES.get(fld, fld)
    return EventLogError(f"{origin.source}: column {origin.column(col)!r} ({role}) {problem}. Fix: {fix}.")


def _drop_nulls_fix(config: SessionWorkflowConfig, what: str, otherwise: str) -> str:
    flag = config.flag("drop_nulls")
    if flag is None:  # the command has no such flag (preprocess-ranking)
        return otherwise
    return (f"{flag} to drop {what} (they are counted in data_report.json), or {otherwise} "
            "(Python: SessionWorkflowConfig.drop_nulls=True)")


def _note(df: pd.DataFrame, text: str) -> None:
    df.attrs.setdefault(NOTES_ATTR, []).append(text)


# ---------------------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------------------
def read_event_log(
    path_or_df: Union[PathLike, pd.DataFrame], config: Optional[SessionWorkflowConfig] = None
) -> pd.DataFrame:
    """Load an event log (CSV / Parquet / sequence text / DataFrame) as one row per event.

    A Merlin session layout is exploded to events; a sequence-per-line text file (`detect_input_format`) becomes
    (id, item) rows in list order. Id columns that do not fit int64 are read as strings (a note says so). The
    frame's `attrs` carry its `LogOrigin` (for error messages) and the notes.
    """
    config = config or SessionWorkflowConfig()
    if isinstance(path_or_df, pd.DataFrame):
        df = path_or_df.copy(deep=False)
        df.attrs = {ORIGIN_ATTR: LogOrigin.of(path_or_df), NOTES_ATTR: list(path_or_df.attrs.get(NOTES_ATTR, []))}
        if SPLITS_ATTR in path_or_df.attrs:
            df.attrs[SPLITS_ATTR] = path_or_df.attrs[SPLITS_ATTR]
    elif isinstance(path_or_df, (str, os.PathLike)):
        path = Path(path_or_df)
        if detect_input_format(path, config) == "sequences":
            df = _read_sequences(path, config)
        else:
            df = _read_file(path, config)
    else:
        raise EventLogError(
            f"read_event_log takes a path or a pandas DataFrame, got {type(path_or_df).__name__}"
        )
    if config.input_format == "sessions" and not is_merlin_session_layout(df):
        raise EventLogError(
            f"{LogOrigin.of(df).source}: {config.flag('input_format')} sessions, but there is no "
            f"{MERLIN_SESSION_ITEMS!r} column (columns: {list(df.columns)}). Fix: {config.flag('input_format')} "
            "events for one row per event."
        )
    if config.input_format != "events" and is_merlin_session_layout(df):
        df = merlin_sessions_to_event_log(df, config)
    return _wide_ids_as_strings(df, config)


def detect_input_format(path: PathLike, config: Optional[SessionWorkflowConfig] = None) -> str:
    """events | sessions | sequences for a file or folder (config.input_format unless "auto").

    Auto: a text file (.txt/.csv/.tsv, optionally compressed) whose first line holds two or more integers
    separated by spaces only, with no , ; | or TAB, is a sequence-per-line file (`user item item ...`); Parquet
    with an `item_id_list_seq` column is the Merlin session layout (known only once read: "events" here).
    """
    config = config or SessionWorkflowConfig()
    if config.input_format != "auto":
        return config.input_format
    path = Path(path)
    if not path.is_file() or _file_kind(path) not in _CSV_SUFFIXES:
        return "events"
    try:
        with _open_text(path) as handle:
            first = next((line for line in handle if line.strip()), "")
    except (OSError, EOFError, ValueError, ImportError):
        return "events"  # the reader reports it with the file name
    tokens = first.split()
    if any(sep in first for sep in (",", ";", "|", "\t")) or len(tokens) < 2:
        return "events"
    return "sequences" if all(t.lstrip("-").isdigit() for t in tokens) else "events"


def _file_kind(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in _COMPRESSION_SUFFIXES:
        suffixes = suffixes[:-1]
    return suffixes[-1] if suffixes else ""


def _open_text(path: Path):
    """The (decompressed) text of a file; errors="replace" so that a sniff never fails on encoding."""
    openers = {".gz": gzip.open, ".xz": lzma.open, ".bz2": bz2.open}
    suffix = Path(path).suffix.lower()
    if suffix == ".zst":
        import zstandard  # noqa: F401  (ImportError: the caller names the fix)

        raw = zstandard.ZstdDecompressor().stream_reader(open(path, "rb"))
    else:
        raw = openers.get(suffix, open)(path, "rb")
    return io.TextIOWrapper(raw, encoding="utf-8", errors="replace")


def _read_error(path: Path, what: str, error: BaseException, fix: str) -> EventLogError:
    detail = " ".join(str(error).replace("'<Buffer>'", "").split()) or type(error).__name__
    return EventLogError(f"{path}: {what} ({type(error).__name__}: {detail}). Fix: {fix}.")


def _read_file(path: Path, config: SessionWorkflowConfig) -> pd.DataFrame:
    flag = config.flag("input")
    if not path.exists():
        raise EventLogError(f"event log {str(path)!r} does not exist. Fix: pass the path of the log to {flag}.")
    layout = split_layout_files(path) if path.is_dir() else None
    if layout:
        return _read_split_layout(path, layout, config)
    if path.is_dir():  # e.g. an NVTabular output: part_*.parquet next to schema.pbtxt / _metadata
        files = sorted(path.glob("*.parquet"), key=lambda p: (len(p.name), p.name))
        if not files:
            raise EventLogError(f"directory {str(path)!r} holds no *.parquet files. Fix: pass a CSV / Parquet "
                                f"file or a folder of Parquet files to {flag}.")
        frames, parts, start = [], [], 0
        for part in files:
            frames.append(_read_parquet(part, config))
            parts.append((str(part), start))
            start += len(frames[-1])
        df = pd.concat(frames, ignore_index=True)
        df.attrs = {ORIGIN_ATTR: LogOrigin(str(path), "parquet", path=path, parts=parts), NOTES_ATTR: []}
        return df
    kind = _file_kind(path)
    if kind in _PARQUET_SUFFIXES:
        df = _read_parquet(path, config)
        df.attrs = {ORIGIN_ATTR: LogOrigin(str(path), "parquet", path=path), NOTES_ATTR: []}
        return df
    if kind in _CSV_SUFFIXES:
        df = _read_csv(path, config)
        df.attrs = {ORIGIN_ATTR: LogOrigin(str(path), "csv", path=path), NOTES_ATTR: []}
        return df
    raise EventLogError(
        f"cannot tell the format of {str(path)!r} from its name. Fix: name it .csv/.tsv/.txt (optionally "
        f".gz/.xz/.bz2/.zst) or .parquet, pass a Parquet folder, or {config.flag('input_format')} sequences for a "
        "sequence-per-line text file"
    )


def split_layout_files(path: PathLike) -> List[Tuple[str, Path]]:
    """[(split, file)] of a Merlin split layout folder, in order (days numerically, then train, valid, test);
    [] when the folder is not one. A file may be a Parquet file or a folder of parts."""
    path = Path(path)
    folders = [path] if any((path / f"{s}.parquet").exists() for s in SPLITS) else []
    if not folders:
        days = [d for d in path.iterdir() if d.is_dir() and any((d / f"{s}.parquet").exists() for s in SPLITS)]
        folders = sorted(days, key=lambda d: (not d.name.isdigit(), int(d.name) if d.name.isdigit() else 0, d.name))
    out = []
    for folder in folders:
        missing = [f"{s}.parquet" for s in SPLITS if not (folder / f"{s}.parquet").exists()]
        if missing:
            raise EventLogError(
                f"{folder}: a Merlin split layout needs train.parquet, valid.parquet and test.parquet, but "
                f"{missing} {'is' if len(missing) == 1 else 'are'} missing. Fix: write all three files (empty ones "
                "are fine), or pass one Parquet file instead of the folder."
            )
        out += [(s, folder / f"{s}.parquet") for s in SPLITS]
    return out


def _arrow_schema(path: Path):
    import pyarrow.parquet as pq

    try:
        return pq.ParquetDataset(str(path)).schema
    except Exception as error:
        raise _read_error(path, "not a readable Parquet file", error, "re-write the file") from None


def _read_split_layout(path: Path, layout: List[Tuple[str, Path]], config: SessionWorkflowConfig) -> pd.DataFrame:
    """The files of a Merlin split layout as one frame; their schemas must agree (names and types), and no
    user/session may sit in two splits (leakage). attrs[SPLITS_ATTR] maps every id to its split."""
    reference = None
    for split, file in layout:
        schema = _arrow_schema(file)
        fields = {f.name: str(f.type) for f in schema}
        if reference is None:
            reference = (file, fields)
            continue
        ref_file, ref_fields = reference
        if fields != ref_fields:
            only_ref = sorted(set(ref_fields) - set(fields))
            only_this = sorted(set(fields) - set(ref_fields))
            typed = sorted(f"{n}: {ref_fields[n]} vs {fields[n]}" for n in set(fields) & set(ref_fields)
                           if fields[n] != ref_fields[n])
            raise EventLogError(
                f"{file}: its schema disagrees with {ref_file} (columns only in {ref_file.name}: {only_ref}; only in "
                f"{file.name}: {only_this}; types differ: {typed}). Fix: write the train / valid / test files with "
                "the same columns and types."
            )
    frames, parts, splits, start = [], [], [], 0
    for split, file in layout:
        frame = _read_parquet(file, config)
        frames.append(frame)
        parts.append((str(file), start))
        splits.append(np.full(len(frame), split, dtype=object))
        start += len(frame)
    df = pd.concat(frames, ignore_index=True)
    key = MERLIN_SESSION_ID if MERLIN_SESSION_ITEMS in df.columns and config.input_format != "events" \
        else config.id_column
    if key not in df.columns:
        raise EventLogError(f"{path}: the split files have no id column {key!r} (columns: {list(df.columns)}). Fix: "
                            f"{config.flag('id_column')} NAME.")
    split_of = pd.Series(np.concatenate(splits) if splits else [], index=df.index)
    owners = split_of.groupby(df[key].to_numpy()).agg(lambda v: sorted(set(v), key=SPLITS.index))
    shared = owners[owners.map(len) > 1]
    if len(shared):
        raise EventLogError(
            f"{path}: {len(shared)} {config.id_kind}(s) appear in more than one split file, e.g. {_short(shared.index[0])} "
            f"in {shared.iloc[0]} (that would leak its events across splits). Fix: put every {config.id_kind} in "
            "exactly one of train / valid / test."
        )
    df.attrs = {ORIGIN_ATTR: LogOrigin(str(path), "parquet", path=path, parts=parts), NOTES_ATTR: [
        f"{path}: the Merlin split layout ({len(layout)} files); each {config.id_kind} keeps its split"],
        SPLITS_ATTR: {k: v[0] for k, v in owners.items()}}
    return df


def _read_parquet(path: Path, config: SessionWorkflowConfig) -> pd.DataFrame:
    try:
        return pd.read_parquet(path)
    except Exception as error:  # pyarrow raises ArrowInvalid / OSError / ArrowNotImplementedError for bad files
        raise _read_error(path, "not a readable Parquet file", error,
                          "re-write the file (it may be truncated or not Parquet at all), or pass the log as "
                          f"CSV to {config.flag('input')}") from None


def _read_csv(path: Path, config: SessionWorkflowConfig) -> pd.DataFrame:
    fix_sep = f"{config.flag('csv_separator')} SEP"
    try:
        sep = config.csv_separator or _sniff_separator(path, config)
        with warnings.catch_warnings():
            # index_col=False: pandas would otherwise turn a first field without a header name into the index
            # (every column shifted by one, silently); with it, pandas warns that it drops the extra fields
            warnings.simplefilter("error", pd.errors.ParserWarning)
            return pd.read_csv(path, sep=sep, index_col=False)
    except pd.errors.ParserWarning:
        raise EventLogError(f"{path}: the data lines have more fields than the header line. Fix: give every "
                            "column a name in the header line (or remove the extra fields), or pass the separator "
                            f"with {fix_sep}.") from None
    except pd.errors.EmptyDataError:
        raise EventLogError(f"{path}: the file is empty (not even a header line). Fix: pass an event log with a "
                            f"header line and one line per event to {config.flag('input')}.") from None
    except pd.errors.ParserError as error:
        raise _read_error(path, "cannot be parsed as CSV", error,
                          "every line needs as many fields as the header line; correct that line, or pass the "
                          f"separator with {fix_sep}") from None
    except UnicodeDecodeError as error:
        raise EventLogError(f"{path}: not UTF-8 text (byte 0x{error.object[error.start]:02x} at byte offset "
                            f"{error.start}). Fix: re-save the file as UTF-8.") from None
    except ImportError as error:
        raise EventLogError(f"{path}: reading it needs a module that is not installed ({error}). Fix: decompress "
                            "the file first (or install that module).") from None
    except (EOFError, OSError, lzma.LZMAError, zlib.error) as error:
        raise _read_error(path, "cannot be read (truncated or damaged compressed file?)", error,
                          "re-create or re-download the file") from None


def _sniff_separator(path: Path, config: SessionWorkflowConfig) -> str:
    """The most frequent of , ; TAB | in the header line (',' if none appears)."""
    with _open_text(path) as handle:
        header = handle.readline()
    counts = {sep: header.count(sep) for sep in (",", ";", "\t", "|")}
    best = max(counts, key=counts.get)
    return best if counts[best] > 0 else ","


def _read_sequences(path: Path, config: SessionWorkflowConfig) -> pd.DataFrame:
    """A sequence-per-line text file as (id, item) event rows in list order (no actions, no timestamps)."""
    from merlin_hstu.workflows.datasets import read_sequence_file

    for fld in ("action_column", "timestamp_column"):
        if getattr(config, fld) is not None:
            raise EventLogError(
                f"{path} is a sequence-per-line file (user item item ...), which has no {_ROLE_NAMES[fld]}s, but "
                f"{fld} is {getattr(config, fld)!r}. Fix: {config.flag('action_column')} none "
                f"{config.flag('timestamp_column')} none (Python: SessionWorkflowConfig(action_column=None, "
                "timestamp_column=None)), or name the file's layout with --input-format events"
            )
    if not path.is_file():
        raise EventLogError(f"sequence file {str(path)!r} does not exist. Fix: pass the path of the file to "
                            f"{config.flag('input')}.")
    try:
        frame, lines, note = read_sequence_file(path, user_ids=config.sequence_user_ids,
                                                columns=(config.id_column, config.item_column),
                                                user_ids_flag=config.flag("sequence_user_ids"))
    except UnicodeDecodeError as error:
        raise EventLogError(f"{path}: not UTF-8 text (byte offset {error.start}). Fix: re-save the file as UTF-8.") \
            from None
    except (EOFError, OSError, lzma.LZMAError, zlib.error) as error:
        raise _read_error(path, "cannot be read (truncated or damaged compressed file?)", error,
                          "re-create or re-download the file") from None
    frame.attrs = {ORIGIN_ATTR: LogOrigin(str(path), "sequences", path=path, lines=lines), NOTES_ATTR: [note]}
    return frame


def is_merlin_session_layout(df: pd.DataFrame) -> bool:
    """True for the Merlin session Parquet layout (one row per session, `item_id_list_seq` lists)."""
    return MERLIN_SESSION_ITEMS in df.columns


def _list_element_kind(values: pd.Series) -> Optional[str]:
    """numpy dtype kind of the first element of the first non-empty list in `values` (None: no list / all empty)."""
    for value in values:
        if _is_list_like(value) and len(value):
            return np.asarray(value).dtype.kind
        if value is not None and not _is_list_like(value) and not _is_null(value):
            return None  # not a list column
    return None


def _schema_time_lists(origin: LogOrigin) -> List[str]:
    """List columns tagged TIME in the schema.pbtxt next to a Parquet folder (T4R / NVTabular outputs)."""
    from merlin.schema import Tags

    path = origin.path
    if path is None or not Path(path).is_dir() or not (Path(path) / "schema.pbtxt").is_file():
        return []
    try:
        schema = TensorflowMetadata.from_proto_text_file(str(path)).to_merlin_schema()
    except Exception:  # an empty or foreign schema file: fall back to names
        return []
    return [c.name for c in schema if Tags.TIME in c.tags and (c.is_list or Tags.LIST in c.tags)]


def merlin_session_time_column(df: pd.DataFrame, config: SessionWorkflowConfig) -> Tuple[Optional[str], bool]:
    """(column, per_event) giving each exploded event its time in the Merlin session layout.

    `config.session_time_column` names it (a list column: per-event times; a scalar column: repeated per session).
    Otherwise the per-event list is detected: list columns tagged TIME in the folder's schema.pbtxt, else list
    columns whose name contains "timestamp"; only those holding integers or datetimes count (T4R's derived time
    features such as `timestamp/age_days-list` are floats, not unix seconds). One candidate is used; several are an
    error naming them and the flag. Without a candidate: `timestamp_first` repeated (per_event False), or None.
    """
    origin = LogOrigin.of(df)
    named = config.session_time_column
    if named is not None:
        if named not in df.columns:
            raise EventLogError(
                f"{origin.source}: {config.flag('session_time_column')} {named!r}, but the session file has no such "
                f"column (columns: {list(df.columns)}). Fix: name the list column of per-event unix seconds aligned "
                f"with {MERLIN_SESSION_ITEMS!r}, or {MERLIN_SESSION_TIME!r} for the session start."
            )
        return named, _list_element_kind(df[named]) is not None or df[named].map(_is_list_like).any()
    skip = {MERLIN_SESSION_ID, MERLIN_SESSION_ITEMS, MERLIN_SESSION_EVENTS, MERLIN_SESSION_TIME}
    tagged = [c for c in _schema_time_lists(origin) if c in df.columns and c not in skip]
    named_like = [c for c in df.columns if c not in skip and MERLIN_SESSION_TIME_HINT in str(c).lower()]
    found = []
    for column in tagged or named_like:
        kind = _list_element_kind(df[column])
        if kind is not None and kind in "iuM":
            found.append(column)
    if len(found) > 1:
        raise EventLogError(
            f"{origin.source}: the session file has several per-event timestamp lists {found}. Fix: name the one "
            f"to use with {config.flag('session_time_column')} NAME (Python: "
            "SessionWorkflowConfig.session_time_column)."
        )
    if found:
        return found[0], True
    return (MERLIN_SESSION_TIME, False) if MERLIN_SESSION_TIME in df.columns else (None, False)


def merlin_sessions_to_event_log(df: pd.DataFrame, config: SessionWorkflowConfig) -> pd.DataFrame:
    """Explode the Merlin session layout into one row per event, named after `config`'s columns.

    Each event keeps its own time when the file has a per-event timestamp list (`merlin_session_time_column`);
    its length must equal the item list's in every session (else an error naming the session and both lengths).
    Without one, every event gets the session's `timestamp_first`, with a warning (and a data-report note) that
    names the column to provide. List order is kept. Sessions with empty lists have no events and so produce no
    rows. A null list is an error (with `drop_nulls`: the session is dropped and counted); a null inside a list
    becomes a null event (an error or, with `drop_nulls`, a dropped event), named by its session key and list
    position.
    """
    base = LogOrigin.of(df)
    time_column, per_event = (None, False)
    if config.timestamp_column is not None:
        time_column, per_event = merlin_session_time_column(df, config)
    wanted = [(MERLIN_SESSION_ID, "id_column"), (MERLIN_SESSION_ITEMS, "item_column")]
    if config.action_column is not None:
        wanted.append((MERLIN_SESSION_EVENTS, "action_column"))
    if config.timestamp_column is not None and time_column is None:
        wanted.append((MERLIN_SESSION_TIME, "timestamp_column"))
    missing = [(col, fld) for col, fld in wanted if col not in df.columns]
    if missing:
        fixes = [
            f"{config.flag(fld)} none (Python: SessionWorkflowConfig.{fld}=None)"
            if fld in ("action_column", "timestamp_column") else f"add the column {col!r} to the file"
            for col, fld in missing
        ]
        if any(fld == "timestamp_column" for _, fld in missing):
            fixes.insert(0, f"add a list column of per-event unix seconds aligned with {MERLIN_SESSION_ITEMS!r} (e.g. "
                            f"{roles.TIMESTAMP_LIST!r}; {config.flag('session_time_column')} NAME names it) or a "
                            f"{MERLIN_SESSION_TIME!r} column")
        raise EventLogError(
            f"{base.source}: the Merlin session layout (found {MERLIN_SESSION_ITEMS!r}) is missing column(s) "
            f"{[c for c, _ in missing]} (columns present: {list(df.columns)}). Fix: {'; '.join(fixes)}."
        )
    if time_column is not None and not per_event:
        if config.session_time_column is None:  # detected fallback: say what is lost and what to provide
            message = (f"{base.source}: the Merlin session file has no per-event timestamp list, so every event of a "
                       f"session gets the session's {MERLIN_SESSION_TIME!r} (order inside a session = list order; no "
                       f"time gaps inside sessions). Provide a list column of per-event unix seconds aligned with "
                       f"{MERLIN_SESSION_ITEMS!r} (e.g. {roles.TIMESTAMP_LIST!r}, or name it with "
                       f"{config.flag('session_time_column')} NAME) to keep per-event time.")
            warnings.warn(message, UserWarning, stacklevel=3)
            _note(df, message)
    list_columns = [MERLIN_SESSION_ITEMS] + ([MERLIN_SESSION_EVENTS] if config.action_column else [])
    if per_event:
        list_columns.append(time_column)
    null_lists = np.zeros(len(df), dtype=bool)
    for list_col in list_columns:
        nulls = df[list_col].isna().to_numpy()
        if nulls.any() and not config.drop_nulls:
            first = int(np.argmax(nulls))
            raise EventLogError(
                f"{base.source}: column {list_col!r} has {int(nulls.sum())} null list(s), the first at session "
                f"{_short(df[MERLIN_SESSION_ID].iloc[first])} ({base.where(df.index[first])}). Fix: "
                + _drop_nulls_fix(config, "such sessions", "store an empty list in the file") + "."
            )
        null_lists |= nulls
    if null_lists.any():
        _note(df, f"{base.source}: dropped {int(null_lists.sum())} session(s) whose "
                  f"{' or '.join(repr(c) for c in list_columns)} is null ({config.flag('drop_nulls')})")
        dropped_sessions = int(null_lists.sum())
        attrs = df.attrs
        df = df[~null_lists]
        df.attrs = attrs
    else:
        dropped_sessions = 0
    for list_col in list_columns:
        not_list = np.fromiter((not _is_list_like(v) for v in df[list_col]), dtype=bool, count=len(df))
        if not_list.any():
            first = int(np.argmax(not_list))
            raise EventLogError(
                f"{base.source}: column {list_col!r} must hold a list per session, but session "
                f"{_short(df[MERLIN_SESSION_ID].iloc[first])} ({base.where(df.index[first])}) holds "
                f"{_short(df[list_col].iloc[first])}. Fix: write the column as a list column (one list per session)."
            )
    lengths = np.fromiter((len(v) for v in df[MERLIN_SESSION_ITEMS]), dtype=np.int64, count=len(df))
    aligned = [(MERLIN_SESSION_EVENTS, "event names", f"give every item exactly one event name, or "
                f"{config.flag('action_column')} none to ignore the event names")] if config.action_column else []
    if per_event:
        aligned.append((time_column, "timestamps", f"give every item exactly one timestamp, or name another time "
                        f"column with {config.flag('session_time_column')} NAME ({MERLIN_SESSION_TIME!r}: the "
                        f"session start for every event)"))
    for list_col, what, fix in aligned:
        other = np.fromiter((len(v) for v in df[list_col]), dtype=np.int64, count=len(df))
        bad = np.flatnonzero(other != lengths)
        if len(bad):
            first = int(bad[0])
            raise EventLogError(
                f"{base.source}: columns {MERLIN_SESSION_ITEMS!r} and {list_col!r} differ in length at "
                f"{len(bad)} session(s), the first session {_short(df[MERLIN_SESSION_ID].iloc[first])} "
                f"({base.where(df.index[first])}): {lengths[first]} items vs {other[first]} {what}. Fix: {fix}."
            )
    session_row = np.repeat(df.index.to_numpy(), lengths)
    starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
    events = {
        config.id_column: np.repeat(df[MERLIN_SESSION_ID].to_numpy(), lengths),
        config.item_column: _flatten(df[MERLIN_SESSION_ITEMS]),
    }
    if config.action_column is not None:
        events[config.action_column] = _flatten(df[MERLIN_SESSION_EVENTS])
    if time_column is not None:
        events[config.timestamp_column] = (_flatten(df[time_column]) if per_event
                                           else np.repeat(df[time_column].to_numpy(), lengths))
    out = pd.DataFrame(events)
    columns = {config.id_column: MERLIN_SESSION_ID, config.item_column: MERLIN_SESSION_ITEMS}
    if config.action_column is not None:
        columns[config.action_column] = MERLIN_SESSION_EVENTS
    if time_column is not None:
        columns[config.timestamp_column] = time_column
    list_roles = {config.item_column, config.action_column} | ({config.timestamp_column} if per_event else set())
    sessions = {"base": base, "row": session_row, "pos": np.arange(len(out)) - starts,
                "keys": events[config.id_column], "columns": columns, "list_columns": list_roles - {None}}
    source = base.source
    out.attrs = {ORIGIN_ATTR: LogOrigin(source, "sessions", sessions=sessions),
                 NOTES_ATTR: list(df.attrs.get(NOTES_ATTR, [])), "merlin_hstu_null_sessions": dropped_sessions}
    if SPLITS_ATTR in df.attrs:
        out.attrs[SPLITS_ATTR] = df.attrs[SPLITS_ATTR]
    return out


def _is_list_like(value) -> bool:
    return isinstance(value, (list, tuple, np.ndarray))


def _flatten(lists: pd.Series) -> pd.Series:
    """Concatenate a column of lists, keeping element types (pandas infers int64 / object)."""
    return pd.Series(list(chain.from_iterable(lists)))


_INT64_MAX, _INT64_MIN = np.iinfo(np.int64).max, np.iinfo(np.int64).min


def _wide_ids_as_strings(df: pd.DataFrame, config: SessionWorkflowConfig) -> pd.DataFrame:
    """Integer id / item / action columns with values outside int64 become strings, with a note."""
    origin = LogOrigin.of(df)
    for fld, col in config.role_columns():
        if fld == "timestamp_column" or col not in df.columns:
            continue
        series = df[col]
        widest = None
        if pd.api.types.is_unsigned_integer_dtype(series.dtype) and len(series) and series.max() > _INT64_MAX:
            widest = int(series.max())
        elif series.dtype == object and pd.api.types.infer_dtype(series, skipna=True) == "integer":
            outside = [v for v in series.dropna() if v > _INT64_MAX or v < _INT64_MIN]
            widest = outside[0] if outside else None
        if widest is None:
            continue
        attrs = df.attrs
        df = df.copy(deep=False)
        df.attrs = attrs
        df[col] = np.asarray([v if _is_null(v) else str(int(v)) for v in series], dtype=object)
        _note(df, f"{origin.source}: column {origin.column(col)!r} holds ids that do not fit int64 (e.g. {widest}); "
                  "they are read as strings (Categorify encodes them as strings; requests must send them as strings)")
    return df


def _is_null(value) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value))


# ---------------------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------------------
def validate_event_log(df: pd.DataFrame, config: SessionWorkflowConfig) -> None:
    """Raise `EventLogError` naming the file, column, row, value and fix; return None for a usable log.

    Checks, in order: it is a DataFrame, it has rows, the configured columns exist, no nulls in them,
    ids/items/actions are integers or strings, timestamps are numeric (or datetime64), integral and >= 0.
    Extra columns are not checked: they are not used.
    """
    if not isinstance(df, pd.DataFrame):
        raise EventLogError(f"event log must be a pandas DataFrame, got {type(df).__name__}")
    origin = LogOrigin.of(df)
    expected = [col for _, col in config.role_columns()]
    missing = [(fld, col) for fld, col in config.role_columns() if col not in df.columns]
    if missing and len(df.columns) > 0:
        fixes = []
        for fld, col in missing:
            fix = f"{config.flag(fld)} NAME to name the column that holds the {_ROLE_NAMES[fld]}s"
            if fld in ("action_column", "timestamp_column"):
                fix += f", or {config.flag(fld)} none if the log has none"
            fixes.append(fix + f" (Python: SessionWorkflowConfig.{fld})")
        hint = ""
        if len(df.columns) == 1 and any(sep in str(df.columns[0]) for sep in (",", ";", "|", "\t", " ")):
            hint = (f" The header was read as one column {str(df.columns[0])!r}: is the separator right? "
                    f"Pass it with {config.flag('csv_separator')} SEP.")
        raise EventLogError(
            f"{origin.source}: no column {', '.join(repr(c) for _, c in missing)} (the columns are "
            f"{[str(c) for c in df.columns]}).{hint} Fix: {'; '.join(fixes)}."
        )
    if len(df) == 0:
        raise EventLogError(
            f"{origin.source}: the event log is empty (0 rows; columns {[str(c) for c in df.columns]}); "
            f"expected one row per event with columns {expected}. Fix: pass a log with events to "
            f"{config.flag('input')}."
        )
    for fld, col in config.role_columns():
        nulls = df[col].isna().to_numpy()
        if nulls.any():
            first = int(np.argmax(nulls))
            more = f" (and {int(nulls.sum()) - 1} more)" if nulls.sum() > 1 else ""
            raise _error(origin, col, fld, f"is empty at {origin.where(df.index[first], col)}{more}",
                         _drop_nulls_fix(config, "events with an empty field", "fill or drop them in the file"))
    for fld, col in config.role_columns():
        if fld == "timestamp_column":
            _timestamps_to_seconds(df[col], col, origin, config)  # raises on bad timestamps
        else:
            _check_id_dtype(df[col], col, fld, origin, config)
    if config.item_encoding == "raw":
        _check_raw_item_ids(df[config.item_column], config.item_column, origin)


def _check_raw_item_ids(series: pd.Series, col: str, origin: Optional[LogOrigin] = None) -> None:
    """item_encoding='raw': ids must be integers >= 1 (0 is the padding id)."""
    origin = origin or LogOrigin("the DataFrame", "dataframe")
    if not (pd.api.types.is_integer_dtype(series.dtype) or pd.api.types.infer_dtype(series) == "integer"):
        first = _first_non_integer(series)
        raise _error(origin, col, "item_column",
                     f"holds {series.iloc[first]!r} at {origin.where(series.index[first], col)}, but "
                     "item_encoding='raw' keeps item ids as they are, so they must be integers >= 1",
                     "use item_encoding='categorify' (the CLI's default), or write integer ids")
    values = series.to_numpy().astype(np.int64)
    bad = values < 1
    if bad.any():
        first = int(np.argmax(bad))
        raise _error(origin, col, "item_column",
                     f"holds {values[first]} at {origin.where(series.index[first], col)} ({int(bad.sum())} id(s) "
                     "<= 0); with item_encoding='raw' 0 is the padding id, so ids must be >= 1",
                     "shift the ids by +1, or use item_encoding='categorify'")


def _first_non_integer(series: pd.Series) -> int:
    """Position of the first value that is not an integer (0 if every value is)."""
    for i, value in enumerate(series.to_numpy()):
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
            return i
    return 0


def _check_id_dtype(series: pd.Series, col: str, fld: str, origin: Optional[LogOrigin] = None,
                    config: Optional[SessionWorkflowConfig] = None) -> None:
    origin = origin or LogOrigin("the DataFrame", "dataframe")
    config = config or SessionWorkflowConfig()
    dtype = series.dtype
    role = _ROLE_NAMES.get(fld, fld)
    pointer = f"check that {config.flag(fld)} names the column holding the {role}s"
    if pd.api.types.is_bool_dtype(dtype):
        raise _error(origin, col, fld, f"holds true/false values ({series.iloc[0]!r} at "
                     f"{origin.where(series.index[0], col)}); ids must be integers or strings",
                     f"{pointer}, or write the ids as integers or strings in the file "
                     f"(Python: df[{col!r}] = df[{col!r}].astype(str))")
    if pd.api.types.is_float_dtype(dtype):
        values = series.to_numpy(dtype=np.float64)
        fractional = values != np.floor(values)
        first = int(np.argmax(fractional)) if fractional.any() else 0
        what = "a fractional number" if fractional.any() else "a number with a decimal point"
        raise _error(origin, col, fld, f"holds {what}, {values[first]!r} at {origin.where(series.index[first], col)}; "
                     "ids must be integers or strings",
                     f"{pointer}, or write the ids without a decimal point in the file "
                     f"(Python: df[{col!r}] = df[{col!r}].astype('int64'))")
    if not (pd.api.types.is_integer_dtype(dtype) or pd.api.types.is_string_dtype(dtype) or dtype == object):
        raise _error(origin, col, fld, f"has dtype {dtype} ({_short(series.iloc[0])} at "
                     f"{origin.where(series.index[0], col)}); ids must be integers or strings",
                     f"{pointer} (Python: df[{col!r}] = df[{col!r}].astype(str))")
    if pd.api.types.is_unsigned_integer_dtype(dtype) and series.max() > _INT64_MAX:
        first = int(np.argmax(series.to_numpy() > _INT64_MAX))
        raise _error(origin, col, fld, f"holds {series.iloc[first]} at {origin.where(series.index[first], col)}, "
                     "beyond the int64 range", "read the log with read_event_log / preprocess, which read such ids "
                     f"as strings (Python: df[{col!r}] = df[{col!r}].astype(str))")
    if dtype == object or pd.api.types.is_string_dtype(dtype):
        kind = pd.api.types.infer_dtype(series, skipna=False)
        if kind not in ("string", "integer"):
            values = series.to_numpy()
            is_str = np.fromiter((isinstance(v, str) for v in values), dtype=bool, count=len(values))
            # the first value whose type differs from the first value's (or that is neither int nor str)
            odd = np.fromiter((not isinstance(v, (str, int, np.integer)) or isinstance(v, (bool, np.bool_))
                               for v in values), dtype=bool, count=len(values))
            bad = odd if odd.any() else (is_str != is_str[0])
            first = int(np.argmax(bad))
            raise _error(origin, col, fld, f"holds {_short(values[first])} at {origin.where(series.index[first], col)} "
                         f"among {'strings' if is_str[0] else 'integers'} (values {kind!r}); ids must be all "
                         "integers or all strings",
                         f"{pointer}, or make the ids one type (Python: df[{col!r}] = df[{col!r}].astype(str))")


def _timestamps_to_seconds(series: pd.Series, col: str, origin: Optional[LogOrigin] = None,
                           config: Optional[SessionWorkflowConfig] = None) -> np.ndarray:
    """Validated unix seconds as int64: ints as-is, integral floats cast, datetime64 floored to seconds."""
    origin = origin or LogOrigin("the DataFrame", "dataframe")
    config = config or SessionWorkflowConfig()
    dtype = series.dtype
    no_time = config.flag("timestamp_none")  # None: the command needs timestamps (preprocess-ranking)
    no_time = f", or {no_time} to ignore time (events keep the file order)" if no_time else ""
    fix_text = (
        f"write whole unix seconds in the file{no_time} "
        f"(Python: df[{col!r}] = pd.to_datetime(df[{col!r}]).astype('int64') // 10**9)"
    )

    def fail(position: int, problem: str, fix: str = fix_text):
        value = series.iloc[position]
        raise _error(origin, col, "timestamp_column",
                     f"holds {_short(value)} at {origin.where(series.index[position], col)}: {problem}", fix)

    if pd.api.types.is_datetime64_any_dtype(dtype):
        if getattr(dtype, "tz", None) is not None:
            series = series.dt.tz_convert("UTC").dt.tz_localize(None)
        seconds = series.to_numpy(dtype="datetime64[ns]").astype(np.int64) // 10**9
    elif pd.api.types.is_bool_dtype(dtype):
        fail(0, "true/false values are not timestamps")
    elif pd.api.types.is_integer_dtype(dtype):
        values = series.to_numpy()
        if values.dtype.kind == "u" and len(values) and values.max() > _INT64_MAX:
            fail(int(np.argmax(values > _INT64_MAX)), "beyond the int64 range")
        seconds = values.astype(np.int64)
    elif pd.api.types.is_float_dtype(dtype):
        values = series.to_numpy(dtype=np.float64)
        bad = ~np.isfinite(values) | (values != np.floor(values)) | (np.abs(values) >= 2.0**63)
        if bad.any():
            fail(int(np.argmax(bad)), f"not whole unix seconds ({int(bad.sum())} such value(s))",
                 f"write whole seconds in the file{no_time} "
                 f"(Python: df[{col!r}] = np.floor(df[{col!r}]).astype('int64'))")
        seconds = values.astype(np.int64)
    elif dtype == object and pd.api.types.infer_dtype(series, skipna=False) == "integer":
        values = series.to_numpy()
        outside = np.fromiter((v > _INT64_MAX or v < _INT64_MIN for v in values), dtype=bool, count=len(values))
        if outside.any():
            fail(int(np.argmax(outside)), "beyond the int64 range")
        seconds = values.astype(np.int64)
    else:
        numeric = pd.to_numeric(series, errors="coerce").to_numpy(dtype=np.float64)
        not_number = np.isnan(numeric)
        first = int(np.argmax(not_number)) if not_number.any() else 0
        fail(first, f"non-numeric (dtype {dtype}); timestamps must be unix seconds (integers) or datetime64")
    negative = seconds < 0
    if negative.any():
        fail(int(np.argmax(negative)), f"negative ({int(negative.sum())} such value(s)); timestamps are unix "
             "seconds >= 0", f"correct or drop those events in the file{no_time}")
    if len(seconds) and seconds.max() > _LIKELY_MILLISECONDS:
        warnings.warn(
            f"{origin.source}: column {origin.column(col)!r} has values up to {seconds.max()}, which look like "
            "milliseconds; timestamp-list is meant to hold unix seconds (divide by 1000 if so).",
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
# a log read, cleaned as asked, validated and normalized: what preprocess and the data report start from
# ---------------------------------------------------------------------------------------------------------
@dataclass
class PreparedLog:
    """`load_event_log`'s result: the normalized events and the facts the data report needs."""

    events: pd.DataFrame  # normalize_event_log's output (role columns only)
    config: SessionWorkflowConfig
    source: str  # the file (or "the DataFrame")
    input_format: str  # events | sessions | sequences
    events_in: int  # rows read, before dropping nulls
    sequences_in: int  # distinct ids read, before dropping nulls
    dropped_nulls: dict = field(default_factory=dict)  # {"events": n, "sessions": m, "by_column": {col: n}}
    notes: List[str] = field(default_factory=list)
    splits: Optional[dict] = None  # {id: "train" | "valid" | "test"} when the input was a Merlin split layout

    def sequence_lengths(self) -> np.ndarray:
        """Events per id (before the min_length filter and truncation), in id order."""
        return self.events.groupby(self.config.id_column, sort=True).size().to_numpy(dtype=np.int64)


def load_event_log(source: Union[PathLike, pd.DataFrame], config: Optional[SessionWorkflowConfig] = None
                   ) -> PreparedLog:
    """Read (`read_event_log`), drop events with empty fields if `config.drop_nulls` (counted), validate
    (`validate_event_log`) and normalize (`normalize_event_log`)."""
    config = config or SessionWorkflowConfig()
    raw = read_event_log(source, config)
    origin = LogOrigin.of(raw)
    notes = list(raw.attrs.get(NOTES_ATTR, []))
    layout = origin.layout if origin.layout in ("sessions", "sequences") else "events"
    present = [col for _, col in config.role_columns() if col in raw.columns]
    events_in = len(raw)
    ids_in = int(raw[config.id_column].nunique()) if config.id_column in raw.columns else 0
    ids_in += int(raw.attrs.get("merlin_hstu_null_sessions", 0))  # sessions dropped for a null list
    null_sessions = int(raw.attrs.get("merlin_hstu_null_sessions", 0))
    dropped = {"events": 0, "sessions": null_sessions, "by_column": {}}
    if config.drop_nulls and present and len(raw):
        nulls = raw[present].isna()
        mask = nulls.any(axis=1).to_numpy()
        if mask.any():
            dropped["events"] = int(mask.sum())
            dropped["by_column"] = {origin.column(c): int(nulls[c].sum()) for c in present if nulls[c].any()}
            attrs = raw.attrs
            raw = raw[~mask]
            raw.attrs = attrs
            notes.append(f"{origin.source}: dropped {int(mask.sum()):,} event(s) with an empty field "
                         f"({config.flag('drop_nulls')}): " + ", ".join(f"{origin.column(c)!r} {int(nulls[c].sum()):,}"
                                                                        for c in present if nulls[c].any()))
            raw = _whole_floats_as_int64(raw, config, notes)
    validate_event_log(raw, config)
    events = normalize_event_log(raw, config)
    return PreparedLog(events=events, config=config, source=origin.source, input_format=layout,
                       events_in=events_in, sequences_in=ids_in, dropped_nulls=dropped, notes=notes,
                       splits=raw.attrs.get(SPLITS_ATTR))


def _whole_floats_as_int64(df: pd.DataFrame, config: SessionWorkflowConfig, notes: List[str]) -> pd.DataFrame:
    """After dropping empty fields: an id column that pandas read as floats only because of them, and whose
    values are all whole numbers, is an integer column again (said in a note)."""
    origin = LogOrigin.of(df)
    for fld, col in config.role_columns():
        series = df[col]
        if fld == "timestamp_column" or not pd.api.types.is_float_dtype(series.dtype) or not len(series):
            continue
        values = series.to_numpy(dtype=np.float64)
        if np.all(values == np.floor(values)) and np.all(np.abs(values) < 2.0**53):
            attrs = df.attrs
            df = df.copy(deep=False)
            df.attrs = attrs
            df[col] = values.astype(np.int64)
            notes.append(f"{origin.source}: column {origin.column(col)!r} was read as decimals only because of its "
                         "empty fields; its other values are whole numbers, kept as integers")
    return df


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
    report: Optional[dict] = None  # the data report, also in output_dir/data_report.json

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
    source: Union[PathLike, pd.DataFrame, PreparedLog],
    output_dir: PathLike,
    config: Optional[SessionWorkflowConfig] = None,
    *,
    overwrite: bool = False,
    candidates: Optional[Union[Sequence, np.ndarray, pd.Series]] = None,
    max_history_chosen_by: Optional[str] = None,
    report_extra: Optional[dict] = None,
) -> ProcessedDataset:
    """Read, validate, fit + transform; write output_dir/{processed/, workflow/, candidates.parquet,
    data_report.json} atomically.

    `source`: a path, a DataFrame, or a `PreparedLog` from `load_event_log` (its column settings must equal
    `config`'s; its length limits may differ, which is how a caller sizes max_length from the data first).
    `candidates`: the item catalogue as RAW item ids (None: every item of the log, see the module docstring).
    `max_history_chosen_by` says in the data report how max_length was chosen; `report_extra` adds sections
    (e.g. a dataset's count filter under "dropped").
    Everything is written into a hidden sibling temp directory that is renamed to `output_dir` only after
    every file is complete; on any error it is removed, so no half-written output directory is left.
    An existing `output_dir` is an error unless `overwrite=True` (then it is replaced after success).
    """
    config = config or SessionWorkflowConfig()
    output_dir = Path(output_dir).resolve()
    if output_dir.exists() and not overwrite:
        raise FileExistsError(f"{output_dir} already exists. Fix: --overwrite to replace it, or another --output "
                              "(Python: overwrite=True)")

    prepared = source if isinstance(source, PreparedLog) else load_event_log(source, config)
    if prepared.config.role_columns() != config.role_columns():
        raise ValueError(f"preprocess: the PreparedLog was read with columns {prepared.config.role_columns()}, "
                         f"the config names {config.role_columns()}; load it with the same config")
    events = prepared.events
    lengths = prepared.sequence_lengths()
    if not (lengths >= config.min_length).any():
        raise EventLogError(
            f"{prepared.source}: no {config.id_kind} has at least min_length={config.min_length} events (the longest "
            f"has {int(lengths.max()) if len(lengths) else 0}), so the output would be empty. Fix: "
            f"{config.flag('min_length')} {max(1, int(lengths.max()) if len(lengths) else 1)} or lower "
            "(Python: SessionWorkflowConfig.min_length)."
        )
    catalogue = None
    if candidates is not None:
        catalogue = _validate_catalogue(candidates, events[config.item_column], config)
    write_splits = prepared.splits is not None or config.split_layout == "merlin"
    if config.prefix_expansion and not write_splits:
        raise EventLogError(
            f"{prepared.source}: prefix expansion adds rows to the TRAIN split only (on one file it would put the "
            f"prefixes of evaluated sequences into training). Fix: {config.flag('split_layout')} merlin (or an input "
            f"in the Merlin train/valid/test layout), or drop {config.flag('prefix_expansion')}."
        )
    if config.split_layout == "merlin" and prepared.splits is None and config.timestamp_column is None:
        raise EventLogError(
            f"{prepared.source}: {config.flag('split_layout')} merlin splits sequences by time, but the log has no "
            f"timestamps ({config.flag('timestamp_column')} is none). Fix: name the timestamp column, or give the "
            "input as train.parquet / valid.parquet / test.parquet."
        )

    staging = staging_dir(output_dir)
    try:
        workflow_dir, processed_dir = staging / "workflow", staging / "processed"
        raw_max = int(catalogue.max()) if catalogue is not None and config.item_encoding == "raw" else None
        workflow = build_session_workflow(config, categories_dir=workflow_dir, raw_item_max_id=raw_max)
        # one partition, or on a Dask cluster partitions cut at id boundaries (workflows/cluster.py)
        result = fit_transform(workflow, events, keys=[config.id_column])
        if len(result) == 0:
            raise EventLogError(
                f"no {config.id_kind} in column {config.id_column!r} has at least min_length={config.min_length} "
                f"events, so the output would be empty. Fix: lower {config.flag('min_length')} "
                "(Python: SessionWorkflowConfig.min_length)."
            )
        out_schema = _relocate_paths(workflow.output_schema, str(staging), str(output_dir))
        encoded = _encoded_candidates(config, workflow_dir, events[config.item_column], catalogue)
        report = data_report(prepared, config, lengths, result[roles.LENGTH].to_numpy(), len(encoded),
                             max_history_chosen_by, report_extra)
        Dataset(result, cpu=True, schema=out_schema).to_parquet(str(processed_dir), output_files=1)
        if write_splits:
            parts = split_sequences(result, config, prepared.splits)
            report["splits"] = write_split_layout(parts, staging / SPLITS_DIR, processed_dir, config,
                                                  given=prepared.splits is not None)
        workflow.save(str(workflow_dir))
        pd.DataFrame({CANDIDATES_COLUMN: encoded}).to_parquet(staging / CANDIDATES_FILE, index=False)
        (staging / DATA_REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
        publish_dir(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise

    processed = output_dir / "processed"
    schema = TensorflowMetadata.from_proto_text_file(str(processed)).to_merlin_schema()
    return ProcessedDataset(path=processed, schema=schema, workflow_path=output_dir / "workflow",
                            num_rows=len(result), candidates_path=output_dir / CANDIDATES_FILE, report=report)


# ---------------------------------------------------------------------------------------------------------
# the Merlin split layout (train / valid / test files) and prefix expansion
# ---------------------------------------------------------------------------------------------------------
def split_sequences(rows: pd.DataFrame, config: SessionWorkflowConfig, given: Optional[dict] = None
                    ) -> Dict[str, pd.DataFrame]:
    """The workflow's output rows as {"train", "valid", "test"} frames, each in start-time order.

    `given` ({id: split}, from an input in the split layout) keeps the input's split. Otherwise sequences are
    ordered by their first kept event's time (ties: id order) and cut into the first 1 - valid - test share
    (train), the next `valid_fraction` (valid) and the latest `test_fraction` (test); each split gets >= 1 row.
    """
    ids = rows[config.id_column]
    if given is not None:
        label = ids.map(given)
        if label.isna().any():  # ids read as strings (wider than int64) are keyed by their text
            label = label.fillna(ids.astype(str).map({str(k): v for k, v in given.items()}))
        if label.isna().any():
            raise RuntimeError(f"split layout: no split recorded for {config.id_kind} {_short(ids[label.isna()].iloc[0])}")
    else:
        starts = np.array([int(t[0]) for t in rows[roles.TIMESTAMP_LIST]], dtype=np.int64)
        order = np.argsort(starts, kind="stable")
        n = len(rows)
        n_test, n_valid = max(1, round(n * config.test_fraction)), max(1, round(n * config.valid_fraction))
        if n - n_test - n_valid < 1:
            raise EventLogError(
                f"{n} {config.id_kind}(s) are too few for a train / valid / test split ({n_valid} valid, {n_test} test). "
                f"Fix: more data, or smaller {config.flag('valid_fraction')} / {config.flag('test_fraction')}."
            )
        names = np.empty(n, dtype=object)
        names[order[: n - n_test - n_valid]] = "train"
        names[order[n - n_test - n_valid: n - n_test]] = "valid"
        names[order[n - n_test:]] = "test"
        label = pd.Series(names, index=rows.index)
    out = {}
    for split in SPLITS:
        part = rows[(label == split).to_numpy()]
        if roles.TIMESTAMP_LIST in part.columns and len(part):
            start = np.array([int(t[0]) if len(t) else 0 for t in part[roles.TIMESTAMP_LIST]], dtype=np.int64)
            part = part.iloc[np.argsort(start, kind="stable")]
        out[split] = part.reset_index(drop=True)
    return out


def expand_prefixes(rows: pd.DataFrame) -> pd.DataFrame:
    """Every row of n events -> its prefixes of 2..n events (in that order; a 1-event row gives none): the
    classic session augmentation. Every list column is cut to the prefix (the interleaved list to 2k tokens) and
    `length` set to k; other columns (the id) are repeated."""
    lists = [c for c in rows.columns if c != roles.LENGTH and len(rows) and _is_list_like(rows[c].iloc[0])]
    lengths = rows[roles.LENGTH].to_numpy(dtype=np.int64)
    source = np.repeat(np.arange(len(rows)), np.maximum(lengths - 1, 0))
    k = np.concatenate([np.arange(2, n + 1) for n in lengths]) if len(rows) else np.zeros(0, np.int64)
    out = rows.iloc[source].reset_index(drop=True)
    out[roles.LENGTH] = k.astype(np.int64)
    for column in lists:
        width = 2 if column == roles.INTERLEAVED_LIST else 1
        values = rows[column].to_numpy()
        out[column] = [np.asarray(values[r])[: width * n] for r, n in zip(source, k)]
    return out


def write_split_layout(parts: Dict[str, pd.DataFrame], folder: Path, processed_dir: Path,
                       config: SessionWorkflowConfig, given: bool) -> dict:
    """folder/{train,valid,test}.parquet (+ the processed schema.pbtxt), with prefix expansion of train if asked;
    returns the data report's "splits" section."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True)
    shutil.copyfile(processed_dir / "schema.pbtxt", folder / "schema.pbtxt")
    report = {"folder": SPLITS_DIR,
              "how": ("the input's own train / valid / test files" if given else
                      f"sequences ordered by their first event's time: the latest {config.test_fraction:g} test, the "
                      f"{config.valid_fraction:g} before them valid, the rest train")}
    reference = None
    for split in SPLITS:
        part = parts[split]
        report[split] = {"sequences": int(len(part)), "events": int(part[roles.LENGTH].sum())}
        if split == "train" and config.prefix_expansion:
            part = expand_prefixes(part)
            report["prefix_expansion"] = {"train_rows": int(len(part)), "how": "every train sequence of n events "
                                          "-> its prefixes of 2..n events"}
        table = pa.Table.from_pandas(part, preserve_index=False)
        if reference is not None:  # an empty split would infer other types: cast to the first split's schema
            table = table.cast(reference)
        reference = reference or table.schema
        pq.write_table(table, folder / f"{split}.parquet")
    return report


# ---------------------------------------------------------------------------------------------------------
# the data report and the history length the data suggests
# ---------------------------------------------------------------------------------------------------------
DATA_REPORT_FILE = "data_report.json"  # <output>/data_report.json, written by preprocess
HISTORY_PERCENTILES = (50, 90, 95, 99)
HISTORY_QUANTILE = 95  # suggest_max_history: this percentile of the history lengths ...
HISTORY_MULTIPLE = 8  # ... rounded up to a multiple of this


def history_lengths(sequence_lengths: np.ndarray, min_length: int = 1) -> np.ndarray:
    """History length of each sequence that passes min_length: its events before the last one (n - 1), the
    history of leave-one-out's evaluation sample before any truncation."""
    lengths = np.asarray(sequence_lengths, dtype=np.int64)
    return lengths[lengths >= min_length] - 1


def history_percentiles(histories: np.ndarray) -> Dict[str, int]:
    """p50 / p90 / p95 / p99 / max of the history lengths (observed values: numpy's 'higher' method)."""
    histories = np.asarray(histories, dtype=np.int64)
    if len(histories) == 0:
        return {**{f"p{q}": 0 for q in HISTORY_PERCENTILES}, "max": 0}
    out = {f"p{q}": int(np.percentile(histories, q, method="higher")) for q in HISTORY_PERCENTILES}
    out["max"] = int(histories.max())
    return out


def suggest_max_history(histories: np.ndarray, cap: int) -> Tuple[int, str]:
    """The data's max history: the 95th percentile of the history lengths rounded up to a multiple of 8 (at least
    8), then at most `cap` (the caller's memory budget). Returns (value, how it was chosen)."""
    if cap < 1:
        raise ValueError(f"suggest_max_history: cap must be >= 1, got {cap}")
    histories = np.asarray(histories, dtype=np.int64)
    p = int(np.percentile(histories, HISTORY_QUANTILE, method="higher")) if len(histories) else 1
    rounded = max(HISTORY_MULTIPLE, -(-p // HISTORY_MULTIPLE) * HISTORY_MULTIPLE)
    value = min(rounded, int(cap))
    how = (f"p{HISTORY_QUANTILE} of the history lengths = {p}, rounded up to a multiple of {HISTORY_MULTIPLE} = "
           f"{rounded}")
    if value < rounded:
        how += f", capped at {value} by the memory budget"
    return value, how


def data_report(prepared: PreparedLog, config: SessionWorkflowConfig, sequence_lengths: np.ndarray,
                kept_lengths: np.ndarray, num_candidates: int, chosen_by: Optional[str] = None,
                extra: Optional[dict] = None) -> dict:
    """What preprocessing read, dropped, truncated and kept (the content of data_report.json)."""
    lengths = np.asarray(sequence_lengths, dtype=np.int64)
    kept = lengths >= config.min_length
    cut = np.maximum(lengths[kept] - config.max_length, 0)
    out_lengths = np.asarray(kept_lengths, dtype=np.int64)
    if len(out_lengths) != int(kept.sum()) or int(out_lengths.sum()) != int(lengths[kept].sum() - cut.sum()):
        raise RuntimeError(f"data report: the workflow kept {len(out_lengths)} sequences / {int(out_lengths.sum())} "
                           f"events, the count from the log is {int(kept.sum())} / {int(lengths[kept].sum() - cut.sum())}")
    nulls = dict(prepared.dropped_nulls or {"events": 0, "sessions": 0, "by_column": {}})
    nulls["how"] = (f"dropped ({config.flag('drop_nulls')})" if config.drop_nulls
                    else f"an error unless {config.flag('drop_nulls')}: none were found")
    dropped = {
        "too_short": {"sequences": int((~kept).sum()), "events": int(lengths[~kept].sum()),
                      "min_length": int(config.min_length)},
        "nulls": nulls,
        "unknown_items": {"events": 0, "how": "an item outside the catalogue is an error, never dropped"},
    }
    notes = list(prepared.notes)
    for events, what in ((1, "neither trained on nor evaluated"), (2, "evaluated but not trained on")):
        count = int((lengths[kept] == events).sum())
        if count:
            notes.append(f"{count:,} kept sequence(s) have {events} event(s): retrieval's leave-one-out protocol "
                         f"{what} (it needs 3 events: history, train target, eval target)")
    extra = dict(extra or {})
    dropped.update(extra.pop("dropped", {}))
    report = {
        "source": prepared.source,
        "input_format": prepared.input_format,
        "id": {"column": config.id_column, "kind": config.id_kind},
        "columns": {"id": config.id_column, roles.ROLE_ITEM: config.item_column,
                    roles.ROLE_ACTION: config.action_column, roles.ROLE_TIMESTAMP: config.timestamp_column},  # None: the data has no such column
        "in": {"sequences": int(prepared.sequences_in), "events": int(prepared.events_in)},
        "dropped": dropped,
        "truncated": {"sequences": int((cut > 0).sum()), "events": int(cut.sum()),
                      "max_length": int(config.max_length)},
        "out": {"sequences": int(len(out_lengths)), "events": int(out_lengths.sum())},
        "history_length": {"of": "events before each kept sequence's last one, before truncation",
                           **history_percentiles(history_lengths(lengths, config.min_length))},
        "catalogue": {"items_in_log": int(prepared.events[config.item_column].nunique()),
                      "candidates": int(num_candidates)},
        "max_history": {"value": int(config.max_length) - 2, "max_length": int(config.max_length),
                        "chosen_by": chosen_by or "SessionWorkflowConfig.max_length - 2 (history + 2 targets)"},
        **extra,
        "notes": notes,
    }
    return report


def read_data_report(output_dir: PathLike) -> Optional[dict]:
    """The data report of a preprocess output (None for outputs written before reports existed)."""
    path = Path(output_dir) / DATA_REPORT_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error}). Fix: re-run preprocess for this directory.") from None


def format_data_report(report: dict) -> str:
    """The report as the lines the CLI prints."""
    kind = report["id"]["kind"] + "s"
    d = report["dropped"]
    h = report["history_length"]
    m = report["max_history"]
    lines = [
        f"  read       {report['in']['sequences']:,} {kind}, {report['in']['events']:,} events "
        f"({report['input_format']}: {report['source']})",
        f"  dropped    too short (< {d['too_short']['min_length']} events): {d['too_short']['sequences']:,} {kind}, "
        f"{d['too_short']['events']:,} events; empty fields: {d['nulls']['events']:,} events"
        + (f", {d['nulls']['sessions']:,} sessions" if d['nulls'].get('sessions') else "")
        + f"; unknown items: {d['unknown_items']['events']:,} events",
    ]
    for key, value in d.items():
        if key not in ("too_short", "nulls", "unknown_items"):
            lines.append(f"  dropped    {key}: " + ", ".join(f"{k} {v:,}" if isinstance(v, int) else f"{k} {v}"
                                                            for k, v in value.items()))
    lines += [
        f"  truncated  {report['truncated']['events']:,} older events of {report['truncated']['sequences']:,} {kind} "
        f"(keeping the last {report['truncated']['max_length']} = max history {m['value']} + 2 targets)",
        f"  kept       {report['out']['sequences']:,} {kind}, {report['out']['events']:,} events; catalogue "
        f"{report['catalogue']['items_in_log']:,} items ({report['catalogue']['candidates']:,} candidates)",
        f"  history    p50 {h['p50']:,}  p90 {h['p90']:,}  p95 {h['p95']:,}  p99 {h['p99']:,}  max {h['max']:,} events",
        f"  max history {m['value']}: {m['chosen_by']}",
    ]
    if report.get("splits"):
        sp = report["splits"]
        lines.append(f"  splits     {sp['folder']}/: " + ", ".join(f"{k} {sp[k]['sequences']:,}" for k in SPLITS)
                     + f" {kind} ({sp['how']})" + (f"; train expanded to {sp['prefix_expansion']['train_rows']:,} "
                                                   "prefix rows" if "prefix_expansion" in sp else ""))
        lines.append(f"  training   `merlin-hstu train --data` on this output trains on {sp['folder']}/train, early-stops "
                     f"on {sp['folder']}/valid and reports {sp['folder']}/test (train.split=sessions; "
                     "--set train.split=leave_one_out for processed/)")
    lines += [f"  note       {note}" for note in report.get("notes", [])]
    return "\n".join(lines)


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
