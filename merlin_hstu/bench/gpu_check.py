"""`merlin-hstu bench gpu-check`: the prepared GPU check, one table headed by the device name.

Written before any GPU was lent, so that on the day one is (e.g. an H200) a single command measures what the
CPU sessions could not, in well under 8 minutes:

    make gpu-check        (= merlin-hstu bench gpu-check --output gpu_check.json, TRITON_INTERPRET=0)
    python -m merlin_hstu.bench.gpu_check --dry-run        every section on CPU at tiny sizes, < 1 minute

Sections (times: CUDA events + synchronize on GPU, perf_counter on CPU; warm-up runs excluded; medians):

1. parity    Triton HSTU attention (`hstu_attention(..., kernel="triton")`) against the PyTorch op
             (`kernel="pytorch"`) on the same inputs: output and dq, dk, dv, d bias, in fp32 and bf16, with the
             causal, target-aware (num_targets) and contextual masks, a learned-bias-like attn_bias every time.
             err = max |triton - pytorch| per tensor; PASS when err <= tol * max |pytorch| (error relative to the
             tensor's scale, so one tolerance fits outputs and gradients of different magnitudes):
               fp32 tol 1e-4: both sides multiply in exact fp32 (the kernel uses "ieee" dots, the op cuBLAS
                    without TF32) and differ only in summation order, ~sqrt(W) * 6e-8 relative (W <= 512 keys:
                    ~1e-6); 1e-4 leaves two orders of margin and still catches a wrong mask entry or tile.
               bf16 tol 2e-2: the op rounds S, SiLU(S)/N and dP to bf16 (unit roundoff 2^-8 = 3.9e-3) before
                    its matmuls, the kernel keeps S in fp32 and rounds only P for the dot: a few bf16 ulps of
                    the largest value apart; 2e-2 = 5 ulps.  A masking bug moves whole terms: errors O(1).
               fp16 tol 5e-3 (dry run only, see below): the same reasoning with roundoff 2^-11 = 4.9e-4.
             Any FAIL makes the command exit 1.
2. speed     forward+backward of the attention, bf16, heads and head dim of the hstu-large-ml1m preset, one
             jagged batch of a fixed number of tokens per max length L (lengths ~ U{1..L}, kernels/bench.py's
             `draw_lengths`, timed by its `bench_one`): Triton, the PyTorch op, and torch SDPA (FlashAttention
             backend on the padded batch: *softmax* attention, a different function, the speed yardstick people
             know).  Ratio columns: time / Triton time.  A cell that runs out of memory prints "oom".
3. train     one optimizer step (forward + backward + AdamW) of `next_item_training_loss` on the hstu-large-ml1m
             retrieval model (built by `retrieval.train.build_model` from `load_config("hstu-large-ml1m")`), a
             synthetic batch of the preset's batch size with full histories; fp32 and bf16 autocast, with the
             Triton and the PyTorch attention.  Before timing, one step runs under a dispatch-mode recorder
             that lists every op producing a non-scalar tensor off the check's device, with the package line
             that issued it (the "device-clean" check).
4. mfalcon   `MFalconScorer` on a DlrmHSTU built like `bench mfalcon` (its defaults), one user with a long
             history: 1k..16k candidates in micro-batches, prefill and scoring ms, candidates/s; against
             `score_without_cache` (the full model per micro-batch) at the smallest size, with the largest
             score difference between the two.

The dry run under the Triton interpreter uses fp16 wherever the GPU run uses bf16: the interpreter of
triton 3.9 multiplies bf16 tl.dot operands wrongly (a 16x16 probe is off by 2e10; fp16 is exact), so bf16
Triton figures exist on a GPU only.  The code path (16-bit inputs, fp32 accumulation) is the same.

`--output PATH.json` writes the same figures (rewritten after every section, so a run cut short keeps what it
measured).  A section that raises is reported with the package line it came from, and the exit status is 1.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

from merlin_hstu.common.atomic_dir import write_file

PRESET = "hstu-large-ml1m"
ML1M_ITEMS = 3706  # movies with at least one rating in MovieLens-1M: the preset's catalogue size
FIRST_ITEM_ID = 3  # NVTabular Categorify: 0 pad, 1 null, 2 OOV (SequenceTable's default)
TOLERANCES = {"float32": 1e-4, "bfloat16": 2e-2, "float16": 5e-3}  # relative to max |reference|; module docstring
MASKS = ("causal", "target-aware", "contextual")
SECTIONS = ("parity", "speed", "train", "mfalcon")
CONTEXTUAL_LEN = 3  # contextual prefix of the parity "contextual" case
TRUE = ("1", "true", "on", "yes")


@dataclass(frozen=True)
class Sizes:
    """Everything the GPU run and the dry run differ in; the code paths are the same."""

    warmup: int
    iters: int
    parity_batch: int
    parity_max_len: int
    parity_extra_dims: tuple  # head dims checked besides the preset's
    speed_lengths: tuple
    speed_total_tokens: int
    train_overrides: tuple  # on top of the preset (the GPU run uses it as is)
    train_num_items: int
    mfalcon_history: int
    mfalcon_candidates: tuple
    mfalcon_micro_batch: int
    mfalcon_model: tuple  # bench mfalcon flags overridden: (("embedding_dim", 16), ...)


GPU_SIZES = Sizes(
    warmup=3, iters=10, parity_batch=8, parity_max_len=512, parity_extra_dims=(64,),
    speed_lengths=(256, 512, 1024, 2048, 4096, 8192), speed_total_tokens=32768,
    train_overrides=(), train_num_items=ML1M_ITEMS + FIRST_ITEM_ID,
    mfalcon_history=8192, mfalcon_candidates=(1024, 2048, 4096, 8192, 16384), mfalcon_micro_batch=256,
    mfalcon_model=(),
)
DRY_SIZES = Sizes(
    warmup=1, iters=2, parity_batch=3, parity_max_len=40, parity_extra_dims=(),
    speed_lengths=(32, 64), speed_total_tokens=64,
    train_overrides=("model.embedding_dim=16", "model.num_blocks=2", "model.attention_dim=8", "model.linear_dim=8",
                     "model.max_seq_len=16", "data.max_history=12", "train.batch_size=4", "train.num_negatives=16"),
    train_num_items=64,
    mfalcon_history=48, mfalcon_candidates=(8, 16), mfalcon_micro_batch=4,
    mfalcon_model=(("embedding_dim", 16), ("num_blocks", 2), ("head_dim", 8), ("num_items", 500)),
)


class CheckError(ValueError):
    """A setup problem the user must fix (missing CUDA, interpreter on a GPU run, bad flags)."""


# ------------------------------------------------------------------------------------------------------
# Small helpers: timing, locations, formatting
# ------------------------------------------------------------------------------------------------------
def median_ms(fn: Callable[[], object], device: str, warmup: int, iters: int) -> float:
    """Median ms of `iters` calls after `warmup` untimed ones, with kernels/bench.py's device timer."""
    from merlin_hstu.kernels.bench import device_timer

    timer = device_timer(device)
    for _ in range(warmup):
        fn()
    if device == "cuda":
        import torch

        torch.cuda.synchronize()
    return statistics.median(timer(fn) for _ in range(iters))


