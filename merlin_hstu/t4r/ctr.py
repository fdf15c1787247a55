"""WuKong as Transformers4Rec (23.12, torch) blocks for tabular CTR data.

    inputs = tr.TabularFeatures.from_schema(schema, aggregation=None, embedding_dim_default=16)
    body   = tr.SequentialBlock(inputs, WukongBlock(dim=16, tower=WukongConfig(num_layers=2)))
    head   = tr.Head(body, CTRBinaryClassificationTask("label"), inputs=inputs)
    model  = tr.Model(head)            # trains with tr.Trainer on a Criteo-workflow output
    # or, in one call: model = wukong_ctr_model(schema, dim=16)

Why `aggregation=None`: T4R's TabularFeatures usually concatenates the features into one vector, and its
"stack" aggregation stacks features but reports a wrong output size ([B, n] without d) and needs every
feature to have the same size already.  With no aggregation the block receives the per-feature dict
{name: [B, d] embedding or [B, 1] continuous value}, projects each continuous value to d
(e_i = x_i w_i + b_i, `merlin_hstu.ctr.wukong.DenseFeatureEmbedding`'s formula; any input whose last size is not d
gets its own d_in -> d linear map), stacks all features in sorted name order into X [B, n, d], and runs

    X -> WukongTower -> flatten -> ReLU MLP (top_mlp) -> [B, top_mlp[-1]]

`forward_output_size` reports [B, top_mlp[-1]], so `Head` can size the task.

`CTRBinaryClassificationTask` is T4R's `BinaryClassificationTask` with metrics that suit CTR: AUC and log
loss (`merlin_hstu.common.metrics`, accumulated over the evaluation set).  The stock task rounds the
predictions to 0/1 before its metrics, which would make AUC meaningless, so this one passes probabilities on.
"""
from __future__ import annotations

import re
from typing import Dict, Optional, Sequence

import torch
import torchmetrics as tm
import transformers4rec.torch as tr
from torch import nn

from merlin_hstu.common import metrics as ranking_metrics
from merlin_hstu.common.checks import layer_widths, positive_int
from merlin_hstu.encoders.wukong import WukongConfig, WukongTower, mlp


def _module_key(name: str) -> str:
    return re.sub(r"[^0-9A-Za-z_]", "_", name)  # ModuleDict keys may not contain "."


class WukongBlock(tr.BlockBase):
    """Per-feature dict from `TabularFeatures(aggregation=None)` -> WuKong tower -> MLP -> [B, top_mlp[-1]]."""

    def __init__(self, dim: int, tower: Optional[WukongConfig] = None, top_mlp: Sequence[int] = (64,)):
        super().__init__()
        self.dim = positive_int("WukongBlock", "dim", dim)
        self.tower_config = tower or WukongConfig()
        self.top_widths = layer_widths("WukongBlock", "top_mlp", top_mlp)
        if not self.top_widths:
            raise ValueError("WukongBlock.top_mlp needs at least one width: its last width is the block's output")
        self.feature_names: Optional[list] = None

    def build(self, input_size, schema=None, **kwargs):
        if not isinstance(input_size, dict):
            raise ValueError(
                f"WukongBlock needs one input per feature (a dict of sizes), got {input_size!r}. Fix: build the "
                "inputs with tr.TabularFeatures.from_schema(schema, aggregation=None, embedding_dim_default=dim).")
        sizes = {name: list(size) for name, size in input_size.items()}
        if self.feature_names == sorted(sizes) and getattr(self, "_sizes", None) == sizes:
            return super().build(input_size, schema=schema, **kwargs)  # already built (SequentialBlock + Head)
        for name, size in sizes.items():
            if len(size) != 2:
                raise ValueError(
                    f"WukongBlock: feature {name!r} has size {size}; expected [batch, width] (one vector per row). "
                    "List (sequence) features need a sequence model; drop them from the schema for CTR.")
        self.feature_names = sorted(sizes)
        self._sizes = sizes
        # features whose width is not d get their own linear map to d (continuous values: width 1)
        self.projections = nn.ModuleDict({_module_key(name): nn.Linear(size[-1], self.dim)
                                          for name, size in sizes.items() if size[-1] != self.dim})
        self.tower = WukongTower(len(self.feature_names), self.dim, self.tower_config)
        self.top = mlp(self.tower.output_features * self.dim, self.top_widths[:-1], self.top_widths[-1],
                       final_activation=True)
        return super().build(input_size, schema=schema, **kwargs)

    def stack_features(self, inputs: Dict[str, torch.Tensor]) -> torch.Tensor:
        """X [B, n, d] in sorted feature-name order (continuous values projected to d)."""
        if self.feature_names is None:
            raise RuntimeError("WukongBlock is not built: put it after TabularFeatures in a tr.SequentialBlock")
        missing = [n for n in self.feature_names if n not in inputs]
        if missing:
            raise ValueError(f"WukongBlock: inputs lack feature(s) {missing} (got {sorted(inputs)})")
        columns = []
        for name in self.feature_names:
            x = inputs[name].float()
            if x.dim() == 1:
                x = x.unsqueeze(-1)
            key = _module_key(name)
            columns.append(self.projections[key](x) if key in self.projections else x)
        return torch.stack(columns, dim=1)

    def forward(self, inputs: Dict[str, torch.Tensor], **kwargs) -> torch.Tensor:
        x = self.tower(self.stack_features(inputs))
        return self.top(x.flatten(1))

    def forward_output_size(self, input_size):
        batch = next(iter(input_size.values()))[0] if isinstance(input_size, dict) else input_size[0]
        return torch.Size([batch, self.top_widths[-1]])


