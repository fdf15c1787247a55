"""NVTabular on one process or on a Dask `distributed` cluster, with the same rows either way.

Every workflow of the package fits and transforms through `fit_transform`.  Without a cluster it hands NVTabular one
in-memory partition, as before.  Inside `dask_cluster(...)` (a LocalCluster of worker processes started here, or an
existing scheduler joined by address) it splits the frame into `partitions` partitions cut at group-key
boundaries, so that every user's rows sit in one partition in their input order (NVTabular's Groupby works per
partition: otherwise a user's lists would come out split), fits on the workers (Categorify statistics are global) and
transforms there.  The result is sorted by the key, so it does not depend on how rows were partitioned: the
single-process and the cluster outputs are the same rows in the same order (tests/test_dask_workflows.py).

merlin-integration.md §7: NVTabular 23.08 and dask/distributed 2023.7.1 run this on CPU worker processes; a
script that starts a LocalCluster must guard its entry point with `if __name__ == "__main__":`.
"""
from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import pandas as pd


@dataclass
class ClusterInfo:
    address: str
    workers: int
    started_here: bool


_ACTIVE: Optional[ClusterInfo] = None


def active_cluster() -> Optional[ClusterInfo]:
    """The cluster `fit_transform` runs on, or None (one process)."""
    return _ACTIVE


@contextlib.contextmanager
def dask_cluster(workers: int = 0, scheduler: Optional[str] = None, threads_per_worker: int = 1,
                 memory_limit: str = "auto") -> Iterator[Optional[ClusterInfo]]:
    """Run the workflows inside on Dask: `scheduler` joins an existing cluster (tcp://host:port); else `workers`
    > 0 starts a LocalCluster of that many worker processes on 127.0.0.1, closed on exit; workers == 0 and no
    scheduler is the single-process path (yields None)."""
    global _ACTIVE
    if scheduler is None and workers <= 0:
        yield None
        return
    if workers < 0:
        raise ValueError(f"--workers must be >= 0, got {workers}")
    from distributed import Client, LocalCluster
    from merlin.core.utils import set_dask_client

    cluster = None
    if scheduler is not None:
        try:
            client = Client(scheduler, timeout="20s")
        except OSError as exc:
            raise ValueError(f"--scheduler {scheduler}: no Dask scheduler answers there ({exc}); start one with "
                             "`dask scheduler` (and `dask worker ADDRESS`) or use --workers N for a local "
                             "cluster") from exc
    else:
        cluster = LocalCluster(n_workers=workers, threads_per_worker=threads_per_worker, processes=True,
                               dashboard_address=None, host="127.0.0.1", memory_limit=memory_limit)
        client = Client(cluster)
    from merlin.core.utils import _merlin_dask_client

    previous, previous_client = _ACTIVE, _merlin_dask_client.get()
    try:
        set_dask_client(client)
        _ACTIVE = ClusterInfo(client.scheduler.address, len(client.scheduler_info()["workers"]), cluster is not None)
        yield _ACTIVE
    finally:
        _ACTIVE = previous
        _merlin_dask_client.set(previous_client)  # a nested cluster hands the outer one back
        client.close()
        if cluster is not None:
            cluster.close()


