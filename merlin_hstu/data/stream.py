"""Parquet read by row groups: the streaming side of training data (issue 15 item 4).

A processed dataset (the `part_N.parquet` files of `merlin-hstu preprocess`) is a list of row groups; streaming
training reads them one at a time (`pyarrow.parquet.ParquetFile.read_row_group`), so what a process holds is one
row group, a shuffle buffer and a batch, never the dataset:

* `row_groups(files)`: every row group with its row count and its first row's index in the dataset (from the
  Parquet footers alone, no data read);
* `shard(groups, rank, world_size)`: the row groups one process of a multi-process run reads (rank r: groups
  r, r + N, r + 2N, ...); the shards are disjoint and together cover the dataset;
* `read_groups(groups, columns)`: the groups' columns, one `pyarrow.Table` per row group;
* `ShuffleBuffer`: samples (dicts of equal-length numpy arrays) in, shuffled batches out, holding at most
  `size` samples plus one incoming chunk. Once every sample of an epoch is in the buffer (size >= the epoch), its
  output is exactly `torch.randperm(n, generator)` batched in order: the in-memory path's shuffle.

Memory bound: peak samples held = shuffle buffer + the largest row group's samples + one batch, whatever the
dataset's size (docs/scaling.md, "Streaming data", measures it).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Sequence

import numpy as np
import torch

FILE_LIST = "_file_list.txt"  # NVTabular's list of the part files it wrote, in order


@dataclass(frozen=True)
class RowGroup:
    path: Path
    index: int  # the row group's index in its file
    num_rows: int
    first_row: int  # index of its first row in the whole dataset (files in order, row groups in order)


def parquet_files(directory: Path) -> List[Path]:
    """The dataset's Parquet files in the order its rows are numbered: NVTabular's `_file_list.txt` order when it
    names the files present, else the part files in natural order (part_2 before part_10)."""
    directory = Path(directory)
    listing = directory / FILE_LIST
    if listing.is_file():
        names = [Path(line.strip()).name for line in listing.read_text().splitlines()[1:] if line.strip()]
        if names and all((directory / name).is_file() for name in names):
            return [directory / name for name in names]
    files = [p for p in directory.glob("*.parquet") if not p.name.startswith((".", "_"))]
    if not files:
        raise FileNotFoundError(f"no Parquet files in {directory}; pass the --output directory of "
                                "`merlin-hstu preprocess` (its processed/ folder holds part_N.parquet)")
    return sorted(files, key=lambda p: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name)])


def row_groups(files: Sequence[Path]) -> List[RowGroup]:
    """Every row group of `files` (footers only; no column data is read)."""
    import pyarrow.parquet as pq

    out, first = [], 0
    for path in files:
        metadata = pq.ParquetFile(path).metadata
        for index in range(metadata.num_row_groups):
            rows = metadata.row_group(index).num_rows
            out.append(RowGroup(Path(path), index, rows, first))
            first += rows
    return out


def shard(groups: Sequence[RowGroup], rank: int, world_size: int) -> List[RowGroup]:
    """The row groups process `rank` of `world_size` reads: groups[rank::world_size] (disjoint, covering)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    if len(groups) < world_size:
        raise ValueError(f"the dataset has {len(groups)} Parquet row group(s), fewer than the {world_size} processes "
                         "that stream it (each process reads its own row groups); rewrite the Parquet with smaller "
                         "row groups (pyarrow.parquet.write_table(..., row_group_size=N)) or use fewer processes")
    return list(groups[rank::world_size])


def read_groups(groups: Iterable[RowGroup], columns: Sequence[str]) -> Iterator:
    """(row group, pyarrow.Table of `columns`) for each group in the given order; one row group in memory at a time
    (the open file is kept while consecutive groups come from it)."""
    import pyarrow.parquet as pq

    handle, opened = None, None
    for group in groups:
        if opened != group.path:
            handle, opened = pq.ParquetFile(group.path), group.path
        yield group, handle.read_row_group(group.index, columns=list(columns))


Samples = Dict[str, np.ndarray]  # equal-length arrays, one row per sample


def _concat(a: Optional[Samples], b: Samples) -> Samples:
    if a is None or len(next(iter(a.values()))) == 0:
        return b
    return {k: np.concatenate([a[k], b[k]]) for k in a}


def _take(samples: Samples, index) -> Samples:
    return {k: v[index] for k, v in samples.items()}


def _size(samples: Optional[Samples]) -> int:
    return 0 if samples is None else len(next(iter(samples.values())))


class ShuffleBuffer:
    """Shuffled batches from a stream of sample chunks, holding at most `size` samples between chunks.

    While the buffer holds more than `size` samples, it emits a batch of `batch_size` samples drawn uniformly at
    random from it (torch.randperm with `generator`); when the stream ends, what is left is shuffled with one
    `torch.randperm(left, generator)` and emitted in order. So an epoch that fits in the buffer gives exactly the
    batches of the in-memory shuffle (`LeaveOneOut.batches(..., shuffle=True)`) with the same generator state."""

    def __init__(self, size: int, batch_size: int, generator: torch.Generator):
        if size < 1 or batch_size < 1:
            raise ValueError(f"shuffle buffer size and batch size must be >= 1, got {size} and {batch_size}")
        self.size, self.batch_size, self.generator = size, batch_size, generator
        self.peak = 0  # most samples held at once (tests check the bound)

    def batches(self, chunks: Iterable[Samples]) -> Iterator[Samples]:
        held: Optional[Samples] = None
        for chunk in chunks:
            held = _concat(held, chunk)
            self.peak = max(self.peak, _size(held))
            while _size(held) > self.size:
                n = _size(held)
                picked = torch.randperm(n, generator=self.generator)[:self.batch_size].numpy()
                keep = np.ones(n, dtype=bool)
                keep[picked] = False
                yield _take(held, picked)
                held = _take(held, keep)
        n = _size(held)
        if n:
            order = torch.randperm(n, generator=self.generator).numpy()
            for start in range(0, n, self.batch_size):
                yield _take(held, order[start:start + self.batch_size])


def in_order(chunks: Iterable[Samples], batch_size: int) -> Iterator[Samples]:
    """Batches of `batch_size` samples in stream order (the last one shorter), whatever the chunk boundaries."""
    held: Optional[Samples] = None
    for chunk in chunks:
        held = _concat(held, chunk)
        n = _size(held)
        full = n - n % batch_size
        for start in range(0, full, batch_size):
            yield _take(held, slice(start, start + batch_size))
        held = _take(held, slice(full, n))
    if _size(held):
        yield held
