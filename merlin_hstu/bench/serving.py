"""`merlin-hstu bench serve`: load test of the exported repository against the stock merlin-systems path.

One tritonserver serves both repositories side by side (same process, same cores, same moment):

* **merlin-hstu**: `export_repository`'s batched endpoint (what `ServingClient` calls): one user per request,
  raw lists with a leading request dimension, Triton's dynamic batcher in front of the Merlin executor;
* **merlin-hstu ragged**: the same repository's plain Merlin-convention model (validates, one BLS hop to the
  batched model);
* **stock**: `stock.export_stock_repository` (executor_model -> BLS workflow model -> BLS TorchScript model),
  the same users' events as raw event rows.

The paths are driven in alternating rounds (so background load drifts hit all alike) by the same closed-loop
generator: `concurrency` threads, each with its own HTTP client, each sending its next request as soon as the
previous one returns.  Latency is client-side wall time per request; QPS = requests / wall time of the round.
All paths must agree on every top-K list (stock's encoded ids mapped to raw), so the comparison is between
servings of the same numbers.

`bench_t4r_tasks` (`merlin-hstu bench serve --t4r --task retrieval|ranking|ctr|all`) compares the two ways a model
trained with `tr.Trainer` exports (`merlin_hstu.serving.t4r_export.export_t4r_model`, mode "stock" and
"merlin-hstu"), per task: the `demo` preset's HSTU (retrieval, on `--data` or a synthetic log), DLRM-HSTU (ranking,
on the ranking workflow's output of a synthetic log) and WuKong (CTR, on the Criteo workflow's output of synthetic
Criteo lines), each built from its workflow's schema and trained by `tr.Trainer` for `--epochs`.  All repositories
are served by one tritonserver; each task's stock ensemble and our endpoint get the same raw-id requests (one user
per request; CTR: `ctr_rows_per_request` rows), in alternating rounds, after the first request of each path was
checked against the eager model on the workflow's in-process output.  One table: task x path, p50 / p95 / p99,
QPS, and the ratios ours / stock of this run, with the machine line.
"""
from __future__ import annotations

import dataclasses
import os
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import pandas as pd


PATHS = ("merlin-hstu", "merlin-hstu ragged", "stock")


@dataclass
class BenchConfig:
    requests: int = 2000  # per path
    concurrency: int = 8
    rounds: int = 4  # alternate the paths this many times (requests split evenly)
    warmup: int = 40  # per path, not timed
    top_k: int = 10
    instances: int = 2  # executor instances of the batched model
    entry_instances: int = 8
    max_queue_delay_us: int = 0
    prune_unused_inputs: bool = True  # False: merlin-hstu also runs the workflow's action branch, like stock
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("requests", "concurrency", "rounds", "top_k", "instances", "entry_instances"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"BenchConfig.{name} must be >= 1, got {getattr(self, name)}")
        if int(self.warmup) < 0:
            raise ValueError(f"BenchConfig.warmup must be >= 0, got {self.warmup}")
        if self.requests < self.rounds:
            raise ValueError(f"BenchConfig.requests={self.requests} must be >= rounds={self.rounds}")


@dataclass
class LoadResult:
    latencies_s: List[float] = field(default_factory=list)
    errors: List[str] = field(default_factory=list)
    wall_s: float = 0.0

    def merge(self, other: "LoadResult") -> None:
        self.latencies_s += other.latencies_s
        self.errors += other.errors
        self.wall_s += other.wall_s

    def summary(self) -> Dict[str, float]:
        lat = np.asarray(self.latencies_s) * 1000.0
        done = len(lat)
        return {"requests": done + len(self.errors), "errors": len(self.errors),
                "p50_ms": float(np.percentile(lat, 50)) if done else float("nan"),
                "p95_ms": float(np.percentile(lat, 95)) if done else float("nan"),
                "p99_ms": float(np.percentile(lat, 99)) if done else float("nan"),
                "mean_ms": float(lat.mean()) if done else float("nan"),
                "qps": done / self.wall_s if self.wall_s > 0 else float("nan")}


def run_load(send: Callable[[object, int], object], make_client: Callable[[], object], indices: List[int],
             concurrency: int) -> LoadResult:
    """Closed loop: `concurrency` threads pull the next index and call send(client, index)."""
    result = LoadResult()
    lock = threading.Lock()
    cursor = iter(indices)

    def worker() -> None:
        client = make_client()
        while True:
            with lock:
                index = next(cursor, None)
            if index is None:
                if hasattr(client, "close"):
                    client.close()  # an open keep-alive connection would hold up the server's shutdown
                return
            start = time.perf_counter()
            try:
                send(client, index)
                elapsed = time.perf_counter() - start
                with lock:
                    result.latencies_s.append(elapsed)
            except Exception as exc:  # every failure is counted and reported, never hidden
                with lock:
                    result.errors.append(f"request {index}: {exc}")

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    result.wall_s = time.perf_counter() - start
    return result