def dataset_of(frame: pd.DataFrame, keys: Sequence[str] = (), partitions: Optional[int] = None):
    """A merlin Dataset of `frame`: one partition without a cluster; on a cluster `partitions` (default 2 per
    worker).  With `keys`, the rows are stably sorted by them and cut only at key boundaries, so each key's rows sit
    in one partition in their original relative order: ties a stable time sort resolves by input order come out as
    in the single-process run (a hash shuffle, `Dataset.shuffle_by_keys`, would reorder them)."""
    from merlin.io import Dataset

    info = active_cluster()
    if info is None:
        return Dataset(frame, cpu=True, npartitions=1)
    import dask
    import dask.dataframe as dd
    import numpy as np

    nparts = max(1, min(partitions or 2 * info.workers, len(frame)))
    ordered = frame.sort_values(list(keys), kind="stable") if keys else frame
    ordered = ordered.reset_index(drop=True)
    bounds = [i * len(ordered) // nparts for i in range(nparts + 1)]
    if keys:  # move every cut to the first row of the key it falls in
        key = ordered[list(keys)]
        starts = np.flatnonzero((key != key.shift()).any(axis=1).to_numpy())  # first row of every key
        cuts = {int(starts[np.searchsorted(starts, b, side="right") - 1]) for b in bounds[1:-1]}
        bounds = sorted({0, len(ordered), *cuts})
    # Each partition gets a 0-based index: NVTabular 23.08's CPU Categorify indexes its null positions by label
    # and fails ("index out of bounds") on partitions whose index does not start at 0.
    pieces = [dask.delayed(ordered.iloc[a:b].reset_index(drop=True)) for a, b in zip(bounds[:-1], bounds[1:])
              if b > a]
    return Dataset(dd.from_delayed(pieces, meta=ordered.iloc[:0]), cpu=True)


def fit_transform(workflow, frame: pd.DataFrame, keys: Sequence[str] = (), fit: bool = True,
                  partitions: Optional[int] = None) -> pd.DataFrame:
    """`workflow.fit` (if `fit`) and `workflow.transform` of `frame` -> the transformed rows as pandas.  On a
    cluster the rows are sorted by `keys` (the output's group key columns; keys absent from the output are
    ignored), the order the single-process Groupby gives; without keys partitions come back in order."""
    dataset = dataset_of(frame, keys, partitions)
    if fit:
        fit_workflow(workflow, dataset)
    result = workflow.transform(dataset).to_ddf().compute()
    present = [k for k in keys if k in result.columns]
    if active_cluster() is not None and present:
        result = result.sort_values(present, kind="stable")
    return result.reset_index(drop=True)


def fit_workflow(workflow, dataset) -> None:
    """`workflow.fit(dataset)`, then every Categorify vocabulary put in its canonical order (`canonical_categories`),
    so the ids a fit assigns depend on the data alone, not on the CPU it ran on."""
    workflow.fit(dataset)
    canonical_categories(workflow)


def canonical_categories(workflow) -> int:
    """Order each fitted Categorify vocabulary by count, descending, and equal counts by value, ascending; returns
    how many vocabulary files were rewritten.

    NVTabular 23.08 sorts a vocabulary by value and then by count with pandas' default (unstable) quicksort, so
    the order of values with equal counts, hence their ids, is up to numpy's sort kernel (numpy 1.26 dispatches
    it to an AVX-512 kernel where the CPU has one).  Measured: the machine that recorded tests/fixtures and an
    AVX2-only one gave the same log different item ids, so different seeded training.  The labels
    (the files' index: 3, 4, ... after padding, null and OOV) stay where they are; only which value holds each
    one changes, and only among values of equal count.  Dask workers read vocabularies during the fit and keep them
    in a cache keyed by path: after a rewrite the caches are cleared, here and on every worker."""
    from merlin.core.utils import global_dask_client
    from merlin.dag import postorder_iter_nodes
    from merlin.io.worker import clean_worker_cache
    from nvtabular import ops

    rewritten = 0
    for node in postorder_iter_nodes(workflow.output_node):
        if isinstance(node.op, ops.Categorify):
            for path in dict.fromkeys(str(p) for p in node.op.categories.values()):
                rewritten += _canonical_vocabulary(path)
    if rewritten:
        client = global_dask_client()
        if client is not None:
            client.run(_forget_vocabularies)
        clean_worker_cache()
    return rewritten


def _forget_vocabularies(dask_worker) -> None:
    """Drop a worker's cached tables (merlin.io.worker keeps them on `worker.worker_cache`).  Not merlin's
    `clean_worker_cache`: inside `Client.run` its `get_worker()` finds no worker, so it clears the process-global
    cache and leaves the worker's in place."""
    if hasattr(dask_worker, "worker_cache"):
        dask_worker.worker_cache = {}


def _canonical_vocabulary(path: str) -> int:
    root = Path(path)
    if root.is_dir():  # one vocabulary written in parts (part.0.parquet, part.1.parquet, ...), labels running on
        files = sorted(root.glob("part.*.parquet"), key=lambda f: int(re.findall(r"\d+", f.name)[-1]))
    elif root.is_file():
        files = [root]
    else:
        return 0
    parts = [pd.read_parquet(f) for f in files]
    frame = pd.concat(parts) if len(parts) > 1 else parts[0]
    sizes = [c for c in frame.columns if c.endswith("_size")]
    values = [c for c in frame.columns if c not in sizes]
    if len(frame) < 2 or len(sizes) != 1:  # no counts recorded (e.g. a vocabulary fitted without them): keep it
        return 0
    ordered = frame.sort_values([sizes[0], *values], ascending=[False] + [True] * len(values), kind="stable",
                                na_position="first")
    if ordered.index.equals(frame.index):
        return 0
    start, changed = 0, 0
    for file, part in zip(files, parts):
        piece = ordered.iloc[start:start + len(part)]
        start += len(part)
        piece = piece.set_axis(part.index, axis=0)  # the same labels, in the same place
        if piece.equals(part):
            continue
        staged = file.with_name(f".{file.name}.tmp")
        piece.to_parquet(staged, compression=None)
        os.replace(staged, file)
        changed += 1
    return changed


def default_workers() -> int:
    """A sensible --workers for this machine: one per core, at least 1."""
    return max(1, os.cpu_count() or 1)
