"""WuKong CTR model over tabular features: categorical embeddings of dim d and dense features projected to d
(one embedding per dense feature, e_i = x_i w_i + b_i), the WuKong tower (`merlin_hstu.encoders.wukong`), then
flatten -> MLP -> one logit.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence, Tuple

import torch
from torch import nn

from merlin_hstu.common.checks import layer_widths, positive_int
from merlin_hstu.common.embeddings import check_backend, to_torchrec, torchrec_tables
from merlin_hstu.encoders.wukong import WukongConfig, WukongTower, mlp


class DenseFeatureEmbedding(nn.Module):
    """One d-dim embedding per dense (continuous) feature: e_i = x_i * w_i + b_i, [B, m] -> [B, m, d]."""

    def __init__(self, num_dense: int, dim: int):
        super().__init__()
        self.num_dense, self.dim = num_dense, dim
        self.weight = nn.Parameter(torch.randn(num_dense, dim) * dim ** -0.5)
        self.bias = nn.Parameter(torch.zeros(num_dense, dim))

    def forward(self, dense: torch.Tensor) -> torch.Tensor:
        return dense.unsqueeze(-1) * self.weight + self.bias


def check_tabular_inputs(dense: torch.Tensor, sparse: torch.Tensor, num_dense: int,
                         cardinalities: Sequence[int], where: str) -> None:
    """Shape, dtype and id-range checks shared by the tabular CTR models (skipped while tracing)."""
    if torch.jit.is_tracing() or torch.jit.is_scripting():
        return
    if dense.dim() != 2 or dense.shape[1] != num_dense:
        raise ValueError(f"{where}: dense must be [batch, {num_dense}] floats, got {tuple(dense.shape)}. "
                         f"Fix: pass the {num_dense} dense features the model was built for.")
    if sparse.dim() != 2 or sparse.shape[1] != len(cardinalities):
        raise ValueError(f"{where}: sparse must be [batch, {len(cardinalities)}] ids, got {tuple(sparse.shape)}. "
                         f"Fix: pass the {len(cardinalities)} categorical features the model was built for.")
    if dense.shape[0] != sparse.shape[0]:
        raise ValueError(f"{where}: dense has {dense.shape[0]} rows but sparse has {sparse.shape[0]}")
    if sparse.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{where}: sparse ids must be int64, got {sparse.dtype}")
    if sparse.numel():
        bad = (sparse < 0) | (sparse >= torch.as_tensor(cardinalities, device=sparse.device))
        if bool(bad.any()):
            j = int(bad.any(0).nonzero()[0])
            raise ValueError(f"{where}: categorical feature {j} has ids outside [0, {cardinalities[j]}) "
                             f"(min {int(sparse[:, j].min())}, max {int(sparse[:, j].max())}). "
                             "Fix: encode ids with the fitted workflow, or size the tables from the data.")


def to_torchrec_bags(model: nn.Module) -> None:
    """Move a CTR model's per-feature tables (`model.embeddings`, an nn.ModuleList) into one torchrec
    EmbeddingBagCollection (feature j reads table j; the same weights and state-dict names)."""
    to_torchrec(model, {f"embeddings.{j}": f"feature_{j}" for j in range(len(model.embeddings))}, pooled=True,
                containers=("embeddings",))


def categorical_embeddings(model: nn.Module, sparse: torch.Tensor) -> torch.Tensor:
    """[B, c] ids -> [B, c, d]: table j's row for column j (one pooled KeyedJaggedTensor lookup with torchrec)."""
    tables = torchrec_tables(model)
    if tables is not None:
        return tables.pooled_lookup(sparse)
    return torch.stack([table(sparse[:, j]) for j, table in enumerate(model.embeddings)], dim=1)


@dataclass
class WukongModelConfig:
    """A WuKong CTR model: embedding dim d, the tower, and the top MLP's hidden widths."""

    embedding_dim: int = 16
    tower: WukongConfig = field(default_factory=WukongConfig)
    top_mlp: Tuple[int, ...] = (64,)
    top_dropout: float = 0.0
    embeddings: str = "torch"  # torch: nn.Embedding tables | torchrec: one EmbeddingBagCollection (shardable)

    def __post_init__(self) -> None:
        positive_int("WukongModelConfig", "embedding_dim", self.embedding_dim)
        check_backend(self.embeddings, "model.embeddings")
        if isinstance(self.tower, dict):
            self.tower = WukongConfig(**self.tower)
        self.top_mlp = layer_widths("WukongModelConfig", "top_mlp", self.top_mlp)

    def to_dict(self) -> dict:
        d = {"embedding_dim": self.embedding_dim, "tower": self.tower.to_dict(), "top_mlp": list(self.top_mlp),
             "top_dropout": self.top_dropout}
        if self.embeddings != "torch":
            d["embeddings"] = self.embeddings
        return d


class WukongModel(nn.Module):
    """Tabular CTR model: [dense embeddings; categorical embeddings] -> WukongTower -> flatten -> MLP -> logit.

    forward(dense [B, num_dense] float, sparse [B, len(cardinalities)] int64) -> logits [B].
    """

    def __init__(self, cardinalities: Sequence[int], num_dense: int, config: WukongModelConfig | None = None):
        super().__init__()
        self.config = config or WukongModelConfig()
        self.cardinalities = [int(c) for c in cardinalities]
        self.num_dense = int(num_dense)
        if not self.cardinalities and not self.num_dense:
            raise ValueError("WukongModel needs at least one categorical or dense feature")
        d = self.config.embedding_dim
        self.embeddings = nn.ModuleList(nn.Embedding(c, d) for c in self.cardinalities)
        for table in self.embeddings:
            nn.init.normal_(table.weight, std=d ** -0.5)  # unit-norm-ish embeddings keep <x_i, x_j> O(1)
        self.dense_embedding = DenseFeatureEmbedding(self.num_dense, d) if self.num_dense else None
        self.tower = WukongTower(self.num_dense + len(self.cardinalities), d, self.config.tower)
        self.top = mlp(self.tower.output_features * d, self.config.top_mlp, 1, dropout=self.config.top_dropout)
        if self.config.embeddings == "torchrec" and self.cardinalities:
            to_torchrec_bags(self)

    def feature_embeddings(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        """X: [B, num_dense + num_categorical, d], dense features first."""
        parts = [self.dense_embedding(dense)] if self.dense_embedding is not None else []
        if self.embeddings:
            parts.append(categorical_embeddings(self, sparse))
        return torch.cat(parts, dim=1)

    def forward(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        check_tabular_inputs(dense, sparse, self.num_dense, self.cardinalities, "WukongModel")
        x = self.tower(self.feature_embeddings(dense, sparse))
        return self.top(x.flatten(1)).squeeze(-1)
