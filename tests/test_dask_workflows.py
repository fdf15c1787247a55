"""NVTabular workflows on a real Dask `distributed` LocalCluster (two worker processes on 127.0.0.1, several
partitions shuffled by user) give the same rows as the single-process run (workflows/cluster.py)."""
from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
import pytest

from merlin_hstu.workflows.cluster import active_cluster, dask_cluster


@pytest.fixture(scope="module")
def cluster():
    with dask_cluster(workers=2) as info:
        yield info


def read_processed(path: Path) -> pd.DataFrame:
    return pd.concat([pd.read_parquet(p) for p in sorted(path.glob("*.parquet"))], ignore_index=True)


def test_ranking_workflow_on_the_cluster_equals_one_process(cluster, tmp_path):
    sys.path.insert(0, str(Path(__file__).parent))
    from test_ranking_export import CONFIG, event_log

    from merlin_hstu.workflows import ranking_workflow as rw

    log = event_log(num_users=120, seed=3)  # shuffled rows: one user's events spread over every partition
    with dask_cluster(workers=0):  # nested "no cluster" does not disturb the active one
        pass
    assert active_cluster() is cluster and cluster.workers == 2 and cluster.started_here
    on_cluster = rw.preprocess_ranking(log, tmp_path / "cluster", CONFIG)
    import merlin_hstu.workflows.cluster as c

    saved, c._ACTIVE = c._ACTIVE, None  # the single-process path, in the same test
    try:
        single = rw.preprocess_ranking(log, tmp_path / "single", CONFIG)
    finally:
        c._ACTIVE = saved
    a = read_processed(on_cluster.output_dir / "processed")
    b = read_processed(single.output_dir / "processed")
    assert len(a) == len(b) > 50
    pd.testing.assert_frame_equal(a, b)


def test_criteo_workflow_on_the_cluster_equals_one_process(cluster, tmp_path):
    from merlin_hstu.ctr.data import SyntheticCriteoConfig, generate_synthetic_criteo, write_criteo_tsv
    from merlin_hstu.workflows.criteo_workflow import CriteoWorkflowConfig, preprocess_criteo

    frame = generate_synthetic_criteo(SyntheticCriteoConfig(num_rows=900, seed=4, max_cardinality=60)).frame
    src = write_criteo_tsv(frame, tmp_path / "day_0.tsv")
    config = CriteoWorkflowConfig(freq_threshold=2, valid_fraction=0.25)
    on_cluster = preprocess_criteo(src, tmp_path / "cluster", config)
    import merlin_hstu.workflows.cluster as c

    saved, c._ACTIVE = c._ACTIVE, None
    try:
        single = preprocess_criteo(src, tmp_path / "single", config)
    finally:
        c._ACTIVE = saved
    for split in ("train", "valid"):
        a = read_processed(on_cluster.path / "processed" / split)
        b = read_processed(single.path / "processed" / split)
        floats = [c for c in a.columns if a[c].dtype.kind == "f"]
        assert floats and len(a) == len(b) > 100
        # integer ids exactly; Normalize's mean/std are sums over partitions in another order: equal to float32
        # rounding, not bit for bit
        pd.testing.assert_frame_equal(a.drop(columns=floats), b.drop(columns=floats))
        pd.testing.assert_frame_equal(a[floats], b[floats], check_exact=False, rtol=1e-5, atol=1e-6)


def test_scheduler_address_that_does_not_answer_is_a_clear_error():
    with pytest.raises(ValueError, match="no Dask scheduler answers there"):
        with dask_cluster(scheduler="tcp://127.0.0.1:9"):
            pass


def test_cli_preprocess_with_workers_equals_one_process(cluster, tmp_path, capsys):
    """`merlin-hstu preprocess --workers 2` (its own local cluster, nested in the module's) == no --workers."""
    from merlin_hstu.cli.main import main
    from merlin_hstu.data.synthetic import SyntheticConfig, generate_event_log

    events = generate_event_log(SyntheticConfig(num_users=150, num_items=90, min_events=3, max_events=30, seed=6))
    events = events.sample(frac=1.0, random_state=0)  # users spread over every partition
    events.to_parquet(tmp_path / "events.parquet")
    import merlin_hstu.workflows.cluster as c

    saved, c._ACTIVE = c._ACTIVE, None
    try:
        assert main(["preprocess", "--input", str(tmp_path / "events.parquet"), "--output", str(tmp_path / "one"),
                     "--max-history", "16"]) == 0
        assert main(["preprocess", "--input", str(tmp_path / "events.parquet"), "--output", str(tmp_path / "two"),
                     "--max-history", "16", "--workers", "2"]) == 0
    finally:
        c._ACTIVE = saved
    assert "NVTabular on Dask: 2 worker(s)" in capsys.readouterr().out
    a, b = read_processed(tmp_path / "two" / "processed"), read_processed(tmp_path / "one" / "processed")
    assert len(a) == 150
    pd.testing.assert_frame_equal(a, b)
    assert active_cluster() is cluster  # the nested cluster handed the module's back
