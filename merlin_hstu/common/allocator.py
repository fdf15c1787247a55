"""glibc malloc settings for CPU training, applied by the `merlin-hstu` command (docs/benchmarks.md, "Allocator").

A training step allocates and frees many large tensors: the [B, H, W, W] attention blocks (46 MB at the
hstu-large-ml1m shape) and dozens of 5-25 MB activations.  With glibc's defaults,

  * blocks above the mmap threshold are fresh mappings, faulted in 4 KiB pages and zeroed on every allocation;
  * the threshold itself adapts upwards (up to 32 MiB) as large blocks are freed, so the 5-25 MB activations
    move onto the heap, where they fragment it and the resident set grows from step to step.

Two glibc tunables fix both: `glibc.malloc.hugetlb=1` lets the kernel back malloc's mappings with 2 MiB
transparent huge pages (512x fewer page faults), and a fixed `glibc.malloc.mmap_threshold` of 16 MiB stops the
drift.  Measured on hstu-large-ml1m (1 thread, this 2-core CPU): 15% less CPU per step and 0.1 GB lower peak RSS;
the math is untouched (bit-identical losses).

Tunables are read once, at process start, so the console entry point re-executes itself with
`GLIBC_TUNABLES` set (before any heavy import).  Nothing is changed when the variable already sets a malloc
tunable, on non-glibc or pre-2.35 systems, or when `MERLIN_HSTU_MALLOC=default`.  In your own process (a T4R
Trainer script, a notebook kernel) export the same variable before starting Python to get the same effect.
"""
from __future__ import annotations

import os
import platform
import sys
from typing import Mapping, Optional

TUNABLES = "glibc.malloc.hugetlb=1:glibc.malloc.mmap_threshold=16777216"
SWITCH = "MERLIN_HSTU_MALLOC"  # "default": leave glibc's defaults alone


def _glibc_version() -> Optional[tuple]:
    name, version = platform.libc_ver()
    if name != "glibc":
        return None
    try:
        return tuple(int(part) for part in version.split(".")[:2])
    except ValueError:
        return None


def tuned_environment(environ: Mapping[str, str]) -> Optional[dict]:
    """The environment to re-execute with, or None when the current one should be kept."""
    if environ.get(SWITCH, "tuned").lower() == "default" or not sys.platform.startswith("linux"):
        return None
    version = _glibc_version()
    if version is None or version < (2, 35):  # glibc.malloc.hugetlb arrived in 2.35
        return None
    current = environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc." in current:  # the user chose malloc settings: respect them
        return None
    env = dict(environ)
    env["GLIBC_TUNABLES"] = f"{current}:{TUNABLES}" if current else TUNABLES
    return env


def describe(environ: Mapping[str, str] = os.environ) -> str:
    """One line for benchmark records: which malloc settings this process started with."""
    current = environ.get("GLIBC_TUNABLES", "")
    malloc = [t for t in current.split(":") if t.startswith("glibc.malloc.")]
    return "glibc tunables " + ", ".join(t[len("glibc.malloc."):] for t in malloc) if malloc else "glibc defaults"


def reexec_tuned(module: str) -> None:
    """Replace this process by `python -m module <same arguments>` under the tuned environment, if it applies.
    Returns (without doing anything) when it does not, or when the exec fails."""
    env = tuned_environment(os.environ)
    if env is None:
        return
    try:
        os.execve(sys.executable, [sys.executable, "-m", module, *sys.argv[1:]], env)
    except OSError:
        return
