"""`merlin-hstu bench kernels`: HSTU attention speed, Triton vs the PyTorch reference vs torch SDPA.

For each max length L, head dim d and length distribution, one jagged batch holds a fixed number of tokens
(`--total-tokens`); sequences are drawn until the budget is met (the last one is cut to fit):

    uniform   lengths ~ U{1..L}
    zipf      lengths ~ Zipf(a) clipped to [1, L]: many short histories, a few long ones

Timed: forward, backward (given the forward's graph), forward+backward; median of `--iters` after
`--warmup`.  Achieved TFLOP/s counts the *useful* work of causal attention on real tokens, the same for
every implementation, so padding waste shows up as lower throughput:

    pairs  = sum_b n_b (n_b + 1) / 2                       (causal query/key pairs)
    fwd    = pairs * H * 2 * (dqk + dv)                     (S = QK^T and O = PV)
    bwd    = 2.5 * fwd                                      (recompute S, dV, dP, dQ, dK)

Implementations: "triton" (the jagged kernels), "pytorch" (the reference: pad to [B, W, H, d], dense
[B, H, W, W] scores), "sdpa" (torch scaled_dot_product_attention, causal, FlashAttention backend, on the
padded batch: softmax attention, a speed yardstick, not the same math).  On a machine without CUDA only the
PyTorch path runs, in fp32 at small sizes, and the output says so.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

GPU_DEFAULTS = dict(lengths="256,1024,4096,8192", dims="64,128", total_tokens=65536, heads=4, dtype="bf16",
                    iters=10, warmup=3, impls="triton,pytorch,sdpa")
CPU_DEFAULTS = dict(lengths="64,256", dims="64", total_tokens=2048, heads=2, dtype="fp32", iters=3, warmup=1,
                    impls="pytorch")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `merlin-hstu bench kernels` (unset ones take GPU or CPU defaults, see --help)."""
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                        help="auto: CUDA when available, else CPU (PyTorch path only)")
    parser.add_argument("--lengths", help=f"comma-separated max lengths L (GPU {GPU_DEFAULTS['lengths']}, "
                                          f"CPU {CPU_DEFAULTS['lengths']})")
    parser.add_argument("--dims", help="comma-separated head dims d = dqk = dv (GPU 64,128; CPU 64)")
    parser.add_argument("--total-tokens", type=int, help="tokens per batch (GPU 65536, CPU 2048)")
    parser.add_argument("--heads", type=int, help="attention heads (GPU 4, CPU 2)")
    parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), help="GPU bf16, CPU fp32 (CPU is fp32 only)")
    parser.add_argument("--dists", default="uniform,zipf", help="length distributions: uniform,zipf")
    parser.add_argument("--zipf-a", type=float, default=1.2, help="Zipf exponent of the zipf lengths")
    parser.add_argument("--impls", help="comma-separated: triton,pytorch,sdpa (CPU: pytorch only)")
    parser.add_argument("--iters", type=int, help="timed repetitions (median reported)")
    parser.add_argument("--warmup", type=int, help="untimed repetitions first")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the results to this JSON file")


@dataclass
class Result:
    impl: str
    dist: str
    max_len: int
    dim: int
    heads: int
    dtype: str
    total_tokens: int
    num_seqs: int
    fwd_ms: Optional[float]
    bwd_ms: Optional[float]
    fwd_bwd_ms: Optional[float]
    fwd_tflops: Optional[float]
    bwd_tflops: Optional[float]
    fwd_bwd_tflops: Optional[float]
    note: str = ""


def draw_lengths(dist: str, max_len: int, total_tokens: int, zipf_a: float, seed: int) -> list[int]:
    """Sequence lengths summing to exactly total_tokens, each in [1, max_len]."""
    import numpy as np

    rng = np.random.default_rng(seed)
    lengths: list[int] = []
    remaining = total_tokens
    while remaining > 0:
        if dist == "uniform":
            n = int(rng.integers(1, max_len + 1))
        elif dist == "zipf":
            n = int(min(rng.zipf(zipf_a), max_len))
        else:
            raise ValueError(f"--dists: unknown length distribution {dist!r}; use uniform and/or zipf")
        n = min(n, remaining)
        lengths.append(n)
        remaining -= n
    return lengths


