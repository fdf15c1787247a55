"""How a query (user) vector is compared with item vectors: dot product, or a mixture of logits (MoL).

Both similarities score two shapes of problem:

    pairs      query [P, D] against its own items [P, M]       training: a positive plus sampled negatives
    catalogue  query [B, D] against a shared item set [C, D]   top-K, evaluation, full softmax

**Dot product**: s(q, x) = <q, x>.

**Mixture of logits** (MoL, RAILS arXiv 2407.15462; reference-hstu.md §1.7).  With P_Q query components, P_X item
components of width d and K = P_Q * P_X component logits:

    q_1..q_PQ   = split(f_Q(q))        f_Q = Dropout -> SwiGLU(D -> H_Q) -> Linear(H_Q -> P_Q d)   (H_Q <= 0: Linear)
    x_1..x_PX   = split(f_X(x))        f_X built the same way on the item embedding
    q_i, x_j   <- q_i / max(||q_i||, eps), x_j / max(||x_j||, eps)     when component_l2_norm
    l_k         = <q_i, x_j> / tau_MoL                                  k = i * P_X + j
    g           = SiLU(g_Q(q) * g_X(x) + g_L(l))                        g_* two-layer MLPs with SiLU, K outputs
    pi          = softmax(g)                                            the gate: sums to 1 over the K logits
    pi~         = Dropout(pi) / max(sum Dropout(pi), eps)               gate dropout, renormalised (training only)
    s(q, x)     = sum_k pi~_k * l_k

and the auxiliary mutual-information loss on the gates of N (query, item) pairs,
``mi = -H(mean_n pi_n) + mean_n H(pi_n)`` with H(p) = -sum_k p_k log p_k: low when every component is used across
the batch (high entropy of the mean) while each pair relies on few components (low entropy per pair).

Everything on the item side (components and g_X) depends on the item only, so top-K and training compute it once
per catalogue (or once per distinct id of a batch) and gather, instead of once per (query, item) pair.

`RetrievalHead` puts a similarity together with the query / item normalisation (L2, layer norm or none) that
decides what "query vector" and "item vector" mean for a model.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from merlin_hstu.kernels.gathered_logits import gathered_logits

L2_EPS = 1e-6
SIMILARITIES = ("dot", "mol")
QUERY_NORMS = ("l2", "layer_norm", "none")
ITEM_NORMS = ("l2", "none")
DOT_TOPK_CHUNK = 65536  # items per top-K chunk for the dot product ([B, 65536] floats per chunk)


def l2_normalize(x: Tensor, eps: float = L2_EPS) -> Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp(min=eps)


# ------------------------------------------------------------------------------------------------
# configs
# ------------------------------------------------------------------------------------------------
@dataclass
class MoLConfig:
    """Mixture-of-logits shape.  Defaults are the reference's RAILS ML-1M config (8 x 4 x 64, tau 0.05,
    gate dropout 0.2, query SwiGLU 512, linear item projection with dropout 0.1, gating MLPs of 128)."""

    query_components: int = 8  # P_Q
    item_components: int = 4  # P_X
    component_dim: int = 64  # d
    temperature: float = 0.05  # tau_MoL: component logits are cosines / tau when component_l2_norm
    component_l2_norm: bool = True
    query_hidden_dim: int = 512  # SwiGLU width of f_Q; <= 0: f_Q is Dropout -> Linear
    query_dropout: float = 0.0
    item_hidden_dim: int = 0  # SwiGLU width of f_X; <= 0: f_X is Dropout -> Linear
    item_dropout: float = 0.1
    gate_query_hidden_dim: int = 128
    gate_item_hidden_dim: int = 128
    gate_logits_hidden_dim: int = 128
    gate_dropout: float = 0.2  # dropout on the softmax gate, renormalised
    train_chunk_size: int = 1024  # training scores this many queries at a time, recomputed in backward
    eps: float = 1e-6

    def __post_init__(self) -> None:
        for name in ("query_components", "item_components", "component_dim", "gate_query_hidden_dim",
                     "gate_item_hidden_dim", "gate_logits_hidden_dim", "train_chunk_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"MoLConfig.{name} must be a positive int, got {value!r}")
        for name in ("query_hidden_dim", "item_hidden_dim"):
            if isinstance(getattr(self, name), bool) or not isinstance(getattr(self, name), int):
                raise ValueError(f"MoLConfig.{name} must be an int (<= 0: a linear projection), "
                                 f"got {getattr(self, name)!r}")
        if not self.temperature > 0:
            raise ValueError(f"MoLConfig.temperature must be > 0, got {self.temperature}")
        for name in ("query_dropout", "item_dropout", "gate_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"MoLConfig.{name} must be in [0, 1), got {getattr(self, name)}")

    @property
    def num_logits(self) -> int:
        return self.query_components * self.item_components


@dataclass
class RetrievalHeadConfig:
    """How queries and items are compared (saved with the model: evaluation and serving need it).

    similarity: "dot" (reference default) or "mol".  query_norm: "l2" (reference default), "layer_norm" (no affine,
    eps 1e-6; the RAILS MoL configs) or "none".  item_norm: "l2" (reference default) or "none".
    topk_chunk_size: items scored at a time by top-K / evaluation (0: 65,536 for dot, 1,024 for MoL).
    """

    similarity: str = "dot"
    query_norm: str = "l2"
    item_norm: str = "l2"
    mol: MoLConfig = field(default_factory=MoLConfig)
    topk_chunk_size: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.mol, dict):
            names = {f.name for f in dataclasses.fields(MoLConfig)}
            unknown = sorted(set(self.mol) - names)
            if unknown:
                raise ValueError(f"unknown key(s) {unknown} in head.mol; valid keys: {sorted(names)}")
            self.mol = MoLConfig(**self.mol)
        for name, value, valid in (("similarity", self.similarity, SIMILARITIES),
                                   ("query_norm", self.query_norm, QUERY_NORMS),
                                   ("item_norm", self.item_norm, ITEM_NORMS)):
            if value not in valid:
                raise ValueError(f"RetrievalHeadConfig.{name} must be one of {list(valid)}, got {value!r}")
        if isinstance(self.topk_chunk_size, bool) or not isinstance(self.topk_chunk_size, int) \
                or self.topk_chunk_size < 0:
            raise ValueError(f"RetrievalHeadConfig.topk_chunk_size must be an int >= 0 (0: automatic), "
                             f"got {self.topk_chunk_size!r}")

    @property
    def chunk_size(self) -> int:
        if self.topk_chunk_size:
            return self.topk_chunk_size
        return DOT_TOPK_CHUNK if self.similarity == "dot" else 1024

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Optional[dict]) -> "RetrievalHeadConfig":
        return cls(**(d or {}))


# ------------------------------------------------------------------------------------------------
# dot product
# ------------------------------------------------------------------------------------------------
class DotProduct(nn.Module):
    """s(q, x) = <q, x>."""

    def forward(self, query: Tensor, items: Tensor) -> Tensor:
        """query [P, D], items [P, M, D] -> [P, M]."""
        return torch.einsum("pd,pmd->pm", query, items)

    def catalogue(self, query: Tensor, items: Tensor) -> Tensor:
        """query [B, D], items [C, D] -> [B, C]."""
        return query @ items.t()


# ------------------------------------------------------------------------------------------------
# mixture of logits
# ------------------------------------------------------------------------------------------------
class SwiGLU(nn.Module):
    """SwiGLU(x) = SiLU(x W_a + b_a) * (x W_b + b_b), one [D, 2H] matmul (Shazeer, arXiv 2002.05202)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.out_features = out_features
        self.proj = nn.Linear(in_features, 2 * out_features)
        nn.init.normal_(self.proj.weight, std=0.02)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: Tensor) -> Tensor:
        gate, value = self.proj(x).split(self.out_features, dim=-1)
        return F.silu(gate) * value


