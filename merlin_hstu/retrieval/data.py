"""Sequences for retrieval training and evaluation, with the reference's leave-one-out protocol.

One sample per user (reference-hstu.md §1.2, chronological sequence s_1..s_T):
  train: target s_{T-1}, history = the last <= H items of s_1..s_{T-2}
  eval:  target s_T,     history = the last <= H items of s_1..s_{T-1}
A batch is a dict of right-padded tensors:
  ids        [B, W]  history ids at positions < len, the target id at position len, then 0
  lengths    [B]     history lengths
  timestamps [B, W]  event times aligned with ids (the target's time at position len)   (optional)
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


@dataclass
class SequenceTable:
    """Chronological encoded item sequences, one per user/session."""

    items: list  # list[np.ndarray[int64]]
    timestamps: Optional[list]  # list[np.ndarray[int64]] or None
    keys: np.ndarray  # raw user/session ids, aligned with items
    num_items: int  # embedding rows = largest encoded id + 1
    first_item_id: int = 3  # smallest id of a real item (NVTabular Categorify: 0 pad, 1 null, 2 OOV)
    candidates: Optional[np.ndarray] = None  # the catalogue, if not every id in [first_item_id, num_items)

    def __post_init__(self) -> None:
        if len(self.items) == 0:
            raise ValueError("SequenceTable has no sequences; check the input data and the min_length filter")
        if self.timestamps is not None and any(len(a) != len(b) for a, b in zip(self.items, self.timestamps)):
            raise ValueError("item and timestamp lists differ in length for at least one row")
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
                   num_items: Optional[int] = None, first_item_id: int = 3) -> "SequenceTable":
        items = [np.asarray(v, dtype=np.int64) for v in df[item_column]]
        timestamps = None
        if timestamp_column is not None:
            timestamps = [np.asarray(v, dtype=np.int64) for v in df[timestamp_column]]
        top = max((int(a.max()) for a in items if len(a)), default=first_item_id - 1)
        if num_items is None:
            num_items = top + 1
        elif top >= num_items:
            raise ValueError(f"item id {top} in column {item_column!r} is >= num_items={num_items}")
        return cls(items, timestamps, df[key_column].to_numpy(), int(num_items), first_item_id)


def load_processed(path: str | Path) -> SequenceTable:
    """Read the output of `merlin_hstu.workflows.session_workflow.preprocess` (parquet + schema.pbtxt)."""
    from merlin.io import Dataset

    from merlin_hstu.common import schema as roles

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
    df = dataset.to_ddf().compute()
    table = SequenceTable.from_frame(df, item_col, ts_col, key_col, num_items=num_items)
    candidates_file = path.parent / "candidates.parquet"
    if candidates_file.is_file():
        table.candidates = pd.read_parquet(candidates_file)["item_id"].to_numpy()
        table.__post_init__()
    return table


def _window(seq: np.ndarray, end: int, max_history: int) -> np.ndarray:
    return seq[max(0, end - max_history):end]


@dataclass
class _Padded:
    ids: np.ndarray
    lengths: np.ndarray
    timestamps: Optional[np.ndarray]
    rows: np.ndarray  # index into the SequenceTable


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
        validation split never sees a test target."""
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"validation fraction must be in (0, 1), got {fraction!r}")
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
                           t.rows[mask])

        self.validation, self.train = take(chosen), take(~chosen)

    def _build(self, holdout: int) -> _Padded:
        # target = s_{T-holdout+1}; history = window ending before it.  Needs >= 1 history item.
        rows = [r for r, seq in enumerate(self.table.items) if len(seq) - holdout >= 1]
        width = self.max_history + 1
        ids = np.zeros((len(rows), width), dtype=np.int64)
        lengths = np.zeros(len(rows), dtype=np.int64)
        has_ts = self.table.timestamps is not None
        ts = np.zeros((len(rows), width), dtype=np.int64) if has_ts else None
        for out, r in enumerate(rows):
            seq = self.table.items[r]
            t_index = len(seq) - holdout
            hist = _window(seq, t_index, self.max_history)
            n = len(hist)
            ids[out, :n], ids[out, n], lengths[out] = hist, seq[t_index], n
            if has_ts:
                times = self.table.timestamps[r]
                ts[out, :n], ts[out, n] = _window(times, t_index, self.max_history), times[t_index]
        return _Padded(ids, lengths, ts, np.asarray(rows, dtype=np.int64))

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