def _package_roots() -> tuple:
    import merlin_hstu
    import merlin_hstu.kernels

    return (str(Path(merlin_hstu.__file__).parent), str(Path(merlin_hstu.kernels.__file__).parent))


def package_location(frames) -> str:
    """'file.py:line in func' of the innermost frame inside the package (this module excluded)."""
    roots, here = _package_roots(), str(Path(__file__).resolve())
    for frame in reversed(list(frames)):
        name = str(Path(frame.filename).resolve())
        if name != here and name.startswith(roots):
            rel = os.path.relpath(name, str(Path(roots[0]).parent))
            return f"{rel}:{frame.lineno} in {frame.name}"
    return "(no package frame: autograd backward or library code)"


def off_device_ops(fn: Callable[[], object], device_type: str) -> list:
    """Run fn() once and list [{'where', 'ops'}] for every op that produced a non-scalar tensor on a device other
    than `device_type`: a tensor built on the side (e.g. a CPU arange next to CUDA activations).  0-dim CPU
    tensors are legitimate (Python scalars, optimizer step counters) and are ignored."""
    import torch
    from torch.utils._pytree import tree_flatten
    from torch.utils._python_dispatch import TorchDispatchMode

    found: dict = {}

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor) and t.dim() > 0 and t.device.type != device_type:
                    found.setdefault(package_location(traceback.extract_stack()), set()).add(
                        f"{func}".split(".default")[0] + f" -> {t.device.type}")
                    break
            return out

    with Recorder():
        fn()
    return [{"where": where, "ops": sorted(ops)} for where, ops in sorted(found.items())]


def _error_record(exc: BaseException) -> dict:
    message = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
    return {"error": f"{type(exc).__name__}: {message}",
            "where": package_location(traceback.extract_tb(exc.__traceback__)),
            "traceback": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))}