def useful_flops(lengths: list[int], heads: int, dqk: int, dv: int) -> float:
    pairs = sum(n * (n + 1) // 2 for n in lengths)
    return float(pairs) * heads * 2 * (dqk + dv)


def device_timer(device: str) -> Callable[[Callable[[], None]], float]:
    """timer(fn) -> ms of one call: CUDA events around it on "cuda" (then a sync), perf_counter on CPU."""
    import torch

    def cuda_time(fn) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)

    def cpu_time(fn) -> float:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    return cuda_time if device == "cuda" else cpu_time


def _make_impl(impl: str, q, k, v, offsets, lengths, max_len: int):
    """A function computing the attention output from (q, k, v) leaves, for one implementation."""
    import torch

    from merlin_hstu.kernels.attention_ops import hstu_attention, jagged_to_padded

    if impl in ("triton", "pytorch"):
        return lambda: hstu_attention(q, k, v, offsets, max_len, kernel=impl)
    if impl == "sdpa":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        lengths_t = torch.tensor(lengths, device=q.device)
        token_mask = torch.arange(max(lengths), device=q.device).unsqueeze(0) < lengths_t.unsqueeze(1)

        def sdpa():
            qp, kp, vp = (jagged_to_padded(t, token_mask).transpose(1, 2) for t in (q, k, v))  # [B, H, W, d]
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                out = torch.nn.functional.scaled_dot_product_attention(qp, kp, vp, is_causal=True)
            return out.transpose(1, 2)[token_mask]

        return sdpa
    raise ValueError(f"--impls: unknown implementation {impl!r}; use triton, pytorch, sdpa")


def bench_one(impl: str, lengths: list[int], dim: int, heads: int, dtype, device: str, iters: int, warmup: int,
              seed: int) -> tuple[Optional[float], Optional[float], Optional[float], str]:
    """(fwd_ms, bwd_ms, fwd_bwd_ms, note) for one implementation on one batch."""
    import torch

    gen = torch.Generator(device="cpu").manual_seed(seed)
    total = sum(lengths)
    q, k, v = (
        (torch.randn(total, heads, dim, generator=gen) * 0.5).to(device=device, dtype=dtype).requires_grad_(True)
        for _ in range(3)
    )
    offsets = torch.tensor([0] + lengths, device=device).cumsum(0)
    fn = _make_impl(impl, q, k, v, offsets, lengths, max(lengths))
    grad_out = torch.randn(total, heads, dim, generator=gen).to(device=device, dtype=dtype)
    timer = device_timer(device)
    state: dict = {}

    def fwd():
        with torch.no_grad():
            fn()

    def fwd_for_bwd():
        state["out"] = fn()

    def bwd():
        state["out"].backward(grad_out)

    def fwd_bwd():
        fn().backward(grad_out)

    try:
        for _ in range(warmup):
            fwd_bwd()
        fwd_ms = statistics.median(timer(fwd) for _ in range(iters))
        bwd_times = []
        for _ in range(iters):
            fwd_for_bwd()
            if device == "cuda":
                torch.cuda.synchronize()
            bwd_times.append(timer(bwd))
        fb_ms = statistics.median(timer(fwd_bwd) for _ in range(iters))
        return fwd_ms, statistics.median(bwd_times), fb_ms, ""
    except torch.OutOfMemoryError:
        return None, None, None, "out of memory"
    except RuntimeError as exc:  # e.g. no flash kernel for this dtype / head dim
        return None, None, None, f"failed: {str(exc).splitlines()[0][:120]}"
    finally:
        state.clear()
        if device == "cuda":
            torch.cuda.empty_cache()


def _settings(args: argparse.Namespace, device: str) -> dict:
    defaults = GPU_DEFAULTS if device == "cuda" else CPU_DEFAULTS
    s = {name: getattr(args, name) if getattr(args, name, None) is not None else value
         for name, value in defaults.items()}
    if device == "cpu":
        if s["dtype"] != "fp32":
            raise ValueError("--dtype: the CPU benchmark runs fp32 only (bf16/fp16 timings need a CUDA device)")
        extra = [i for i in s["impls"].split(",") if i != "pytorch"]
        if extra:
            raise ValueError(f"--impls: {','.join(extra)} need a CUDA device; on CPU only 'pytorch' runs")
    for name in ("total_tokens", "heads", "iters"):
        if s[name] <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {s[name]}")
    if s["warmup"] < 0:
        raise ValueError(f"--warmup must be >= 0, got {s['warmup']}")
    return s


