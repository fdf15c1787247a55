"""The ranking data contract: what a ranking workflow produces and what every ranking model consumes.

One sample per user (reference-hstu.md §5): the user's interaction history (UIH) and, after it, the K candidate
events to rank, each with one label per task.  Everything is jagged (values + offsets), the currency of the
HSTU stack:

  history_item_ids    [Lh]    encoded item ids of the UIH, oldest first
  history_actions     [Lh]    per-event action bitmask (bit b set = task with `bit=b` happened)
  history_timestamps  [Lh]    unix seconds
  history_offsets     [B+1]   row b's history is values[history_offsets[b]:history_offsets[b+1]]
  history_watch_time  [Lh]    optional continuous signal (e.g. seconds watched), float
  candidate_item_ids  [Lc]    encoded ids of the candidates
  candidate_timestamps[Lc]    the query time of each candidate (the reference: max of the UIH timestamps)
  candidate_offsets   [B+1]
  labels              [Lc, T] one column per task in `tasks` order (0/1 for binary, a float for regression)
  contextual          {name: [B]} encoded contextual (user-level) features, e.g. age group, occupation
  user_ids            [B]     raw user ids (for GAUC and debugging; never a model input unless contextual)

The candidates' actions are unknown at inference time, so models must never read them from the history
arrays; the labels are the only place they appear.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor

TASK_KINDS = ("binary", "regression")


@dataclass(frozen=True)
class RankingTask:
    """One prediction target.  Binary tasks read `bit` of the action bitmask; regression tasks a float signal."""

    name: str
    kind: str = "binary"
    bit: Optional[int] = None  # binary: label = (bitmask >> bit) & 1
    weight: float = 1.0  # weight of this task's loss in the total

    def __post_init__(self) -> None:
        if self.kind not in TASK_KINDS:
            raise ValueError(f"RankingTask {self.name!r}: kind must be one of {TASK_KINDS}, got {self.kind!r}")
        if self.kind == "binary" and (self.bit is None or not 0 <= self.bit < 63):
            raise ValueError(f"RankingTask {self.name!r}: a binary task needs bit in [0, 63), got {self.bit!r}")
        if self.weight < 0:
            raise ValueError(f"RankingTask {self.name!r}: weight must be >= 0, got {self.weight}")


def labels_from_bitmask(actions: Tensor, tasks: Sequence[RankingTask],
                        watch_time: Optional[Tensor] = None) -> Tensor:
    """[L] bitmasks (and optional [L] watch time) -> [L, T] float labels in `tasks` order."""
    columns = []
    for task in tasks:
        if task.kind == "binary":
            columns.append(((actions >> task.bit) & 1).to(torch.float32))
        else:
            if watch_time is None:
                raise ValueError(f"regression task {task.name!r} needs a watch-time / continuous signal; "
                                 "the data has none")
            columns.append(watch_time.to(torch.float32))
    return torch.stack(columns, dim=1) if columns else torch.zeros(actions.shape[0], 0)


def _check_offsets(offsets: Tensor, num_values: int, name: str) -> None:
    if offsets.dim() != 1 or offsets.numel() < 1:
        raise ValueError(f"{name} must be a 1-D tensor [B+1], got shape {tuple(offsets.shape)}")
    if int(offsets[0]) != 0 or int(offsets[-1]) != num_values:
        raise ValueError(f"{name} must start at 0 and end at the number of values ({num_values}), "
                         f"got {int(offsets[0])}..{int(offsets[-1])}")
    if offsets.numel() > 1 and bool((offsets[1:] < offsets[:-1]).any()):
        raise ValueError(f"{name} must be non-decreasing")


@dataclass
class RankingBatch:
    history_item_ids: Tensor
    history_actions: Tensor
    history_timestamps: Tensor
    history_offsets: Tensor
    candidate_item_ids: Tensor
    candidate_timestamps: Tensor
    candidate_offsets: Tensor
    labels: Tensor
    tasks: Tuple[RankingTask, ...]
    contextual: Dict[str, Tensor] = field(default_factory=dict)
    user_ids: Optional[Tensor] = None
    history_watch_time: Optional[Tensor] = None

    def __post_init__(self) -> None:
        self.tasks = tuple(self.tasks)
        lh, lc = self.history_item_ids.numel(), self.candidate_item_ids.numel()
        for name in ("history_actions", "history_timestamps"):
            if getattr(self, name).shape != self.history_item_ids.shape:
                raise ValueError(f"RankingBatch.{name} has shape {tuple(getattr(self, name).shape)}; "
                                 f"it must match history_item_ids {tuple(self.history_item_ids.shape)}")
        if self.history_watch_time is not None and self.history_watch_time.shape != self.history_item_ids.shape:
            raise ValueError("RankingBatch.history_watch_time must match history_item_ids in shape")
        if self.candidate_timestamps.shape != self.candidate_item_ids.shape:
            raise ValueError("RankingBatch.candidate_timestamps must match candidate_item_ids in shape")
        _check_offsets(self.history_offsets, lh, "RankingBatch.history_offsets")
        _check_offsets(self.candidate_offsets, lc, "RankingBatch.candidate_offsets")
        if self.history_offsets.numel() != self.candidate_offsets.numel():
            raise ValueError("RankingBatch: history_offsets and candidate_offsets must have the same B+1 length")
        if tuple(self.labels.shape) != (lc, len(self.tasks)):
            raise ValueError(f"RankingBatch.labels has shape {tuple(self.labels.shape)}; expected "
                             f"[num candidates={lc}, num tasks={len(self.tasks)}]")
        b = self.batch_size
        for name, value in self.contextual.items():
            if value.shape != (b,):
                raise ValueError(f"RankingBatch.contextual[{name!r}] has shape {tuple(value.shape)}; expected [{b}]")
        if self.user_ids is not None and self.user_ids.shape != (b,):
            raise ValueError(f"RankingBatch.user_ids has shape {tuple(self.user_ids.shape)}; expected [{b}]")

    @property
    def batch_size(self) -> int:
        return self.history_offsets.numel() - 1

    @property
    def history_lengths(self) -> Tensor:
        return self.history_offsets[1:] - self.history_offsets[:-1]

    @property
    def num_candidates(self) -> Tensor:
        return self.candidate_offsets[1:] - self.candidate_offsets[:-1]

    @property
    def candidate_row(self) -> Tensor:
        """[Lc] the batch row of each candidate (for per-user metrics such as GAUC)."""
        return torch.repeat_interleave(torch.arange(self.batch_size), self.num_candidates)

    def to(self, device) -> "RankingBatch":
        moved = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Tensor):
                moved[f.name] = value.to(device)
            elif isinstance(value, dict):
                moved[f.name] = {k: v.to(device) for k, v in value.items()}
        return replace(self, **moved)


def multitask_loss(predictions: Tensor, labels: Tensor, tasks: Sequence[RankingTask],
                   sample_weight: Optional[Tensor] = None) -> Tuple[Tensor, Dict[str, Tensor]]:
    """Per-task losses and their weighted sum.

    predictions [L, T]: logits for binary tasks, values for regression tasks.  Binary: BCE with logits;
    regression: squared error.  Each task's loss is a weighted mean over candidates (sample_weight [L], default 1);
    the total is sum_t task.weight * loss_t.
    """
    if predictions.shape != labels.shape or predictions.shape[1] != len(tasks):
        raise ValueError(f"predictions {tuple(predictions.shape)} and labels {tuple(labels.shape)} must both be "
                         f"[num candidates, num tasks={len(tasks)}]")
    w = torch.ones(predictions.shape[0], dtype=predictions.dtype, device=predictions.device) \
        if sample_weight is None else sample_weight.to(predictions.dtype)
    denom = w.sum().clamp_min(1.0)
    per_task: Dict[str, Tensor] = {}
    total = predictions.new_zeros(())
    for t, task in enumerate(tasks):
        if task.kind == "binary":
            elementwise = torch.nn.functional.binary_cross_entropy_with_logits(
                predictions[:, t], labels[:, t], reduction="none")
        else:
            elementwise = (predictions[:, t] - labels[:, t]) ** 2
        per_task[task.name] = (elementwise * w).sum() / denom
        total = total + task.weight * per_task[task.name]
    return total, per_task
