"""Sequences for retrieval training and evaluation, with the reference's leave-one-out protocol.

One sample per user (reference-hstu.md §1.2, chronological sequence s_1..s_T):
  train: target s_{T-1}, history = the last <= H items of s_1..s_{T-2}
  eval:  target s_T,     history = the last <= H items of s_1..s_{T-1}
A batch is a dict of right-padded tensors:
  ids        [B, W]  history ids at positions < len, the target id at position len, then 0
  lengths    [B]     history lengths
  timestamps [B, W]  event times aligned with ids (the target's time at position len)   (optional)
  actions    [B, W]  encoded action ids aligned with ids, 0 at positions >= len: the target's action is never
                     an input   (only when the table has actions: `load_processed(path, actions=...)`)
  targets    [B]     the target ids
W is trimmed per batch to max(len) + 1; the encoder's normaliser N is a constant, so trimming never changes
a number.

train.split=sessions (`SessionSplits`) reads the Merlin train / valid / test files of DATA/splits/ instead
(`load_session_splits`): one sample per session, target = its last item; train / validation / eval = the three files.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import pandas as pd
import torch

from merlin_hstu.retrieval.model import ACTION_INPUTS


class Catalogue:
    """The items a model ranks, from `num_items`, `first_item_id` and `candidates` (SequenceTable, StreamingTable)."""

    num_items: int
    first_item_id: int
    candidates: Optional[np.ndarray]

    @property
    def candidate_ids(self) -> torch.Tensor:
        """The catalogue: every id a model ranks and samples negatives from."""
        if self.candidates is not None:
            return torch.from_numpy(self.candidates.copy())
        return torch.arange(self.first_item_id, self.num_items, dtype=torch.long)

    @property
    def non_candidate_ids(self) -> tuple:
        """Embedding rows that are never ranked: padding, null / OOV rows, ids outside the catalogue."""
        keep = np.zeros(self.num_items, dtype=bool)
        keep[self.candidate_ids.numpy()] = True
        return tuple(np.flatnonzero(~keep).tolist())


def _check_candidates(candidates, num_items: int) -> np.ndarray:
    c = np.unique(np.asarray(candidates, dtype=np.int64))
    if len(c) == 0 or c[0] < 1 or c[-1] >= num_items:
        raise ValueError(f"candidate ids must be non-empty and lie in [1, num_items={num_items})")
    return c


@dataclass
class SequenceTable(Catalogue):
    """Chronological encoded item sequences, one per user/session."""

    items: list  # list[np.ndarray[int64]]
    timestamps: Optional[list]  # list[np.ndarray[int64]] or None
    keys: np.ndarray  # raw user/session ids, aligned with items
    num_items: int  # embedding rows = largest encoded id + 1
    first_item_id: int = 3  # smallest id of a real item (NVTabular Categorify: 0 pad, 1 null, 2 OOV)
    candidates: Optional[np.ndarray] = None  # the catalogue, if not every id in [first_item_id, num_items)
    actions: Optional[list] = None  # list[np.ndarray[int64]] encoded action ids aligned with items, or None
    num_actions: int = 0  # action embedding rows = largest encoded action id + 1 (0: derived from `actions`)

    def __post_init__(self) -> None:
        if len(self.items) == 0:
            raise ValueError("SequenceTable has no sequences; check the input data and the min_length filter")
        if self.timestamps is not None and any(len(a) != len(b) for a, b in zip(self.items, self.timestamps)):
            raise ValueError("item and timestamp lists differ in length for at least one row")
        if self.actions is not None:
            if len(self.actions) != len(self.items) or any(len(a) != len(b) for a, b in zip(self.items, self.actions)):
                raise ValueError("item and action lists differ in length for at least one row")
            top = max((int(a.max()) for a in self.actions if len(a)), default=0)
            low = min((int(a.min()) for a in self.actions if len(a)), default=1)
            if low < 1:  # Categorify: 0 is padding, 1 null, 2 OOV; a real event has an id >= 1
                raise ValueError(f"action id {low} in the action lists: encoded action ids of events must be >= 1 "
                                 "(0 is padding)")
            if not self.num_actions:
                self.num_actions = top + 1
            elif top >= self.num_actions:
                raise ValueError(f"action id {top} is >= num_actions={self.num_actions}")
        if self.candidates is not None:
            self.candidates = _check_candidates(self.candidates, self.num_items)

    @property
    def has_actions(self) -> bool:
        return self.actions is not None

    @classmethod
    def from_frame(cls, df: pd.DataFrame, item_column: str, timestamp_column: Optional[str], key_column: str,
                   num_items: Optional[int] = None, first_item_id: int = 3, action_column: Optional[str] = None,
                   num_actions: int = 0) -> "SequenceTable":
        items = [np.asarray(v, dtype=np.int64) for v in df[item_column]]
        timestamps = None
        if timestamp_column is not None:
            timestamps = [np.asarray(v, dtype=np.int64) for v in df[timestamp_column]]
        actions = None
        if action_column is not None:
            actions = [np.asarray(v, dtype=np.int64) for v in df[action_column]]
        top = max((int(a.max()) for a in items if len(a)), default=first_item_id - 1)
        if num_items is None:
            num_items = top + 1
        elif top >= num_items:
            raise ValueError(f"item id {top} in column {item_column!r} is >= num_items={num_items}")
        return cls(items, timestamps, df[key_column].to_numpy(), int(num_items), first_item_id, actions=actions,
                   num_actions=num_actions)


@dataclass
class ProcessedLayout:
    """What a processed dataset's schema says about its columns (shared by `load_processed` and streaming)."""

    path: Path  # the folder holding the part files and schema.pbtxt
    item_column: str
    timestamp_column: Optional[str]
    key_column: str
    action_column: Optional[str]  # the column `actions` reads (None: "none")
    actions: str  # "none" | "concat" | "interleave"
    num_items: Optional[int]
    num_actions: int
    action_token_offset: int  # interleave only (else 0)
    candidates: Optional[np.ndarray]  # DATA/candidates.parquet, when present

    @property
    def read_columns(self) -> list:
        return [c for c in (self.key_column, self.item_column, self.timestamp_column, self.action_column) if c]


