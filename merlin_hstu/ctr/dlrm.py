"""CTR baselines beside WuKong: DLRM (Naumov et al. 2019) and logistic regression, pure PyTorch.

Both take the same inputs as `merlin_hstu.ctr.wukong.WukongModel`: dense [B, m] floats and sparse [B, c] int64
ids, and return one logit per row.

DLRM:

    v_0     = bottom_MLP(dense)                       ReLU MLP ending in d units (ReLU too)
    v_j     = E_j[sparse_j]                           j = 1..c, one d-dim table per categorical feature
    T       = [v_0; v_1; ...; v_c]                    [B, c + 1, d]
    z       = { <v_i, v_j> : i < j }                  the upper triangle of T T^T, (c + 1) c / 2 dot products
    logit   = top_MLP([v_0, z])                       ReLU MLP -> 1

Only pairwise (order-2) interactions are explicit; anything higher has to come from the top MLP.  With no
dense features there is no v_0 and z covers the c embeddings alone.

Logistic regression:  logit = b + w . dense + sum_j u_j[sparse_j]   (order 1: no interactions at all).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Tuple

import torch
from torch import nn

from merlin_hstu.common.checks import layer_widths, positive_int
from merlin_hstu.common.embeddings import check_backend
from merlin_hstu.ctr.wukong import categorical_embeddings, check_tabular_inputs, to_torchrec_bags
from merlin_hstu.encoders.wukong import mlp


@dataclass
class DLRMConfig:
    """embedding_dim = d (also the bottom MLP's output); the MLPs' hidden widths."""

    embedding_dim: int = 16
    bottom_mlp: Tuple[int, ...] = (64,)
    top_mlp: Tuple[int, ...] = (64, 32)
    embeddings: str = "torch"  # torch: nn.Embedding tables | torchrec: one EmbeddingBagCollection (shardable)

    def __post_init__(self) -> None:
        positive_int("DLRMConfig", "embedding_dim", self.embedding_dim)
        check_backend(self.embeddings, "model.embeddings")
        self.bottom_mlp = layer_widths("DLRMConfig", "bottom_mlp", self.bottom_mlp)
        self.top_mlp = layer_widths("DLRMConfig", "top_mlp", self.top_mlp)

    def to_dict(self) -> dict:
        d = {"embedding_dim": self.embedding_dim, "bottom_mlp": list(self.bottom_mlp),
             "top_mlp": list(self.top_mlp)}
        if self.embeddings != "torch":
            d["embeddings"] = self.embeddings
        return d


class DLRM(nn.Module):
    """forward(dense [B, num_dense], sparse [B, len(cardinalities)]) -> logits [B]."""

    def __init__(self, cardinalities: Sequence[int], num_dense: int, config: DLRMConfig | None = None):
        super().__init__()
        self.config = config or DLRMConfig()
        self.cardinalities = [int(c) for c in cardinalities]
        self.num_dense = int(num_dense)
        d = self.config.embedding_dim
        vectors = len(self.cardinalities) + (1 if self.num_dense else 0)
        if vectors < 2:
            raise ValueError("DLRM needs at least two vectors to interact (categorical features, plus one for the "
                             f"dense features); got {len(self.cardinalities)} categorical and {self.num_dense} dense")
        self.bottom = (mlp(self.num_dense, self.config.bottom_mlp, d, final_activation=True)
                       if self.num_dense else None)
        self.embeddings = nn.ModuleList(nn.Embedding(c, d) for c in self.cardinalities)
        for table in self.embeddings:
            nn.init.normal_(table.weight, std=d ** -0.5)
        rows, cols = torch.triu_indices(vectors, vectors, offset=1)
        self.register_buffer("pair_rows", rows, persistent=False)
        self.register_buffer("pair_cols", cols, persistent=False)
        top_in = len(rows) + (d if self.num_dense else 0)
        self.top = mlp(top_in, self.config.top_mlp, 1)
        if self.config.embeddings == "torchrec" and self.cardinalities:
            to_torchrec_bags(self)

    def forward(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        check_tabular_inputs(dense, sparse, self.num_dense, self.cardinalities, "DLRM")
        vectors = list(categorical_embeddings(self, sparse).unbind(1)) if self.cardinalities else []
        v0 = None
        if self.bottom is not None:
            v0 = self.bottom(dense)
            vectors.insert(0, v0)
        t = torch.stack(vectors, dim=1)  # [B, m, d]
        z = torch.bmm(t, t.transpose(1, 2))[:, self.pair_rows, self.pair_cols]  # upper triangle of T T^T
        top_in = z if v0 is None else torch.cat([v0, z], dim=1)
        return self.top(top_in).squeeze(-1)


class LogisticRegression(nn.Module):
    """logit = b + w . dense + sum_j u_j[sparse_j]; same inputs as DLRM / WukongModel."""

    def __init__(self, cardinalities: Sequence[int], num_dense: int):
        super().__init__()
        self.cardinalities = [int(c) for c in cardinalities]
        self.num_dense = int(num_dense)
        self.dense = nn.Linear(self.num_dense, 1) if self.num_dense else None
        self.weights = nn.ModuleList(nn.Embedding(c, 1) for c in self.cardinalities)
        for table in self.weights:
            nn.init.zeros_(table.weight)
        self.bias = nn.Parameter(torch.zeros(()))

    def forward(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        check_tabular_inputs(dense, sparse, self.num_dense, self.cardinalities, "LogisticRegression")
        logit = self.bias.expand(dense.shape[0])
        if self.dense is not None:
            logit = logit + self.dense(dense).squeeze(-1)
        for j, table in enumerate(self.weights):
            logit = logit + table(sparse[:, j]).squeeze(-1)
        return logit