def raw_histories(run_dir: str | Path, limit: Optional[int] = None) -> pd.DataFrame:
    """The run's users as raw event rows (their most recent events as preprocessed), decoded back to raw ids."""
    from merlin_hstu.retrieval.config import load_config
    from merlin_hstu.train.run_dir import read_record

    run_dir = Path(run_dir)
    cfg = load_config(run_dir / "config.yaml")
    record = read_record(run_dir)
    return raw_events_of(record["data"], record["workflow"], cfg.data, limit)


def raw_events_of(data: str | Path, workflow: str | Path, d, limit: Optional[int] = None) -> pd.DataFrame:
    """The users of a session-workflow output as raw event rows, decoded back to raw ids; `d` names the raw
    columns (`id_column`, `item_column`, `action_column`, `timestamp_column`)."""
    from merlin_hstu.common import schema as roles
    import nvtabular as nvt

    from merlin_hstu.serving.export import item_ids_of
    from merlin_hstu.workflows.session_workflow import load_action_mapping

    data, workflow = Path(data), Path(workflow)
    processed = data / "processed" if (data / "processed").is_dir() else data
    frame = pd.concat([pd.read_parquet(p) for p in sorted(processed.glob("*.parquet"))], ignore_index=True)
    if limit is not None:
        frame = frame.iloc[:limit]
    items = item_ids_of(nvt.Workflow.load(str(workflow)), workflow).mapping
    counts = frame[roles.ITEM_LIST].map(len).to_numpy()
    events = {d.id_column: np.repeat(frame[d.id_column].to_numpy(), counts),
              d.item_column: items[np.concatenate(frame[roles.ITEM_LIST].to_numpy()).astype(np.int64)]}
    if d.action_column and roles.ACTION_LIST in frame.columns:
        actions = load_action_mapping(workflow)
        events[d.action_column] = actions[np.concatenate(frame[roles.ACTION_LIST].to_numpy()).astype(np.int64)]
    if d.timestamp_column and roles.TIMESTAMP_LIST in frame.columns:
        events[d.timestamp_column] = np.concatenate(frame[roles.TIMESTAMP_LIST].to_numpy()).astype(np.int64)
    out = pd.DataFrame(events)
    if out[d.item_column].map(type).eq(int).all():
        out[d.item_column] = out[d.item_column].astype(np.int64)
    return out


def _machine() -> str:
    from merlin_hstu.bench.retrieval import machine_info, machine_summary

    info = machine_info()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{machine_summary(info)}, load average {load:.2f} at start, Python {info['python']}"


def bench_serve(run_dir: str | Path, config: Optional[BenchConfig] = None, work_dir: Optional[Path] = None,
                log: Callable[[str], None] = print) -> Dict[str, Dict[str, float]]:
    """Export both repositories, serve them from one tritonserver, drive both; -> {path: summary}."""
    import nvtabular as nvt

    from merlin_hstu.serving.export import export_repository, item_ids_of
    from merlin_hstu.serving.repository import read_serving_record
    from merlin_hstu.serving.stock import STOCK_ENTRY_MODEL, export_stock_repository

    config = config or BenchConfig()
    run_dir = Path(run_dir)
    tmp = tempfile.TemporaryDirectory(prefix="merlin-hstu-bench-") if work_dir is None else None
    work = Path(tmp.name) if tmp else Path(work_dir)
    try:
        log(f"machine: {_machine()}")
        log(f"config: {config}")
        export_cfg = _export_config(config)
        ours_repo = export_repository(run_dir, work / "merlin_hstu_repo", export_cfg, overwrite=True)
        stock_repo = export_stock_repository(run_dir, work / "stock_repo", top_k=config.top_k)
        events = raw_histories(run_dir)
        workflow = Path(read_serving_record(ours_repo)["workflow"])
        mapping = item_ids_of(nvt.Workflow.load(str(workflow)), workflow).mapping
        return _drive(ours_repo, stock_repo, STOCK_ENTRY_MODEL, events, config, export_cfg, log, mapping)
    finally:
        if tmp is not None:
            tmp.cleanup()


def _export_config(config: BenchConfig):
    from merlin_hstu.serving.export import ExportConfig

    return ExportConfig(top_k=config.top_k, instances=config.instances, entry_instances=config.entry_instances,
                        max_queue_delay_us=config.max_queue_delay_us, prune_unused_inputs=config.prune_unused_inputs)


TASKS = ("retrieval", "ranking", "ctr")
TASK_PATHS = ("stock", "merlin-hstu")  # the stock merlin-systems ensemble, our endpoint