class _StoredPredictions(tm.Metric):
    """Keeps every (probability, label) of an evaluation; subclasses reduce them with ranking_metrics."""

    full_state_update = False

    def __init__(self):
        super().__init__()
        self.add_state("predictions", default=[], dist_reduce_fx="cat")
        self.add_state("labels", default=[], dist_reduce_fx="cat")

    def update(self, predictions: torch.Tensor, labels: torch.Tensor) -> None:
        self.predictions.append(predictions.detach().reshape(-1).float())
        self.labels.append(labels.detach().reshape(-1).float())

    def _arrays(self):
        if not self.predictions:
            return torch.zeros(0), torch.zeros(0)
        return torch.cat(self.predictions), torch.cat(self.labels)


class BinaryAUC(_StoredPredictions):
    """AUC over everything seen since the last reset (ranking_metrics.auc: ties count one half)."""

    def compute(self) -> torch.Tensor:
        p, y = self._arrays()
        return torch.tensor(ranking_metrics.auc(y, p))


class BinaryLogLoss(_StoredPredictions):
    """Mean binary cross-entropy of the predicted probabilities (ranking_metrics.log_loss)."""

    def compute(self) -> torch.Tensor:
        p, y = self._arrays()
        return torch.tensor(ranking_metrics.log_loss(y, p) if len(y) else float("nan"))


class CTRBinaryClassificationTask(tr.BinaryClassificationTask):
    """`BinaryClassificationTask` scored by AUC and log loss on the probabilities (not rounded 0/1)."""

    def __init__(self, target_name: Optional[str] = None, task_name: Optional[str] = None, task_block=None,
                 summary_type: str = "first"):
        super().__init__(target_name=target_name, task_name=task_name, task_block=task_block,
                         metrics=(BinaryAUC(), BinaryLogLoss()), summary_type=summary_type)
        self.forward_to_prediction_fn = lambda x: x  # metrics see probabilities

    def forward(self, inputs, targets=None, training=False, testing=False):
        if targets is not None:
            targets = targets.float()  # BCELoss needs float labels; the Merlin loader yields int64
        return super().forward(inputs, targets=targets, training=training, testing=testing)


def wukong_ctr_model(schema, dim: int = 16, tower: Optional[WukongConfig] = None, top_mlp: Sequence[int] = (64,),
                     target: Optional[str] = None) -> tr.Model:
    """A T4R Model: TabularFeatures.from_schema (embeddings of dim `dim`, continuous values) -> WukongBlock ->
    CTRBinaryClassificationTask on `target` (default: the schema's one TARGET column)."""
    from merlin.schema import Tags

    from merlin_hstu.t4r.encoders import _as_core_schema

    core = _as_core_schema(schema)
    if target is None:
        targets = core.select_by_tag(Tags.TARGET).column_names
        if len(targets) != 1:
            raise ValueError(f"wukong_ctr_model: the schema has TARGET columns {targets}; pass target=<name>")
        target = targets[0]
    features = core.excluding_by_name([target])
    inputs = tr.TabularFeatures.from_schema(features, aggregation=None, embedding_dim_default=dim)
    if inputs is None:
        raise ValueError("wukong_ctr_model: the schema has no CATEGORICAL or CONTINUOUS feature columns")
    body = tr.SequentialBlock(inputs, WukongBlock(dim, tower, top_mlp))
    return tr.Model(tr.Head(body, CTRBinaryClassificationTask(target), inputs=inputs))
