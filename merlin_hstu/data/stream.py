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
  output is exactly `permutation(n, generator)` batched in order: the in-memory path's shuffle;
* `epoch_batches(...)`: one epoch of a split's batches, shuffled through a buffer (row groups in a seeded random
  order when the epoch does not fit in it) or in file order;
* `key_fraction(keys, seed)`: a seeded uniform number per key (which rows or users a validation split holds,
  decided row by row without seeing the others);
* several processes: `batch_share` (rank r's part of a global batch), `rank_steps` (the steps of an epoch on every
  rank: the most any rank needs for its own samples) and `repeat_for` (a rank with fewer samples starts its
  stream again, as torch's DistributedSampler pads).

The retrieval stream (`retrieval.data.StreamingLeaveOneOut`) and the CTR stream (`ctr.data.CTRStream`) are built
on these.

Memory bound: peak samples held = shuffle buffer + the largest row group's samples + one batch, whatever the
dataset's size (docs/scaling.md, "Streaming data", measures it).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Union

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


Samples = Dict[str, np.ndarray]  # equal-length arrays, one row per sample (or an object with __len__, take, concat)


def _concat(a, b):
    if a is None or _size(a) == 0:
        return b
    if not isinstance(a, dict):
        return a.concat(b)
    return {k: np.concatenate([a[k], b[k]]) for k in a}


def _take(samples, index):
    if not isinstance(samples, dict):
        return samples.take(np.arange(_size(samples))[index])
    return {k: v[index] for k, v in samples.items()}


def _size(samples) -> int:
    if samples is None:
        return 0
    return len(next(iter(samples.values()))) if isinstance(samples, dict) else len(samples)


Generator = Union[torch.Generator, np.random.Generator]


def permutation(n: int, generator: Generator) -> np.ndarray:
    """A random permutation of range(n): `torch.randperm(n, generator)` or a numpy Generator's `permutation(n)`
    (the ranking task shuffles with numpy, retrieval and CTR with torch; the stream draws as its task does)."""
    if isinstance(generator, np.random.Generator):
        return generator.permutation(n)
    return torch.randperm(n, generator=generator).numpy()


class ShuffleBuffer:
    """Shuffled batches from a stream of sample chunks, holding at most `size` samples between chunks.

    While the buffer holds more than `size` samples, it emits a batch of `batch_size` samples drawn uniformly at
    random from it (`permutation` with `generator`: torch.randperm, or numpy's for a numpy Generator); when the
    stream ends, what is left is shuffled with one `permutation(left, generator)` and emitted in order. So an epoch
    that fits in the buffer gives exactly the batches of the in-memory shuffle (`LeaveOneOut.batches(...,
    shuffle=True)`) with the same generator state. Samples are dicts of equal-length arrays, or objects with
    `__len__`, `take(index)` and `concat(other)` (ranking's ragged `RankingSamples`)."""

    def __init__(self, size: int, batch_size: int, generator: Generator):
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
                picked = permutation(n, self.generator)[:self.batch_size]
                keep = np.ones(n, dtype=bool)
                keep[picked] = False
                yield _take(held, picked)
                held = _take(held, keep)
        n = _size(held)
        if n:
            order = permutation(n, self.generator)
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


def epoch_groups(groups: Sequence[RowGroup], count: int, shuffle_buffer: int,
                 generator: Optional[Generator]) -> List[RowGroup]:
    """The order an epoch reads its row groups in: file order when the epoch's `count` samples fit in the buffer
    (then the shuffle is the in-memory one) or when there is no generator, else a seeded random order (a buffer
    alone would mix only neighbouring row groups)."""
    if generator is None or count <= shuffle_buffer:
        return list(groups)
    return [groups[i] for i in permutation(len(groups), generator).tolist()]


def epoch_batches(read: Callable[[Sequence[RowGroup]], Iterable[Samples]], groups: Sequence[RowGroup], count: int,
                  batch_size: int, shuffle_buffer: int = 0,
                  generator: Optional[Generator] = None) -> Iterator[Samples]:
    """One epoch of a split's batches. `read(groups)` gives the split's samples row group by row group (`count` of
    them in all); with a `generator` they go through a `ShuffleBuffer` of `shuffle_buffer` samples, row groups in
    `epoch_groups` order, else they come in file order (`in_order`)."""
    if generator is None:
        return in_order(read(groups), batch_size)
    order = epoch_groups(groups, count, shuffle_buffer, generator)
    return ShuffleBuffer(shuffle_buffer, batch_size, generator).batches(read(order))


def key_fraction(keys: np.ndarray, seed: int) -> np.ndarray:
    """A seeded uniform number in [0, 1) per key (splitmix64 of integer keys, blake2b of other keys): which users
    or rows a streaming validation split holds, decided key by key without seeing the others."""
    keys = np.asarray(keys)
    if np.issubdtype(keys.dtype, np.integer):
        with np.errstate(over="ignore"):
            z = keys.astype(np.uint64) + np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)
            z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
            z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
            z = z ^ (z >> np.uint64(31))
        return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)
    import hashlib

    return np.array([int.from_bytes(hashlib.blake2b(f"{seed}:{k}".encode(), digest_size=8).digest(), "little")
                     / 2.0 ** 64 for k in keys])


# --- several processes ----------------------------------------------------------------------------------------
def batch_share(batch_size: int, rank: int, world_size: int) -> int:
    """How many samples of a global batch of `batch_size` rank `rank` trains on (`distributed.context.rank_slice`)."""
    from merlin_hstu.distributed.context import rank_slice

    part = rank_slice(batch_size, rank, world_size)
    if part.stop - part.start < 1:
        raise ValueError(f"train.batch_size={batch_size} leaves rank {rank} of {world_size} no samples; use a larger "
                         "batch size")
    return part.stop - part.start


def rank_steps(count: int, batch_size: int, world_size: int, what: str = "train") -> int:
    """Steps of an epoch on every rank when each streams its own `count` samples in batches of its share of the
    global batch: the most any rank needs (the counts are all-gathered; one process: its own)."""
    from merlin_hstu.distributed.context import current

    ctx = current()
    counts = ctx.all_gather_object(count) if ctx is not None and world_size > 1 else [count]
    if min(counts) < 1:
        raise ValueError(f"rank {counts.index(min(counts))} has no {what} samples in its row groups; rewrite the "
                         "Parquet with smaller row groups or use fewer processes")
    return max(-(-c // batch_share(batch_size, r, len(counts))) for r, c in enumerate(counts))


def repeat_for(epoch: Callable[[], Iterable], steps: int) -> Iterator:
    """Exactly `steps` batches: `epoch()`'s, then a new `epoch()` (its generator going on) while more are needed."""
    done = 0
    while done < steps:
        empty = True
        for batch in epoch():
            empty = False
            yield batch
            done += 1
            if done == steps:
                return
        if empty:
            raise ValueError("a stream with no samples cannot fill an epoch's steps")
