"""Brute-force top-K over the whole catalogue, chunk by chunk: MIPS (dot product) and MoL.

For a batch of queries u_b, every catalogue item v is scored (s[b, v] = <u_b, e_v>, or the MoL score), items that
may not be recommended get -inf:

    s[b, v] = -inf   unless rankable[v]                 padding / null / OOV rows, ids outside the candidate list
    s[b, v] = -inf   for v in exclude[b, :]             history filtering (ids < 0 in `exclude` are ignored)

and the K best are kept in the order (score descending, id ascending).  The catalogue is scored `chunk_size` items
at a time and each chunk is merged into the running top-K, so memory is O(B * (K + chunk)) plus one chunk's scoring
intermediates (for MoL: [B, chunk, K_logits] tensors) - never [B, V, ...] - however large the catalogue.

Ties are broken by id exactly (stable sorts; chunks arrive in id order), so `target_ranks` - the 1-based position of
each target in the top-`rank_cap` list, or rank_cap + 1 when it is not there, the reference's protocol - equals
`merlin_hstu.retrieval.metrics.target_ranks` on the same scores, and evaluation (merlin_hstu.retrieval.train.evaluate_model) uses it.

`scores(query)` returns the unmasked [B, V] scores through the same chunked path; it is what the serving program
traces (merlin_hstu.serving.scorer), so served and offline scores come from one implementation.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from merlin_hstu.retrieval.similarity import MixtureOfLogits, RetrievalHead


class BruteForceTopK(nn.Module):
    """Base class: subclasses implement `prepare(query)` (per-query work done once) and `score_chunk`."""

    num_items: int
    chunk_size: int

    def __init__(self, num_items: int, chunk_size: int, rankable: Optional[Tensor] = None):
        super().__init__()
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        if rankable is None:
            rankable = torch.ones(num_items, dtype=torch.bool)
        if rankable.shape != (num_items,) or rankable.dtype != torch.bool:
            raise ValueError(f"rankable must be a bool tensor of shape ({num_items},), got "
                             f"{rankable.dtype} {tuple(rankable.shape)}")
        self.num_items = num_items
        self.chunk_size = chunk_size
        self.register_buffer("rankable", rankable.clone())

    # --- to implement -------------------------------------------------------------------------------
    def prepare(self, query: Tensor) -> Tuple[Tensor, ...]:
        return (query,)

    def score_chunk(self, prepared: Tuple[Tensor, ...], start: int, end: int) -> Tensor:
        """Scores of items start..end-1 for every query: [B, end - start]."""
        raise NotImplementedError

    # --- scoring ------------------------------------------------------------------------------------
    def chunks(self):
        return [(s, min(s + self.chunk_size, self.num_items)) for s in range(0, self.num_items, self.chunk_size)]

    def scores(self, query: Tensor) -> Tensor:
        """Unmasked scores of every item: [B, V] (chunked; traceable - the chunk loop depends on V only)."""
        prepared = self.prepare(query)
        return torch.cat([self.score_chunk(prepared, s, e) for s, e in self.chunks()], dim=1)

    def _masked_chunk(self, prepared, start: int, end: int, exclude: Optional[Tensor]) -> Tensor:
        scores = self.score_chunk(prepared, start, end)
        if torch.isnan(scores).any():
            raise ValueError("top-K: scores contain NaN; NaN cannot be ranked (check the model output)")
        scores = scores.masked_fill(~self.rankable[start:end].unsqueeze(0), float("-inf"))
        if exclude is not None:
            local = exclude - start
            inside = (exclude >= 0) & (local >= 0) & (local < end - start)
            rows = torch.arange(exclude.shape[0], device=exclude.device).unsqueeze(1).expand_as(exclude)
            scores = scores.index_put((rows[inside], local[inside]),
                                      torch.full((), float("-inf"), dtype=scores.dtype, device=scores.device))
        return scores

    def forward(self, query: Tensor, k: int, exclude: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """query [B, D] (normalised as the model's head does), k, exclude [B, H] ids (or None)
        -> (scores [B, k], ids [B, k]) best first, ties by id.  Slots past the rankable items hold -inf."""
        if not 1 <= k <= self.num_items:
            raise ValueError(f"top-K: k must be in [1, {self.num_items}], got {k}")
        if exclude is not None and (exclude.dim() != 2 or exclude.shape[0] != query.shape[0]):
            raise ValueError(f"top-K: exclude must be [batch={query.shape[0]}, H] ids, got {tuple(exclude.shape)}")
        prepared = self.prepare(query)
        best_scores: Optional[Tensor] = None
        best_ids: Optional[Tensor] = None
        for start, end in self.chunks():
            scores = self._masked_chunk(prepared, start, end, exclude)
            # Stable sorts: equal scores keep id order (within a chunk the columns are in id order; the running
            # list holds only smaller ids than the chunk, and comes first in the concatenation).
            values, order = torch.sort(scores, dim=1, descending=True, stable=True)
            values, ids = values[:, :k], order[:, :k] + start
            if best_scores is not None:
                values = torch.cat([best_scores, values], dim=1)
                ids = torch.cat([best_ids, ids], dim=1)
                values, order = torch.sort(values, dim=1, descending=True, stable=True)
                values, ids = values[:, :k], ids.gather(1, order[:, :k])
            best_scores, best_ids = values, ids
        return best_scores, best_ids

    def target_ranks(self, query: Tensor, targets: Tensor, history: Optional[Tensor] = None,
                     rank_cap: Optional[int] = 2500) -> Tensor:
        """The reference protocol's rank of each target: its 1-based position in the top-`rank_cap` list after
        history filtering (the target itself is never filtered), rank_cap + 1 when it is not in the list."""
        targets = targets.to(torch.long)
        if targets.shape != (query.shape[0],):
            raise ValueError(f"target_ranks: targets must be [batch={query.shape[0]}], got {tuple(targets.shape)}")
        if targets.numel() and (targets.min() < 0 or targets.max() >= self.num_items):
            raise ValueError(f"target_ranks: targets must be ids in [0, {self.num_items})")
        if rank_cap is not None and rank_cap < 1:
            raise ValueError(f"target_ranks: rank_cap must be >= 1 or None, got {rank_cap}")
        if not bool(self.rankable[targets].all()):
            bad = sorted(set(targets[~self.rankable[targets]].tolist()))
            raise ValueError(f"target_ranks: targets {bad} are not rankable ids; drop those samples before evaluation")
        exclude = None
        if history is not None:
            exclude = history.to(torch.long).masked_fill(history == targets.unsqueeze(1), -1)
        k = self.num_items if rank_cap is None else min(rank_cap, self.num_items)
        _, ids = self(query, k, exclude)
        hit = ids == targets.unsqueeze(1)
        position = hit.to(torch.int64).argmax(dim=1) + 1
        missing = (rank_cap + 1) if rank_cap is not None else self.num_items + 1
        return torch.where(hit.any(dim=1), position, torch.full_like(position, missing))


class MIPSBruteForceTopK(BruteForceTopK):
    """Maximum inner product: s[b, v] = <u_b, e_v> over the (normalised) item table."""

    def __init__(self, item_vectors: Tensor, chunk_size: int = 65536, rankable: Optional[Tensor] = None):
        super().__init__(item_vectors.shape[0], chunk_size, rankable)
        self.register_buffer("item_vectors", item_vectors.detach().clone())

    def score_chunk(self, prepared: Tuple[Tensor, ...], start: int, end: int) -> Tensor:
        return prepared[0] @ self.item_vectors[start:end].t()


class MoLBruteForceTopK(BruteForceTopK):
    """Mixture of logits: the item side (components, g_X) of the whole catalogue is computed once, at
    construction; each call computes the query side once and scores the catalogue chunk by chunk."""

    def __init__(self, mol: MixtureOfLogits, item_embeddings: Tensor, chunk_size: int = 1024,
                 rankable: Optional[Tensor] = None):
        super().__init__(item_embeddings.shape[0], chunk_size, rankable)
        self.mol = mol
        with torch.no_grad():
            comps, gate = mol.item_side(item_embeddings.detach())
        self.register_buffer("item_components", comps)
        self.register_buffer("item_gate", gate)

    def prepare(self, query: Tensor) -> Tuple[Tensor, ...]:
        return self.mol.query_side(query)

    def score_chunk(self, prepared: Tuple[Tensor, ...], start: int, end: int) -> Tensor:
        return self.mol.score_catalogue(prepared[0], prepared[1], self.item_components[start:end],
                                        self.item_gate[start:end])


def build_topk(head: RetrievalHead, item_vectors: Tensor, rankable: Optional[Tensor] = None,
               chunk_size: Optional[int] = None) -> BruteForceTopK:
    """The top-K module matching a head: MIPS for the dot product, MoL otherwise.  Built from the current
    weights (a snapshot of the item side); call it in eval mode (MoL's dropouts)."""
    chunk = chunk_size or head.config.chunk_size
    if head.is_mol:
        return MoLBruteForceTopK(head.similarity, item_vectors, chunk, rankable)
    return MIPSBruteForceTopK(item_vectors, chunk, rankable)


def rankable_from_invalid(num_items: int, invalid_ids: Sequence[int]) -> Tensor:
    """bool [num_items]: True except at `invalid_ids` (padding, null / OOV rows, non-catalogue ids)."""
    mask = torch.ones(num_items, dtype=torch.bool)
    if len(invalid_ids):
        mask[torch.as_tensor(list(invalid_ids), dtype=torch.long)] = False
    return mask