def _xavier_zero_bias(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def _projection(in_dim: int, hidden: int, out_dim: int, dropout: float) -> nn.Sequential:
    """Dropout -> SwiGLU(in -> hidden) -> Linear(hidden -> out), or Dropout -> Linear when hidden <= 0."""
    if hidden > 0:
        out = nn.Linear(hidden, out_dim)
        _xavier_zero_bias(out)
        return nn.Sequential(nn.Dropout(dropout), SwiGLU(in_dim, hidden), out)
    out = nn.Linear(in_dim, out_dim)
    _xavier_zero_bias(out)
    return nn.Sequential(nn.Dropout(dropout), out)


def _gate_mlp(in_dim: int, hidden: int, out_dim: int, bias: bool) -> nn.Sequential:
    mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.SiLU(), nn.Linear(hidden, out_dim, bias=bias))
    mlp.apply(_xavier_zero_bias)
    return mlp


def _recompute(rows: int, chunk: int) -> bool:
    """Checkpoint the chunks (recompute in backward) when gradients are on and there is more than one chunk."""
    return torch.is_grad_enabled() and rows > chunk and not torch.jit.is_tracing()


def gate_entropy(probs: Tensor, eps: float = 1e-6) -> Tensor:
    """H(p) = -sum_k p_k log p_k over the last dim (log clamped at eps so exact zeros are harmless)."""
    return -(probs * probs.clamp(min=eps).log()).sum(-1)


