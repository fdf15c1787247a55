"""Kernel switch: which implementation of an op runs.

Three names are accepted everywhere a kernel is chosen (an op's `kernel=` argument, a module config field,
the global default):

    "pytorch"  the plain PyTorch reference (any device, any float dtype; the CPU path and the test oracle)
    "triton"   the Triton kernels (CUDA tensors, or CPU tensors when TRITON_INTERPRET=1 was set before triton
               was first imported: the interpreter CI uses)
    "auto"     Triton for CUDA tensors of a dtype the kernels support, PyTorch otherwise

An explicit "pytorch"/"triton" on a call or a module wins; "auto" (or None) defers to the global default,
which starts as "auto".  So `set_default_kernel("pytorch")` pins every module left at "auto" to PyTorch,
and `use_kernel("triton")` does the same for the duration of a `with` block.

This is the one place a kernel is decided.  Models and layers only carry their configured name down to the
attention ops (`hstu_attention`, `plan_hstu_attention`, `hstu_attention_rows`), which call `resolve_kernel`.
Not every op has every kernel (`OP_KERNELS`): the rows op of cached decoding (a few new queries against a KV
cache, M-FALCON) has no Triton kernel, so "triton" runs its PyTorch implementation.  Its work is R new rows
against S cached keys, two small matmuls per head that PyTorch runs well; a Triton rows kernel would slot in
by adding "triton" to its entry.
"""
from __future__ import annotations

import importlib.util
from contextlib import contextmanager
from typing import Iterator, Literal, Optional

import torch

KernelName = Literal["pytorch", "triton", "auto"]
KERNELS: tuple[str, ...] = ("pytorch", "triton", "auto")
TRITON_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16)

# The kernels each attention op has.  A resolved kernel an op lacks falls back to "pytorch" (see the docstring).
OP_KERNELS: dict[str, tuple[str, ...]] = {
    "hstu_attention": ("pytorch", "triton"),  # jagged batches: training, full forwards
    "hstu_attention_rows": ("pytorch",),  # cached decoding: R query rows against a KV cache
}

_default_kernel = "auto"  # process-wide, so worker threads see what the main thread set


def validate_kernel(kernel: str, field: str = "kernel") -> str:
    """Return `kernel` if it is a known name, else raise naming `field` and the accepted values."""
    if kernel not in KERNELS:
        raise ValueError(f"{field} must be one of {', '.join(repr(k) for k in KERNELS)}, got {kernel!r}")
    return kernel


def get_default_kernel() -> str:
    """The global default kernel ("auto" unless changed by `set_default_kernel` / `use_kernel`)."""
    return _default_kernel


def set_default_kernel(kernel: str) -> None:
    """Set the process-wide default kernel used wherever a call or module says "auto"."""
    global _default_kernel
    _default_kernel = validate_kernel(kernel, "set_default_kernel(kernel)")


@contextmanager
def use_kernel(kernel: str) -> Iterator[None]:
    """`with use_kernel("pytorch"): ...` sets the global default inside the block and restores it after."""
    validate_kernel(kernel, "use_kernel(kernel)")
    previous = get_default_kernel()
    set_default_kernel(kernel)
    try:
        yield
    finally:
        set_default_kernel(previous)


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def resolve_kernel(kernel: Optional[str], *tensors: torch.Tensor, op: str = "hstu_attention") -> str:
    """Turn a requested kernel ("pytorch" | "triton" | "auto" | None) into the one that runs `op`.

    "auto" picks Triton only when every tensor is on CUDA in fp32/bf16/fp16 and triton is installed; CPU
    tensors always get PyTorch under "auto" (the interpreter is for tests, and it is slow), as do float64
    tensors (the kernels do not compile for them) and anything under torch.jit.trace (a traced graph must
    replay without Triton, e.g. in a serving process).  A kernel `op` does not have (`OP_KERNELS`) resolves
    to "pytorch".
    """
    if op not in OP_KERNELS:
        raise ValueError(f"resolve_kernel: op must be one of {sorted(OP_KERNELS)}, got {op!r}")
    requested = get_default_kernel() if kernel is None or kernel == "auto" else validate_kernel(kernel)
    if requested == "auto":
        if torch.jit.is_tracing():
            requested = "pytorch"
        else:
            on_cuda = bool(tensors) and all(t.is_cuda and t.dtype in TRITON_DTYPES for t in tensors)
            requested = "triton" if on_cuda and triton_installed() else "pytorch"
    return requested if requested in OP_KERNELS[op] else "pytorch"
