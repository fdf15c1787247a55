"""Checkpoints of a sharded run with `torch.distributed.checkpoint` (DCP).

    CHECKPOINTS/step-NNNNNNNN.dcp/        one directory per checkpoint
        .metadata, __R_0.distcp           DCP: the sharded tables (each rank writes its shards), the dense weights,
                                          the fused sparse optimizer's state (sharded like its tables)
        trainer.pt                        rank 0: dense optimizer, LR schedule, loop counters, the task's generators,
                                          every rank's RNG states, the fingerprint, the world size it was written at

A checkpoint is written into `.step-NNNNNNNN.dcp.tmp` and renamed once every rank has finished and rank 0 has
fsynced trainer.pt, so a `step-*.dcp` directory that exists is complete. DCP records every shard's offsets, so a
checkpoint loads into any number of processes and any sharding: each rank reads the blocks its new shards cover.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import List

import torch

SUFFIX = ".dcp"
TRAINER_FILE = "trainer.pt"


def sharded_checkpoint_paths(directory: Path) -> List[Path]:
    """Complete sharded checkpoints in `directory`, oldest first."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.glob(f"step-*{SUFFIX}")
                  if p.is_dir() and p.name[5:-len(SUFFIX)].isdigit() and (p / TRAINER_FILE).is_file())


def save_sharded(directory: Path, step: int, dmp, sparse_optimizer, payload: dict, ctx, keep: int) -> Path:
    """Every rank: write the sharded state of step `step`; rank 0 adds `payload` and publishes the directory."""
    import torch.distributed.checkpoint as dcp

    directory = Path(directory)
    final = directory / f"step-{step:08d}{SUFFIX}"
    tmp = directory / f".{final.name}.tmp"
    if ctx.is_main:
        directory.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    ctx.barrier()
    dcp.save({"model": dmp.state_dict(), "sparse_optimizer": sparse_optimizer.state_dict()}, checkpoint_id=str(tmp))
    ctx.barrier()
    if ctx.is_main:
        with open(tmp / TRAINER_FILE, "wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in sharded_checkpoint_paths(directory)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    ctx.barrier()
    return final


def read_trainer_state(path: Path) -> dict:
    """trainer.pt of a sharded checkpoint (what is not sharded: optimizer of the dense part, loop, RNG, ...)."""
    return torch.load(Path(path) / TRAINER_FILE, map_location="cpu", weights_only=False)


def load_sharded(path: Path, dmp, sparse_optimizer) -> None:
    """Every rank: load the sharded state at `path` into `dmp` and its fused optimizer, resharded to this run's
    plan (each rank reads the blocks its shards cover)."""
    import torch.distributed.checkpoint as dcp

    state = {"model": dmp.state_dict(), "sparse_optimizer": sparse_optimizer.state_dict()}
    dcp.load(state, checkpoint_id=str(path))
    dmp.load_state_dict(state["model"])
    sparse_optimizer.load_state_dict(state["sparse_optimizer"])
