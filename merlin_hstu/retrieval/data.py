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
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import pandas as pd
import torch

from merlin_hstu.retrieval.model import ACTION_INPUTS


@dataclass
class SequenceTable:
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
            c = np.unique(np.asarray(self.candidates, dtype=np.int64))
            if len(c) == 0 or c[0] < 1 or c[-1] >= self.num_items:
                raise ValueError(f"candidate ids must be non-empty and lie in [1, num_items={self.num_items})")
            self.candidates = c

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


def load_processed(path: str | Path, actions: str = "none") -> SequenceTable:
    """Read the output of `merlin_hstu.workflows.session_workflow.preprocess` (parquet + schema.pbtxt).

    `actions` (the config's `inputs.actions`): "none" reads no actions; "concat" reads the `action-list` column;
    "interleave" reads the `interleaved-list` column ([i_1, a_1 + K, i_2, a_2 + K, ...], K its
    `action_token_offset`), checks its item tokens against `item_id-list` and keeps a_j = token - K.  Either way the
    table's `actions` are the encoded action ids per event; a dataset without the column is an error naming it."""
    from merlin.io import Dataset

    from merlin_hstu.common import schema as roles

    if actions not in ACTION_INPUTS:
        raise ValueError(f"load_processed: actions must be one of {list(ACTION_INPUTS)}, got {actions!r}")
    path = Path(path)
    if (path / "processed").is_dir():
        path = path / "processed"
    dataset = Dataset(str(path), engine="parquet", cpu=True)
    schema = dataset.schema
    item_col = roles.item_list_column(schema)
    ts_col = roles.timestamp_list_column(schema)
    key_col = next((c.name for c in schema if not c.is_list and c.name != roles.LENGTH), None)
    if key_col is None:
        raise ValueError(f"no user/session id column found in {path}/schema.pbtxt")
    domain = schema[item_col].int_domain
    num_items = int(domain.max) + 1 if domain is not None and domain.max else None
    action_col = _action_source(schema, path, actions)
    df = dataset.to_ddf().compute()
    num_actions = 0
    if actions == "interleave":
        decoded = _read_interleaved(df, item_col, action_col, roles.action_token_offset(schema))
        action_col = f"{action_col}:actions"
        df = df.assign(**{action_col: decoded})
    if actions != "none" and roles.ACTION_LIST in schema.column_names:
        action_domain = schema[roles.ACTION_LIST].int_domain
        num_actions = int(action_domain.max) + 1 if action_domain is not None and action_domain.max else 0
    table = SequenceTable.from_frame(df, item_col, ts_col, key_col, num_items=num_items, action_column=action_col,
                                     num_actions=num_actions)
    candidates_file = path.parent / "candidates.parquet"
    if candidates_file.is_file():
        table.candidates = pd.read_parquet(candidates_file)["item_id"].to_numpy()
        table.__post_init__()
    return table


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


def _read_interleaved(df: pd.DataFrame, item_column: str, column: str, offset: int) -> list:
    """Per row: the action ids of the interleaved tokens [i_1, a_1 + K, ...], checked against the item list."""
    out = []
    for row, (items, tokens) in enumerate(zip(df[item_column], df[column])):
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


class LeaveOneOut:
    """Train / eval samples of a SequenceTable as padded arrays, batched on demand."""

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

        def take(mask: np.ndarray) -> _Padded:
            t = self.train
            return _Padded(t.ids[mask], t.lengths[mask], None if t.timestamps is None else t.timestamps[mask],
                           t.rows[mask], None if t.actions is None else t.actions[mask])

        self.validation, self.train = take(chosen), take(~chosen)

    def _build(self, holdout: int) -> _Padded:
        # target = s_{T-holdout+1}; history = window ending before it.  Needs >= 1 history item.
        rows = [r for r, seq in enumerate(self.table.items) if len(seq) - holdout >= 1]
        width = self.max_history + 1
        ids = np.zeros((len(rows), width), dtype=np.int64)
        lengths = np.zeros(len(rows), dtype=np.int64)
        has_ts = self.table.timestamps is not None
        ts = np.zeros((len(rows), width), dtype=np.int64) if has_ts else None
        acts = np.zeros((len(rows), width), dtype=np.int64) if self.table.actions is not None else None
        for out, r in enumerate(rows):
            seq = self.table.items[r]
            t_index = len(seq) - holdout
            hist = _window(seq, t_index, self.max_history)
            n = len(hist)
            ids[out, :n], ids[out, n], lengths[out] = hist, seq[t_index], n
            if has_ts:
                times = self.table.timestamps[r]
                ts[out, :n], ts[out, n] = _window(times, t_index, self.max_history), times[t_index]
            if acts is not None:
                acts[out, :n] = _window(self.table.actions[r], t_index, self.max_history)
        return _Padded(ids, lengths, ts, np.asarray(rows, dtype=np.int64), acts)

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


def history_window(batch: dict) -> torch.Tensor:
    """The history ids a ranking must filter out: ids at positions < len, 0 elsewhere."""
    ids, lengths = batch["ids"], batch["lengths"]
    real = torch.arange(ids.shape[1]).unsqueeze(0) < lengths.unsqueeze(1)
    return ids * real


def train_sequences(split: _Padded) -> Sequence[np.ndarray]:
    """Everything a popularity baseline may see in training: history plus the train target."""
    return [split.ids[i, : split.lengths[i] + 1] for i in range(len(split.lengths))]
