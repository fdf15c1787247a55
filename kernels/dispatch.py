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
"""
from __future__ import annotations

import importlib.util
from contextlib import contextmanager
from typing import Iterator, Literal, Optional

import torch

KernelName = Literal["pytorch", "triton", "auto"]
KERNELS: tuple[str, ...] = ("pytorch", "triton", "auto")
TRITON_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16)

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


def resolve_kernel(kernel: Optional[str], *tensors: torch.Tensor) -> str:
    """Turn a requested kernel ("pytorch" | "triton" | "auto" | None) into the one that runs.

    "auto" picks Triton only when every tensor is on CUDA in fp32/bf16/fp16 and triton is installed; CPU
    tensors always get PyTorch under "auto" (the interpreter is for tests, and it is slow), as do float64
    tensors (the kernels do not compile for them) and anything under torch.jit.trace (a traced graph must
    replay without Triton, e.g. in a serving process).
    """
    requested = get_default_kernel() if kernel is None or kernel == "auto" else validate_kernel(kernel)
    if requested != "auto":
        return requested
    if torch.jit.is_tracing():
        return "pytorch"
    on_cuda = bool(tensors) and all(t.is_cuda and t.dtype in TRITON_DTYPES for t in tensors)
    return "triton" if on_cuda and triton_installed() else "pytorch"
