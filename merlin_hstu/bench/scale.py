"""`merlin-hstu bench scale`: scale-out figures measured on this machine, and `--plan`: the 1B-user / 100M-item plan
computed from them (docs/scaling.md).

Measured (each section printed under the machine line: CPU model, cores, torch version, device, date):

    nvtabular   a source log grown by fractal expansion (merlin_hstu.data.fractal.expand), then the session workflow
                (`preprocess`) in one process (workers 0) or on a local Dask cluster of N worker processes
                (workflows/cluster.py, what `preprocess --workers N` starts): input rows / second, wall time of
                the whole preprocess (read, fit, transform, write), cluster start-up excluded
    train       `merlin-hstu train --nproc P` (torchrun underneath, merlin_hstu/distributed/) on that preprocess
                output, one epoch cut at --steps optimizer steps: samples / second and tokens / second over the
                training time rank 0 records (evaluation and start-up excluded).  samples = the global batches'
                rows; tokens = samples x the mean history length of the training samples (the supervised positions)
    memory      one item table (rows x dim, fp32) as a torchrec EmbeddingCollection sharded row-wise by
                DistributedModelParallel over R gloo ranks with fused row-wise Adagrad: bytes of each rank's local
                table shards and of its optimizer state, beside rows x dim x 4 / R

`plan(PlanInputs)` is the arithmetic of docs/scaling.md's plan (tables, optimizer state, dense parameters,
activations, GPUs and nodes, hours per epoch, serving fan-out); `format_plan` prints it with each figure's
formula and status: measured, assumption (an input to replace once measured) or extrapolated (computed).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

BYTES_FP32 = 4
GB = 1e9


# ------------------------------------------------------------------------------------------------------------
# the plan: arithmetic only (no torch), tested against hand-computed values
# ------------------------------------------------------------------------------------------------------------
@dataclass
class PlanInputs:
    """Inputs of the 1B-user plan.  Defaults: the reference's ML-20M HSTU-large stack (D 256, 16 blocks, 8 heads
    of dqk = dv = 32) with a longer history; every throughput is an assumption until measured."""

    users: float = 1e9
    items: float = 1e8
    embedding_dim: int = 256  # item table width = the stack's D
    num_blocks: int = 16
    num_heads: int = 8
    attention_dim: int = 32  # dqk per head
    linear_dim: int = 32  # dv per head
    sequence_length: int = 1024  # W: tokens per training sequence (history window)
    num_time_buckets: int = 128
    events: float = 1e11  # events in the log = tokens of one epoch (1B users x 100 events)
    gpus_per_node: int = 8
    gpu_memory_gb: float = 80.0
    usable_fraction: float = 0.8  # of a GPU's memory for tables, optimizer, weights and activations
    gpu_tokens_per_s: float = 1e6  # ASSUMPTION: training tokens / s per GPU at this model (bf16), until measured
    cpu_tokens_per_s: Optional[float] = None  # MEASURED by `bench scale` (all processes together) ...
    cpu_model_flops_per_token: Optional[float] = None  # ... at a model of this many training FLOPs per token
    cpu_processes: int = 2  # ... on this many processes (cores)
    serving_qps: float = 10_000.0  # target recommendation requests / s
    serving_gpu_tflops: float = 200.0  # ASSUMPTION: sustained TFLOP/s per GPU for batched bf16 scoring GEMMs
    serving_top_k: int = 200
    serving_shards: int = 8  # the item table split over this many GPUs for top-K (one node)
    serving_bytes_per_value: int = 2  # bf16 item table for serving


def dense_parameters(d: int, blocks: int, heads: int, dqk: int, dv: int, max_seq_len: int,
                     time_buckets: int = 128, position_bias: bool = True, time_bias: bool = True) -> int:
    """Parameters of our STU stack (merlin_hstu.encoders.stu.STULayer) without embeddings: per layer
    W_uvqk d x (2 H dv + 2 H dqk), output Linear (H dv) x d + d, relative bias 2N - 1 positions + buckets + 1."""
    per_layer = d * (2 * heads * dv + 2 * heads * dqk) + heads * dv * d + d
    per_layer += (2 * max_seq_len - 1 if position_bias else 0) + (time_buckets + 1 if time_bias else 0)
    return blocks * per_layer


def flops_per_token(d: int, blocks: int, heads: int, dqk: int, dv: int, length: int) -> float:
    """Training FLOPs per token (forward + backward = 3 x forward): the matmuls 2 x (d (2H dv + 2H dqk) + H dv d) and
    causal attention 2 x (W / 2) x H (dqk + dv) per layer (the mean query attends to W / 2 keys)."""
    matmul = 2 * (d * (2 * heads * dv + 2 * heads * dqk) + heads * dv * d)
    attention = 2 * (length / 2) * heads * (dqk + dv)
    return 3.0 * blocks * (matmul + attention)


def activation_bytes(d: int, blocks: int, heads: int, dqk: int, dv: int, length: int, fused: bool = False) -> float:
    """fp32 bytes autograd keeps per training sequence of W tokens (estimate): per layer the attention scores
    before and after SiLU 2 x H x W x W (not with a fused kernel, which recomputes them), u v q k
    W (2 H dv + 2 H dqk), the attention output, its norm and the gated product 3 W H dv, and the layer input, its
    norm and the output 3 W d."""
    per_layer = length * (2 * heads * dv + 2 * heads * dqk) + 3 * length * heads * dv + 3 * length * d
    if not fused:
        per_layer += 2 * heads * length * length
    return float(BYTES_FP32 * blocks * per_layer)


def plan(p: PlanInputs) -> List[dict]:
    """The plan as rows {name, formula, value, unit, status}; status: assumption | measured | extrapolated."""
    rows: List[dict] = []

    def row(name: str, formula: str, value: float, unit: str, status: str = "extrapolated") -> float:
        rows.append({"name": name, "formula": formula, "value": value, "unit": unit, "status": status})
        return value

    d, H, L, W = p.embedding_dim, p.num_heads, p.num_blocks, p.sequence_length
    table = row("item table", "items x d x 4 B", p.items * d * BYTES_FP32 / GB, "GB")
    adagrad = row("row-wise Adagrad state", "items x 1 x 4 B", p.items * BYTES_FP32 / GB, "GB")
    adam = row("Adam state (for comparison)", "items x 2d x 4 B", p.items * 2 * d * BYTES_FP32 / GB, "GB")
    row("user-id table (HSTU has none: a user is its history)", "users x d x 4 B, not allocated",
        p.users * d * BYTES_FP32 / GB, "GB")
    dense = row("HSTU dense parameters", "L (d (2H dv + 2H dqk) + H dv d + d + 2W - 1 + buckets + 1)",
                dense_parameters(d, L, H, p.attention_dim, p.linear_dim, W, p.num_time_buckets), "params")
    dense_gb = row("dense weights + grads + Adam", "params x 4 x 4 B", dense * 4 * BYTES_FP32 / GB, "GB")
    act = row("activations per sequence (unfused attention)", "4 B x L (2 H W^2 + W (2H dv + 2H dqk) + 3 W H dv + 3 W d)",
              activation_bytes(d, L, H, p.attention_dim, p.linear_dim, W) / GB, "GB")
    act_fused = row("activations per sequence (fused attention)", "the same without 2 H W^2",
                    activation_bytes(d, L, H, p.attention_dim, p.linear_dim, W, fused=True) / GB, "GB")
    usable = row("usable memory per GPU", "gpu_memory x usable_fraction", p.gpu_memory_gb * p.usable_fraction,
                 "GB", "assumption")
    node = row("usable memory per node", "gpus_per_node x usable per GPU", p.gpus_per_node * usable, "GB")
    sparse = table + adagrad
    gpus_tables = row("GPUs to hold table + Adagrad state", "ceil((table + Adagrad) / (usable - dense))",
                      math.ceil(sparse / (usable - dense_gb)), "GPUs")
    row("nodes to hold table + Adagrad state", "ceil(GPUs / gpus_per_node)",
        math.ceil(gpus_tables / p.gpus_per_node), "nodes")
    row("nodes to hold table + Adam state (for comparison)", "ceil((table + Adam) / node memory)",
        math.ceil((table + adam) / node), "nodes")
    for label, per_seq in (("unfused", act), ("fused", act_fused)):
        row(f"sequences per GPU batch ({label})", f"floor((usable - dense - table shard) / activations {label})",
            math.floor((usable - dense_gb - sparse / max(gpus_tables, 1)) / per_seq), "sequences")
    fpt = row("training FLOPs per token", "3 L (2 (d (2H dv + 2H dqk) + H dv d) + W H (dqk + dv))",
              flops_per_token(d, L, H, p.attention_dim, p.linear_dim, W), "FLOP")
    gpu_tps = row("training tokens / s per GPU", "input", p.gpu_tokens_per_s, "tokens/s", "assumption")
    row("implied sustained TFLOP/s per GPU", "tokens/s x FLOPs per token", gpu_tps * fpt / 1e12, "TFLOP/s")
    row("tokens in one epoch", "events", p.events, "tokens", "assumption")
    gpu_hours = row("GPU-hours per epoch", "events / tokens per s per GPU / 3600", p.events / gpu_tps / 3600,
                    "GPU-h")
    nodes = max(1, math.ceil(gpus_tables / p.gpus_per_node))
    row(f"hours per epoch on {nodes} node(s) of {p.gpus_per_node} GPUs", "GPU-hours / (nodes x gpus_per_node)",
        gpu_hours / (nodes * p.gpus_per_node), "h")
    if p.cpu_tokens_per_s and p.cpu_model_flops_per_token:
        cpu = row("CPU training tokens / s (bench scale, its model)", "measured", p.cpu_tokens_per_s, "tokens/s",
                  "measured")
        per_process = row("CPU sustained GFLOP/s per process", "tokens/s x its FLOPs per token / processes",
                          cpu * p.cpu_model_flops_per_token / p.cpu_processes / 1e9, "GFLOP/s")
        row("CPU process-hours per epoch at the plan's model", "events x FLOPs per token / (GFLOP/s per process) "
            "/ 3600", p.events * fpt / (per_process * 1e9) / 3600, "process-h")
    # serving: the user tower once per request, top-K over the catalogue split in shards
    tower = row("user tower FLOPs per request", "FLOPs per token / 3 x W (forward, full history)", fpt / 3 * W,
                "FLOP")
    row("user tower requests / s per GPU", "serving TFLOP/s / tower FLOPs",
        p.serving_gpu_tflops * 1e12 / tower, "req/s")
    score = row("brute-force top-K FLOPs per request", "2 x items x d", 2 * p.items * d, "FLOP")
    row("serving table per shard (bf16)", "items x d x bytes / shards",
        p.items * d * p.serving_bytes_per_value / p.serving_shards / GB, "GB")
    row("brute-force requests / s per shard set", "shards x serving TFLOP/s / top-K FLOPs",
        p.serving_shards * p.serving_gpu_tflops * 1e12 / score, "req/s")
    row("GPUs for brute-force top-K at the target QPS", "ceil(QPS x (top-K + tower FLOPs) / serving TFLOP/s)",
        math.ceil(p.serving_qps * (score + tower) / (p.serving_gpu_tflops * 1e12)), "GPUs")
    row("candidates merged per request", "shards x K", p.serving_shards * p.serving_top_k, "items")
    return rows


def _number(value: float) -> str:
    if value == 0 or (1e-2 <= abs(value) < 1e6):
        return f"{value:,.2f}".rstrip("0").rstrip(".")
    return f"{value:.3g}"


def format_plan(p: PlanInputs, rows: Optional[List[dict]] = None) -> str:
    rows = rows if rows is not None else plan(p)
    width = max(len(r["name"]) for r in rows)
    lines = [f"plan: {p.users:.3g} users, {p.items:.3g} items, d={p.embedding_dim}, {p.num_blocks} blocks x "
             f"{p.num_heads} heads (dqk {p.attention_dim}, dv {p.linear_dim}), W={p.sequence_length}, "
             f"{p.events:.3g} events per epoch, {p.gpus_per_node} x {p.gpu_memory_gb:g} GB GPUs per node"]
    for r in rows:
        lines.append(f"  {r['name']:<{width}}  {_number(r['value']):>12} {r['unit']:<10} [{r['status']}]  "
                     f"{r['formula']}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------------
# the machine
# ------------------------------------------------------------------------------------------------------------
def machine_stamp() -> dict:
    """CPU model, cores, torch version, device and the date (UTC) of a measurement."""
    import datetime

    from merlin_hstu.bench.retrieval import machine_info

    info = machine_info()
    info["device"] = info["gpu"] or "cpu"
    info["date"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return info


def stamp_line(info: dict) -> str:
    return (f"machine: {info['cpu']}; cores {info['cores']}; torch {info['torch']}; device {info['device']}; "
            f"date {info['date']}")


# ------------------------------------------------------------------------------------------------------------
# measurements
# ------------------------------------------------------------------------------------------------------------
def _env(threads: int) -> dict:
    root = str(Path(__file__).resolve().parents[2])
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": root + (os.pathsep + path if path else ""),
            "PYTHONUNBUFFERED": "1"}


def _run(cmd: List[str], threads: int, what: str, timeout: float) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(threads), timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {proc.returncode}): {' '.join(cmd)}\n{proc.stdout[-2000:]}\n"
                           f"{proc.stderr[-3000:]}")
    return proc.stdout


def source_events(args):
    """The log to expand: --input, or a registered dataset; its first --users users when given."""
    import pandas as pd

    from merlin_hstu.workflows.datasets import read_events
    from merlin_hstu.data.fractal import FractalConfig

    events = read_events(None if args.input else args.dataset, args.input)
    if args.users:
        column = FractalConfig().user_column
        if column not in events.columns:
            raise ValueError(f"the source log has no {column!r} column (columns: {list(events.columns)})")
        keep = pd.unique(events[column])[: args.users]
        events = events[events[column].isin(keep)].reset_index(drop=True)
    return events


def measure_nvtabular(expanded: Path, work: Path, workers: Sequence[int], max_history: int) -> List[dict]:
    """Preprocess the expansion at each worker count: rows / s of the whole preprocess (cluster start excluded)."""
    import pandas as pd

    from merlin_hstu.data.fractal import MANIFEST
    from merlin_hstu.workflows.cluster import dask_cluster
    from merlin_hstu.workflows.session_workflow import SessionWorkflowConfig, preprocess

    manifest = json.loads((expanded / MANIFEST).read_text())
    frame = pd.concat([pd.read_parquet(expanded / part["file"]) for part in manifest["parts"]], ignore_index=True)
    config = SessionWorkflowConfig(action_column=None, max_length=max_history + 2)
    results = []
    for n in workers:
        out = work / f"data-w{n}"
        with dask_cluster(workers=n) as cluster:
            start = time.perf_counter()
            preprocess(frame, out, config, overwrite=True)
            seconds = time.perf_counter() - start
        results.append({"workers": n, "rows": len(frame), "seconds": seconds, "rows_per_s": len(frame) / seconds,
                        "dask": cluster is not None, "output": str(out)})
    return results


def training_samples(data: Path, max_history: int) -> tuple:
    """(training samples per epoch, their mean history length) of the leave-one-out split `train` builds."""
    from merlin_hstu.retrieval.data import LeaveOneOut, load_processed

    split = LeaveOneOut(load_processed(data), max_history=max_history)
    lengths = split.train.lengths
    return int(len(lengths)), float(lengths.mean()) if len(lengths) else 0.0


def measure_training(data: Path, work: Path, nprocs: Sequence[int], args) -> List[dict]:
    """`merlin-hstu train --nproc P` for each P; samples / s and tokens / s over rank 0's training time."""
    from merlin_hstu.retrieval.config import load_config

    overrides = ["train.epochs=1", f"train.max_steps={args.steps}", f"train.batch_size={args.batch_size}",
                 "train.eval_every=0", f"model.embeddings={args.embeddings}", *args.overrides]
    cfg = load_config(args.config, [*overrides, f"data.max_history={args.max_history}"])
    samples_per_epoch, mean_length = training_samples(data, args.max_history)
    cores = os.cpu_count() or 1
    results = []
    for nproc in nprocs:
        run = work / f"run-p{nproc}"
        cmd = [sys.executable, "-m", "merlin_hstu.cli.main", "train", "--data", str(data), "--output", str(run),
               "--config", args.config, "--max-history", str(args.max_history), "--no-progress", "--overwrite"]
        if nproc > 1:
            cmd += ["--nproc", str(nproc)]
        for o in overrides:
            cmd += ["--set", o]
        threads = max(1, cores // nproc)
        _run(cmd, threads, f"train with {nproc} process(es)", timeout=args.timeout)
        record = json.loads((run / "metrics.json").read_text())
        steps = int(json.loads((run / "run.json").read_text())["steps"])
        samples = min(steps * cfg.train.batch_size, samples_per_epoch)
        seconds = float(record["train_seconds"])
        results.append({"processes": nproc, "threads_per_process": threads, "steps": steps,
                        "global_batch": cfg.train.batch_size, "samples": samples, "mean_length": mean_length,
                        "tokens": samples * mean_length, "seconds": seconds, "samples_per_s": samples / seconds,
                        "tokens_per_s": samples * mean_length / seconds, "embeddings": args.embeddings,
                        "model": cfg.name, "flops_per_token": flops_per_token(
                            cfg.model.embedding_dim, cfg.model.num_blocks, cfg.model.num_heads,
                            cfg.model.attention_dim, cfg.model.linear_dim, args.max_history + 1)})
    return results


def measure_memory(rows: Sequence[int], dim: int, ranks: Sequence[int], work: Path, timeout: float) -> List[dict]:
    """Row-wise sharded item tables on R gloo ranks (torchrun): per-rank bytes of table shards and optimizer state."""
    results = []
    for r in ranks:
        out = work / f"memory-r{r}.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(r), "--standalone", "-m",
               "merlin_hstu.bench.scale", "--memory-worker", ",".join(map(str, rows)), str(dim), str(out)]
        _run(cmd, 1, f"the sharded-table worker on {r} rank(s)", timeout=timeout)
        results.extend(json.loads(out.read_text()))
    return results


