"""Transformers4Rec adapter for DLRM-HSTU: a T4R body block, one T4R `PredictionTask` per ranking task, and a
`Head` that trains under `tr.Trainer` on the ranking workflow's output.

    model = ranking_model_from_schema(schema, tasks)        # schema.pbtxt of workflows/ranking_workflow.py
    trainer = tr.Trainer(model=model, args=args, schema=trainer_schema(schema), compute_metrics=True,
                         train_dataset_or_path=..., eval_dataset_or_path=...)

    body  = DlrmHSTUBlock(model)                           T4R padded input dict -> [B, K, T + 1]
    head  = DlrmHSTUHead(body, ranking_prediction_tasks(model), task_weights=[t.weight for t in model.tasks])
    t4r_model = tr.Model(head)                              (ranking_head(model) builds this head)
    t4r_model(inputs)                                       {task name: [B, K] probabilities / values}
    t4r_model(inputs, targets=targets, training=True)       {"loss", "labels", "predictions"}

Inputs are the ranking workflow's columns (names from `merlin_hstu.common.schema` and `merlin_hstu.ranking.data`),
right-padded with 0 as T4R's `pad_inputs` leaves them: `item_id-list`, `action-list`, `timestamp-list` (the
history), `candidate_item_id-list` ([B, K], 0 = no candidate), `query_time` ([B], every candidate's query time),
and one column per contextual feature (`context-<name>` or `<name>`). Targets: `candidate_action-list` ([B, K]
bitmasks; a binary task reads its bit) and `candidate_watch_time-list` ([B, K], regression tasks). They are
dense and padded like the candidates.

The body runs `DlrmHSTU.forward` on the jagged batch. It returns the [Lc, T] predictions scattered to [B, K, T],
plus a last channel that is 1 for real candidates and 0 for padding, so each task can drop the padding without
another input. Each `DlrmHSTUPredictionTask` reads its column. Binary tasks train with BCE-with-logits, predict
sigmoid probabilities and are scored by AUC and log loss. Regression tasks train with squared error, predict the
value and are scored by MSE. T4R's `Head` averages the tasks' weighted losses (mean over tasks), while
`ranking_batch.multitask_loss` sums them. The gradient direction is the same, scaled by 1 / T.

Why `DlrmHSTUHead` and `trainer_schema` (the targets through the Merlin loader). The workflow tags the
candidate label lists TARGET. They are ragged, one value per candidate and K or fewer per user. The Merlin
dataloader of `data_loader_engine="merlin"` splits ragged columns into `<name>__values` / `<name>__offsets`
before it pops the labels by name, so it fails with `KeyError: 'candidate_action-list'`. `trainer_schema` keeps
those columns as LIST columns without the TARGET tag. The loader then pads them like every other list and
delivers them with the inputs. `DlrmHSTUHead` takes each task's target column from the batch when the targets do
not carry it. T4R's own `Head` also casts every label to float32, which changes bitmask values of 2**24 and
above; `DlrmHSTUHead` hands the int64 bitmasks to the tasks as they are.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
import torchmetrics as tm
from merlin.schema import ColumnSchema, Schema, Tags
from torch import Tensor
from transformers4rec.torch.model.base import Head, PredictionTask

from merlin_hstu.common import schema as roles
from merlin_hstu.ranking.batch import RankingBatch, RankingTask
from merlin_hstu.ranking.data import (CANDIDATE_ACTION_LIST, CANDIDATE_ITEM_LIST, CANDIDATE_WATCH_TIME_LIST,
                                      CONTEXT_PREFIX, QUERY_TIME)
from merlin_hstu.ranking.model import DlrmHSTU

#: role -> the ranking workflow's history list column (the defaults; `history_columns(schema)` reads a schema's)
HISTORY_COLUMNS = {roles.ROLE_ITEM: roles.ITEM_LIST, roles.ROLE_ACTION: roles.ACTION_LIST,
                   roles.ROLE_TIMESTAMP: roles.TIMESTAMP_LIST}
CANDIDATE_COLUMN = CANDIDATE_ITEM_LIST
QUERY_TIME_COLUMN = QUERY_TIME
BINARY_TARGET = CANDIDATE_ACTION_LIST
REGRESSION_TARGET = CANDIDATE_WATCH_TIME_LIST


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
                column = CONTEXT_PREFIX + name if CONTEXT_PREFIX + name in inputs else name
            out[name] = _column(inputs, column).reshape(-1).long()
        return out

    def to_batch(self, inputs: Dict[str, Tensor]) -> RankingBatch:
        """The padded T4R inputs as a jagged RankingBatch (labels zero: T4R hands targets to the tasks)."""
        items = _column(inputs, self.history_columns[roles.ROLE_ITEM]).long()
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
            history_actions=_column(inputs, self.history_columns[roles.ROLE_ACTION]).long()[real],
            history_timestamps=_column(inputs, self.history_columns[roles.ROLE_TIMESTAMP]).long()[real],
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


def default_metrics(task: RankingTask) -> list:
    """Binary tasks: AUC and log loss of the probabilities; regression tasks: mean squared error."""
    if task.kind == "binary":
        from merlin_hstu.t4r.ctr import BinaryAUC, BinaryLogLoss

        return [BinaryAUC(), BinaryLogLoss()]
    return [tm.MeanSquaredError()]


def _pad_to(x: Tensor, width: int) -> Tensor:
    """Right-pad [B, K] with zeros to [B, width] (a loader may pad targets and candidates to different widths;
    the extra positions are padding either way)."""
    return x if x.shape[1] == width else torch.cat([x, x.new_zeros(x.shape[0], width - x.shape[1])], dim=1)


class DlrmHSTUPredictionTask(PredictionTask):
    """One DLRM-HSTU task as a T4R PredictionTask, reading column `index` of DlrmHSTUBlock's output.

    `metrics`: None gives `default_metrics(task)`; pass () for none."""

    def __init__(self, task: RankingTask, index: int, target_name: Optional[str] = None, metrics=None):
        self.ranking_task = task
        self.index = index
        target = target_name or (BINARY_TARGET if task.kind == "binary" else REGRESSION_TARGET)
        metrics = default_metrics(task) if metrics is None else list(metrics)
        super().__init__(loss=torch.nn.Identity(), metrics=metrics, target_name=target, task_name=task.name,
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
        if targets.dim() == 1:
            targets = targets.unsqueeze(1)
        if targets.shape[0] != raw.shape[0]:
            raise ValueError(f"task {self.ranking_task.name!r}: targets[{self.target_name!r}] has {targets.shape[0]} "
                             f"rows, the batch has {raw.shape[0]}")
        if targets.shape[1] < raw.shape[1] and bool(mask[:, targets.shape[1]:].any()):
            raise ValueError(f"task {self.ranking_task.name!r}: targets[{self.target_name!r}] has "
                             f"{targets.shape[1]} columns, but some rows have more candidates "
                             f"({raw.shape[1]} columns); every candidate needs its label")
        width = max(raw.shape[1], targets.shape[1])
        raw, mask, targets = _pad_to(raw, width), _pad_to(mask, width), _pad_to(targets, width)
        logits = raw[mask]
        if binary:
            if targets.is_floating_point() and bool((targets != targets.round()).any()):
                raise ValueError(f"task {self.ranking_task.name!r}: targets[{self.target_name!r}] must be integer "
                                 "action bitmasks, got fractional values")
            labels = ((targets.long() >> self.ranking_task.bit) & 1).to(logits.dtype)[mask]
            loss = F.binary_cross_entropy_with_logits(logits, labels)
            predictions = torch.sigmoid(logits)
        else:
            labels = targets.to(logits.dtype)[mask]
            loss = ((logits - labels) ** 2).mean()
            predictions = logits
        return {"loss": loss, "labels": labels, "predictions": predictions}


class DlrmHSTUHead(Head):
    """`tr.Head` whose tasks find their target columns in the targets or, failing that, in the batch itself.

    What `tr.Trainer` needs on the ranking workflow's output with `trainer_schema` (see the module docstring).
    Targets are passed on as they are, never cast to float. In inference the head is T4R's."""

    def _task_targets(self, inputs, targets) -> Dict[str, Tensor]:
        tasks = list(self.prediction_task_dict.values())
        if targets is not None and not isinstance(targets, dict):
            if len({t.target_name for t in tasks}) != 1:
                raise ValueError("DlrmHSTUHead: the tasks read different target columns "
                                 f"{sorted({t.target_name for t in tasks})}; pass targets as a dict by column")
            return {tasks[0].target_name: targets}
        found = dict(targets or {})
        for task in tasks:
            name = task.target_name
            if name in found:
                continue
            if isinstance(inputs, dict) and name in inputs:
                found[name] = inputs[name]
                continue
            raise ValueError(
                f"task {task.task_name!r} needs its target column {name!r}, which is neither in the targets "
                f"({sorted(found)}) nor in the batch. Fix: give tr.Trainer schema=trainer_schema(schema) (the "
                "ranking workflow's schema with the label lists delivered as inputs), or pass targets={...}")
        return found

    def forward(self, body_outputs, training: bool = False, testing: bool = False, targets=None,
                call_body: bool = False, top_k: Optional[int] = None, **kwargs):
        if not (training or testing):
            return super().forward(body_outputs, training=training, testing=testing, targets=targets,
                                   call_body=call_body, top_k=top_k, **kwargs)
        task_targets = self._task_targets(body_outputs if call_body else None, targets)
        if call_body:
            body_outputs = self.body(body_outputs, training=training, testing=testing, **kwargs)
        losses, labels, predictions = [], {}, {}
        for name, task in self.prediction_task_dict.items():
            out = task(body_outputs, targets=task_targets[task.target_name], training=training, testing=testing,
                       **kwargs)
            labels[name], predictions[name] = out["labels"], out["predictions"]
            losses.append(out["loss"] * self._task_weights[name])
        loss = getattr(torch.stack(losses), self.loss_reduction)()
        return {"loss": loss, "labels": labels, "predictions": predictions}