def _ints(text: str, flag: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{flag} must be comma-separated integers, got {text!r}") from None
    if not values or any(x <= 0 for x in values):
        raise ValueError(f"{flag} must be positive integers, got {text!r}")
    return values


def _fmt(x: Optional[float], spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _write_json(path: str, payload: dict) -> None:
    """Temp file + rename, so a half-written file never looks complete."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        json.dump(payload, fh, indent=2)
    os.replace(tmp, target)


def run(args: argparse.Namespace) -> int:
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available on this machine")
    device = "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    s = _settings(args, device)
    lengths_grid, dims = _ints(s["lengths"], "--lengths"), _ints(s["dims"], "--dims")
    dists = [d for d in args.dists.split(",") if d]
    impls = [i for i in s["impls"].split(",") if i]
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[s["dtype"]]

    if device == "cuda":
        print(f"device: {torch.cuda.get_device_name()} (torch {torch.__version__})")
    else:
        print(f"device: CPU, {os.cpu_count()} cores, {platform.processor() or platform.machine()} "
              f"(torch {torch.__version__}, {torch.get_num_threads()} threads)")
        print("no CUDA device: reporting the PyTorch reference only (fp32, small sizes); Triton and SDPA "
              "figures need a GPU.")
    print(f"config: total_tokens={s['total_tokens']} heads={s['heads']} dtype={s['dtype']} dists={dists} "
          f"zipf_a={args.zipf_a} iters={s['iters']} warmup={s['warmup']} seed={args.seed}; TFLOP/s = useful "
          "causal work (see `kernels/bench.py`)")
    header = (f"{'impl':8} {'dist':8} {'L':>6} {'d':>4} {'seqs':>5} {'fwd ms':>9} {'bwd ms':>9} {'f+b ms':>9} "
              f"{'fwd TF/s':>9} {'bwd TF/s':>9} {'f+b TF/s':>9}  note")
    print(header)
    results: list[Result] = []
    for max_len in lengths_grid:
        for dim in dims:
            for dist in dists:
                lengths = draw_lengths(dist, max_len, s["total_tokens"], args.zipf_a, args.seed)
                flops = useful_flops(lengths, s["heads"], dim, dim)
                for impl in impls:
                    fwd, bwd, fb, note = bench_one(impl, lengths, dim, s["heads"], dtype, device, s["iters"],
                                                   s["warmup"], args.seed)

                    def tflops(ms: Optional[float], work: float) -> Optional[float]:
                        return None if ms is None else work / (ms * 1e-3) / 1e12

                    r = Result(impl, dist, max_len, dim, s["heads"], str(dtype).replace("torch.", ""),
                               s["total_tokens"], len(lengths), fwd, bwd, fb, tflops(fwd, flops),
                               tflops(bwd, 2.5 * flops), tflops(fb, 3.5 * flops), note)
                    results.append(r)
                    print(f"{impl:8} {dist:8} {max_len:>6} {dim:>4} {len(lengths):>5} {_fmt(fwd, '9.3f')} "
                          f"{_fmt(bwd, '9.3f')} {_fmt(fb, '9.3f')} {_fmt(r.fwd_tflops, '9.4f')} "
                          f"{_fmt(r.bwd_tflops, '9.4f')} {_fmt(r.fwd_bwd_tflops, '9.4f')}  {note}", flush=True)
    if args.json:
        _write_json(args.json, {"device": device, "settings": s, "results": [asdict(r) for r in results]})
        print(f"wrote {args.json}")
    return 0


def register_subcommands(subparsers, bench_subparsers) -> None:
    """Hook for merlin_hstu.cli.main.EXTENSION_MODULES: adds `bench kernels`."""
    p = bench_subparsers.add_parser("kernels", help="HSTU attention: Triton vs PyTorch reference vs SDPA",
                                    description=__doc__.split("\n\n")[0])
    add_arguments(p)
    p.set_defaults(func=run)