def processed_layout(path: str | Path, actions: str = "none", files: Optional[Sequence[Path]] = None):
    """-> (ProcessedLayout, merlin Dataset) of the output of `merlin-hstu preprocess` (no column data read);
    `files`: the Parquet files of the folder `path` to read, with its schema.pbtxt (e.g. the split layout's)."""
    from merlin.io import Dataset

    from merlin_hstu.common import schema as roles

    if actions not in ACTION_INPUTS:
        raise ValueError(f"load_processed: actions must be one of {list(ACTION_INPUTS)}, got {actions!r}")
    path = Path(path)
    if (path / "processed").is_dir():
        path = path / "processed"
    if files is None:
        dataset = Dataset(str(path), engine="parquet", cpu=True)
    else:
        from merlin.schema.io.tensorflow_metadata import TensorflowMetadata

        dataset = Dataset([str(f) for f in files], engine="parquet", cpu=True,
                          schema=TensorflowMetadata.from_proto_text_file(str(path)).to_merlin_schema())
    schema = dataset.schema
    item_col = roles.item_list_column(schema)
    ts_col = roles.timestamp_list_column(schema)
    key_col = next((c.name for c in schema if not c.is_list and c.name != roles.LENGTH), None)
    if key_col is None:
        raise ValueError(f"no user/session id column found in {path}/schema.pbtxt")
    domain = schema[item_col].int_domain
    num_items = int(domain.max) + 1 if domain is not None and domain.max else None
    action_col = _action_source(schema, path, actions)
    offset = roles.action_token_offset(schema) if actions == "interleave" else 0
    num_actions = 0
    if actions != "none" and roles.ACTION_LIST in schema.column_names:
        action_domain = schema[roles.ACTION_LIST].int_domain
        num_actions = int(action_domain.max) + 1 if action_domain is not None and action_domain.max else 0
    candidates_file = path.parent / "candidates.parquet"
    candidates = (pd.read_parquet(candidates_file)[roles.CANDIDATES_COLUMN].to_numpy() if candidates_file.is_file()
                  else None)
    layout = ProcessedLayout(path, item_col, ts_col, key_col, action_col, actions, num_items, num_actions, offset,
                             candidates)
    return layout, dataset


def load_processed(path: str | Path, actions: str = "none") -> SequenceTable:
    """Read the output of `merlin_hstu.workflows.session_workflow.preprocess` (parquet + schema.pbtxt).

    `actions` (the config's `inputs.actions`): "none" reads no actions; "concat" reads the `action-list` column;
    "interleave" reads the `interleaved-list` column ([i_1, a_1 + K, i_2, a_2 + K, ...], K its
    `action_token_offset`), checks its item tokens against `item_id-list` and keeps a_j = token - K.  Either way the
    table's `actions` are the encoded action ids per event; a dataset without the column is an error naming it.

    The whole dataset is read into memory; `StreamingLeaveOneOut` (train.streaming) reads it by row groups."""
    layout, dataset = processed_layout(path, actions)
    return _table_of_frame(dataset.to_ddf().compute(), layout, layout.num_items)