def ranking_prediction_tasks(model: DlrmHSTU, binary_target: str = BINARY_TARGET,
                             regression_target: str = REGRESSION_TARGET) -> List[DlrmHSTUPredictionTask]:
    """One T4R task per model task, in the model's task order."""
    return [DlrmHSTUPredictionTask(t, i, binary_target if t.kind == "binary" else regression_target)
            for i, t in enumerate(model.tasks)]


def ranking_head(model: DlrmHSTU, binary_target: str = BINARY_TARGET, regression_target: str = REGRESSION_TARGET,
                 **block_kwargs) -> DlrmHSTUHead:
    """DlrmHSTUHead(DlrmHSTUBlock(model), one task per model task, task weights = the RankingTask weights)."""
    return DlrmHSTUHead(DlrmHSTUBlock(model, **block_kwargs),
                        ranking_prediction_tasks(model, binary_target, regression_target),
                        task_weights=[t.weight for t in model.tasks])


# ------------------------------------------------------------------------------------------------
# From the ranking workflow's schema
# ------------------------------------------------------------------------------------------------
def _core(schema) -> Schema:
    from merlin_hstu.t4r.encoders import _as_core_schema

    return _as_core_schema(schema)


def history_columns(schema) -> Dict[str, str]:
    """role -> history list column of a ranking schema, read by role property (`HISTORY_COLUMNS`' name for a role
    the schema does not mark)."""
    core = _core(schema)
    return {role: roles.role_column(core, role) or name for role, name in HISTORY_COLUMNS.items()}