def _is_oom(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def _free(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.empty_cache()


def _ms(x: Optional[float]) -> str:
    if x is None:
        return "-"
    return f"{x:.1f}" if x >= 100 else f"{x:.3f}" if x < 1 else f"{x:.2f}"


def _ratio(num: Optional[float], den: Optional[float]) -> Optional[float]:
    return None if num is None or den is None or den <= 0 else num / den


def print_table(header: list, rows: list, aligns: str = "") -> None:
    """Columns padded to the widest cell; aligns[i] 'l' or 'r' (default: first column left, rest right)."""
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    aligns = aligns or "l" + "r" * (len(header) - 1)
    for n, r in enumerate(cells):
        print(("  " + "  ".join(c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(r, widths, aligns))).rstrip())
        if n == 0:
            print("  " + "  ".join("-" * w for w in widths))
    sys.stdout.flush()


# ------------------------------------------------------------------------------------------------------
# Setup: device, Triton
# ------------------------------------------------------------------------------------------------------
def prepare_triton(device: str) -> tuple:
    """(usable, how): whether kernel="triton" can run on `device` in this process, and in what form.

    CPU needs the interpreter, which triton reads when it is first imported: the dry run sets
    TRITON_INTERPRET=1 itself if triton is not imported yet.  A GPU run must not be interpreted (the figures
    would time numpy), so an interpreter setting there is an error, not a skip."""
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed: Triton cells skipped"
    if device == "cuda" and os.environ.get("TRITON_INTERPRET", "0").lower() in TRUE:
        raise CheckError("TRITON_INTERPRET=1 is set: the Triton kernels would run in the CPU interpreter and the "
                         "GPU figures would be meaningless; run with TRITON_INTERPRET=0 (make gpu-check does)")
    if device == "cpu" and "triton" not in sys.modules:
        os.environ["TRITON_INTERPRET"] = "1"
    from merlin_hstu.kernels import triton_hstu_attention

    if device == "cpu" and not triton_hstu_attention.INTERPRETED:
        return False, ("triton was imported in this process before TRITON_INTERPRET=1 was set: Triton cells "
                       "skipped (start the process with TRITON_INTERPRET=1)")
    if device == "cuda" and triton_hstu_attention.INTERPRETED:
        raise CheckError("triton runs in interpreter mode in this process; start it with TRITON_INTERPRET=0")
    return True, "interpreter (TRITON_INTERPRET=1)" if device == "cpu" else "compiled"


def device_info(device: str, triton_how: str, dry_run: bool) -> dict:
    import torch

    triton_version = None
    if importlib.util.find_spec("triton") is not None:
        import triton

        triton_version = triton.__version__
    info = {"type": device, "dry_run": dry_run, "torch": torch.__version__, "triton": triton_version,
            "triton_mode": triton_how, "python": platform.python_version()}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(name=torch.cuda.get_device_name(0), capability=f"sm_{props.major}{props.minor}",
                    memory_gib=round(props.total_memory / 2 ** 30, 1), cuda=torch.version.cuda,
                    tf32_matmul=bool(torch.backends.cuda.matmul.allow_tf32))
    else:
        info.update(name=f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                         f"{torch.get_num_threads()} threads)")
    return info


# ------------------------------------------------------------------------------------------------------
# 1. Parity
# ------------------------------------------------------------------------------------------------------
def parity_inputs(mask: str, batch: int, max_len: int, heads: int, dim: int, dtype, device: str, seed: int) -> dict:
    """Seeded jagged q, k, v, bias, dO (drawn in fp32 on CPU, then cast: both kernels see the same values) and the
    mask arguments of one case.  The first sequence has max_len tokens, so every tile position occurs."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(12, max_len + 1, (batch,), generator=gen)
    lengths[0] = max_len
    total = int(lengths.sum())
    offsets = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])

    def draw(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)

    # q.k ~ N(0, d/4): S spans SiLU's curved region; bias ~ N(0, 0.1^2) like small learned tables
    args = dict(q=draw(total, heads, dim, scale=0.5), k=draw(total, heads, dim, scale=0.5), v=draw(total, heads, dim),
                attn_bias=draw(batch, max_len, max_len, scale=0.1), grad=draw(total, heads, dim),
                seq_offsets=offsets.to(device), max_seq_len=max_len, num_targets=None, contextual_seq_len=0)
    if mask == "target-aware":
        args["num_targets"] = torch.randint(1, 9, (batch,), generator=gen).to(device)
    elif mask == "contextual":
        args["contextual_seq_len"] = CONTEXTUAL_LEN
    elif mask != "causal":
        raise ValueError(f"parity mask must be one of {MASKS}, got {mask!r}")
    return args


def attention_with_grads(inputs: dict, kernel: str) -> dict:
    """Output and gradients of q, k, v, bias for one kernel, from fresh leaves of the shared inputs."""
    from merlin_hstu.kernels.attention_ops import hstu_attention

    leaves = {n: inputs[n].detach().clone().requires_grad_(True) for n in ("q", "k", "v", "attn_bias")}
    out = hstu_attention(leaves["q"], leaves["k"], leaves["v"], inputs["seq_offsets"], inputs["max_seq_len"],
                         num_targets=inputs["num_targets"], contextual_seq_len=inputs["contextual_seq_len"],
                         attn_bias=leaves["attn_bias"], kernel=kernel)
    out.backward(inputs["grad"])
    return {"out": out.detach(), "dq": leaves["q"].grad, "dk": leaves["k"].grad, "dv": leaves["v"].grad,
            "dbias": leaves["attn_bias"].grad}


def compare(got, want, tol: float) -> dict:
    """max |got - want| against tol * max |want| (computed in fp32)."""
    got, want = got.float(), want.float()
    err = float((got - want).abs().max()) if want.numel() else 0.0
    scale = float(want.abs().max()) if want.numel() else 0.0
    bound = tol * max(scale, 1e-12)
    return {"max_abs_err": err, "ref_max_abs": scale, "rel_err": err / max(scale, 1e-12), "tol": tol,
            "passed": bool(math.isfinite(err) and err <= bound)}


def dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def section_parity(device: str, sizes: Sizes, heads: int, preset_dim: int, triton_ok: bool, half, seed: int) -> dict:
    import torch

    if not triton_ok:
        return {"skipped": "no usable Triton: nothing to compare", "rows": [], "passed": True}
    rows = []
    dims = (preset_dim,) + tuple(d for d in sizes.parity_extra_dims if d != preset_dim)
    for dtype in (torch.float32, half):
        name = dtype_name(dtype)
        for dim in dims:
            for case, mask in enumerate(MASKS):
                inputs = parity_inputs(mask, sizes.parity_batch, sizes.parity_max_len, heads, dim, dtype, device,
                                       seed + case)
                got, want = attention_with_grads(inputs, "triton"), attention_with_grads(inputs, "pytorch")
                for tensor in got:
                    rows.append(dict(dtype=name, dim=dim, mask=mask, tensor=tensor,
                                     **compare(got[tensor], want[tensor], TOLERANCES[name])))
                del inputs, got, want
                _free(device)
    print_table(["dtype", "d", "mask", "tensor", "max|err|", "max|ref|", "err/ref", "tol", "result"],
                [[r["dtype"], r["dim"], r["mask"], r["tensor"], f"{r['max_abs_err']:.2e}", f"{r['ref_max_abs']:.2e}",
                  f"{r['rel_err']:.1e}", f"{r['tol']:.0e}", "PASS" if r["passed"] else "FAIL"] for r in rows],
                aligns="lrllrrrrl")
    return {"rows": rows, "passed": all(r["passed"] for r in rows), "heads": heads, "dims": list(dims),
            "batch": sizes.parity_batch, "max_len": sizes.parity_max_len, "tolerances": TOLERANCES}


# ------------------------------------------------------------------------------------------------------
# 2. Attention speed
# ------------------------------------------------------------------------------------------------------
def section_speed(device: str, sizes: Sizes, heads: int, dim: int, triton_ok: bool, half, seed: int) -> dict:
    from merlin_hstu.kernels.bench import bench_one, draw_lengths

    impls = ("triton", "pytorch", "sdpa")
    rows = []
    for max_len in sizes.speed_lengths:
        lengths = draw_lengths("uniform", max_len, sizes.speed_total_tokens, 1.2, seed)
        row = {"max_len": max_len, "num_seqs": len(lengths), "longest": max(lengths)}
        for impl in impls:
            if impl == "triton" and not triton_ok:
                row[impl] = {"fwd_ms": None, "bwd_ms": None, "fwd_bwd_ms": None, "note": "skipped"}
                continue
            fwd, bwd, fb, note = bench_one(impl, lengths, dim, heads, half, device, sizes.iters,
                                           sizes.warmup, seed)
            row[impl] = {"fwd_ms": fwd, "bwd_ms": bwd, "fwd_bwd_ms": fb,
                         "note": "oom" if note == "out of memory" else note}
        base = row["triton"]["fwd_bwd_ms"]
        row["pytorch_over_triton"] = _ratio(row["pytorch"]["fwd_bwd_ms"], base)
        row["sdpa_over_triton"] = _ratio(row["sdpa"]["fwd_bwd_ms"], base)
        rows.append(row)

    def cell(r, impl):
        c = r[impl]
        return _ms(c["fwd_bwd_ms"]) if c["fwd_bwd_ms"] is not None else (c["note"] or "-").split(":")[0]

    print_table(["L", "seqs", "triton f+b ms", "pytorch f+b ms", "sdpa f+b ms", "pytorch/triton", "sdpa/triton"],
                [[r["max_len"], r["num_seqs"], cell(r, "triton"), cell(r, "pytorch"), cell(r, "sdpa"),
                  "-" if r["pytorch_over_triton"] is None else f"{r['pytorch_over_triton']:.2f}x",
                  "-" if r["sdpa_over_triton"] is None else f"{r['sdpa_over_triton']:.2f}x"] for r in rows],
                aligns="rrrrrrr")
    failed = [f"L={r['max_len']} {i}: {r[i]['note']}" for r in rows for i in impls if r[i]["note"].startswith("failed")]
    for line in failed:
        print(f"  note: {line}")
    # SDPA refusing a shape is torch's business; the HSTU paths failing is this repository's.
    broken = [line for line in failed if " sdpa:" not in line]
    print("  sdpa = softmax attention (FlashAttention backend, padded batch): a different function, a speed "
          "yardstick only")
    return {"rows": rows, "heads": heads, "dim": dim, "dtype": dtype_name(half),
            "total_tokens": sizes.speed_total_tokens,
            "lengths": "uniform U{1..L}", "notes": failed, "failed_cells": broken}


# ------------------------------------------------------------------------------------------------------
# 3. Training step of the hstu-large-ml1m retrieval model
# ------------------------------------------------------------------------------------------------------
def synthetic_retrieval_batch(batch_size: int, history: int, num_items: int, device: str, seed: int) -> dict:
    """ids [B, H+1] (H history items, the target at position H), lengths [B] = H, increasing timestamps."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(FIRST_ITEM_ID, num_items, (batch_size, history + 1), generator=gen)
    gaps = torch.randint(1, 86_400, (batch_size, history + 1), generator=gen)
    times = 956_703_932 + gaps.cumsum(1)  # ml-1m's first rating time
    lengths = torch.full((batch_size,), history, dtype=torch.long)
    return {"ids": ids.to(device), "lengths": lengths.to(device), "timestamps": times.to(device),
            "targets": ids[:, history].to(device)}


def section_train(device: str, sizes: Sizes, triton_ok: bool, half, seed: int) -> dict:
    import numpy as np
    import torch

    from merlin_hstu.kernels.dispatch import use_kernel
    from merlin_hstu.retrieval.config import load_config
    from merlin_hstu.retrieval.data import SequenceTable
    from merlin_hstu.retrieval.model import next_item_training_loss
    from merlin_hstu.retrieval.train import build_model

    cfg = load_config(PRESET, list(sizes.train_overrides))
    batch_size, history = cfg.train.batch_size, cfg.data.max_history
    batch = synthetic_retrieval_batch(batch_size, history, sizes.train_num_items, device, seed)
    # build_model reads only num_items from the table; a one-row table of the synthetic catalogue serves.
    table = SequenceTable(items=[batch["ids"][0].cpu().numpy()], timestamps=[batch["timestamps"][0].cpu().numpy()],
                          keys=np.arange(1), num_items=sizes.train_num_items)
    pool = table.candidate_ids.to(device)
    loss_cfg = cfg.train.loss_config()
    kernels = ("triton", "pytorch") if triton_ok else ("pytorch",)
    rows, off_device = [], []
    for kernel in kernels:
        for precision in ("float32", dtype_name(half)):
            torch.manual_seed(cfg.train.seed)
            model = build_model(table, cfg).to(device).train()
            optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.learning_rate,
                                          betas=tuple(cfg.train.betas), weight_decay=cfg.train.weight_decay)
            negatives = torch.Generator(device=device).manual_seed(cfg.train.seed + 1)
            last = {}

            def step():
                with torch.autocast(device_type=device, dtype=half, enabled=precision != "float32"):
                    loss = next_item_training_loss(model, batch, pool, loss_cfg, negatives)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                last.setdefault("first", loss.detach())  # before any update: comparable across the rows
                last["loss"] = loss.detach()

            row = {"kernel": kernel, "dtype": precision, "ms": None, "first_loss": None, "loss": None,
                   "peak_mib": None, "note": ""}
            try:
                with use_kernel(kernel):  # the preset's encoder says "auto": the global default decides
                    if not off_device:  # once: the recorder is slow and the ops do not depend on the kernel
                        off_device = off_device_ops(step, device) or [{"where": "none", "ops": []}]
                    if device == "cuda":
                        torch.cuda.reset_peak_memory_stats()
                    row["ms"] = median_ms(step, device, sizes.warmup, sizes.iters)
                row["first_loss"], row["loss"] = float(last["first"]), float(last["loss"])
                if device == "cuda":
                    row["peak_mib"] = torch.cuda.max_memory_allocated() / 2 ** 20
            except Exception as exc:  # noqa: BLE001 - reported in the table; oom is not a failure
                if not _is_oom(exc):
                    raise
                row["note"] = "oom"
            rows.append(row)
            del model, optimizer
            _free(device)
    tokens = batch_size * history
    for r in rows:
        r["tokens_per_s"] = None if r["ms"] is None else tokens / (r["ms"] / 1e3)
    print_table(["attention", "precision", "step ms", "tokens/s", "first loss", "last loss", "peak MiB"],
                [[r["kernel"], r["dtype"] if r["dtype"] == "float32" else f"{r['dtype']} autocast",
                  _ms(r["ms"]) if r["ms"] else r["note"],
                  "-" if r["tokens_per_s"] is None else f"{r['tokens_per_s']:,.0f}",
                  "-" if r["first_loss"] is None else f"{r['first_loss']:.5f}",
                  "-" if r["loss"] is None else f"{r['loss']:.5f}",
                  "-" if r["peak_mib"] is None else f"{r['peak_mib']:,.0f}"] for r in rows], aligns="llrrrrr")
    print("  first loss: the step before any update (same weights, dropout and negatives in every row); last loss: "
          "after the timed steps")
    clean = off_device == [{"where": "none", "ops": []}]
    print(f"  device-clean: {'yes' if clean else 'NO'} (ops producing non-scalar tensors off {device} in one step)")
    for entry in ([] if clean else off_device):
        print(f"    {entry['where']}: {', '.join(entry['ops'])}")
    return {"rows": rows, "preset": PRESET, "overrides": list(sizes.train_overrides), "batch_size": batch_size,
            "history": history, "num_items": sizes.train_num_items, "device_clean": clean,
            "off_device_ops": [] if clean else off_device}


# ------------------------------------------------------------------------------------------------------
# 4. M-FALCON
# ------------------------------------------------------------------------------------------------------
def mfalcon_setup(device: str, sizes: Sizes, seed: int):
    """A DlrmHSTU as `bench mfalcon` builds it (its argument defaults, with the dry run's tiny overrides), one user
    history of `mfalcon_history` events and the largest candidate list."""
    import torch

    from merlin_hstu.bench import mfalcon as bench_mfalcon
    from merlin_hstu.ranking.batch import RankingTask
    from merlin_hstu.ranking.mfalcon import UserHistory
    from merlin_hstu.ranking.model import DlrmHSTU, DlrmHSTUConfig

    parser = argparse.ArgumentParser()
    bench_mfalcon.add_arguments(parser)
    a = parser.parse_args([])
    for name, value in sizes.mfalcon_model:
        setattr(a, name, value)
    torch.manual_seed(seed)
    tasks = (RankingTask("click", bit=0), RankingTask("like", bit=1), RankingTask("watch", kind="regression"))
    contextual = {"age": 8, "country": 50}
    per = 2 if a.interleave else 1
    history_len, micro = sizes.mfalcon_history, sizes.mfalcon_micro_batch
    config = DlrmHSTUConfig(embedding_dim=a.embedding_dim, num_blocks=a.num_blocks, num_heads=a.num_heads,
                            attention_dim=a.head_dim, linear_dim=a.head_dim,
                            max_seq_len=len(contextual) + per * history_len + micro, interleave=a.interleave,
                            dropout=0.0, input_dropout=0.0)
    model = DlrmHSTU(config, a.num_items, contextual, tasks).to(device).eval()
    gen = torch.Generator().manual_seed(seed)
    times = 1_600_000_000 + torch.randint(1, 7200, (history_len,), generator=gen).cumsum(0)
    history = UserHistory(torch.randint(1, a.num_items, (history_len,), generator=gen),
                          torch.randint(0, 4, (history_len,), generator=gen), times, {"age": 3, "country": 7})
    candidates = torch.randint(1, a.num_items, (max(sizes.mfalcon_candidates),), generator=gen)
    return model, config, history, candidates, int(times[-1]) + 60


def section_mfalcon(device: str, sizes: Sizes, seed: int) -> dict:
    import torch

    from merlin_hstu.ranking.mfalcon import MFalconScorer, score_without_cache

    model, config, history, candidates, query_time = mfalcon_setup(device, sizes, seed)
    micro = sizes.mfalcon_micro_batch
    scorer = MFalconScorer(model)
    prefill_ms = median_ms(lambda: scorer.set_history(history), device, sizes.warmup, sizes.iters)
    rows = []
    for m in sizes.mfalcon_candidates:
        chunk = candidates[:m]
        row = {"mode": "mfalcon", "candidates": m, "micro_batch": micro, "prefill_ms": prefill_ms, "score_ms": None,
               "ms": None, "candidates_per_s": None, "note": ""}
        try:
            row["score_ms"] = median_ms(lambda: scorer.score(chunk, query_time, micro_batch=micro), device,
                                        sizes.warmup, sizes.iters)
            row["ms"] = prefill_ms + row["score_ms"]
            row["candidates_per_s"] = m / (row["ms"] / 1e3)
        except Exception as exc:  # noqa: BLE001
            if not _is_oom(exc):
                raise
            row["note"] = "oom"
            _free(device)
        rows.append(row)
    smallest = min(sizes.mfalcon_candidates)
    chunk = candidates[:smallest]
    # The full model re-encodes the history for every micro-batch: fewer repetitions, same medians.
    full_ms = median_ms(lambda: score_without_cache(model, history, chunk, query_time, micro_batch=micro), device,
                        min(sizes.warmup, 1), max(1, min(sizes.iters, 3)))
    cached = scorer.score(chunk, query_time, micro_batch=micro, history=history)
    full = score_without_cache(model, history, chunk, query_time, micro_batch=micro)
    max_diff = float((cached - full.to(cached.device)).abs().max())
    mf_small = next(r for r in rows if r["candidates"] == smallest)
    rows.append({"mode": "no-cache", "candidates": smallest, "micro_batch": micro, "prefill_ms": None,
                 "score_ms": full_ms, "ms": full_ms, "candidates_per_s": smallest / (full_ms / 1e3),
                 "note": f"{_ratio(full_ms, mf_small['ms']) or float('nan'):.2f}x M-FALCON's time"})
    print_table(["mode", "candidates", "m", "prefill ms", "scoring ms", "total ms", "cands/s", "note"],
                [[r["mode"], r["candidates"], r["micro_batch"], _ms(r["prefill_ms"]), _ms(r["score_ms"]), _ms(r["ms"]),
                  "-" if r["candidates_per_s"] is None else f"{r['candidates_per_s']:,.0f}", r["note"]] for r in rows],
                aligns="lrrrrrrl")
    print(f"  history {sizes.mfalcon_history} events, D={config.embedding_dim}, {config.num_blocks} blocks, "
          f"{config.num_heads} heads x {config.attention_dim}, fp32; max |M-FALCON - no-cache| at {smallest} "
          f"candidates = {max_diff:.2e}")
    return {"rows": rows, "history": sizes.mfalcon_history, "model": config.to_dict(),
            "max_abs_diff_vs_no_cache": max_diff}


# ------------------------------------------------------------------------------------------------------
# Driver
# ------------------------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=("cuda", "cpu"), default=None,
                   help="cuda (the default) or cpu; --dry-run alone runs on cpu")
    p.add_argument("--dry-run", action="store_true",
                   help="every section at tiny sizes (CPU: < 1 minute; Triton through TRITON_INTERPRET=1), so the "
                        "check cannot rot while no GPU is lent")
    p.add_argument("--sections", default=",".join(SECTIONS),
                   help=f"comma-separated subset of {','.join(SECTIONS)} (default: all)")
    p.add_argument("--output", help="also write the figures to this JSON file (rewritten after each section)")
    p.add_argument("--seed", type=int, default=0)