def _table_of_frame(df: pd.DataFrame, layout: ProcessedLayout, num_items: Optional[int]) -> SequenceTable:
    """The SequenceTable of processed rows `df` read with `layout` (actions decoded, the catalogue attached)."""
    action_col = layout.action_column
    if layout.actions == "interleave":
        decoded = _read_interleaved(df, layout.item_column, action_col, layout.action_token_offset)
        action_col = f"{action_col}:actions"
        df = df.assign(**{action_col: decoded})
    table = SequenceTable.from_frame(df, layout.item_column, layout.timestamp_column, layout.key_column,
                                     num_items=num_items, action_column=action_col,
                                     num_actions=layout.num_actions)
    if layout.candidates is not None:
        table.candidates = layout.candidates
        table.__post_init__()
    return table


# --- the Merlin train / valid / test files (train.split=sessions) ---------------------------------------------
@dataclass
class SessionTables(Catalogue):
    """The three files of a Merlin split layout (DATA/splits/{train,valid,test}.parquet, written by
    `preprocess --split-layout merlin`) as SequenceTables over one catalogue."""

    train: SequenceTable
    valid: SequenceTable
    test: SequenceTable
    num_items: int
    first_item_id: int = 3
    candidates: Optional[np.ndarray] = None
    num_actions: int = 0
    folder: Optional[Path] = None

    @property
    def has_actions(self) -> bool:
        return self.train.has_actions

    @property
    def has_timestamps(self) -> bool:
        return self.train.timestamps is not None

    def summary(self) -> str:
        return ", ".join(f"{len(t.items):,} {name}" for name, t in
                         (("train", self.train), ("valid", self.valid), ("test", self.test))) + " sequences"


def session_split_files(path: str | Path) -> Optional[dict]:
    """{"train" | "valid" | "test": file} of DATA/splits/ (DATA: the output of `preprocess`; also accepted: the
    splits folder itself or DATA/processed), or None when the dataset has no splits folder. A splits folder that
    lacks a file (or its schema.pbtxt) is an error naming it."""
    from merlin_hstu.workflows.session_workflow import SPLITS, SPLITS_DIR

    path = Path(path)
    if path.name == "processed" and not (path / SPLITS_DIR).is_dir():
        path = path.parent
    folder = path if path.name == SPLITS_DIR and not (path / SPLITS_DIR).is_dir() else path / SPLITS_DIR
    if not folder.is_dir():
        return None
    files = {split: folder / f"{split}.parquet" for split in SPLITS}
    missing = [f.name for f in [*files.values(), folder / "schema.pbtxt"] if not f.exists()]
    if missing:
        raise ValueError(f"{folder} is a Merlin split layout without {missing}; re-run `merlin-hstu preprocess ... "
                         "--split-layout merlin` into a new --output")
    return files


def load_session_splits(path: str | Path, actions: str = "none") -> SessionTables:
    """The train / valid / test files of a processed dataset (`session_split_files`), each a SequenceTable with the
    processed dataset's columns, catalogue and sizes (the splits' schema.pbtxt is the processed one)."""
    files = session_split_files(path)
    if files is None:
        raise ValueError(f"train.split=sessions reads the Merlin train / valid / test files of {path}/splits/, but "
                         f"{path} has none. Fix: re-run `merlin-hstu preprocess ... --split-layout merlin` (add "
                         "--prefix-expansion for train prefixes), give preprocess an --input folder with "
                         "train.parquet / valid.parquet / test.parquet, or set train.split=leave_one_out")
    folder = files["train"].parent
    layout, _ = processed_layout(folder, actions, files=list(files.values()))
    frames = {split: pd.read_parquet(file, columns=layout.read_columns) for split, file in files.items()}
    num_items = layout.num_items
    if num_items is None:  # no size in the schema: the largest id of any split
        num_items = 1 + max(int(np.max(v)) for df in frames.values() for v in df[layout.item_column] if len(v))
    tables = {}
    for split, df in frames.items():
        if len(df) == 0:
            raise ValueError(f"{files[split]} holds no sequence; every split needs at least one (re-run preprocess "
                             "with other --valid-fraction / --test-fraction, or fill the input's file)")
        tables[split] = _table_of_frame(df, layout, num_items)
    num_actions = max(t.num_actions for t in tables.values())
    for table in tables.values():  # one action vocabulary for the model, whichever split holds the largest id
        table.num_actions = num_actions
    return SessionTables(tables["train"], tables["valid"], tables["test"], num_items,
                         candidates=tables["train"].candidates, num_actions=num_actions, folder=folder)


