"""Settings of the one training loop that every task shares (`merlin_hstu.train.loop.fit`).

Each task's train section (`retrieval.config.TrainConfig`, `ranking.train.RankingTrainConfig`,
`ctr.train.CTRTrainConfig`) inherits these fields, so `--set train.device=cuda` or `--precision bf16` mean the same
thing for every task. Defaults reproduce the reference protocol: CPU, fp32, no clipping, constant learning rate,
no early stopping.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import torch

PRECISIONS = ("fp32", "bf16")
LR_SCHEDULES = ("constant", "linear", "cosine")
# Loop settings that may differ between a checkpoint and its resume without changing the numbers (left out of the
# fingerprint a resumed checkpoint must match).
RESUMABLE_CHANGES = ("device", "checkpoint_every", "keep_checkpoints", "threads", "sharding")


@dataclass
class LoopConfig:
    device: str = "cpu"  # cpu | cuda | cuda:N | auto (cuda when available, else cpu)
    precision: str = "fp32"  # fp32 | bf16 (torch.autocast; runs on CPU too)
    grad_clip: float = 0.0  # clip the global gradient norm to this (0: off)
    warmup_steps: int = 0  # linear warm-up from lr/warmup_steps to lr over this many steps
    lr_schedule: str = "constant"  # after warm-up: constant | linear (to 0 at the last step) | cosine (to 0)
    checkpoint_every: int = 0  # write a resumable checkpoint every N optimizer steps (0: only at epoch ends
    #                            when the run has a work directory; see merlin_hstu.train.loop)
    keep_checkpoints: int = 2  # newest checkpoints kept on disk
    early_stopping_patience: int = 0  # stop after this many evaluations without improvement (0: off)
    early_stopping_metric: Optional[str] = None  # the validation metric watched (None: the task's default)
    validation_fraction: float = 0.0  # users / rows held out of training for validation (needed for early stopping);
    #                                   1.0 (retrieval): every user's second-to-last item, training ends before it
    # Multi-process runs (merlin-hstu train --nproc N; merlin_hstu.distributed) of models with torchrec tables
    # (model.embeddings=torchrec): how the tables are sharded and the fused optimizer that trains them.
    sharding: str = "auto"  # auto (torchrec's planner decides) | table_wise | row_wise | column_wise
    sparse_optimizer: str = "rowwise_adagrad"  # rowwise_adagrad | adagrad | sgd | adam (CUDA only)
    sparse_learning_rate: float = 0.0  # the tables' learning rate (0: the task's learning_rate)
    # Streaming data (retrieval; merlin_hstu.data.stream): read the processed Parquet row group by row group instead
    # of loading it whole; memory is bounded by the shuffle buffer, a row group and a batch. Under --nproc N each
    # process reads only its own row groups (r::N). See docs/scaling.md, "Streaming data".
    streaming: bool = False
    shuffle_buffer: int = 10000  # training samples held for shuffling (>= an epoch's samples: the in-memory order)

    def __post_init__(self) -> None:
        from merlin_hstu.distributed.sharding import check_settings

        resolve_device(self.device, check_available=False)  # validates the spelling only
        check_settings(self.sharding, self.sparse_optimizer)
        if not (isinstance(self.sparse_learning_rate, (int, float)) and self.sparse_learning_rate >= 0):
            raise ValueError(f"train.sparse_learning_rate must be >= 0 (0: the task's learning_rate), got "
                             f"{self.sparse_learning_rate!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"train.precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"train.lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        for name in ("warmup_steps", "checkpoint_every", "early_stopping_patience"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"train.{name} must be an int >= 0, got {value!r}")
        if isinstance(self.keep_checkpoints, bool) or not isinstance(self.keep_checkpoints, int) \
                or self.keep_checkpoints < 1:
            raise ValueError(f"train.keep_checkpoints must be an int >= 1, got {self.keep_checkpoints!r}")
        if not isinstance(self.streaming, bool):
            raise ValueError(f"train.streaming must be true or false, got {self.streaming!r}")
        if isinstance(self.shuffle_buffer, bool) or not isinstance(self.shuffle_buffer, int) or self.shuffle_buffer < 1:
            raise ValueError(f"train.shuffle_buffer must be an int >= 1 (samples), got {self.shuffle_buffer!r}")
        if not self.grad_clip >= 0:
            raise ValueError(f"train.grad_clip must be >= 0 (0: off), got {self.grad_clip!r}")
        if not 0.0 <= self.validation_fraction <= 1.0:
            raise ValueError(f"train.validation_fraction must be in [0, 1], got {self.validation_fraction!r}")
        if self.early_stopping_patience and not self.validates:
            raise ValueError("train.early_stopping_patience needs a validation split: set train.validation_fraction "
                             "(e.g. 0.1); the test split is never used to choose when to stop")

    @property
    def validates(self) -> bool:
        """Whether the task holds a validation split, evaluated after every epoch (early stopping watches it):
        `validation_fraction` here; a task may have one of its own (retrieval: train.split=sessions)."""
        return bool(self.validation_fraction)


def resolve_device(device: str, check_available: bool = True) -> torch.device:
    """'cpu' | 'cuda' | 'cuda:N' | 'auto' -> torch.device; a clear error when CUDA is asked for but absent."""
    if not isinstance(device, str):
        raise ValueError(f"train.device must be a string (cpu | cuda | cuda:N | auto), got {device!r}")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device != "cpu" and not (device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit())):
        raise ValueError(f"train.device must be cpu | cuda | cuda:N | auto, got {device!r}")
    if check_available and device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"train.device={device!r} but this torch build sees no CUDA device "
                             f"(torch {torch.__version__}); use --device cpu or auto")
        index = int(device[5:]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise ValueError(f"train.device={device!r} but only {torch.cuda.device_count()} CUDA device(s) exist")
    return torch.device(device)


def autocast(device: torch.device, precision: str):
    """The forward pass's precision context: nothing for fp32, bf16 autocast on CPU or CUDA otherwise."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
