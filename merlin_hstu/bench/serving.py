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

`bench_t4r_serve` (`merlin-hstu bench serve --t4r`) does the same for a retrieval model trained with `tr.Trainer`:
the `demo` preset's HSTU built by `retrieval_model_from_schema`, trained on a session-workflow output (`--data`, or
a synthetic log), exported by `merlin_hstu.serving.t4r_export` both ways (stock: raw ids out already).
"""
from __future__ import annotations

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
    from merlin_hstu.bench.retrieval import machine_info

    info = machine_info()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{info['cores']} CPU cores ({info['cpu']}), load average {load:.2f} at start, Python {info['python']}"


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


def bench_t4r_serve(data: Optional[str | Path] = None, config: Optional[BenchConfig] = None, epochs: int = 1,
                    work_dir: Optional[Path] = None, log: Callable[[str], None] = print,
                    synthetic_users: int = 2000) -> Dict[str, Dict[str, float]]:
    """`bench_serve` for a retrieval model trained with tr.Trainer: the demo preset's HSTU
    (`retrieval_model_from_schema`, `epochs` epochs of tr.Trainer on `data`, a session-workflow output, or on a
    synthetic log of `synthetic_users` users), exported by `export_t4r_model` as a merlin-hstu repository and as
    the stock merlin-systems ensemble; -> {path: summary} as `bench_serve`."""
    import torch
    import transformers4rec.torch as tr

    from merlin_hstu.bench.t4r_vs_native import synthetic_dataset, training_arguments
    from merlin_hstu.retrieval.config import load_config
    from merlin_hstu.serving.t4r_export import STOCK_NAMES, session_columns, export_t4r_model
    from merlin_hstu.t4r.data import parquet_files, read_schema, retrieval_trainer_splits
    from merlin_hstu.t4r.retrieval import GenerativeRetrievalTask, retrieval_model_from_schema

    config = config or BenchConfig()
    tmp = tempfile.TemporaryDirectory(prefix="merlin-hstu-bench-t4r-") if work_dir is None else None
    work = Path(tmp.name) if tmp else Path(work_dir)
    try:
        log(f"machine: {_machine()}")
        log(f"config: {config}")
        cfg = load_config("demo", [f"train.epochs={epochs}", "train.eval_every=0"])
        data = Path(data) if data else synthetic_dataset(work, synthetic_users, cfg.data.max_history)
        processed = data / "processed" if (data / "processed").is_dir() else data
        splits = retrieval_trainer_splits(data, work / "splits", max_history=cfg.data.max_history, overwrite=True)
        torch.manual_seed(cfg.train.seed)
        model = retrieval_model_from_schema(read_schema(processed), cfg.model, splits.max_sequence_length,
                                            task=GenerativeRetrievalTask.from_configs(cfg.train.loss_config(),
                                                                                      cfg.head),
                                            input_dropout=cfg.train.input_dropout)
        start = time.perf_counter()
        tr.Trainer(model=model, args=training_arguments(cfg, work / "trainer", splits.max_sequence_length),
                   schema=splits.schema, train_dataset_or_path=parquet_files(splits.train)).train()
        log(f"tr.Trainer: {epochs} epoch(s) of the demo preset's HSTU on {data} in "
            f"{time.perf_counter() - start:.0f} s")
        export_cfg = _export_config(config)
        ours_repo = export_t4r_model(model, data, work / "t4r_merlin_hstu_repo", config=export_cfg, overwrite=True)
        stock_repo = export_t4r_model(model, data, work / "t4r_stock_repo", mode="stock", config=export_cfg,
                                      overwrite=True)
        events = raw_events_of(data, data / "workflow", session_columns(data))
        return _drive(ours_repo, stock_repo, STOCK_NAMES["retrieval"], events, config, export_cfg, log, None)
    finally:
        if tmp is not None:
            tmp.cleanup()


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
        warm = list(range(config.requests, config.requests + config.warmup))
        for name, send in paths.items():
            warm_result = run_load(send, make_client, warm, config.concurrency)
            if warm_result.errors:
                raise RuntimeError(f"{name} warm-up failed: {warm_result.errors[0]}")
        totals = {name: LoadResult() for name in paths}
        chunks = np.array_split(np.arange(config.requests), config.rounds)
        for r, chunk in enumerate(chunks):
            for name, send in paths.items():
                result = run_load(send, make_client, chunk.tolist(), config.concurrency)
                totals[name].merge(result)
                s = result.summary()
                log(f"  round {r + 1}/{config.rounds} {name:18s} p50 {s['p50_ms']:7.1f} ms  p99 {s['p99_ms']:7.1f} ms"
                    f"  {s['qps']:6.1f} QPS  errors {s['errors']}")
        client.close()
    summary = {name: t.summary() for name, t in totals.items()}
    for name, t in totals.items():
        for line in t.errors[:3]:
            log(f"  {name} error: {line}")
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