def _action_source(schema, path: Path, actions: str) -> Optional[str]:
    """The column `actions` reads (None for "none"); a clear error when the dataset lacks it."""
    from merlin_hstu.common import schema as roles

    if actions == "none":
        return None
    if actions == "concat":
        column = roles.action_list_column(schema)
        if column is None:
            raise ValueError(f"inputs.actions=concat reads the action list column ({roles.ACTION_LIST!r}, property "
                             f"{roles.ROLE_PROPERTY}={roles.ROLE_ACTION!r}), but {path}/schema.pbtxt has none "
                             f"(columns: {schema.column_names}); preprocess the log with its action column "
                             "(--action-column NAME, data.action_column) or set inputs.actions=none")
        return column
    column = roles.interleaved_list_column(schema)
    if column is None:
        raise ValueError(f"inputs.actions=interleave reads the interleaved item/action column "
                         f"({roles.INTERLEAVED_LIST!r}), but {path}/schema.pbtxt has none (columns: "
                         f"{schema.column_names}); preprocess with interleaving on (`merlin-hstu preprocess "
                         "--set inputs.actions=interleave`, or SessionWorkflowConfig(interleave_actions=True)) "
                         "or set inputs.actions=none")
    return column


def _read_interleaved(df: pd.DataFrame, item_column: str, column: str, offset: int, first_row: int = 0) -> list:
    """Per row: the action ids of the interleaved tokens [i_1, a_1 + K, ...], checked against the item list
    (`first_row`: the index of df's first row in the dataset, for the error messages)."""
    out = []
    for row, (items, tokens) in enumerate(zip(df[item_column], df[column]), start=first_row):
        items, tokens = np.asarray(items, dtype=np.int64), np.asarray(tokens, dtype=np.int64)
        if len(tokens) != 2 * len(items) or not np.array_equal(tokens[0::2], items):
            raise ValueError(f"row {row}: column {column!r} is not the interleaving of {item_column!r} "
                             f"({len(tokens)} tokens for {len(items)} items, or other item tokens); re-run preprocess")
        kinds = tokens[1::2] - offset
        if len(kinds) and kinds.min() < 1:
            raise ValueError(f"row {row}: column {column!r} has an action token below its action_token_offset "
                             f"K={offset}; re-run preprocess")
        out.append(kinds)
    return out


def _window(seq: np.ndarray, end: int, max_history: int) -> np.ndarray:
    return seq[max(0, end - max_history):end]


@dataclass
class _Padded:
    ids: np.ndarray
    lengths: np.ndarray
    timestamps: Optional[np.ndarray]
    rows: np.ndarray  # index into the SequenceTable
    actions: Optional[np.ndarray] = None  # aligned with ids; 0 at positions >= len (the target's action is unseen)


def _pad(items: list, timestamps: Optional[list], actions: Optional[list], holdout: int, max_history: int,
         first_row: int = 0, keep: Optional[np.ndarray] = None) -> _Padded:
    """Samples of the sequences `items` (timestamps, actions aligned): target = s_{T-holdout+1}, history = the window
    ending before it; sequences without >= 1 history item give none (nor rows with keep[r] False). rows are
    first_row + the sequence's index."""
    rows = [r for r, seq in enumerate(items) if len(seq) - holdout >= 1 and (keep is None or keep[r])]
    width = max_history + 1
    ids = np.zeros((len(rows), width), dtype=np.int64)
    lengths = np.zeros(len(rows), dtype=np.int64)
    has_ts = timestamps is not None
    ts = np.zeros((len(rows), width), dtype=np.int64) if has_ts else None
    acts = np.zeros((len(rows), width), dtype=np.int64) if actions is not None else None
    for out, r in enumerate(rows):
        seq = items[r]
        t_index = len(seq) - holdout
        hist = _window(seq, t_index, max_history)
        n = len(hist)
        ids[out, :n], ids[out, n], lengths[out] = hist, seq[t_index], n
        if has_ts:
            times = timestamps[r]
            ts[out, :n], ts[out, n] = _window(times, t_index, max_history), times[t_index]
        if acts is not None:
            acts[out, :n] = _window(actions[r], t_index, max_history)
    return _Padded(ids, lengths, ts, np.asarray(rows, dtype=np.int64) + first_row, acts)