@dataclass
class T4RTaskData:
    """What `bench serve --t4r` trains on: `data` (retrieval only; default: a synthetic log) and the synthetic
    sizes; one epoch of tr.Trainer per task by default."""

    data: Optional[str] = None  # a session-workflow output (merlin-hstu preprocess) for retrieval
    users: int = 2000  # synthetic log (retrieval, and ranking's log)
    ctr_rows: int = 4000  # synthetic Criteo lines
    ctr_rows_per_request: int = 32  # CTR: raw rows per request (retrieval and ranking: one user per request)
    epochs: int = 1

    def __post_init__(self) -> None:
        for name in ("users", "ctr_rows", "ctr_rows_per_request", "epochs"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"T4RTaskData.{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class _TaskCase:
    """One task's trained model, its workflow output and the per-request raw frames; `ours(frame)` -> the typed
    request of our contract, `offline(frame)` -> the eager model's answer, `check(path, answer, want)` fails
    loudly when a served answer differs."""

    task: str
    model: object
    data: Path
    frames: List[pd.DataFrame]
    ours: Callable[[pd.DataFrame], object]
    offline: Callable[[pd.DataFrame], object]


def _eager(model, inputs: Dict[str, object]):
    import torch

    with torch.no_grad():
        return model(inputs)


def _ragged(lists: List[np.ndarray]) -> tuple:
    import torch

    offsets = torch.tensor(np.concatenate([[0], np.cumsum([len(v) for v in lists])]))
    return torch.from_numpy(np.concatenate(lists).astype(np.int64)), offsets


def _retrieval_case(work: Path, spec: T4RTaskData, top_k: int, log) -> _TaskCase:
    """The demo preset's HSTU trained by tr.Trainer on `spec.data` or a synthetic log (as `merlin-hstu bench
    t4r-vs-native` trains it); one request = one user's raw events."""
    import torch
    import transformers4rec.torch as tr

    from merlin_hstu.bench.t4r_vs_native import synthetic_dataset, training_arguments
    from merlin_hstu.common import schema as roles
    from merlin_hstu.retrieval.config import load_config
    from merlin_hstu.serving.t4r_export import session_columns
    from merlin_hstu.t4r.data import parquet_files, read_schema, retrieval_trainer_splits
    from merlin_hstu.t4r.retrieval import GenerativeRetrievalTask, retrieval_model_from_schema
    from merlin_hstu.workflows.session_workflow import (SessionWorkflowConfig, load_item_id_mapping,
                                                        load_serving_workflow, normalize_event_log)
    from merlin_hstu.serving.contract import RetrievalRequest

    cfg = load_config("demo", [f"train.epochs={spec.epochs}", "train.eval_every=0"])
    data = Path(spec.data) if spec.data else synthetic_dataset(work, spec.users, cfg.data.max_history)
    processed = data / "processed" if (data / "processed").is_dir() else data
    splits = retrieval_trainer_splits(data, work / "retrieval-splits", max_history=cfg.data.max_history,
                                      overwrite=True)
    torch.manual_seed(cfg.train.seed)
    model = retrieval_model_from_schema(read_schema(processed), cfg.model, splits.max_sequence_length,
                                        task=GenerativeRetrievalTask.from_configs(cfg.train.loss_config(), cfg.head),
                                        input_dropout=cfg.train.input_dropout)
    start = time.perf_counter()
    tr.Trainer(model=model, args=training_arguments(cfg, work / "retrieval-trainer", splits.max_sequence_length),
               schema=splits.schema, train_dataset_or_path=parquet_files(splits.train)).train()
    log(f"retrieval: tr.Trainer, {spec.epochs} epoch(s) of the demo preset's HSTU on {data} in "
        f"{time.perf_counter() - start:.0f} s")
    model.eval()
    columns = session_columns(data)
    events = raw_events_of(data, data / "workflow", columns)
    frames = [g for _, g in events.groupby(columns.id_column, sort=False)]
    workflow = load_serving_workflow(data / "workflow")
    mapping = load_item_id_mapping(data / "workflow")
    session = SessionWorkflowConfig(id_column=columns.id_column, item_column=columns.item_column,
                                    action_column=columns.action_column, timestamp_column=columns.timestamp_column)
    width = model.max_sequence_length

    def offline(frame: pd.DataFrame):
        """The fitted workflow in-process, the most recent `width` events, the eager model, the window masked."""
        rows = workflow._transform_df(normalize_event_log(frame, session))
        inputs, window = {}, None
        for column in model.input_schema.column_names:
            lists = [np.asarray(v, dtype=np.int64)[-width:] for v in rows[column]]
            inputs[f"{column}__values"], inputs[f"{column}__offsets"] = _ragged(lists)
            if column == roles.ITEM_LIST:
                window = lists
        scores = _eager(model, inputs).numpy().astype(np.float64)
        for b, items in enumerate(window):
            scores[b, items] = -np.inf
        order = np.argsort(-scores, axis=1, kind="stable")[:, :top_k]
        return np.array([mapping[i] for i in order[0]]), scores[0, order[0]]

    return _TaskCase("retrieval", model, data, frames, lambda f: RetrievalRequest(f), offline)


def _ranking_case(work: Path, spec: T4RTaskData, log) -> _TaskCase:
    """DLRM-HSTU (`ranking_model_from_schema`, its default sizes) trained by tr.Trainer on the ranking workflow's
    output of the synthetic log (its actions as binary action columns, one task each; the user id as the contextual
    feature); one request = one user's history and candidates."""
    import nvtabular as nvt
    import torch
    import transformers4rec.torch as tr

    from merlin_hstu.bench.t4r_vs_native import training_arguments
    from merlin_hstu.common import schema as roles
    from merlin_hstu.data.synthetic import SyntheticConfig, generate_event_log
    from merlin_hstu.ranking.batch import RankingTask
    from merlin_hstu.ranking.data import CANDIDATE_ITEM_LIST, CONTEXT_PREFIX, QUERY_TIME, read_meta
    from merlin_hstu.retrieval.config import load_config
    from merlin_hstu.serving.ranking_contract import RankingRequest
    from merlin_hstu.t4r.data import parquet_files, ranking_trainer_splits, read_schema
    from merlin_hstu.t4r.ranking import ranking_model_from_schema, trainer_schema
    from merlin_hstu.workflows import ranking_workflow as rw

    synthetic = SyntheticConfig(num_users=spec.users, num_items=max(80, spec.users // 4), min_events=6,
                                max_events=40, seed=11)
    log_frame = generate_event_log(synthetic)
    for name in synthetic.action_names:  # bit b <- action_names[b]
        log_frame[name] = (log_frame[roles.LOG_ACTION] == name).astype(np.int64)
    config = rw.RankingWorkflowConfig(action_names=synthetic.action_names, contextual_columns=(roles.LOG_USER_ID,),
                                      num_candidates=8, max_uih_len=50)
    out = rw.preprocess_ranking(log_frame.drop(columns=[roles.LOG_ACTION]), work / "ranking", config,
                                overwrite=True)
    splits = ranking_trainer_splits(out.output_dir, work / "ranking-splits", overwrite=True)
    schema = read_schema(out.path)
    torch.manual_seed(0)
    model = ranking_model_from_schema(schema, [RankingTask(**t) for t in read_meta(out.output_dir)["tasks"]])
    args = training_arguments(load_config("demo", [f"train.epochs={spec.epochs}", "train.eval_every=0"]),
                              work / "ranking-trainer", splits.max_sequence_length)
    start = time.perf_counter()
    tr.Trainer(model=model, args=args, schema=trainer_schema(schema),
               train_dataset_or_path=parquet_files(splits.train)).train()
    log(f"ranking: tr.Trainer, {spec.epochs} epoch(s) of DLRM-HSTU on {synthetic.num_users} synthetic users in "
        f"{time.perf_counter() - start:.0f} s")
    model.eval()
    normalized = rw.normalize_ranking_log(log_frame, config)
    workflow = nvt.Workflow.load(str(out.output_dir / "workflow"))
    frames = [g.reset_index(drop=True) for _, g in normalized.groupby(roles.LOG_USER_ID, sort=False)]
    frames = [f for f in frames if len(f) > config.num_candidates]  # a user the workflow keeps

    def ours(frame: pd.DataFrame):
        mine = frame.sort_values(roles.TIME_BASE, kind="stable")
        history, candidates = mine.iloc[:-config.num_candidates], mine.iloc[-config.num_candidates:]
        context = {c: mine[CONTEXT_PREFIX + c].iloc[0] for c in config.contextual_columns}
        return RankingRequest(history[roles.ITEM_BASE].tolist(), history[roles.ACTION_BASE].tolist(),
                              history[roles.TIME_BASE].tolist(), candidates[roles.ITEM_BASE].tolist(), context)

    def offline(frame: pd.DataFrame):
        rows = workflow._transform_df(frame).reset_index(drop=True)
        inputs = {}
        for column in (roles.ITEM_LIST, roles.ACTION_LIST, roles.TIMESTAMP_LIST, CANDIDATE_ITEM_LIST):
            lists = [np.asarray(v, dtype=np.int64) for v in rows[column]]
            inputs[f"{column}__values"], inputs[f"{column}__offsets"] = _ragged(lists)
        for column in [QUERY_TIME] + [CONTEXT_PREFIX + c for c in config.contextual_columns]:
            inputs[column] = torch.from_numpy(rows[column].to_numpy(dtype=np.int64))
        n = len(rows[CANDIDATE_ITEM_LIST][0])
        return {task: scores[0, :n].numpy() for task, scores in _eager(model, inputs).items()}

    return _TaskCase("ranking", model, out.output_dir, frames, ours, offline)


def _ctr_case(work: Path, spec: T4RTaskData, log) -> _TaskCase:
    """WuKong (`wukong_ctr_model`, its default sizes) trained by tr.Trainer on the Criteo workflow's output of a
    synthetic Criteo log; one request = `spec.ctr_rows_per_request` raw rows."""
    import nvtabular as nvt
    import torch
    import transformers4rec.torch as tr

    from merlin_hstu.bench.t4r_vs_native import training_arguments
    from merlin_hstu.ctr.data import SyntheticCriteoConfig, generate_synthetic_criteo, write_criteo_tsv
    from merlin_hstu.retrieval.config import load_config
    from merlin_hstu.serving.ctr_contract import CTRRequest
    from merlin_hstu.t4r.ctr import wukong_ctr_model
    from merlin_hstu.workflows.criteo_workflow import LABEL, CriteoWorkflowConfig, preprocess_criteo, read_criteo_tsv

    tsv = write_criteo_tsv(generate_synthetic_criteo(SyntheticCriteoConfig(num_rows=spec.ctr_rows, seed=5)).frame,
                           work / "criteo_day_0.tsv")
    criteo = preprocess_criteo(tsv, work / "criteo", CriteoWorkflowConfig(freq_threshold=2, valid_fraction=0.25))
    torch.manual_seed(0)
    model = wukong_ctr_model(criteo.schema)
    args = training_arguments(load_config("demo", [f"train.epochs={spec.epochs}", "train.eval_every=0"]),
                              work / "ctr-trainer", None)
    start = time.perf_counter()
    tr.Trainer(model=model, args=args, schema=criteo.schema,
               train_dataset_or_path=[str(p) for p in criteo.parquet_files("train")]).train()
    log(f"ctr: tr.Trainer, {spec.epochs} epoch(s) of WuKong on {spec.ctr_rows} synthetic Criteo rows in "
        f"{time.perf_counter() - start:.0f} s")
    model.eval()
    raw = read_criteo_tsv(tsv, CriteoWorkflowConfig()).drop(columns=[LABEL])
    n = spec.ctr_rows_per_request
    frames = [raw.iloc[i:i + n].reset_index(drop=True) for i in range(0, len(raw) - n + 1, n)]
    workflow = nvt.Workflow.load(str(criteo.workflow_path)).remove_inputs([LABEL])  # as the CTR export serves it

    def offline(frame: pd.DataFrame):
        features = workflow._transform_df(frame[workflow.input_schema.column_names].reset_index(drop=True))
        inputs = {c: torch.from_numpy(features[c].to_numpy()) for c in model.input_schema.column_names}
        return _eager(model, inputs).numpy().reshape(-1)

    return _TaskCase("ctr", model, criteo.path, frames, lambda f: CTRRequest(f), offline)


def _check_served(task: str, path: str, got, want) -> None:
    """Served == offline (scores to 1e-4; retrieval: the same top-K ids, a swap allowed only between offline
    scores that tie within 1e-5), else a RuntimeError naming the task, the path and the difference."""
    def fail(what: str):
        raise RuntimeError(f"bench serve --t4r: the {path} path's answer to the first {task} request differs from "
                           f"the offline model ({what}); the timings would compare different computations")

    if task == "retrieval":
        (ids, scores), (want_ids, want_scores) = got, want
        plain = [v.decode() if isinstance(v, bytes) else v for v in np.asarray(ids).reshape(-1).tolist()]
        expected = list(want_ids.tolist())
        if len(plain) != len(expected) or not np.allclose(scores, want_scores, atol=1e-4, rtol=1e-4):
            fail(f"scores {np.asarray(scores).tolist()} vs {want_scores.tolist()}")
        for i, (a, b) in enumerate(zip(plain, expected)):
            if a != b and np.ptp(want_scores[max(i - 1, 0):i + 2]) >= 1e-5:
                fail(f"rank {i}: item {a!r} vs {b!r}")
    elif task == "ranking":
        for name, scores in want.items():
            if name not in got or not np.allclose(got[name], scores, atol=1e-4, rtol=1e-4):
                fail(f"task {name!r}: {got.get(name)} vs {scores}")
    elif not np.allclose(got, want, atol=1e-5):
        fail(f"probabilities {np.asarray(got).tolist()} vs {want.tolist()}")


def bench_t4r_tasks(tasks=TASKS, config: Optional[BenchConfig] = None, spec: Optional[T4RTaskData] = None,
                    work_dir: Optional[Path] = None, log: Callable[[str], None] = print) -> dict:
    """`merlin-hstu bench serve --t4r --task ...`: per task, a model trained with tr.Trainer, exported by
    `export_t4r_model` both ways (stock merlin-systems ensemble, merlin-hstu endpoint); all repositories served by
    one tritonserver; each task's two paths driven with the same raw-id requests in alternating rounds, after the
    first request of each path was checked against the eager model.  -> {"machine": line, "tasks": {task: {path:
    summary}}}."""
    from merlin_hstu.serving.server import ServerConfig, TritonServer
    from merlin_hstu.serving.t4r_export import export_t4r_model

    tasks = list(tasks)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise ValueError(f"tasks must be a non-empty subset of {TASKS}, got {tasks}")
    if spec is not None and spec.data and "retrieval" not in tasks:
        raise ValueError("T4RTaskData.data (--data) is the retrieval task's session-workflow output; add the "
                         "retrieval task or drop it")
    config, spec = config or BenchConfig(), spec or T4RTaskData()
    tmp = tempfile.TemporaryDirectory(prefix="merlin-hstu-bench-t4r-") if work_dir is None else None
    work = Path(tmp.name) if tmp else Path(work_dir)
    try:
        machine = _machine()
        log(f"machine: {machine}")
        log(f"config: {config}; data: {spec}")
        builders = {"retrieval": lambda: _retrieval_case(work, spec, config.top_k, log),
                    "ranking": lambda: _ranking_case(work, spec, log), "ctr": lambda: _ctr_case(work, spec, log)}
        cases = {task: builders[task]() for task in tasks}
        # retrieval's plain (ragged) entry model is not timed here: one instance (fewer stubs to start)
        export_cfg = dataclasses.replace(_export_config(config), entry_instances=1)
        repos = {}
        start = time.perf_counter()
        for task, case in cases.items():
            for path, mode in (("stock", "stock"), ("merlin-hstu", "merlin-hstu")):
                repos[task, path] = export_t4r_model(case.model, case.data, work / f"{task}-{mode}-repo", mode=mode,
                                                     config=export_cfg, overwrite=True)
        log(f"exported {len(repos)} repositories in {time.perf_counter() - start:.0f} s")
        start = time.perf_counter()
        with TritonServer(ServerConfig(list(repos.values()), http_port=0, grpc_port=0)) as server:
            log(f"tritonserver ready at {server.http_url} (pid {server.pid}) with {len(repos)} repositories in "
                f"{time.perf_counter() - start:.0f} s")
            results = {task: _drive_task(server.http_url, case, export_cfg, config, log)
                       for task, case in cases.items()}
        return {"machine": machine, "tasks": results}
    finally:
        if tmp is not None:
            tmp.cleanup()


def _drive_task(url: str, case: _TaskCase, export_cfg, config: BenchConfig, log) -> Dict[str, Dict[str, float]]:
    """Both paths of one task: the same requests (frames picked with replacement, seeded), warm-up, alternating
    rounds; the first request of each path checked against the offline model before anything is timed."""
    import tritonclient.http as th

    from merlin_hstu.serving.client import ServingClient
    from merlin_hstu.serving.t4r_export import STOCK_NAMES, stock_request

    stock_name = STOCK_NAMES[case.task]
    with ServingClient(url, model_name=export_cfg.name_for(case.task)) as client:
        contract = client.contract
    batched = contract.batched_model_name
    ours_name = batched or contract.model_name
    ours_outputs = [s.name for s in contract.outputs()]
    with th.InferenceServerClient(url) as c:
        stock_config = c.get_model_config(stock_name)
    stock_outputs = [o["name"] for o in stock_config["output"]]
    rng = np.random.default_rng(config.seed)
    picks = rng.choice(len(case.frames), size=config.requests + config.warmup, replace=True)
    ours_inputs, stock_inputs, valid = [], [], []
    for p in picks:
        frame = case.frames[p]
        request = contract.validate(contract.request_arrays(case.ours(frame)))
        wire = contract.wire(request, batched=bool(batched))
        valid.append(request)
        ours_inputs.append(_infer_inputs(th, {k: np.ascontiguousarray(v)[None] for k, v in wire.items()}
                                         if batched else wire))
        stock_inputs.append(_infer_inputs(th, stock_request(stock_config, frame)))

    def make_client():
        return th.InferenceServerClient(url, connection_timeout=120, network_timeout=120)

    def sender(model: str, inputs: list):
        def send(client, index: int):
            client.infer(model, inputs[index])
        return send

    # served == offline on the first request of each path, before any timing
    want = case.offline(case.frames[picks[0]])
    with make_client() as client:
        reply = client.infer(ours_name, ours_inputs[0])
        outputs = {n: reply.as_numpy(n)[0] if batched else reply.as_numpy(n) for n in ours_outputs}
        answer = contract.result(outputs, valid[0])
        reply = client.infer(stock_name, stock_inputs[0])
        stock = {n: reply.as_numpy(n) for n in stock_outputs}
    if case.task == "retrieval":
        _check_served("retrieval", "merlin-hstu", (answer.item_ids[0], answer.scores[0]), want)
        _check_served("retrieval", "stock", (stock["item_ids"][0], stock["scores"][0]), want)
    elif case.task == "ranking":
        _check_served("ranking", "merlin-hstu", answer.user(0), want)
        _check_served("ranking", "stock", {t: stock[f"{t}__values"] for t in want if f"{t}__values" in stock}, want)
    else:
        _check_served("ctr", "merlin-hstu", answer, want)
        _check_served("ctr", "stock", stock[contract.output].reshape(-1), want)
    log(f"{case.task}: the first request's answer equals the offline model on both paths")

    paths = {"stock": sender(stock_name, stock_inputs), "merlin-hstu": sender(ours_name, ours_inputs)}
    totals = time_paths(paths, make_client, config, log, prefix=f"{case.task} ")
    return {name: t.summary() for name, t in totals.items()}


def time_paths(paths: dict, make_client, config, log, prefix: str = "") -> dict:
    """`config.warmup` untimed requests per path (any error stops the benchmark), then `config.requests` timed
    requests per path in `config.rounds` alternating rounds at `config.concurrency`; each round and the first
    errors of each path are logged. -> {path name: merged LoadResult}."""
    warm = list(range(config.requests, config.requests + config.warmup))
    for name, send in paths.items():
        warm_result = run_load(send, make_client, warm, config.concurrency)
        if warm_result.errors:
            raise RuntimeError(f"{prefix}{name} warm-up failed: {warm_result.errors[0]}")
    totals = {name: LoadResult() for name in paths}
    width = max(len(name) for name in paths)
    for r, chunk in enumerate(np.array_split(np.arange(config.requests), config.rounds)):
        for name, send in paths.items():
            result = run_load(send, make_client, chunk.tolist(), config.concurrency)
            totals[name].merge(result)
            s = result.summary()
            log(f"  {prefix}round {r + 1}/{config.rounds} {name:{width}s} p50 {s['p50_ms']:7.1f} ms  p99 "
                f"{s['p99_ms']:7.1f} ms  {s['qps']:6.1f} QPS  errors {s['errors']}")
    for name, t in totals.items():
        for line in t.errors[:3]:
            log(f"  {prefix}{name} error: {line}")
    return totals


TASK_TABLE_HEADER = ("task", "path", "requests", "errors", "p50 ms", "p95 ms", "p99 ms", "QPS", "p50 ours/stock",
                     "p99 ours/stock", "QPS ours/stock")


def format_task_table(result: dict) -> str:
    """One markdown table, task x path (stock, merlin-hstu), the ratios ours / stock on our row, and the machine
    line under it."""
    lines = ["| " + " | ".join(TASK_TABLE_HEADER) + " |", "|" + "---|" * len(TASK_TABLE_HEADER)]
    for task, paths in result["tasks"].items():
        stock = paths["stock"]
        for name in TASK_PATHS:
            s = paths[name]
            ratios = ["-"] * 3 if name == "stock" else [f"{s['p50_ms'] / stock['p50_ms']:.3f}",
                                                        f"{s['p99_ms'] / stock['p99_ms']:.3f}",
                                                        f"{s['qps'] / stock['qps']:.2f}"]
            cells = [task, name, str(s["requests"]), str(s["errors"]), f"{s['p50_ms']:.2f}", f"{s['p95_ms']:.2f}",
                     f"{s['p99_ms']:.2f}", f"{s['qps']:.1f}"] + ratios
            lines.append("| " + " | ".join(cells) + " |")
    lines.append(f"machine: {result['machine']}")
    return "\n".join(lines)


def _drive(ours_repo: Path, stock_repo: Path, stock_model: str, events: pd.DataFrame, config: BenchConfig,
           export_cfg, log: Callable[[str], None], stock_mapping: Optional[np.ndarray]) -> Dict[str, Dict[str, float]]:
    """Serve both repositories from one tritonserver and drive the three paths (module docstring); `stock_mapping`:
    raw id per encoded id when the stock path answers encoded ids (None: it answers raw ids)."""
    import tritonclient.http as th

    from merlin_hstu.serving.client import ServingClient
    from merlin_hstu.serving.contract import request_from_events
    from merlin_hstu.serving.server import ServerConfig, TritonServer

    with TritonServer(ServerConfig([ours_repo, stock_repo], http_port=0, grpc_port=0)) as server:
        log(f"tritonserver ready at {server.http_url} (pid {server.pid}) with both repositories")
        client = ServingClient(server.http_url, model_name=export_cfg.name_for("retrieval"))
        contract = client.contract
        users = pd.unique(events[contract.id_column])
        rng = np.random.default_rng(config.seed)
        picks = rng.choice(len(users), size=config.requests + config.warmup, replace=True)
        by_user = {u: g for u, g in events.groupby(contract.id_column, sort=False)}
        batched_inputs, ragged_inputs, stock_inputs = [], [], []
        for p in picks:
            user_events = by_user[users[p]]
            arrays = request_from_events(contract, user_events)
            wire = contract.validate(arrays).to_wire(contract)
            batched_inputs.append(_infer_inputs(th, {k: np.ascontiguousarray(v)[None] for k, v in wire.items()}))
            ragged_inputs.append(_infer_inputs(th, arrays))
            stock_inputs.append(_infer_inputs(th, _stock_arrays(contract, user_events)))
        answers: Dict[str, Dict[int, np.ndarray]] = {name: {} for name in PATHS}

        def make_client():
            return th.InferenceServerClient(server.http_url, connection_timeout=120, network_timeout=120)

        def sender(name: str, model: str, inputs: list):
            def send(c, index: int):
                reply = c.infer(model, inputs[index])
                answers[name][index] = (reply.as_numpy("item_ids").reshape(-1), reply.as_numpy("scores").reshape(-1))
            return send

        paths = {"merlin-hstu": sender("merlin-hstu", contract.batched_model_name, batched_inputs),
                 "merlin-hstu ragged": sender("merlin-hstu ragged", contract.model_name, ragged_inputs),
                 "stock": sender("stock", stock_model, stock_inputs)}
        totals = time_paths(paths, make_client, config, log)
        client.close()
    summary = {name: t.summary() for name, t in totals.items()}
    summary["agreement"] = _agreement(answers, stock_mapping, config.requests)
    return summary


def _stock_arrays(contract, user_events: pd.DataFrame) -> Dict[str, np.ndarray]:
    """The stock path takes the workflow's raw input: one row per event, scalar columns."""
    from merlin_hstu.serving.contract import encode_values

    arrays = {contract.id_column: encode_values(user_events[contract.id_column].to_numpy(), contract.id_dtype,
                                                contract.id_column)}
    for col in contract.list_columns:
        arrays[col] = encode_values(user_events[col].to_numpy(), contract.column_dtype(col), col)
    return arrays


def _infer_inputs(th, arrays: Dict[str, np.ndarray]) -> list:
    from tritonclient.utils import np_to_triton_dtype

    inputs = []
    for name, array in arrays.items():
        dtype = "BYTES" if array.dtype == object else np_to_triton_dtype(array.dtype)
        tensor = th.InferInput(name, list(array.shape), dtype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def _agreement(answers: Dict[str, Dict[int, np.ndarray]], mapping: Optional[np.ndarray], n: int) -> Dict[str, float]:
    """Requests whose top-K lists are identical on all paths (stock's encoded ids mapped to raw ids by `mapping`;
    None: the stock path answers raw ids).

    A list that differs is counted as a near tie when, at the first differing rank, the two paths' scores agree
    to 1e-5: two items that close can swap places when the same numbers are computed in batches of different
    sizes (the BLAS blocking changes the last float bits).
    """
    def plain(ids: np.ndarray) -> list:
        return [v.decode() if isinstance(v, bytes) else v for v in ids.tolist()]

    same = near_ties = 0
    for i in range(n):
        got = [answers[name].get(i) for name in PATHS]
        if any(x is None for x in got):
            continue
        lists = [plain(got[0][0]), plain(got[1][0]),
                 plain(got[2][0]) if mapping is None else [mapping[int(v)] for v in got[2][0]]]
        if lists[0] == lists[1] == lists[2]:
            same += 1
            continue
        reference = lists[0]
        tied = True
        for other, (_, scores) in zip(lists[1:], got[1:]):
            if other != reference:
                p = next(j for j, (a, b) in enumerate(zip(reference, other)) if a != b)
                tied &= abs(float(got[0][1][p]) - float(scores[p])) < 1e-5
        near_ties += tied
    return {"same_topk": same, "near_ties": near_ties, "compared": n}


def format_summary(summary: Dict[str, Dict[str, float]]) -> str:
    lines = [f"{'path':18s} {'requests':>8s} {'errors':>6s} {'p50 ms':>8s} {'p99 ms':>8s} {'mean ms':>8s} {'QPS':>7s}"]
    for name in PATHS:
        s = summary[name]
        lines.append(f"{name:18s} {s['requests']:8d} {s['errors']:6d} {s['p50_ms']:8.1f} {s['p99_ms']:8.1f} "
                     f"{s['mean_ms']:8.1f} {s['qps']:7.1f}")
    ratio = summary["merlin-hstu"]["p50_ms"] / summary["stock"]["p50_ms"]
    agree = summary["agreement"]
    ragged = summary["merlin-hstu ragged"]["p50_ms"] / summary["stock"]["p50_ms"]
    lines.append(f"p50 ratio merlin-hstu / stock = {ratio:.3f} (target <= 0.2; ragged endpoint {ragged:.3f}); "
                 f"QPS ratio = {summary['merlin-hstu']['qps'] / summary['stock']['qps']:.1f}x; "
                 f"identical top-K lists on all paths: {agree['same_topk']}/{agree['compared']}"
                 f" (+{agree['near_ties']} differing only by a near tie)")
    return "\n".join(lines)