def _memory_worker(rows_list: Sequence[int], dim: int, out: Path) -> int:
    """Inside torchrun: shard each table row-wise, gather every rank's local bytes, rank 0 writes them."""
    import resource
    import warnings

    import torch
    from torch import nn

    from merlin_hstu.common.embeddings import to_torchrec
    from merlin_hstu.distributed.context import init_from_env, shutdown
    from merlin_hstu.distributed.sharding import shard_model

    warnings.filterwarnings("ignore", category=FutureWarning)  # torchrec: ShardedTensor is deprecated
    ctx = init_from_env(torch.device("cpu"))

    def local_bytes(state: dict) -> int:
        total = 0
        for value in state.values():
            for shard in (value.local_shards() if hasattr(value, "local_shards") else []):
                total += shard.tensor.numel() * shard.tensor.element_size()
        return total

    records = []
    for rows in rows_list:
        module = nn.Module()
        module.item_embedding = nn.Embedding(rows, dim)
        to_torchrec(module, {"item_embedding": "item"})
        dmp = shard_model(module, ctx, sharding="row_wise", sparse_optimizer="rowwise_adagrad")
        table = local_bytes(dmp.state_dict())
        optimizer = sum(local_bytes(state) for state in dmp.fused_optimizer.state_dict()["state"].values())
        mine = {"rows": rows, "dim": dim, "ranks": ctx.world_size, "rank": ctx.rank, "table_bytes": table,
                "optimizer_bytes": optimizer, "expected_table_bytes": rows * dim * BYTES_FP32 / ctx.world_size,
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
        records.extend(ctx.all_gather_object(mine))
        del dmp, module
    if ctx.is_main:
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(records))
        tmp.replace(out)
    ctx.barrier()  # no rank leaves the group while another still talks to it
    shutdown()
    # Leave without C++ static destructors: now and then a gloo / fbgemm helper thread is still joinable at exit
    # and libstdc++ aborts ("terminate called without an active exception") after the work is done and written.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# ------------------------------------------------------------------------------------------------------------
