"""Ranking baselines beside DLRM-HSTU: a DLRM-style model and an item prior.

`DlrmBaseline` (DLRM, Naumov et al. 2019, with the history as one pooled sparse feature). Per user b with
history events (i_j, a_j), j = 1..n_b, and per candidate item c of that user:

    token_j   = E_item[i_j] + sum_k bit_k(a_j) * E_action[k]              the event: item + its actions
    h_b       = (1 / n_b) * sum_j token_j                                 mean-pooled history (0 when n_b = 0)
    f         = [h_b, E_ctx_1[x_1], ..., E_ctx_m[x_m], E_item[c]]         F = m + 2 feature vectors of size D
    z         = [f_1, ..., f_F, <f_p, f_q> for p < q]                     concatenation + pairwise dot products
    logits    = MLP(z)  -> [T]                                            ReLU MLP, one output per task

It sees neither the order of the history nor its timestamps: the gap to DLRM-HSTU is what sequence modelling
buys. Forward contract as every ranking model: forward(batch: RankingBatch) -> [num candidates, T].

`ItemPriorBaseline`: no learning. Per task, the smoothed positive rate of the candidate's item (binary) or its
mean signal (regression), counted over every history event of the dataset (the inputs) plus the candidates of
the training users:  p_i = (pos_i + alpha * p) / (n_i + alpha), p the global rate; returned as logit(p_i).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from merlin_hstu.ranking.batch import RankingBatch, RankingTask


@dataclass
class DlrmBaselineConfig:
    embedding_dim: int = 64
    hidden_dims: Tuple[int, ...] = (256, 128)  # top MLP hidden layers
    dropout: float = 0.1
    num_action_bits: int = 8  # set from the dataset by `build_dlrm_baseline`
    contextual_features: Optional[Tuple[str, ...]] = None  # None: every contextual feature of the data
    dot_interactions: bool = True  # False: the MLP sees the concatenation only
    embedding_init_std: float = 0.05

    def __post_init__(self) -> None:
        self.hidden_dims = tuple(int(h) for h in self.hidden_dims)
        if self.contextual_features is not None:
            self.contextual_features = tuple(self.contextual_features)
        if self.embedding_dim < 1 or any(h < 1 for h in self.hidden_dims):
            raise ValueError(f"DlrmBaselineConfig: embedding_dim and hidden_dims must be >= 1, got "
                             f"{self.embedding_dim}, {self.hidden_dims}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"DlrmBaselineConfig.dropout must be in [0, 1), got {self.dropout}")
        if not 1 <= self.num_action_bits <= 62:
            raise ValueError(f"DlrmBaselineConfig.num_action_bits must be in 1..62, got {self.num_action_bits}")

    def to_dict(self) -> dict:
        return asdict(self)


class DlrmBaseline(nn.Module):
    """Embeddings + mean-pooled history + DLRM dot interactions + MLP -> one output per task."""

    def __init__(self, config: DlrmBaselineConfig, num_items: int, contextual_cardinalities: Dict[str, int],
                 tasks: Sequence[RankingTask]):
        super().__init__()
        self.config = config
        self.tasks = tuple(tasks)
        names = tuple(contextual_cardinalities) if config.contextual_features is None else config.contextual_features
        unknown = [n for n in names if n not in contextual_cardinalities]
        if unknown:
            raise ValueError(f"DlrmBaselineConfig.contextual_features {unknown} are not in the data "
                             f"({sorted(contextual_cardinalities)})")
        self.contextual_names = names
        d = config.embedding_dim
        self.item_embedding = nn.Embedding(num_items, d, padding_idx=0)
        self.action_embedding = nn.Parameter(torch.empty(config.num_action_bits, d))
        self.contextual_embeddings = nn.ModuleDict(
            {name: nn.Embedding(int(contextual_cardinalities[name]), d) for name in names})
        num_features = len(names) + 2
        width = num_features * d + (num_features * (num_features - 1) // 2 if config.dot_interactions else 0)
        layers = []
        for hidden in config.hidden_dims:
            layers += [nn.Linear(width, hidden), nn.ReLU(), nn.Dropout(config.dropout)]
            width = hidden
        layers.append(nn.Linear(width, len(self.tasks)))
        self.mlp = nn.Sequential(*layers)
        pairs = torch.triu_indices(num_features, num_features, offset=1)
        self.register_buffer("_pairs", pairs, persistent=False)
        self.register_buffer("_bits", torch.arange(config.num_action_bits), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.config.embedding_init_std
        for table in [self.item_embedding, *self.contextual_embeddings.values()]:
            nn.init.normal_(table.weight, std=std)
        with torch.no_grad():
            self.item_embedding.weight[0].zero_()
        nn.init.normal_(self.action_embedding, std=std)

    def pooled_history(self, batch: RankingBatch) -> Tensor:
        """[B, D]: the mean of item + action embeddings over each user's history."""
        bits = ((batch.history_actions.unsqueeze(1) >> self._bits) & 1).to(self.action_embedding.dtype)
        tokens = self.item_embedding(batch.history_item_ids) + bits @ self.action_embedding
        # segment sums as differences of prefix sums: a scatter-add (index_add_) is ~50x slower on a busy
        # multi-threaded CPU; float64 keeps the differences exact to ~1e-12 for any batch
        offsets = batch.history_offsets.to(tokens.device)
        prefix = torch.cat([tokens.new_zeros(1, tokens.shape[1], dtype=torch.float64),
                            tokens.double().cumsum(0)])
        summed = (prefix[offsets[1:]] - prefix[offsets[:-1]]).to(tokens.dtype)
        return summed / batch.history_lengths.clamp_min(1).unsqueeze(1).to(tokens.dtype)

    def forward(self, batch: RankingBatch) -> Tensor:
        row = batch.candidate_row.to(batch.candidate_item_ids.device)  # [Lc] the user of each candidate
        features = [self.pooled_history(batch)[row]]
        for name in self.contextual_names:
            if name not in batch.contextual:
                raise ValueError(f"the batch lacks contextual feature {name!r} (it has {sorted(batch.contextual)})")
            features.append(self.contextual_embeddings[name](batch.contextual[name])[row])
        features.append(self.item_embedding(batch.candidate_item_ids))
        stacked = torch.stack(features, dim=1)  # [Lc, F, D]
        z = [stacked.flatten(1)]
        if self.config.dot_interactions:
            dots = stacked @ stacked.transpose(1, 2)  # [Lc, F, F]
            z.append(dots[:, self._pairs[0], self._pairs[1]])
        return self.mlp(torch.cat(z, dim=1))


