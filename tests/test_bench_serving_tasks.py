"""`merlin-hstu bench serve --t4r --task all` end to end at tiny sizes: each task's model trained with tr.Trainer
(retrieval, DLRM-HSTU ranking, WuKong CTR), exported as the stock merlin-systems ensemble and as our endpoint, all
six repositories on one real tritonserver, the first answer of each path checked against the eager model, and one
table task x path with positive latencies and the ratio ours / stock.  The numbers themselves are not asserted
(a tiny, loaded machine); the lead measures them with the defaults (docs/serving.md)."""
from __future__ import annotations

import json

import pytest

from merlin_hstu.bench.serving import TASK_PATHS, TASK_TABLE_HEADER, TASKS, T4RTaskData, _check_served
from merlin_hstu.cli.main import main


def parse_table(text: str) -> list:
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in rows[0].strip("|").split("|")]
    assert tuple(header) == TASK_TABLE_HEADER
    return [dict(zip(header, (c.strip() for c in row.strip("|").split("|")))) for row in rows[1:]]


def test_bench_serve_t4r_all_tasks_prints_one_table(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = main(["bench", "serve", "--t4r", "--task", "all", "--requests", "5", "--warmup", "2", "--rounds", "1",
                 "--concurrency", "2", "--instances", "1", "--users", "120", "--ctr-rows", "400",
                 "--json", str(out)])
    text = capsys.readouterr().out
    assert code == 0, text
    for task in TASKS:
        assert f"{task}: the first request's answer equals the offline model on both paths" in text
    rows = parse_table(text)
    assert [(r["task"], r["path"]) for r in rows] == [(t, p) for t in TASKS for p in TASK_PATHS]
    for row in rows:
        assert int(row["requests"]) == 5 and int(row["errors"]) == 0, row
        p50, p95, p99, qps = (float(row[k]) for k in ("p50 ms", "p95 ms", "p99 ms", "QPS"))
        assert 0 < p50 <= p95 <= p99 and qps > 0, row
        if row["path"] == "merlin-hstu":  # the ratio of this run's two rows
            stock = next(r for r in rows if r["task"] == row["task"] and r["path"] == "stock")
            assert float(row["p50 ours/stock"]) == pytest.approx(p50 / float(stock["p50 ms"]), abs=2e-3)
        else:
            assert row["p50 ours/stock"] == "-"
    machine = [line for line in text.splitlines() if line.startswith("machine: ")]
    assert machine and "cores" in machine[-1] and "torch" in machine[-1]
    record = json.loads(out.read_text())
    assert set(record["tasks"]) == set(TASKS) and record["data"]["users"] == 120


def test_bad_settings_are_named(capsys):
    assert main(["bench", "serve", "--t4r", "--task", "ctr", "--data", "DIR"]) == 2
    assert "--data is the retrieval task's session-workflow output" in capsys.readouterr().err
    assert main(["bench", "serve", "--run", "RUN", "--task", "ranking"]) == 2
    assert "--task goes with --t4r" in capsys.readouterr().err
    with pytest.raises(ValueError, match="T4RTaskData.users must be >= 1"):
        T4RTaskData(users=0)


def test_served_answers_that_differ_fail_loudly():
    import numpy as np

    want = (np.array([5, 7, 9]), np.array([3.0, 2.0, 1.0]))
    _check_served("retrieval", "stock", (np.array([5, 7, 9]), want[1] + 1e-7), want)
    with pytest.raises(RuntimeError, match=r"stock path's answer to the first retrieval request .*rank 1"):
        _check_served("retrieval", "stock", (np.array([5, 9, 7]), want[1]), want)
    with pytest.raises(RuntimeError, match="merlin-hstu path's answer to the first ctr request"):
        _check_served("ctr", "merlin-hstu", np.array([0.5, 0.6]), np.array([0.5, 0.7]))
    with pytest.raises(RuntimeError, match="task 'click'"):
        _check_served("ranking", "stock", {"click": np.array([0.1])}, {"click": np.array([0.2])})