def mutual_information_loss(probs: Tensor, eps: float = 1e-6) -> Tensor:
    """MoL's auxiliary loss on gates probs [N, K]: -H(mean_n probs_n) + mean_n H(probs_n)."""
    return -gate_entropy(probs.mean(0), eps) + gate_entropy(probs, eps).mean()


class MixtureOfLogits(nn.Module):
    """MoL similarity (see the module docstring for the math).  Pure PyTorch, traceable, no compile step."""

    def __init__(self, config: MoLConfig, query_dim: int, item_dim: int):
        super().__init__()
        self.config = config
        c = config
        self.query_projection = _projection(query_dim, c.query_hidden_dim, c.query_components * c.component_dim,
                                            c.query_dropout)
        self.item_projection = _projection(item_dim, c.item_hidden_dim, c.item_components * c.component_dim,
                                           c.item_dropout)
        self.gate_query = _gate_mlp(query_dim, c.gate_query_hidden_dim, c.num_logits, bias=False)
        self.gate_item = _gate_mlp(item_dim, c.gate_item_hidden_dim, c.num_logits, bias=False)
        self.gate_logits = _gate_mlp(c.num_logits, c.gate_logits_hidden_dim, c.num_logits, bias=True)
        self.gate_dropout = nn.Dropout(c.gate_dropout)

    # --- the two sides ------------------------------------------------------------------------------
    def _components(self, projected: Tensor, count: int) -> Tensor:
        comps = projected.reshape(projected.shape[:-1] + (count, self.config.component_dim))
        return l2_normalize(comps, self.config.eps) if self.config.component_l2_norm else comps

    def query_side(self, query: Tensor) -> Tuple[Tensor, Tensor]:
        """query [N, Dq] -> (components [N, P_Q, d], gate part g_Q [N, K])."""
        return (self._components(self.query_projection(query), self.config.query_components),
                self.gate_query(query))

    def item_side(self, items: Tensor) -> Tuple[Tensor, Tensor]:
        """items [..., Dx] -> (components [..., P_X, d], gate part g_X [..., K]); depends on the item only."""
        return (self._components(self.item_projection(items), self.config.item_components),
                self.gate_item(items))

    # --- the mixture -------------------------------------------------------------------------------
    def mix(self, logits: Tensor, query_gate: Tensor, item_gate: Tensor) -> Tuple[Tensor, Tensor]:
        """logits, query_gate, item_gate broadcastable to [..., K] -> (scores [...], gate pi [..., K])."""
        gate = F.silu(query_gate * item_gate + self.gate_logits(logits))
        probs = torch.softmax(gate, dim=-1)
        kept = self.gate_dropout(probs)
        kept = kept / kept.sum(-1, keepdim=True).clamp(min=self.config.eps)
        return (kept * logits).sum(-1), probs

    def pair_logits(self, query_comps: Tensor, item_comps: Tensor) -> Tensor:
        """query_comps [P, P_Q, d], item_comps [P, M, P_X, d] -> component logits [P, M, K]."""
        logits = torch.einsum("pid,pmjd->pmij", query_comps, item_comps)
        return logits.flatten(-2) / self.config.temperature

    def catalogue_logits(self, query_comps: Tensor, item_comps: Tensor) -> Tensor:
        """query_comps [B, P_Q, d], item_comps [C, P_X, d] -> component logits [B, C, K]."""
        logits = torch.einsum("bid,cjd->bcij", query_comps, item_comps)
        return logits.flatten(-2) / self.config.temperature

    # --- entry points ------------------------------------------------------------------------------
    def forward(self, query: Tensor, items: Tensor) -> Tensor:
        """query [P, Dq], items [P, M, Dx] -> scores [P, M] (every pair computed directly)."""
        q_comps, q_gate = self.query_side(query)
        x_comps, x_gate = self.item_side(items)
        scores, _ = self.mix(self.pair_logits(q_comps, x_comps), q_gate.unsqueeze(1), x_gate)
        return scores

    def score_ids(self, query: Tensor, item_comps: Tensor, item_gate: Tensor, ids: Tensor,
                  gate_column: Optional[int] = None) -> Tuple[Tensor, Optional[Tensor]]:
        """Each query against its own items, given as rows of a precomputed item side.

        query [P, Dq]; item_comps [U, P_X, d] and item_gate [U, K] (from `item_side`); ids [P, M] rows of those.
        Returns scores [P, M] and, when gate_column is given, the gate pi of column `gate_column` [P, K] (the
        positive in training; for the mutual-information loss).  Queries are processed `train_chunk_size` at a
        time and, when gradients are on, recomputed in backward (activation checkpointing), so memory stays at
        one chunk's [chunk, M, K] tensors however many positions a batch supervises.
        """
        q_comps, q_gate = self.query_side(query)
        flat_comps = item_comps.flatten(1)  # rows are gathered with F.embedding (a gather with a dense backward)

        def chunk(qc: Tensor, qg: Tensor, rows: Tensor, comps: Tensor, gates: Tensor):
            picked = F.embedding(rows, comps).unflatten(-1, item_comps.shape[1:])
            scores, probs = self.mix(self.pair_logits(qc, picked), qg.unsqueeze(1), F.embedding(rows, gates))
            return scores, (probs[:, gate_column] if gate_column is not None else scores.new_zeros(0))

        size = self.config.train_chunk_size
        scores, gates = [], []
        for start in range(0, ids.shape[0], size):
            args = (q_comps[start:start + size], q_gate[start:start + size], ids[start:start + size],
                    flat_comps, item_gate)
            if _recompute(ids.shape[0], size):
                s, g = checkpoint(chunk, *args, use_reentrant=False)
            else:
                s, g = chunk(*args)
            scores.append(s)
            gates.append(g)
        return torch.cat(scores), (torch.cat(gates) if gate_column is not None else None)

    def score_catalogue(self, query_comps: Tensor, query_gate: Tensor, item_comps: Tensor,
                        item_gate: Tensor) -> Tensor:
        """Every query against a shared item set: query side [B, P_Q, d] / [B, K], item side [C, P_X, d] /
        [C, K] -> scores [B, C]."""
        logits = self.catalogue_logits(query_comps, item_comps)
        scores, _ = self.mix(logits, query_gate.unsqueeze(1), item_gate.unsqueeze(0))
        return scores