def build_dlrm_baseline(dataset, overrides: Optional[dict] = None) -> DlrmBaseline:
    """A DlrmBaseline sized for `dataset` (a RankingDataset); `overrides` are DlrmBaselineConfig fields."""
    values = {"num_action_bits": dataset.num_action_bits, **(overrides or {})}
    known = {f.name for f in fields(DlrmBaselineConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown dlrm-baseline option(s) {unknown}; valid: {sorted(known)}")
    config = DlrmBaselineConfig(**values)
    return DlrmBaseline(config, dataset.num_items, dataset.contextual_cardinalities, dataset.tasks)


class ItemPriorBaseline(nn.Module):
    """logit of the smoothed per-item positive rate, per task (see the module docstring)."""

    def __init__(self, rates: Tensor, tasks: Sequence[RankingTask]):
        super().__init__()
        self.tasks = tuple(tasks)
        self.register_buffer("rates", rates)  # [num_items, T]: probabilities (binary) or means (regression)

    @classmethod
    def fit(cls, dataset, train_split: str = "train", alpha: float = 10.0) -> "ItemPriorBaseline":
        """Count over every UIH event (inputs of all users) and the stored candidates of `train_split`'s users.
        `alpha` >= 0 pseudo-counts of the global rate smooth each item's rate."""
        if not alpha >= 0:
            raise ValueError(f"ItemPriorBaseline.fit: alpha must be >= 0 (pseudo-counts of the global rate), got {alpha}")
        known = dataset.history_mask()
        rows = dataset.rows(train_split)
        ends = dataset.row_offsets[rows + 1]
        for start, end in zip(ends - (dataset.row_offsets[rows + 1] - dataset.row_offsets[rows]
                                      - dataset.uih_lengths[rows]), ends):
            known[start:end] = True
        index = np.flatnonzero(known)
        items, labels = dataset.items[index], dataset.event_labels(index).astype(np.float64)
        counts = np.bincount(items, minlength=dataset.num_items).astype(np.float64)
        rates = np.zeros((dataset.num_items, len(dataset.tasks)))
        for t in range(len(dataset.tasks)):
            positives = np.bincount(items, weights=labels[:, t], minlength=dataset.num_items)
            prior = labels[:, t].mean()
            # an item never seen (possible only with alpha == 0) gets the global rate, not 0/0
            rates[:, t] = np.divide(positives + alpha * prior, counts + alpha, out=np.full(dataset.num_items, prior),
                                    where=counts + alpha > 0)
        return cls(torch.from_numpy(rates).float(), dataset.tasks)

    def forward(self, batch: RankingBatch) -> Tensor:
        rates = self.rates[batch.candidate_item_ids]
        out = rates.clone()
        for t, task in enumerate(self.tasks):
            if task.kind == "binary":
                p = rates[:, t].clamp(1e-6, 1 - 1e-6)
                out[:, t] = torch.log(p) - torch.log1p(-p)
        return out