# the command
# ------------------------------------------------------------------------------------------------------------
PARTS = ("nvtabular", "train", "memory")


def _ints(text: str, flag: str, low: int = 0) -> List[int]:
    try:
        values = [int(float(v)) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{flag}: expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < low:
        raise ValueError(f"{flag}: expected integers >= {low}, got {text!r}")
    return values


def run_scale(args) -> int:
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown or not parts:
        raise ValueError(f"--parts: unknown part(s) {unknown or parts}; choose from {', '.join(PARTS)}")
    workers, nprocs = _ints(args.dask_workers, "--dask-workers"), _ints(args.nproc, "--nproc", 1)
    rows, ranks = _ints(args.table_rows, "--table-rows", 1), _ints(args.ranks, "--ranks", 1)
    for name in ("steps", "batch_size", "max_history", "table_dim", "user_factor", "item_factor"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    work = Path(args.output)
    work.mkdir(parents=True, exist_ok=True)
    info = machine_stamp()
    record: dict = {"benchmark": "scale", "machine": info, "argv": sys.argv[1:], "parts": parts}
    print(stamp_line(info), flush=True)

    data = None
    if "nvtabular" in parts or "train" in parts:
        from merlin_hstu.data.fractal import FractalConfig, expand

        events = source_events(args)
        expanded = work / "expanded"
        manifest = expand(events, expanded, FractalConfig(user_factor=args.user_factor,
                                                          item_factor=args.item_factor, seed=args.seed))
        record["expansion"] = {k: manifest[k] for k in ("source_events", "source_users", "source_items", "events",
                                                        "users", "items")}
        print(f"expanded {manifest['source_events']:,} events of {manifest['source_users']:,} users x "
              f"{manifest['source_items']:,} items by {args.user_factor} x {args.item_factor} -> "
              f"{manifest['events']:,} events, {manifest['users']:,} users x {manifest['items']:,} items", flush=True)
        nv_workers = workers if "nvtabular" in parts else [0]
        results = measure_nvtabular(expanded, work, nv_workers, args.max_history)
        data = Path(results[0]["output"])
        if "nvtabular" in parts:
            record["nvtabular"] = results
            print(f"\nNVTabular session workflow on the expansion ({stamp_line(info)}):")
            for r in results:
                how = f"{r['workers']} Dask worker(s)" if r["dask"] else "one process (no Dask)"
                print(f"nvtabular workers={r['workers']}: rows/s {r['rows_per_s']:.1f} (rows {r['rows']}, "
                      f"seconds {r['seconds']:.2f}; {how})", flush=True)
    if "train" in parts:
        results = measure_training(data, work, nprocs, args)
        record["train"] = results
        print(f"\ntraining, `merlin-hstu train --nproc P` ({stamp_line(info)}):")
        for r in results:
            print(f"train processes={r['processes']}: samples/s {r['samples_per_s']:.1f} tokens/s "
                  f"{r['tokens_per_s']:.1f} (steps {r['steps']}, global batch {r['global_batch']}, samples "
                  f"{r['samples']}, mean length {r['mean_length']:.1f}, seconds {r['seconds']:.2f}, threads/process "
                  f"{r['threads_per_process']}, model {r['model']}, embeddings {r['embeddings']})", flush=True)
    if "memory" in parts:
        results = measure_memory(rows, args.table_dim, ranks, work, args.timeout)
        record["memory"] = results
        print(f"\nembedding memory per rank, row-wise sharded torchrec table, fused row-wise Adagrad "
              f"({stamp_line(info)}):")
        for r in results:
            print(f"memory rows={r['rows']} dim={r['dim']} ranks={r['ranks']} rank={r['rank']}: table bytes "
                  f"{r['table_bytes']} optimizer bytes {r['optimizer_bytes']} (rows x dim x 4 / ranks = "
                  f"{r['expected_table_bytes']:.0f}; peak RSS {r['peak_rss_mb']:.0f} MB)", flush=True)
    tmp = work / "scale.json.tmp"
    tmp.write_text(json.dumps(record, indent=2, default=str))
    tmp.replace(work / "scale.json")
    print(f"\nwrote {work / 'scale.json'}")
    return 0


def plan_inputs(args) -> PlanInputs:
    """PlanInputs from the flags, with the CPU throughput of a `bench scale` record (--measured) when given."""
    p = PlanInputs(users=args.plan_users, items=args.plan_items, events=args.plan_events,
                   sequence_length=args.plan_length, gpu_tokens_per_s=args.gpu_tokens_per_s,
                   gpus_per_node=args.gpus_per_node, gpu_memory_gb=args.gpu_memory_gb, serving_qps=args.serving_qps)
    if args.measured:
        record = json.loads(Path(args.measured).read_text())
        train = record.get("train") or []
        if not train:
            raise ValueError(f"--measured {args.measured}: the record has no training figures (run bench scale with "
                             "--parts train)")
        best = max(train, key=lambda r: r["processes"])
        p.cpu_tokens_per_s, p.cpu_model_flops_per_token = best["tokens_per_s"], best["flops_per_token"]
        p.cpu_processes = best["processes"]
    return p


def cmd_bench_scale(args) -> int:
    if args.plan:
        p = plan_inputs(args)
        print(format_plan(p))
        return 0
    return run_scale(args)


def register_subcommands(subparsers, bench_subparsers) -> None:
    p = bench_subparsers.add_parser(
        "scale", help="scale-out figures: NVTabular rows/s with 1 and 2 Dask workers, training samples/s and "
                      "tokens/s at 1 and 2 processes, sharded embedding bytes per rank; --plan: the 1B-user plan",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Measure on this machine (each section printed with the CPU model, cores, torch version, device\n"
                    "and date): a source log grown by fractal expansion and preprocessed by the session workflow in\n"
                    "one process and on a local Dask cluster (--dask-workers); `merlin-hstu train --nproc P` on that\n"
                    "output (--nproc; one epoch cut at --steps steps); an item table sharded row-wise by torchrec\n"
                    "over R gloo ranks (--ranks, --table-rows). The defaults finish in a few minutes on a 2-core\n"
                    "machine. Writes OUTPUT/scale.json. With --plan, print the 1B-user / 100M-item plan instead\n"
                    "(docs/scaling.md): its arithmetic, each figure marked measured, assumption or extrapolated.",
        epilog="examples:\n  merlin-hstu bench scale                       # the defaults (a few minutes on 2 cores)\n"
               "  merlin-hstu bench scale --plan --measured runs/bench/scale/scale.json")
    p.add_argument("--dataset", default="ml-1m-prefix", help="registered dataset to expand (default ml-1m-prefix)")
    p.add_argument("--input", metavar="LOG", help="an event log (.csv / .parquet) to expand instead of --dataset")
    p.add_argument("--users", type=int, default=0, help="take the source's first N users (default: all)")
    p.add_argument("--user-factor", type=int, default=2, help="fractal expansion: users x this (default 2)")
    p.add_argument("--item-factor", type=int, default=2, help="fractal expansion: items x this (default 2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the expansion (default 0)")
    p.add_argument("--dask-workers", default="0,1,2",
                   help="Dask worker processes of each NVTabular run; 0 = one process without Dask (default 0,1,2)")
    p.add_argument("--nproc", default="1,2", help="training processes of each training run (default 1,2)")
    p.add_argument("--config", default="demo", help="retrieval preset trained (default demo)")
    p.add_argument("--max-history", type=int, default=50, help="history window of the data and model (default 50)")
    p.add_argument("--steps", type=int, default=30, help="optimizer steps per training run (default 30)")
    p.add_argument("--batch-size", type=int, default=128, help="global batch (default 128)")
    p.add_argument("--embeddings", choices=["torch", "torchrec"], default="torch",
                   help="training tables: torch (replicated, DDP) or torchrec (sharded by the planner; default torch)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="more training config overrides (repeatable)")
    p.add_argument("--table-rows", default="100000,1000000",
                   help="rows of each sharded table measured (default 100000,1000000)")
    p.add_argument("--table-dim", type=int, default=64, help="width of those tables (default 64)")
    p.add_argument("--ranks", default="1,2", help="ranks the tables are sharded over (default 1,2)")
    p.add_argument("--parts", default=",".join(PARTS), help=f"what to measure (default {','.join(PARTS)})")
    p.add_argument("--output", default="runs/bench/scale", help="work directory and scale.json (default "
                                                                 "runs/bench/scale)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds allowed per subprocess (default 1800)")
    g = p.add_argument_group("--plan (arithmetic only, nothing is measured)")
    g.add_argument("--plan", action="store_true", help="print the 1B-user / 100M-item plan and exit")
    g.add_argument("--measured", metavar="SCALE_JSON", help="a `bench scale` record: its CPU tokens/s enter the plan")
    g.add_argument("--plan-users", type=float, default=PlanInputs.users, help="users (default 1e9)")
    g.add_argument("--plan-items", type=float, default=PlanInputs.items, help="items (default 1e8)")
    g.add_argument("--plan-events", type=float, default=PlanInputs.events,
                   help="events in the log = tokens per epoch (default 1e11)")
    g.add_argument("--plan-length", type=int, default=PlanInputs.sequence_length,
                   help="tokens per training sequence W (default 1024)")
    g.add_argument("--gpu-tokens-per-s", type=float, default=PlanInputs.gpu_tokens_per_s,
                   help="ASSUMED training tokens/s per GPU until measured (default 1e6)")
    g.add_argument("--gpus-per-node", type=int, default=PlanInputs.gpus_per_node, help="default 8")
    g.add_argument("--gpu-memory-gb", type=float, default=PlanInputs.gpu_memory_gb, help="default 80")
    g.add_argument("--serving-qps", type=float, default=PlanInputs.serving_qps, help="target QPS (default 10000)")
    p.set_defaults(func=cmd_bench_scale)


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--memory-worker":
        sys.exit(_memory_worker([int(v) for v in sys.argv[2].split(",")], int(sys.argv[3]), Path(sys.argv[4])))
    sys.exit("usage: python -m merlin_hstu.bench.scale --memory-worker ROWS,.. DIM OUT.json (run by bench scale)")
