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
from dataclasses import dataclass
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
        workflow.fit(dataset)
    result = workflow.transform(dataset).to_ddf().compute()
    present = [k for k in keys if k in result.columns]
    if active_cluster() is not None and present:
        result = result.sort_values(present, kind="stable")
    return result.reset_index(drop=True)


def default_workers() -> int:
    """A sensible --workers for this machine: one per core, at least 1."""
    return max(1, os.cpu_count() or 1)
