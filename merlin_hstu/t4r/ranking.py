"""Transformers4Rec adapter for DLRM-HSTU: a T4R body block and one T4R `PredictionTask` per ranking task.

    body  = DlrmHSTUBlock(model)                           T4R padded input dict -> [B, K, T + 1]
    head  = tr.Head(body, ranking_prediction_tasks(model), task_weights=[t.weight for t in model.tasks])
    t4r_model = tr.Model(head)
    t4r_model(inputs)                                       {task name: [B, K] probabilities / values}
    t4r_model(inputs, targets=targets, training=True)       {"loss", "labels", "predictions"}

Inputs are the ranking workflow's columns (workflows/ranking_workflow.py), right-padded with 0 as T4R's
`pad_inputs` leaves them: `item_id-list`, `action-list`, `timestamp-list` (the history), `candidate_item_id-list`
([B, K], 0 = no candidate), `query_time` ([B], every candidate's query time) and one column per contextual
feature (`context-<name>` or `<name>`).  Targets: `candidate_action-list` ([B, K] bitmasks; a binary task reads its
bit) and `candidate_watch_time-list` ([B, K], regression tasks), dense and padded like the candidates.

The body runs `DlrmHSTU.forward` on the jagged batch and returns its [Lc, T] predictions scattered to [B, K, T],
plus a last channel that is 1 for real candidates and 0 for padding, so each task can drop the padding without
another input.  Each `DlrmHSTUPredictionTask` reads its column: binary tasks train with BCE-with-logits and
predict sigmoid probabilities, regression tasks train with squared error and predict the value.  T4R's `Head`
averages the tasks' weighted losses (mean over tasks), where `ranking_batch.multitask_loss` sums them: the same
gradient direction, scaled by 1 / T.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers4rec.torch.model.base import PredictionTask

from merlin_hstu.ranking.model import DlrmHSTU
from merlin_hstu.ranking.batch import RankingBatch, RankingTask

HISTORY_COLUMNS = {"item": "item_id-list", "action": "action-list", "timestamp": "timestamp-list"}
CANDIDATE_COLUMN = "candidate_item_id-list"
QUERY_TIME_COLUMN = "query_time"
BINARY_TARGET = "candidate_action-list"
REGRESSION_TARGET = "candidate_watch_time-list"


def _column(inputs: Dict[str, Tensor], name: str) -> Tensor:
    if name not in inputs:
        raise ValueError(f"DlrmHSTUBlock: input column {name!r} is missing (got {sorted(inputs)}); feed the ranking "
                         "workflow's output (workflows/ranking_workflow.py) or pass the column names explicitly")
    value = inputs[name]
    if isinstance(value, tuple):  # (values, offsets) from a ragged loader without padding
        raise ValueError(f"DlrmHSTUBlock: column {name!r} is ragged; run it through tr.Model (which pads) or pad it")
    return value


class DlrmHSTUBlock(torch.nn.Module):
    """T4R body: padded ranking inputs -> [B, K, T + 1] (T task outputs, then the candidate mask)."""

    def __init__(self, model: DlrmHSTU, contextual_columns: Optional[Dict[str, str]] = None,
                 history_columns: Optional[Dict[str, str]] = None, candidate_column: str = CANDIDATE_COLUMN,
                 query_time_column: str = QUERY_TIME_COLUMN):
        super().__init__()
        if not isinstance(model, DlrmHSTU):
            raise ValueError(f"DlrmHSTUBlock wraps a merlin_hstu.ranking.model.DlrmHSTU, got {type(model).__name__}")
        self.model = model
        self.contextual_columns = dict(contextual_columns or {})
        self.history_columns = {**HISTORY_COLUMNS, **(history_columns or {})}
        self.candidate_column = candidate_column
        self.query_time_column = query_time_column

    def output_size(self):
        return torch.Size([-1, -1, len(self.model.tasks) + 1])  # [B, K, T + 1]; B and K vary per batch

    def _contextual(self, inputs: Dict[str, Tensor]) -> Dict[str, Tensor]:
        out = {}
        for name in self.model.contextual_names:
            column = self.contextual_columns.get(name)
            if column is None:
                column = f"context-{name}" if f"context-{name}" in inputs else name
            out[name] = _column(inputs, column).reshape(-1).long()
        return out

    def to_batch(self, inputs: Dict[str, Tensor]) -> RankingBatch:
        """The padded T4R inputs as a jagged RankingBatch (labels zero: T4R hands targets to the tasks)."""
        items = _column(inputs, self.history_columns["item"]).long()
        real = items != 0
        candidates = _column(inputs, self.candidate_column).long()
        if candidates.dim() == 1:
            candidates = candidates.unsqueeze(1)
        cand_mask = candidates != 0
        query = _column(inputs, self.query_time_column).reshape(-1).long()
        counts = cand_mask.sum(1)

        def offsets(mask: Tensor) -> Tensor:
            return F.pad(torch.cumsum(mask.sum(1), 0), (1, 0))

        return RankingBatch(
            history_item_ids=items[real],
            history_actions=_column(inputs, self.history_columns["action"]).long()[real],
            history_timestamps=_column(inputs, self.history_columns["timestamp"]).long()[real],
            history_offsets=offsets(real), candidate_item_ids=candidates[cand_mask],
            candidate_timestamps=torch.repeat_interleave(query, counts), candidate_offsets=offsets(cand_mask),
            labels=torch.zeros(int(counts.sum()), len(self.model.tasks), device=items.device),
            tasks=self.model.tasks, contextual=self._contextual(inputs))

    def forward(self, inputs: Dict[str, Tensor], training: bool = False, testing: bool = False, **kwargs) -> Tensor:
        candidates = _column(inputs, self.candidate_column)
        if candidates.dim() == 1:
            candidates = candidates.unsqueeze(1)
        cand_mask = candidates != 0
        predictions = self.model(self.to_batch(inputs))  # [Lc, T]
        out = predictions.new_zeros(*cand_mask.shape, predictions.shape[1] + 1)
        out[cand_mask] = torch.cat([predictions, predictions.new_ones(predictions.shape[0], 1)], dim=1)
        return out


class DlrmHSTUPredictionTask(PredictionTask):
    """One DLRM-HSTU task as a T4R PredictionTask, reading column `index` of DlrmHSTUBlock's output."""

    def __init__(self, task: RankingTask, index: int, target_name: Optional[str] = None, metrics=()):
        self.ranking_task = task
        self.index = index
        target = target_name or (BINARY_TARGET if task.kind == "binary" else REGRESSION_TARGET)
        super().__init__(loss=torch.nn.Identity(), metrics=list(metrics), target_name=target, task_name=task.name,
                         summary_type=None)

    def build(self, body, input_size, inputs=None, device=None, task_block=None, pre=None):
        if task_block is not None or pre is not None:
            raise ValueError("DlrmHSTUPredictionTask takes no task_block / pre: the DLRM-HSTU head is in the model")
        super().build(body, input_size, inputs=inputs, device=device)

    def forward(self, inputs: Tensor, targets: Optional[Tensor] = None, training: bool = False,
                testing: bool = False, **kwargs):
        raw, mask = inputs[..., self.index], inputs[..., -1] > 0.5
        binary = self.ranking_task.kind == "binary"
        if not (training or testing):
            return torch.sigmoid(raw) * mask if binary else raw * mask  # [B, K], 0 at padding
        if targets is None:
            raise ValueError(f"task {self.ranking_task.name!r}: training/testing needs targets[{self.target_name!r}]")
        logits = raw[mask]
        if binary:
            labels = ((targets.long() >> self.ranking_task.bit) & 1).to(logits.dtype)[mask]
            loss = F.binary_cross_entropy_with_logits(logits, labels)
            predictions = torch.sigmoid(logits)
        else:
            labels = targets.to(logits.dtype)[mask]
            loss = ((logits - labels) ** 2).mean()
            predictions = logits
        return {"loss": loss, "labels": labels, "predictions": predictions}


def ranking_prediction_tasks(model: DlrmHSTU, binary_target: str = BINARY_TARGET,
                             regression_target: str = REGRESSION_TARGET) -> List[DlrmHSTUPredictionTask]:
    """One T4R task per model task, in the model's task order."""
    return [DlrmHSTUPredictionTask(t, i, binary_target if t.kind == "binary" else regression_target)
            for i, t in enumerate(model.tasks)]


def ranking_head(model: DlrmHSTU, **block_kwargs):
    """tr.Head(DlrmHSTUBlock(model), one task per model task, task weights = the RankingTask weights)."""
    from transformers4rec.torch import Head

    return Head(DlrmHSTUBlock(model, **block_kwargs), ranking_prediction_tasks(model),
                task_weights=[t.weight for t in model.tasks])