def resolve_device(args: argparse.Namespace) -> str:
    import torch

    device = args.device or ("cpu" if args.dry_run else "cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise CheckError("--device cuda: no CUDA device is available on this machine; the GPU check needs one "
                         "(pass --dry-run to exercise every section on CPU at tiny sizes)")
    if device == "cpu" and not args.dry_run:
        raise CheckError("--device cpu runs only with --dry-run: the full sizes would take hours on a CPU "
                         "(`merlin-hstu bench kernels` and `bench mfalcon` have CPU-sized defaults)")
    return device


def run(args: argparse.Namespace) -> int:
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown or not sections:
        raise CheckError(f"--sections: unknown {unknown or 'empty list'}; choose from {','.join(SECTIONS)}")
    device = resolve_device(args)
    sizes = DRY_SIZES if args.dry_run else GPU_SIZES
    triton_ok, triton_how = prepare_triton(device)  # before anything imports triton (the interpreter flag)
    import torch

    from merlin_hstu.retrieval.config import load_config

    # bf16 everywhere a GPU runs it; fp16 under the interpreter, whose bf16 tl.dot is wrong (module docstring)
    half = torch.float16 if triton_ok and device == "cpu" else torch.bfloat16
    preset = load_config(PRESET).model
    heads, dim = preset.num_heads, preset.attention_dim
    info = device_info(device, triton_how, args.dry_run)
    info["half_dtype"] = dtype_name(half)
    report = {"device": info, "sizes": asdict(sizes), "sections": {}, "failures": []}
    started = time.perf_counter()
    print(f"GPU check: {info['name']}" + (" [DRY RUN: tiny sizes]" if args.dry_run else ""))
    extra = f", {info['capability']}, {info['memory_gib']} GiB, CUDA {info['cuda']}" if device == "cuda" else ""
    print(f"  torch {info['torch']}, triton {info['triton'] or 'absent'} ({triton_how}){extra}; "
          f"warm-up {sizes.warmup}, median of {sizes.iters}; attention {heads} heads x {dim} ({PRESET}); "
          f"16-bit: {dtype_name(half)}")
    titles = {"parity": "1. parity: Triton vs PyTorch HSTU attention, forward + backward",
              "speed": f"2. speed: attention forward+backward, {dtype_name(half)}, {heads} heads x {dim}, "
                       f"{sizes.speed_total_tokens} tokens per batch",
              "train": f"3. train: {PRESET} retrieval step (forward + backward + AdamW)",
              "mfalcon": f"4. mfalcon: DLRM-HSTU candidate scoring, one user, micro-batch {sizes.mfalcon_micro_batch}"}
    runners = {"parity": lambda: section_parity(device, sizes, heads, dim, triton_ok, half, args.seed),
               "speed": lambda: section_speed(device, sizes, heads, dim, triton_ok, half, args.seed),
               "train": lambda: section_train(device, sizes, triton_ok, half, args.seed),
               "mfalcon": lambda: section_mfalcon(device, sizes, args.seed)}
    for name in sections:
        print(f"\n{titles[name]}")
        t0 = time.perf_counter()
        try:
            result = runners[name]()
        except Exception as exc:  # noqa: BLE001 - one broken section must not hide the others
            result = _error_record(exc)
            print(f"  ERROR {result['error']}\n    at {result['where']}")
            report["failures"].append(f"{name}: {result['error']} at {result['where']}")
        result["seconds"] = time.perf_counter() - t0
        for cell in result.get("failed_cells", []):
            report["failures"].append(f"speed: {cell}")
        if name == "parity" and not result.get("passed", True):
            report["failures"].append("parity: " + ", ".join(
                f"{r['dtype']} d={r['dim']} {r['mask']} {r['tensor']}" for r in result["rows"] if not r["passed"]))
        print(f"  ({result['seconds']:.1f} s)")
        report["sections"][name] = result
        report["seconds"] = time.perf_counter() - started
        report["passed"] = not report["failures"]
        if args.output:
            write_file(Path(args.output), json.dumps(report, indent=2, allow_nan=True))
        _free(device)
    verdict = "PASS" if report["passed"] else "FAIL: " + "; ".join(report["failures"])
    print(f"\n{verdict} ({report['seconds']:.1f} s on {info['name']})")
    if args.output:
        print(f"wrote {args.output}")
    return 0 if report["passed"] else 1


def register_subcommands(subparsers, bench_subparsers) -> None:
    """Hook for merlin_hstu.cli.main.EXTENSION_MODULES: adds `bench gpu-check`."""
    p = bench_subparsers.add_parser("gpu-check", help="the prepared GPU check: kernel parity, attention speed, "
                                                      "a training step, M-FALCON (--dry-run on CPU)",
                                    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run)


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m merlin_hstu.bench.gpu_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except CheckError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
