"""Load a ranking dataset (the output of `preprocess-ranking`) and cut it into `RankingBatch`es.

    ds = RankingDataset.load("runs/datasets/ml-1m-prefix-ranking-k10-u200")
    for batch in ds.batches("train", batch_size=32, shuffle=True, seed=0):
        logits = model(batch)                       # [Lc, T]

The directory holds processed/ (one row per user, see `merlin_hstu.workflows.ranking_workflow`) and
ranking.json (tasks, K, table sizes, the default split). Everything is read into flat numpy arrays with offsets
once; a batch gathers its rows from them.

Split (recorded in ranking.json, overridable at load): a seeded per-user split as in the reference's 75/25:
the rows (users, ordered by user id) are permuted with `numpy.random.default_rng(seed).permutation`, the first
round(test_fraction * N) permuted rows are "test", the rest "train"; both keep user-id order. The seed of the
split is independent of the training seed, so runs over several training seeds see the same split. Split "all"
is every row. Why per user rather than temporal: it is the reference's protocol, and every test user is ranked
on its own latest events, after a history the model never trained on.

Samples: every user gives one sample, its UIH and its last K events as candidates (the reference). With
`train_windows=w` the TRAINING users give up to w samples (0: as many as fit): sample j >= 1 takes the K UIH
events before sample j-1's candidates as candidates and the UIH events before those (>= min_uih_len) as its
history. All candidates are then still events that come after their history, and test users are untouched.

Labels: `labels_from_bitmask(candidate bitmasks, tasks, candidate watch time)`: binary task t is bit `t.bit`,
a regression task reads the continuous signal. Candidate timestamps are the query time (max of the UIH times).
`user_ids` in a batch are the raw user ids when they are integers, else the row numbers (for GAUC).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, Optional, Sequence, Tuple, Union

import numpy as np
import pandas as pd
import torch

from merlin_hstu.common import schema as roles
from merlin_hstu.ranking.batch import RankingBatch, RankingTask, labels_from_bitmask

PathLike = Union[str, os.PathLike]
SPLITS = ("train", "test", "all")

# The column names of a ranking dataset (written by merlin_hstu.workflows.ranking_workflow, which imports them
# from here so that reading a dataset does not import NVTabular); the UIH lists use merlin_hstu.common.schema's names.
WATCH_TIME_LIST, CANDIDATE_ITEM_LIST = roles.WATCH_TIME_LIST, roles.CANDIDATE_ITEM_LIST
CANDIDATE_ACTION_LIST, CANDIDATE_WATCH_TIME_LIST = roles.CANDIDATE_ACTION_LIST, roles.CANDIDATE_WATCH_TIME_LIST
QUERY_TIME = "query_time"
NUM_CANDIDATES = "num_candidates"
CONTEXT_PREFIX = "context-"  # context-<feature>
META_FILE = "ranking.json"
META_VERSION = 1


def read_meta(path: PathLike) -> dict:
    """ranking.json of a preprocess-ranking directory."""
    import json

    meta_path = Path(path) / META_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"{Path(path)} is not a ranking dataset: {META_FILE} is missing "
                                "(write one with `merlin-hstu preprocess-ranking`)")
    meta = json.loads(meta_path.read_text())
    if meta.get("format_version") != META_VERSION:
        raise ValueError(f"{meta_path}: format_version {meta.get('format_version')!r}, this code reads "
                         f"{META_VERSION}; re-run preprocess-ranking")
    return meta


def processed_files(path: PathLike) -> list:
    """processed/*.parquet of a preprocess-ranking directory, in row order (part_2 before part_10)."""
    parts = sorted((Path(path) / "processed").glob("*.parquet"), key=lambda p: (len(p.name), p.name))
    if not parts:
        raise FileNotFoundError(f"no parquet files under {Path(path) / 'processed'}; re-run preprocess-ranking")
    return parts


def read_processed_frame(path: PathLike) -> pd.DataFrame:
    """processed/*.parquet of a preprocess-ranking directory, one row per user."""
    return pd.concat([pd.read_parquet(p) for p in processed_files(path)], ignore_index=True)


def _flatten(column: pd.Series, dtype) -> Tuple[np.ndarray, np.ndarray]:
    """A list column -> (values, lengths [N])."""
    lengths = np.fromiter((len(v) for v in column), dtype=np.int64, count=len(column))
    values = np.concatenate([np.asarray(v, dtype=dtype) for v in column]) if len(column) else np.zeros(0, dtype)
    return values.astype(dtype, copy=False), lengths


def _interleave_rows(first: np.ndarray, first_len: np.ndarray, second: np.ndarray, second_len: np.ndarray
                     ) -> np.ndarray:
    """Per row, first's values then second's: [a_1.., b_1.., a_2.., b_2.., ...]."""
    out = np.empty(len(first) + len(second), dtype=np.result_type(first, second))
    starts = np.concatenate([[0], np.cumsum(first_len + second_len)[:-1]]).astype(np.int64)
    out[_ranges(starts, starts + first_len)[0]] = first
    out[_ranges(starts + first_len, starts + first_len + second_len)[0]] = second
    return out


def _ranges(starts: np.ndarray, ends: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Concatenated index ranges [starts[i], ends[i]) and their offsets [len+1]."""
    lengths = ends - starts
    offsets = np.zeros(len(starts) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    index = np.repeat(starts - offsets[:-1], lengths) + np.arange(offsets[-1])
    return index, offsets


def resolve_tasks(requested: Optional[Sequence[Union[str, RankingTask]]], available: Sequence[RankingTask],
                  has_watch_time: bool) -> Tuple[RankingTask, ...]:
    """None -> the dataset's tasks; names pick from them; RankingTask objects are taken as they are."""
    if requested is None:
        return tuple(available)
    by_name = {t.name: t for t in available}
    out = []
    for item in requested:
        if isinstance(item, RankingTask):
            task = item
        elif item in by_name:
            task = by_name[item]
        else:
            raise ValueError(f"unknown task {item!r}; this dataset has {sorted(by_name)} "
                             "(or pass a RankingTask(name, kind, bit))")
        if task.kind == "regression" and not has_watch_time:
            raise ValueError(f"regression task {task.name!r} needs a continuous signal; this dataset has none "
                             "(preprocess with a watch_time_column)")
        out.append(task)
    if not out:
        raise ValueError("tasks must name at least one task")
    if len({t.name for t in out}) != len(out):
        raise ValueError(f"task names must be distinct, got {[t.name for t in out]}")
    return tuple(out)


def read_settings(meta: dict, tasks, test_fraction: Optional[float], split_seed: Optional[int],
                  train_windows) -> Tuple[Tuple[RankingTask, ...], dict, int]:
    """(tasks, meta with the split in effect, train_windows) for reading a dataset: `tasks` default to ranking.json's,
    `test_fraction` / `split_seed` to its recorded split (in memory and streamed alike)."""
    chosen = resolve_tasks(tasks, tuple(RankingTask(**t) for t in meta["tasks"]), bool(meta.get("has_watch_time")))
    if isinstance(train_windows, bool) or int(train_windows) < 0:
        raise ValueError(f"train_windows must be an integer >= 0 (0: every window), got {train_windows!r}")
    split = meta.get("split", {})
    fraction = split.get("test_fraction", 0.25) if test_fraction is None else test_fraction
    seed = split.get("seed", 0) if split_seed is None else split_seed
    return chosen, {**meta, "split": {"kind": "users", "test_fraction": fraction, "seed": seed}}, int(train_windows)


def validation_draw(num_train: int, fraction: float, seed: int) -> np.ndarray:
    """[num_train] True for the training users (in user order) that `hold_out_validation` moves to "validation": the
    first round(fraction * n) of numpy default_rng(seed).permutation(n)."""
    count = int(round(num_train * fraction))
    if not 0.0 < fraction < 1.0 or count < 1 or count >= num_train:
        raise ValueError(f"train.validation_fraction={fraction!r} of {num_train} training users leaves an empty "
                         "split; use a fraction in (0, 1) and more users")
    chosen = np.zeros(num_train, dtype=bool)
    chosen[np.random.default_rng(seed).permutation(num_train)[:count]] = True
    return chosen


def user_split(num_rows: int, test_fraction: float, seed: int) -> Dict[str, np.ndarray]:
    """{"train", "test", "all"} -> sorted row indices; see the module docstring."""
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    permuted = np.random.default_rng(seed).permutation(num_rows)
    n_test = int(round(test_fraction * num_rows))
    return {"train": np.sort(permuted[n_test:]), "test": np.sort(permuted[:n_test]),
            "all": np.arange(num_rows, dtype=np.int64)}


@dataclass
class SampleIndex:
    """Samples as index ranges into the dataset's flat event arrays: history = [hist_start, hist_end),
    candidates = [hist_end, cand_end); `row` is the user row."""

    row: np.ndarray
    hist_start: np.ndarray
    hist_end: np.ndarray
    cand_end: np.ndarray

    def __len__(self) -> int:
        return len(self.row)

    def take(self, index: np.ndarray) -> "SampleIndex":
        return SampleIndex(self.row[index], self.hist_start[index], self.hist_end[index], self.cand_end[index])


class DatasetSizes:
    """What a ranking model is built from, read from ranking.json (`meta`); a subclass gives `_largest_action` (the
    highest action bitmask in its data) for datasets whose actions are not named."""

    meta: dict

    @property
    def num_items(self) -> int:
        """Item embedding rows (largest encoded id + 1)."""
        return int(self.meta["num_items"])

    @property
    def contextual_cardinalities(self) -> Dict[str, int]:
        """Embedding rows per contextual feature."""
        return {k: int(v) for k, v in self.meta["contextual_cardinalities"].items()}

    @property
    def num_action_bits(self) -> int:
        """Bits of the action bitmask (the named actions; else the highest bit set in the data + 1)."""
        names = self.meta.get("action_names") or []
        return len(names) if names else max(self._largest_action().bit_length(), 1)

    def _largest_action(self) -> int:
        raise NotImplementedError


@dataclass
class RankingDataset(DatasetSizes):
    """Per-user ranking samples in flat arrays, with a train/test split.

    Events of row r (its UIH, then its candidates) are items[row_offsets[r]:row_offsets[r+1]] (same for
    actions, timestamps, watch_time); the first uih_lengths[r] of them are the UIH.
    """

    path: Optional[Path]
    meta: dict
    tasks: Tuple[RankingTask, ...]
    raw_user_ids: np.ndarray  # [N] raw user ids (row order = user-id order)
    items: np.ndarray  # [E] encoded item ids
    actions: np.ndarray  # [E] action bitmasks
    timestamps: np.ndarray  # [E] unix seconds
    watch_time: Optional[np.ndarray]  # [E] continuous signal, or None
    row_offsets: np.ndarray  # [N+1]
    uih_lengths: np.ndarray  # [N]
    contextual: Dict[str, np.ndarray]  # feature -> [N] encoded ids
    train_windows: int = 1
    splits: Dict[str, np.ndarray] = field(default_factory=dict)  # split -> user rows
    samples: Dict[str, SampleIndex] = field(default_factory=dict)  # split -> samples

    # ---- loading -------------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: PathLike, tasks: Optional[Sequence[Union[str, RankingTask]]] = None,
             test_fraction: Optional[float] = None, split_seed: Optional[int] = None,
             train_windows: int = 1) -> "RankingDataset":
        """Read a preprocess-ranking directory.

        `tasks` (names or RankingTask) default to ranking.json's; `test_fraction` / `split_seed` to its recorded
        split. `train_windows`: samples per TRAINING user: 1 (the reference) is its last K events as candidates;
        w > 1 adds up to w - 1 earlier samples cut from its UIH (candidates = the K events before the previous
        sample's candidates, history = the UIH events before them, at least min_uih_len); 0 adds every such
        sample. Test users always give one sample (their last K events).
        """
        path = Path(path)
        meta = read_meta(path)  # first: a directory without ranking.json is not a ranking dataset
        return cls.from_frame(read_processed_frame(path), meta, tasks=tasks, test_fraction=test_fraction,
                              split_seed=split_seed, train_windows=train_windows, path=path)

    @classmethod
    def from_frame(cls, df: pd.DataFrame, meta: dict, tasks: Optional[Sequence[Union[str, RankingTask]]] = None,
                   test_fraction: Optional[float] = None, split_seed: Optional[int] = None, train_windows: int = 1,
                   path: Optional[PathLike] = None) -> "RankingDataset":
        """The dataset of an in-memory processed frame and its ranking.json dict (see `load`)."""
        chosen, meta, windows = read_settings(meta, tasks, test_fraction, split_seed, train_windows)
        ds = cls._of_frame(df, meta, chosen, windows, path)
        ds.splits = user_split(len(df), meta["split"]["test_fraction"], meta["split"]["seed"])
        ds.samples = {name: ds._sample_index(rows, windows=ds.train_windows if name == "train" else 1)
                      for name, rows in ds.splits.items()}
        return ds

    @classmethod
    def _of_frame(cls, df: pd.DataFrame, meta: dict, tasks: Tuple[RankingTask, ...], train_windows: int,
                  path: Optional[PathLike] = None) -> "RankingDataset":
        """The flat event arrays of a processed frame, without splits (`from_frame` adds them; a stream makes one
        per row group)."""
        has_watch = bool(meta.get("has_watch_time"))

        def events(uih_column: str, candidate_column: str, dtype):
            uih, uih_len = _flatten(df[uih_column], dtype)
            cand, cand_len = _flatten(df[candidate_column], dtype)
            return _interleave_rows(uih, uih_len, cand, cand_len), uih_len, cand_len

        items, uih_len, cand_len = events(roles.ITEM_LIST, CANDIDATE_ITEM_LIST, np.int64)
        actions = events(roles.ACTION_LIST, CANDIDATE_ACTION_LIST, np.int64)[0]
        uih_times, _ = _flatten(df[roles.TIMESTAMP_LIST], np.int64)
        # candidates carry the query time (the workflow stores no candidate event times)
        query = df[QUERY_TIME].to_numpy().astype(np.int64)
        timestamps = _interleave_rows(uih_times, uih_len, np.repeat(query, cand_len), cand_len)
        watch = events(WATCH_TIME_LIST, CANDIDATE_WATCH_TIME_LIST, np.float32)[0] if has_watch else None
        offsets = np.zeros(len(df) + 1, dtype=np.int64)
        np.cumsum(uih_len + cand_len, out=offsets[1:])
        contextual = {f: df[CONTEXT_PREFIX + f].to_numpy().astype(np.int64)
                      for f in meta["contextual_cardinalities"]}
        return cls(path=Path(path) if path is not None else None, meta=meta, tasks=tasks,
                   raw_user_ids=df[meta["user_column"]].to_numpy(), items=items, actions=actions,
                   timestamps=timestamps, watch_time=watch, row_offsets=offsets, uih_lengths=uih_len,
                   contextual=contextual, train_windows=train_windows)

    def hold_out_validation(self, fraction: float, seed: int) -> None:
        """Move a seeded `fraction` of the training users into a "validation" split (one sample each, their last
        K events), for early stopping; the test users are untouched."""
        train = self.splits["train"]
        chosen = validation_draw(len(train), fraction, seed)
        self.splits["validation"], self.splits["train"] = train[chosen], train[~chosen]
        self.samples["validation"] = self._sample_index(self.splits["validation"], windows=1)
        self.samples["train"] = self._sample_index(self.splits["train"], windows=self.train_windows)

    def _sample_index(self, rows: np.ndarray, windows: int) -> SampleIndex:
        """The last-K sample of each row, plus up to windows - 1 earlier ones (0: all) cut from its UIH."""
        start = self.row_offsets[rows]
        uih_end = start + self.uih_lengths[rows]
        out = [(rows, start, uih_end, self.row_offsets[rows + 1])]
        k, min_uih = int(self.meta["num_candidates"]), int(self.meta.get("min_uih_len", 1))
        j = 1
        while windows == 0 or j < windows:
            hist_end = uih_end - j * k
            ok = hist_end - start >= min_uih
            if not ok.any():
                break
            out.append((rows[ok], start[ok], hist_end[ok], hist_end[ok] + k))
            j += 1
        row, hs, he, ce = (np.concatenate(parts) for parts in zip(*out))
        order = np.lexsort((-he, row))  # user order, then the latest sample first
        return SampleIndex(row[order], hs[order], he[order], ce[order])

    # ---- facts about the data -----------------------------------------------------------------------------
    @property
    def num_rows(self) -> int:
        return len(self.raw_user_ids)

    def _largest_action(self) -> int:
        return int(self.actions.max(initial=0))

    @property
    def has_watch_time(self) -> bool:
        return self.watch_time is not None

    def rows(self, split: str) -> np.ndarray:
        """The user rows of a split."""
        if split not in self.splits:
            raise ValueError(f"unknown split {split!r}; use one of {SPLITS}")
        return self.splits[split]

    def sample_index(self, split: str) -> SampleIndex:
        self.rows(split)  # checks the name
        return self.samples[split]

    def num_samples(self, split: str) -> int:
        return len(self.sample_index(split))

    def history_mask(self) -> np.ndarray:
        """[E] True for the UIH events (inputs), False for the candidates (labels) of the stored samples."""
        mask = np.zeros(len(self.items), dtype=bool)
        mask[_ranges(self.row_offsets[:-1], self.row_offsets[:-1] + self.uih_lengths)[0]] = True
        return mask

    def event_labels(self, index: np.ndarray) -> np.ndarray:
        """[len(index), T] labels of the events at `index` (flat positions), in `tasks` order."""
        watch = None if self.watch_time is None else torch.from_numpy(self.watch_time[index])
        return labels_from_bitmask(torch.from_numpy(self.actions[index]), self.tasks, watch).numpy()

    def labels(self, split: str = "all") -> np.ndarray:
        """[candidates of the split's samples, T] labels in `tasks` order."""
        samples = self.sample_index(split)
        return self.event_labels(_ranges(samples.hist_end, samples.cand_end)[0])

    def summary(self) -> str:
        """Users and samples per split, candidates, history lengths, positive rate per binary task."""
        train, test = self.sample_index("train"), self.sample_index("test")
        lines = [
            f"{self.num_rows:,} users: {len(self.rows('train')):,} train ({len(train):,} samples, "
            f"train_windows={self.train_windows}) / {len(self.rows('test')):,} test (split seed "
            f"{self.meta['split']['seed']}); candidates per sample K={self.meta['num_candidates']}: "
            f"{int((train.cand_end - train.hist_end).sum()):,} train / {int((test.cand_end - test.hist_end).sum()):,}"
            f" test; UIH length median {int(np.median(self.uih_lengths))} (max {self.meta['max_uih_len']})",
            f"{self.num_items:,} item rows; contextual "
            + (", ".join(f"{k} ({v})" for k, v in self.contextual_cardinalities.items()) or "none"),
        ]
        for split in ("train", "test"):
            labels = self.labels(split)
            rates = [f"{t.name} {labels[:, i].mean():.3f}" for i, t in enumerate(self.tasks) if t.kind == "binary"]
            if rates:
                lines.append(f"positive rate ({split} candidates): " + ", ".join(rates))
        return "\n".join(lines)

    # ---- batches -------------------------------------------------------------------------------------
    def batch(self, samples: SampleIndex) -> RankingBatch:
        """The RankingBatch of the given samples (in that order)."""
        if len(samples) == 0:
            raise ValueError("a batch needs at least one sample")
        return RankingSamples.gather(self, samples).to_batch(self.tasks)

    def num_batches(self, split: str, batch_size: int) -> int:
        return -(-self.num_samples(split) // batch_size)

    def batches(self, split: str, batch_size: int, shuffle: bool = False, seed: int = 0) -> Iterator[RankingBatch]:
        """Batches of `batch_size` samples of `split` (the last one smaller), in user order; `shuffle` permutes
        the samples with numpy default_rng(seed) first (pass a different seed per epoch for a new order)."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        samples = self.sample_index(split)
        order = np.random.default_rng(seed).permutation(len(samples)) if shuffle else np.arange(len(samples))
        for start in range(0, len(order), batch_size):
            yield self.batch(samples.take(order[start:start + batch_size]))


# ---------------------------------------------------------------------------------------------------------------
# samples with their events (what a batch is built from, and what a streamed epoch shuffles)
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class RankingSamples:
    """Samples with their events copied out of a dataset: ragged flat arrays, history and candidates apart.

    Sample i's history events are hist_*[hist_offsets[i]:hist_offsets[i+1]] and its candidates
    cand_*[cand_offsets[i]:cand_offsets[i+1]]. `take`, `concat` and `len` make it a sample container of
    `merlin_hstu.data.stream.ShuffleBuffer`; `to_batch` is the RankingBatch (every batch, in memory or streamed, is
    built here)."""

    hist_items: np.ndarray
    hist_actions: np.ndarray
    hist_times: np.ndarray
    hist_watch: Optional[np.ndarray]
    hist_offsets: np.ndarray  # [n + 1]
    cand_items: np.ndarray
    cand_actions: np.ndarray
    cand_watch: Optional[np.ndarray]
    cand_offsets: np.ndarray  # [n + 1]
    contextual: Dict[str, np.ndarray]  # feature -> [n]
    user_ids: np.ndarray  # [n] int64: the raw user id when ids are integers, else the user's row in the dataset

    @classmethod
    def gather(cls, ds: "RankingDataset", samples: SampleIndex, first_row: int = 0) -> "RankingSamples":
        """The samples of `ds` (its rows numbered from `first_row` in the whole dataset: a streamed row group)."""
        hist, hist_offsets = _ranges(samples.hist_start, samples.hist_end)
        cand, cand_offsets = _ranges(samples.hist_end, samples.cand_end)
        raw = ds.raw_user_ids[samples.row]
        users = raw.astype(np.int64) if np.issubdtype(raw.dtype, np.integer) else samples.row + first_row
        watch = ds.watch_time
        return cls(ds.items[hist], ds.actions[hist], ds.timestamps[hist], None if watch is None else watch[hist],
                   hist_offsets, ds.items[cand], ds.actions[cand], None if watch is None else watch[cand],
                   cand_offsets, {f: v[samples.row] for f, v in ds.contextual.items()},
                   np.array(users, dtype=np.int64, copy=True))

    def __len__(self) -> int:
        return len(self.user_ids)

    def take(self, index: np.ndarray) -> "RankingSamples":
        index = np.asarray(index, dtype=np.int64)
        hist, hist_offsets = _ranges(self.hist_offsets[index], self.hist_offsets[index + 1])
        cand, cand_offsets = _ranges(self.cand_offsets[index], self.cand_offsets[index + 1])
        pick = lambda a, at: None if a is None else a[at]  # noqa: E731
        return RankingSamples(self.hist_items[hist], self.hist_actions[hist], self.hist_times[hist],
                              pick(self.hist_watch, hist), hist_offsets, self.cand_items[cand], self.cand_actions[cand],
                              pick(self.cand_watch, cand), cand_offsets,
                              {f: v[index] for f, v in self.contextual.items()}, self.user_ids[index])

    def concat(self, other: "RankingSamples") -> "RankingSamples":
        join = lambda a, b: None if a is None else np.concatenate([a, b])  # noqa: E731
        offsets = lambda a, b: np.concatenate([a, b[1:] + a[-1]])  # noqa: E731
        return RankingSamples(join(self.hist_items, other.hist_items), join(self.hist_actions, other.hist_actions),
                              join(self.hist_times, other.hist_times), join(self.hist_watch, other.hist_watch),
                              offsets(self.hist_offsets, other.hist_offsets),
                              join(self.cand_items, other.cand_items), join(self.cand_actions, other.cand_actions),
                              join(self.cand_watch, other.cand_watch), offsets(self.cand_offsets, other.cand_offsets),
                              {f: np.concatenate([v, other.contextual[f]]) for f, v in self.contextual.items()},
                              np.concatenate([self.user_ids, other.user_ids]))

    def to_batch(self, tasks: Sequence[RankingTask]) -> RankingBatch:
        """The RankingBatch of these samples, in order: candidates carry the query time (the latest history time),
        labels come from the candidates' action bitmasks (and watch time) by task."""
        if len(self) == 0:
            raise ValueError("a batch needs at least one sample")
        query_time = np.maximum.reduceat(self.hist_times, self.hist_offsets[:-1])  # histories are non-empty
        watch = None if self.cand_watch is None else torch.from_numpy(self.cand_watch)
        return RankingBatch(
            history_item_ids=torch.from_numpy(self.hist_items),
            history_actions=torch.from_numpy(self.hist_actions),
            history_timestamps=torch.from_numpy(self.hist_times),
            history_offsets=torch.from_numpy(self.hist_offsets),
            candidate_item_ids=torch.from_numpy(self.cand_items),
            candidate_timestamps=torch.from_numpy(np.repeat(query_time, np.diff(self.cand_offsets))),
            candidate_offsets=torch.from_numpy(self.cand_offsets),
            labels=torch.from_numpy(labels_from_bitmask(torch.from_numpy(self.cand_actions), tuple(tasks),
                                                        watch).numpy()),
            tasks=tuple(tasks),
            contextual={f: torch.from_numpy(v) for f, v in self.contextual.items()},
            user_ids=torch.from_numpy(self.user_ids),
            history_watch_time=None if self.hist_watch is None else torch.from_numpy(self.hist_watch),
        )


# ---------------------------------------------------------------------------------------------------------------
# streaming (train.streaming): a preprocess-ranking directory read row group by row group
# ---------------------------------------------------------------------------------------------------------------
_SPLIT_CODES = {"train": 0, "test": 1, "validation": 2}


class StreamingRankingDataset(DatasetSizes):
    """A preprocess-ranking directory read row group by row group (`merlin_hstu.data.stream`), with the
    `RankingDataset` interface the training loop uses (`batches`, `num_batches`, `hold_out_validation`, the sizes
    a model is built from).

    The user split is the in-memory one (`user_split` over the row count from the Parquet footers; validation
    users drawn as `RankingDataset.hold_out_validation` draws them), kept as one byte per user. Each row group
    becomes a small `RankingDataset` whose samples (`RankingSamples`) go through a shuffle buffer of
    `shuffle_buffer` samples; so with a buffer of at least the epoch's samples every batch equals the in-memory
    path's (numpy default_rng(seed).permutation of the samples in user order). The train split (`train_split`) is
    read from this process's row groups (rank r of N: r::N); every other split from all of them, so every process
    evaluates the whole split. Memory: the buffer, one row group, a batch and one byte per user (five with
    train_windows != 1: the windows per user, counted once from the list lengths)."""

    streaming = True

    def __init__(self, path: PathLike, tasks: Optional[Sequence[Union[str, RankingTask]]] = None,
                 test_fraction: Optional[float] = None, split_seed: Optional[int] = None, train_windows: int = 1,
                 shuffle_buffer: int = 10000, rank: int = 0, world_size: int = 1, train_split: str = "train"):
        import pyarrow.parquet as pq

        from merlin_hstu.data.stream import row_groups, shard

        self.path = Path(path)
        meta = read_meta(self.path)
        files = processed_files(self.path)
        if shuffle_buffer < 1:
            raise ValueError(f"train.shuffle_buffer must be >= 1 sample, got {shuffle_buffer}")
        self.tasks, self.meta, self.train_windows = read_settings(meta, tasks, test_fraction, split_seed,
                                                                  train_windows)
        split = self.meta["split"]
        self.shuffle_buffer = shuffle_buffer
        self.rank, self.world_size, self.train_split = rank, world_size, train_split
        self.groups = row_groups(files)
        self._columns = pq.read_schema(files[0]).names
        self.own_groups = shard(self.groups, rank, world_size)
        self.num_rows = sum(g.num_rows for g in self.groups)
        if self.num_rows == 0:
            raise ValueError(f"{self.path}/processed holds no rows; check the input data")
        self._code = np.full(self.num_rows, _SPLIT_CODES["train"], dtype=np.uint8)
        self._code[user_split(self.num_rows, split["test_fraction"], split["seed"])["test"]] = _SPLIT_CODES["test"]
        self._has_validation = False
        self._extra: Optional[np.ndarray] = None  # per row: training windows beyond the last-K sample
        self._max_action = 0
        self._scan()

    # --- facts about the data (what a model is built from: DatasetSizes) ----------------------------------
    def _largest_action(self) -> int:
        return self._max_action

    @property
    def has_watch_time(self) -> bool:
        return bool(self.meta.get("has_watch_time"))

    def _scan(self) -> None:
        """One pass over the list lengths (train_windows != 1) and, without named actions, the action values:
        samples per row and the largest action bitmask. No event is kept; nothing is read when neither is needed."""
        from merlin_hstu.data.stream import read_groups

        columns = [roles.ITEM_LIST] if self.train_windows != 1 else []
        if not self.meta.get("action_names"):
            columns += [roles.ACTION_LIST, CANDIDATE_ACTION_LIST]
        if not columns:
            return
        k, min_uih = int(self.meta["num_candidates"]), int(self.meta.get("min_uih_len", 1))
        extra = []
        for _, frame in read_groups(self.groups, columns):
            for name in columns:
                if name == roles.ITEM_LIST:
                    continue
                values = frame.column(name).combine_chunks().values.to_numpy(zero_copy_only=False)
                self._max_action = max(self._max_action, int(values.max(initial=0)))
            if self.train_windows == 1:
                continue
            uih = np.diff(frame.column(roles.ITEM_LIST).combine_chunks().offsets.to_numpy()) if frame.num_rows \
                else np.zeros(0, np.int64)
            more = np.maximum((uih - min_uih) // k, 0)
            extra.append(more if self.train_windows == 0 else np.minimum(more, self.train_windows - 1))
        if extra:
            self._extra = np.concatenate(extra).astype(np.int32)

    # --- splits -------------------------------------------------------------------------------------------
    def _rows(self, split: str, first: int, n: int) -> np.ndarray:
        """The rows (numbered in the row group) of `split` among the row group's n rows starting at `first`."""
        if split == "all":
            return np.arange(n, dtype=np.int64)
        if split not in _SPLIT_CODES or (split == "validation" and not self._has_validation):
            raise ValueError(f"unknown split {split!r}; use one of {SPLITS}" + (" (validation: after "
                             "hold_out_validation)" if split == "validation" else ""))
        return np.flatnonzero(self._code[first:first + n] == _SPLIT_CODES[split])

    def _groups(self, split: str):
        return self.own_groups if split == self.train_split else self.groups

    def num_samples(self, split: str) -> int:
        """Samples of `split` in the row groups this process reads for it."""
        windows = split == "train" and self._extra is not None
        total = 0
        for g in self._groups(split):
            rows = self._rows(split, g.first_row, g.num_rows) + g.first_row
            total += len(rows) + (int(self._extra[rows].sum()) if windows else 0)
        return total

    def num_batches(self, split: str, batch_size: int) -> int:
        return -(-self.num_samples(split) // batch_size)

    def hold_out_validation(self, fraction: float, seed: int) -> None:
        """`RankingDataset.hold_out_validation`: the same seeded draw of training users (the same users)."""
        train = np.flatnonzero(self._code == _SPLIT_CODES["train"])
        self._code[train[validation_draw(len(train), fraction, seed)]] = _SPLIT_CODES["validation"]
        self._has_validation = True

    def summary(self) -> str:
        counts = {s: int((self._code == c).sum()) for s, c in _SPLIT_CODES.items()}
        held = f" / {counts['validation']:,} validation" if self._has_validation else ""
        return (f"{self.num_rows:,} users streamed from {len(self.groups)} row group(s): {counts['train']:,} train / "
                f"{counts['test']:,} test{held} (split seed {self.meta['split']['seed']}); candidates per sample "
                f"K={self.meta['num_candidates']}, train_windows={self.train_windows}; {self.num_items:,} item rows")

    # --- samples and batches ------------------------------------------------------------------------------
    def samples(self, split: str, groups=None) -> Iterator[RankingSamples]:
        """The split's samples, one RankingSamples per row group (user order, the latest window first)."""
        from merlin_hstu.data.stream import read_groups

        for group, frame in read_groups(self._groups(split) if groups is None else groups, self._columns):
            rows = self._rows(split, group.first_row, group.num_rows)
            if not len(rows):
                continue
            chunk = RankingDataset._of_frame(frame.to_pandas(), self.meta, self.tasks, self.train_windows)
            index = chunk._sample_index(rows, windows=self.train_windows if split == "train" else 1)
            yield RankingSamples.gather(chunk, index, first_row=group.first_row)

    def batches(self, split: str, batch_size: int, shuffle: bool = False, seed: int = 0,
                generator: Optional[np.random.Generator] = None) -> Iterator[RankingBatch]:
        """`RankingDataset.batches`: in user order, or shuffled with numpy default_rng(seed) (or `generator`)
        through the buffer."""
        from merlin_hstu.data.stream import epoch_batches

        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        rng = (generator or np.random.default_rng(seed)) if shuffle else None
        read = lambda groups: self.samples(split, groups)  # noqa: E731
        for samples in epoch_batches(read, self._groups(split), self.num_samples(split), batch_size,
                                     self.shuffle_buffer, rng):
            yield samples.to_batch(self.tasks)

    # --- several processes --------------------------------------------------------------------------------
    def rank_steps(self, batch_size: int) -> int:
        from merlin_hstu.data.stream import rank_steps

        return rank_steps(self.num_samples(self.train_split), batch_size, self.world_size)

    def rank_batches(self, batch_size: int, seed: int) -> Iterator[RankingBatch]:
        """This rank's batches of an epoch: its share of the global batch from its own row groups, shuffled by one
        numpy generator (seed), exactly `rank_steps` of them (the stream restarted when it ends early)."""
        from merlin_hstu.data.stream import batch_share, repeat_for

        share, rng = batch_share(batch_size, self.rank, self.world_size), np.random.default_rng(seed)
        return repeat_for(lambda: self.batches(self.train_split, share, shuffle=True, generator=rng),
                          self.rank_steps(batch_size))
