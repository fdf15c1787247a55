"""The process group of a multi-process run, and the collectives the training loop needs.

torchrun (`python -m torch.distributed.run`, what `merlin-hstu train --nproc N` starts) sets RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT in every process; `init_from_env` joins the group: gloo when the run's
device is the CPU, nccl on CUDA (each process on `cuda:LOCAL_RANK`). A process not started by torchrun has no
context (`launched()` is False) and trains as a single process.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
import torch.distributed as dist

_CONTEXT: Optional["DistContext"] = None


def launched() -> bool:
    """True in a process started by torchrun (or anything else that sets RANK and WORLD_SIZE)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def launched_rank() -> tuple:
    """(rank, world size) of a process started by torchrun, (0, 1) otherwise: which row groups a streaming reader
    opens before the process group is joined."""
    return (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if launched() else (0, 1)


@dataclass
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    backend: str  # gloo | nccl
    device: torch.device  # this process's device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def group(self):
        return dist.GroupMember.WORLD

    def all_reduce_sum(self, values: Sequence[float]) -> List[float]:
        """Sum of `values` over the ranks (float64, on the backend's device)."""
        tensor = torch.tensor(list(values), dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(tensor)
        return tensor.cpu().tolist()

    def all_gather_object(self, value) -> list:
        out = [None] * self.world_size
        dist.all_gather_object(out, value)
        return out

    def broadcast_object(self, value, src: int = 0):
        box = [value]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        """`tensor` from rank `src` on every rank (in place; moved through the backend's device)."""
        moved = tensor.to(self._comm_device())
        dist.broadcast(moved, src=src)
        if moved is not tensor:
            tensor.copy_(moved.to(tensor.device))
        return tensor

    def barrier(self) -> None:
        dist.barrier()

    def _comm_device(self) -> torch.device:
        return self.device if self.backend == "nccl" else torch.device("cpu")


def init_from_env(device: torch.device) -> DistContext:
    """Join (once) the process group torchrun describes in the environment; `device` is the run's device type
    (cpu -> gloo; cuda -> nccl, this process on cuda:LOCAL_RANK)."""
    global _CONTEXT
    if _CONTEXT is not None:
        return _CONTEXT
    if not launched():
        raise RuntimeError("not started by torchrun: RANK / WORLD_SIZE are not set (use merlin-hstu train --nproc N)")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if torch.cuda.device_count() <= local_rank:
            raise ValueError(f"process {local_rank} of this node needs cuda:{local_rank}, but only "
                             f"{torch.cuda.device_count()} CUDA device(s) exist; lower --nproc")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend)
    _CONTEXT = DistContext(dist.get_rank(), dist.get_world_size(), local_rank, backend, device)
    return _CONTEXT


def current() -> Optional[DistContext]:
    """The context joined by `init_from_env`, or None."""
    return _CONTEXT


def is_main_process() -> bool:
    """Rank 0, or a single process: the one that writes run directories and prints."""
    return _CONTEXT is None or _CONTEXT.is_main


def barrier() -> None:
    if _CONTEXT is not None:
        _CONTEXT.barrier()


def shutdown() -> None:
    """Leave the process group (end of a torchrun process)."""
    global _CONTEXT
    if dist.is_initialized():
        dist.destroy_process_group()
    _CONTEXT = None


def rank_slice(count: int, rank: int, world_size: int) -> slice:
    """Rows of a global batch of `count` rows that rank `rank` trains on: contiguous, sizes differ by at most 1,
    rank order = row order (so the ranks' rows laid end to end are the global batch)."""
    return slice(rank * count // world_size, (rank + 1) * count // world_size)