def trainer_schema(schema) -> Schema:
    """The schema to give `tr.Trainer` for ranking-workflow data: the ragged list columns tagged TARGET keep
    every other tag and property but lose TARGET. The Merlin loader then pads them and delivers them with the
    inputs, where `DlrmHSTUHead` reads them (see the module docstring). Other columns are unchanged."""
    out = []
    for column in _core(schema):
        if Tags.TARGET in column.tags and column.is_list and column.is_ragged:
            properties = {k: v for k, v in column.properties.items() if k != "value_count"}
            column = ColumnSchema(column.name, tags=[t for t in column.tags if t != Tags.TARGET],
                                  properties=properties, dtype=column.dtype, is_list=True, is_ragged=True,
                                  dims=column.shape.as_tuple if column.shape.dims is not None else None)
        out.append(column)
    return Schema(out)


@dataclass(frozen=True)
class RankingSchemaSizes:
    """What `merlin_hstu.ranking.model.build_dlrm_hstu` reads from a dataset, read from a ranking schema."""

    num_items: int
    contextual_cardinalities: Dict[str, int]
    contextual_columns: Dict[str, str]  # feature -> column
    num_action_bits: int
    tasks: Tuple[RankingTask, ...]

    @classmethod
    def from_schema(cls, schema, tasks: Sequence[RankingTask]) -> "RankingSchemaSizes":
        core = _core(schema)
        tasks = tuple(tasks)
        if not tasks or not all(isinstance(t, RankingTask) for t in tasks):
            raise ValueError("tasks must be a non-empty sequence of RankingTask; the ranking workflow records them "
                             "in ranking.json: [RankingTask(**t) for t in read_meta(dir)['tasks']]")
        history = history_columns(core)
        needed = [*history.values(), CANDIDATE_COLUMN, QUERY_TIME_COLUMN]
        needed += [BINARY_TARGET] if any(t.kind == "binary" for t in tasks) else []
        needed += [REGRESSION_TARGET] if any(t.kind == "regression" for t in tasks) else []
        missing = [n for n in needed if n not in core.column_names]
        if missing:
            raise ValueError(f"the schema lacks the ranking column(s) {missing} (columns: {core.column_names}); "
                             "pass the schema.pbtxt of a ranking-workflow output (merlin-hstu preprocess-ranking)")
        num_items = max(roles.embedding_table_size(core, history[roles.ROLE_ITEM]),
                        roles.embedding_table_size(core, CANDIDATE_COLUMN))
        contextual, columns = {}, {}
        for column in core:
            if Tags.CONTEXT not in column.tags:
                continue
            feature = column.name[len(CONTEXT_PREFIX):] if column.name.startswith(CONTEXT_PREFIX) else column.name
            contextual[feature] = roles.embedding_table_size(core, column.name)
            columns[feature] = column.name
        action_list = history[roles.ROLE_ACTION]
        domain = core[action_list].int_domain
        if domain is None or domain.max is None:
            raise ValueError(f"column {action_list!r} has no domain max (the bitmask's largest value); "
                             "it must come from the ranking workflow")
        # bits of the largest bitmask; a float-rounded 2**62 - 1 reads as 2**62, hence the cap
        bits = min(max(int(domain.max).bit_length(), 1), 62)
        return cls(num_items, contextual, columns, bits, tasks)


def ranking_model_from_schema(schema, tasks: Sequence[RankingTask], overrides: Optional[dict] = None):
    """A `tr.Model` for a ranking-workflow output: DlrmHSTU sized from `schema` (item table from the item
    domains, one embedding per CONTEXT column, action bits from the bitmask domain) through
    `build_dlrm_hstu(sizes, overrides)`, inside `ranking_head`. `overrides` are DlrmHSTUConfig fields."""
    import transformers4rec.torch as tr

    from merlin_hstu.ranking.model import build_dlrm_hstu

    sizes = RankingSchemaSizes.from_schema(schema, tasks)
    model = build_dlrm_hstu(sizes, overrides)
    return tr.Model(ranking_head(model, contextual_columns=sizes.contextual_columns,
                                 history_columns=history_columns(schema)))


__all__ = ["DlrmHSTUBlock", "DlrmHSTUPredictionTask", "DlrmHSTUHead", "RankingSchemaSizes", "default_metrics",
           "history_columns", "ranking_prediction_tasks", "ranking_head", "ranking_model_from_schema",
           "trainer_schema"]