# ------------------------------------------------------------------------------------------------
# the head: normalisation + similarity
# ------------------------------------------------------------------------------------------------
class RetrievalHead(nn.Module):
    """Query / item normalisation plus the similarity (no item table: the table belongs to the model).

    A dot-product head with L2 or layer norm has no parameters, so adding it changes no existing state dict.
    """

    def __init__(self, config: RetrievalHeadConfig, query_dim: int, item_dim: int):
        super().__init__()
        self.config = config
        if config.similarity == "dot" and query_dim != item_dim:
            raise ValueError(f"dot-product similarity needs query and item vectors of one size, got {query_dim} "
                             f"and {item_dim}; project the query or use similarity='mol'")
        self.similarity = DotProduct() if config.similarity == "dot" else MixtureOfLogits(config.mol, query_dim,
                                                                                          item_dim)

    @property
    def is_mol(self) -> bool:
        return isinstance(self.similarity, MixtureOfLogits)

    def normalize_query(self, h: Tensor) -> Tensor:
        if self.config.query_norm == "l2":
            return l2_normalize(h)
        if self.config.query_norm == "layer_norm":
            return F.layer_norm(h, h.shape[-1:], eps=L2_EPS)
        return h

    def normalize_items(self, e: Tensor) -> Tensor:
        return l2_normalize(e) if self.config.item_norm == "l2" else e

    def pair_scores(self, query: Tensor, items: Tensor, ids: Tensor,
                    gate_column: Optional[int] = None) -> Tuple[Tensor, Optional[Tensor]]:
        """query [P, D] against rows `ids` [P, M] of the (normalised) item table items [V, D] -> ([P, M], gates).

        Dot product: when the table is smaller than the gathered rows would be (V <= (M - 1) * D; ML-1M: 3,953 rows
        vs 128 * 50), `kernels.gathered_logits` computes only the sampled dot products (sparse kernels on a CPU;
        elsewhere row chunks of dense [P, V] matmuls and a gather, never keeping the [P, V] matrix for the backward
        pass) instead of gathering [P, M, D]; both give the same scores.  MoL: the item side is computed once per
        distinct id (or once for the table when that is smaller), then gathered.
        """
        if not self.is_mol:
            if items.shape[0] <= (ids.shape[1] - 1) * items.shape[1]:
                return gathered_logits(query, items, ids), None
            return self.similarity(query, items[ids]), None
        if ids.numel() < items.shape[0]:
            distinct, rows = torch.unique(ids, return_inverse=True)
            comps, gate = self.similarity.item_side(items[distinct])
        else:
            rows = ids
            comps, gate = self.similarity.item_side(items)
        return self.similarity.score_ids(query, comps, gate, rows, gate_column)

    def catalogue_scores(self, query: Tensor, items: Tensor) -> Tensor:
        """query [B, D] against every row of items [V, D] -> [B, V].  MoL with gradients (full softmax): chunks of
        query rows, recomputed in backward; without (evaluation, inference): chunks of `chunk_size` items."""
        if not self.is_mol:
            return self.similarity.catalogue(query, items)
        comps, gate = self.similarity.item_side(items)
        q_comps, q_gate = self.similarity.query_side(query)
        if not torch.is_grad_enabled() or torch.jit.is_tracing():
            # inference: chunks of items (they depend on V only, so a trace holds for any batch size)
            step = self.config.chunk_size
            return torch.cat([self.similarity.score_catalogue(q_comps, q_gate, comps[s:s + step], gate[s:s + step])
                              for s in range(0, items.shape[0], step)], dim=1)

        def chunk(qc: Tensor, qg: Tensor, ic: Tensor, ig: Tensor) -> Tensor:
            return self.similarity.score_catalogue(qc, qg, ic, ig)

        # as many query rows per chunk as make train_chunk_size x 128 (query, item) pairs: the memory of a sampled
        # chunk with 128 negatives
        size = max(1, self.config.mol.train_chunk_size * 128 // max(1, items.shape[0]))
        out = []
        for start in range(0, query.shape[0], size):
            args = (q_comps[start:start + size], q_gate[start:start + size], comps, gate)
            if _recompute(query.shape[0], size):
                out.append(checkpoint(chunk, *args, use_reentrant=False))
            else:
                out.append(chunk(*args))
        return torch.cat(out)