class LeaveOneOut:
    """Train / eval samples of a SequenceTable as padded arrays, batched on demand."""

    protocol = "leave_one_out"

    def __init__(self, table: SequenceTable, max_history: int = 200):
        if max_history < 1:
            raise ValueError(f"max_history must be >= 1, got {max_history}")
        self.table, self.max_history = table, max_history
        self.train = self._build(holdout=2)
        self.eval = self._build(holdout=1)
        self.validation: Optional[_Padded] = None

    def hold_out_validation(self, fraction: float, seed: int) -> None:
        """Move a seeded `fraction` of the train samples (one per user: history -> second-to-last item) into
        `self.validation`; they are no longer trained on. The eval samples (last items) are untouched, so the
        validation split never sees a test target.

        fraction 1.0 is the standard leave-one-out validation of the Amazon / S3-Rec benchmarks: EVERY user's
        second-to-last item is a validation target (history: the items before it), and training moves one item
        earlier (target s_{T-2}, history <= s_{T-3}), so no validation or test item is ever a training target;
        users with fewer than 4 items then have validation and test samples but no training sample."""
        if fraction == 1.0:
            self.validation, self.train = self.train, self._build(holdout=3)
            return
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"validation fraction must be in (0, 1], got {fraction!r}")
        n = len(self.train.lengths)
        count = int(round(n * fraction))
        if count < 1 or count >= n:
            raise ValueError(f"train.validation_fraction={fraction} of {n} train samples leaves an empty split; "
                             "use more data or another fraction")
        chosen = np.zeros(n, dtype=bool)
        chosen[np.random.default_rng(seed).permutation(n)[:count]] = True

        self.validation, self.train = _subset(self.train, chosen), _subset(self.train, ~chosen)

    def popularity_samples(self) -> _Padded:
        """The samples a most-popular baseline counts (history plus target): the training samples."""
        return self.train

    def _build(self, holdout: int) -> _Padded:
        return _pad(self.table.items, self.table.timestamps, self.table.actions, holdout, self.max_history)

    @staticmethod
    def batches(split: _Padded, batch_size: int, shuffle: bool = False,
                generator: Optional[torch.Generator] = None) -> Iterator[dict]:
        n = len(split.lengths)
        order = torch.randperm(n, generator=generator).numpy() if shuffle else np.arange(n)
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            lengths = split.lengths[idx]
            width = int(lengths.max()) + 1
            ids = torch.from_numpy(split.ids[idx, :width])
            batch = {
                "ids": ids,
                "lengths": torch.from_numpy(lengths),
                "targets": ids[torch.arange(len(idx)), torch.from_numpy(lengths)],
                "rows": torch.from_numpy(split.rows[idx]),
            }
            if split.timestamps is not None:
                batch["timestamps"] = torch.from_numpy(split.timestamps[idx, :width])
            if split.actions is not None:
                batch["actions"] = torch.from_numpy(split.actions[idx, :width])
            yield batch

    def num_batches(self, split: _Padded, batch_size: int) -> int:
        return -(-len(split.lengths) // batch_size)


class SessionSplits(LeaveOneOut):
    """The samples of train.split=sessions (the Merlin train / valid / test files, `SessionTables`), with the
    batches of `LeaveOneOut`.

    One sample per sequence of >= 2 events, the T4R next-item protocol: target = its LAST item, history = the last
    <= H items before it. train: every row of train.parquet (prefix-expanded rows included), trained on at every
    position (the model supervises each history position with the next item, as for leave-one-out's training
    samples); validation: valid.parquet (early stopping); eval: test.parquet (the final metrics). Valid and test
    rows are never training samples; `rows` index the split's own table."""

    protocol = "sessions"

    def __init__(self, tables: SessionTables, max_history: int = 200):
        if max_history < 1:
            raise ValueError(f"max_history must be >= 1, got {max_history}")
        self.tables, self.table, self.max_history = tables, tables, max_history
        self.train = self._samples(tables.train, "train")
        self.validation: Optional[_Padded] = self._samples(tables.valid, "valid")
        self.eval = self._samples(tables.test, "test")

    def _samples(self, table: SequenceTable, name: str) -> _Padded:
        padded = _pad(table.items, table.timestamps, table.actions, 1, self.max_history)
        if len(padded.lengths) == 0:
            raise ValueError(f"{name}.parquet ({self.tables.folder}) has no sequence of >= 2 events, so it gives no "
                             "sample (history + last item); re-run preprocess with --min-length 2 or more data")
        return padded

    def hold_out_validation(self, fraction: float, seed: int) -> None:
        raise ValueError(f"train.validation_fraction={fraction} holds users out of leave-one-out training, but with "
                         "train.split=sessions the valid sessions (splits/valid.parquet) are the validation split: "
                         "set train.validation_fraction=0")

    def popularity_samples(self) -> _Padded:
        """What most-popular counts: each train sequence once (of prefix-expanded rows only the longest per key,
        which holds the others), so the expansion does not weigh early events more."""
        table = self.tables.train
        longest: dict = {}  # key -> (events, sample index)
        for i, row in enumerate(self.train.rows.tolist()):
            key, n = table.keys[row], len(table.items[row])
            if key not in longest or n > longest[key][0]:
                longest[key] = (n, i)
        return _subset(self.train, np.sort(np.array([i for _, i in longest.values()], dtype=np.int64)))


def _subset(split: _Padded, index: np.ndarray) -> _Padded:
    return _Padded(split.ids[index], split.lengths[index], None if split.timestamps is None else split.timestamps[index],
                   split.rows[index], None if split.actions is None else split.actions[index])


# --- streaming (train.streaming) --------------------------------------------------------------------------------
@dataclass
class StreamingTable(Catalogue):
    """A processed dataset read by row groups (`merlin_hstu.data.stream`): the catalogue, no sequences in memory."""

    layout: ProcessedLayout
    groups: list  # this process's row groups (merlin_hstu.data.stream.RowGroup)
    num_rows: int  # the dataset's rows (sequences), all processes together
    num_items: int
    first_item_id: int = 3
    candidates: Optional[np.ndarray] = None
    num_actions: int = 0
    rank: int = 0  # this process's rank and the process count (groups = the dataset's row groups rank::world_size)
    world_size: int = 1

    @property
    def has_actions(self) -> bool:
        return self.layout.actions != "none"

    def chunks(self, groups=None) -> Iterator[tuple]:
        """(row group, items, timestamps, actions, keys) per row group: lists of int64 arrays (None when absent)."""
        from merlin_hstu.data.stream import read_groups

        layout = self.layout
        for group, frame in read_groups(self.groups if groups is None else groups, layout.read_columns):
            items = _list_column(frame, layout.item_column)
            _check_items(items, layout.item_column, self.num_items, group)
            times = _list_column(frame, layout.timestamp_column) if layout.timestamp_column else None
            if times is not None and any(len(a) != len(b) for a, b in zip(items, times)):
                raise ValueError(f"item and timestamp lists differ in length for at least one row "
                                 f"({group.path.name}, row group {group.index})")
            actions = None
            if layout.actions == "concat":
                actions = _list_column(frame, layout.action_column)
            elif layout.actions == "interleave":
                df = pd.DataFrame({layout.item_column: items, layout.action_column: _list_column(frame,
                                                                                                   layout.action_column)})
                actions = _read_interleaved(df, layout.item_column, layout.action_column,
                                            layout.action_token_offset, first_row=group.first_row)
            if actions is not None:
                _check_actions(items, actions, self.num_actions, group)
            yield group, items, times, actions, frame.column(layout.key_column).to_numpy()


def _list_column(frame, name: str) -> list:
    """A list column of a pyarrow table as int64 numpy arrays, one per row (nulls are an error naming the column)."""
    import pyarrow as pa

    column = frame.column(name).combine_chunks() if frame.num_rows else pa.array([], type=frame.schema.field(name).type)
    if column.null_count or column.values.null_count:
        raise ValueError(f"column {name!r} has null lists or null ids ({column.null_count} / "
                         f"{column.values.null_count}); re-run preprocess")
    offsets = column.offsets.to_numpy()
    values = column.values.to_numpy(zero_copy_only=False).astype(np.int64, copy=False)[offsets[0]:offsets[-1]]
    return np.split(values, offsets[1:-1] - offsets[0]) if len(offsets) > 1 else []


def _check_items(items: list, column: str, num_items: int, group) -> None:
    top = max((int(a.max()) for a in items if len(a)), default=0)
    if top >= num_items:
        raise ValueError(f"item id {top} in column {column!r} ({group.path.name}, row group {group.index}) is >= "
                         f"num_items={num_items} of the schema; re-run preprocess")


def _check_actions(items: list, actions: list, num_actions: int, group) -> None:
    where = f"{group.path.name}, row group {group.index}"
    if any(len(a) != len(b) for a, b in zip(items, actions)):
        raise ValueError(f"item and action lists differ in length for at least one row ({where})")
    low = min((int(a.min()) for a in actions if len(a)), default=1)
    top = max((int(a.max()) for a in actions if len(a)), default=0)
    if low < 1:
        raise ValueError(f"action id {low} in the action lists ({where}): encoded action ids of events must be >= 1 "
                         "(0 is padding)")
    if num_actions and top >= num_actions:
        raise ValueError(f"action id {top} ({where}) is >= num_actions={num_actions}")


def open_streaming(path: str | Path, actions: str = "none", rank: int = 0, world_size: int = 1) -> StreamingTable:
    """The processed dataset at `path` for streaming: schema, catalogue and this process's row groups (rank r of N
    reads groups r::N, merlin_hstu.data.stream.shard); reads no sequence."""
    from merlin_hstu.data.stream import parquet_files, row_groups, shard

    layout, _ = processed_layout(path, actions)
    groups = row_groups(parquet_files(layout.path))
    num_rows = sum(g.num_rows for g in groups)
    if num_rows == 0:
        raise ValueError(f"{layout.path} holds no rows; check the input data and the min_length filter")
    if layout.num_items is None:
        raise ValueError(f"train.streaming needs the item column's size in {layout.path}/schema.pbtxt (int_domain max "
                         f"of {layout.item_column!r}; preprocess writes it) to size the model before reading the data")
    if layout.actions != "none" and not layout.num_actions:
        raise ValueError(f"train.streaming with inputs.actions={layout.actions} needs the action column's size in "
                         f"{layout.path}/schema.pbtxt (int_domain max); re-run preprocess")
    candidates = None if layout.candidates is None else _check_candidates(layout.candidates, layout.num_items)
    return StreamingTable(layout, shard(groups, rank, world_size), num_rows, layout.num_items, candidates=candidates,
                          num_actions=layout.num_actions, rank=rank, world_size=world_size)


@dataclass(frozen=True)
class StreamSplit:
    """A split of a StreamingLeaveOneOut: which samples of each row the stream makes, and how many there are."""

    holdout: int  # the target is s_{T-holdout+1}
    count: int  # samples in this process's row groups
    part: str = "all"  # all | kept (key fraction >= validation fraction) | held (< fraction)


class StreamingLeaveOneOut:
    """The leave-one-out splits of `LeaveOneOut`, made row group by row group as they are read (train.streaming).

    Same protocol per row (train: target s_{T-1}; eval: s_T; validation fraction 1.0: s_{T-1} with training one
    item earlier). A validation fraction < 1 holds out the users whose seeded key hash
    (`data.stream.key_fraction`) is below it (the in-memory path draws a permutation instead, so the held-out users
    differ). Training batches come
    through a shuffle buffer of `shuffle_buffer` samples (row groups in a seeded random order when the epoch does
    not fit in it); evaluation batches come in file order. With shuffle_buffer >= the train samples, every batch
    equals the in-memory path's (same generator, same order), so the whole training is the same."""

    streaming = True

    def __init__(self, table: StreamingTable, max_history: int = 200, shuffle_buffer: int = 10000):
        if max_history < 1:
            raise ValueError(f"max_history must be >= 1, got {max_history}")
        if shuffle_buffer < 1:
            raise ValueError(f"train.shuffle_buffer must be >= 1 sample, got {shuffle_buffer}")
        self.table, self.max_history, self.shuffle_buffer = table, max_history, shuffle_buffer
        self.rank, self.world_size = table.rank, table.world_size
        self._fraction, self._seed = 0.0, 0
        counts = self._count({(2, "all"), (1, "all")})
        self.train, self.eval = StreamSplit(2, counts[2, "all"]), StreamSplit(1, counts[1, "all"])
        self.validation: Optional[StreamSplit] = None
        self._rank_steps: dict = {}

    def _count(self, wanted: set) -> dict:
        """Samples per (holdout, part) in this process's row groups: one pass over the item (and key) columns."""
        counts = {w: 0 for w in wanted}
        columns = [self.table.layout.item_column] + ([self.table.layout.key_column] if self._fraction else [])
        from merlin_hstu.data.stream import read_groups

        for group, frame in read_groups(self.table.groups, columns):
            lengths = np.diff(frame.column(columns[0]).combine_chunks().offsets.to_numpy()) if frame.num_rows \
                else np.zeros(0, dtype=np.int64)
            held = self._held(frame.column(self.table.layout.key_column).to_numpy()) if self._fraction else None
            for holdout, part in wanted:
                ok = lengths - holdout >= 1
                if part != "all":
                    ok &= held if part == "held" else ~held
                counts[holdout, part] += int(ok.sum())
        return counts

    def _held(self, keys: np.ndarray) -> np.ndarray:
        from merlin_hstu.data.stream import key_fraction

        return key_fraction(keys, self._seed) < self._fraction

    def hold_out_validation(self, fraction: float, seed: int) -> None:
        """`LeaveOneOut.hold_out_validation` for a stream (fraction 1.0 the same; < 1: by seeded key hash)."""
        if fraction == 1.0:
            self.validation = self.train
            self.train = StreamSplit(3, self._count({(3, "all")})[3, "all"])
            return
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"validation fraction must be in (0, 1], got {fraction!r}")
        self._fraction, self._seed = float(fraction), int(seed)
        counts = self._count({(2, "kept"), (2, "held")})
        if counts[2, "held"] < 1 or counts[2, "kept"] < 1:
            raise ValueError(f"train.validation_fraction={fraction} of {self.train.count} train samples leaves an empty "
                             "split; use more data or another fraction")
        self.train, self.validation = StreamSplit(2, counts[2, "kept"], "kept"), StreamSplit(2, counts[2, "held"], "held")

    # --- samples --------------------------------------------------------------------------------------------
    def samples(self, split: StreamSplit, groups=None) -> Iterator[_Padded]:
        """The split's samples, one _Padded per row group (rows = the dataset's row index)."""
        for group, items, times, actions, keys in self.table.chunks(groups):
            keep = None
            if split.part != "all":
                held = self._held(keys)
                keep = held if split.part == "held" else ~held
            yield _pad(items, times, actions, split.holdout, self.max_history, group.first_row, keep)

    def batches(self, split: StreamSplit, batch_size: int, shuffle: bool = False,
                generator: Optional[torch.Generator] = None) -> Iterator[dict]:
        """Batches (the dicts of `LeaveOneOut.batches`): in file order, or through the shuffle buffer
        (`data.stream.epoch_batches`)."""
        from merlin_hstu.data.stream import epoch_batches

        if shuffle and generator is None:
            raise ValueError("a shuffled stream needs its generator")
        read = lambda groups: (_samples_of(p) for p in self.samples(split, groups))  # noqa: E731
        for samples in epoch_batches(read, self.table.groups, split.count, batch_size, self.shuffle_buffer,
                                     generator if shuffle else None):
            yield next(LeaveOneOut.batches(_padded_of(samples), batch_size))

    def num_batches(self, split: StreamSplit, batch_size: int) -> int:
        return -(-split.count // batch_size)

    # --- several processes ----------------------------------------------------------------------------------
    def rank_steps(self, split: StreamSplit, batch_size: int) -> int:
        """Steps of an epoch on every rank (`data.stream.rank_steps`: the most any rank needs for its own samples
        in batches of its share of the global batch; a rank with fewer samples starts its stream again)."""
        from merlin_hstu.data.stream import rank_steps

        key = (split, batch_size)
        if key not in self._rank_steps:
            what = ("train", "eval")[split.holdout == 1]
            self._rank_steps[key] = rank_steps(split.count, batch_size, self.world_size, what)
        return self._rank_steps[key]

    def rank_batches(self, split: StreamSplit, batch_size: int, generator: torch.Generator) -> Iterator[dict]:
        """This rank's batches of an epoch: its share of `batch_size` from its own row groups, shuffled, exactly
        `rank_steps` of them (the stream restarted, with the same generator going on, when it ends early)."""
        from merlin_hstu.data.stream import batch_share, repeat_for

        share = batch_share(batch_size, self.rank, self.world_size)
        return repeat_for(lambda: self.batches(split, share, shuffle=True, generator=generator),
                          self.rank_steps(split, batch_size))


def _samples_of(padded: _Padded) -> dict:
    import dataclasses

    return {f.name: getattr(padded, f.name) for f in dataclasses.fields(padded) if getattr(padded, f.name) is not None}


def _padded_of(samples: dict) -> _Padded:
    return _Padded(samples["ids"], samples["lengths"], samples.get("timestamps"), samples["rows"],
                   samples.get("actions"))


def popularity_counts(split, samples, num_items: int) -> torch.Tensor:
    """Item counts over everything a popularity baseline may see in training (history plus train target) of the
    `samples` of `split` (a LeaveOneOut or a StreamingLeaveOneOut), summed batch by batch."""
    from merlin_hstu.retrieval.baselines import MostPopular

    counts = torch.zeros(num_items, dtype=torch.float32)
    for batch in split.batches(samples, 4096):
        ids, lengths = batch["ids"], batch["lengths"]
        seen = torch.arange(ids.shape[1]).unsqueeze(0) <= lengths.unsqueeze(1)
        counts += MostPopular().fit(ids * seen, num_items).counts
    return counts


def history_window(batch: dict) -> torch.Tensor:
    """The history ids a ranking must filter out: ids at positions < len, 0 elsewhere."""
    ids, lengths = batch["ids"], batch["lengths"]
    real = torch.arange(ids.shape[1]).unsqueeze(0) < lengths.unsqueeze(1)
    return ids * real


def train_sequences(split: _Padded) -> Sequence[np.ndarray]:
    """Everything a popularity baseline may see in training: history plus the train target."""
    return [split.ids[i, : split.lengths[i] + 1] for i in range(len(split.lengths))]
