"""Most-popular baseline: the floor any sequence model has to clear.

score(user, j) = count of id j in the training sequences, the same for every user.  Evaluated with the reference
protocol (metrics.target_ranks filters the history window), this is the "history-filtered most-popular" row of
reference-hstu.md §9.
"""
from __future__ import annotations

from typing import Iterable, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

__all__ = ["MostPopular"]

SequencesLike = Union[Tensor, np.ndarray, Iterable[Sequence[int]]]


class MostPopular:
    """Item-count popularity over encoded ids 0..num_items-1.

    Ids in ``invalid_ids`` (padding 0 by default; add e.g. null/OOV rows) are never counted or recommended.
    """

    def __init__(self, invalid_ids: Sequence[int] = (0,)) -> None:
        self.invalid_ids = tuple(int(i) for i in invalid_ids)
        self.counts: Optional[Tensor] = None  # [num_items] float32, set by fit()

    @property
    def num_items(self) -> int:
        return self._fitted_counts().shape[0]

    def fit(self, sequences: SequencesLike, num_items: int) -> "MostPopular":
        """Count item occurrences.

        ``sequences`` is either a [B, L] integer tensor/array right- or left-padded with 0, or an iterable of
        id sequences (lists, arrays or 1-D tensors).  Every id must lie in [0, num_items); out-of-range ids raise
        instead of being dropped, since they mean the encoding and ``num_items`` disagree.
        """
        if int(num_items) < 1:
            raise ValueError(f"MostPopular.fit: num_items must be >= 1, got {num_items}")
        num_items = int(num_items)
        for i in self.invalid_ids:
            if not 0 <= i < num_items:
                raise ValueError(f"MostPopular: invalid_ids {list(self.invalid_ids)} must lie in [0, {num_items})")
        ids = _flatten_ids(sequences)
        if ids.numel():
            lo, hi = int(ids.min()), int(ids.max())
            if lo < 0 or hi >= num_items:
                raise ValueError(f"MostPopular.fit: item ids must lie in [0, num_items={num_items}), got range "
                                 f"[{lo}, {hi}]; pass the embedding table size as num_items")
        counts = torch.bincount(ids, minlength=num_items).to(torch.float32)
        if self.invalid_ids:
            counts[list(self.invalid_ids)] = 0.0
        self.counts = counts
        return self

    def _fitted_counts(self) -> Tensor:
        if self.counts is None:
            raise RuntimeError("MostPopular: call fit(sequences, num_items) before scoring")
        return self.counts

    def scores(self, batch_size: int) -> Tensor:
        """[batch_size, num_items] scores: the popularity vector repeated for every user (a fresh tensor)."""
        if int(batch_size) < 0:
            raise ValueError(f"MostPopular.scores: batch_size must be >= 0, got {batch_size}")
        return self._fitted_counts().unsqueeze(0).repeat(int(batch_size), 1)

    def recommend(self, history: Tensor, k: int) -> Tensor:
        """Top-k ids per user, excluding the user's history ids and the invalid ids.

        ``history`` is [B, H] long, 0 = padding.  Ties are broken by the smaller id (stable sort), so the output
        is deterministic.
        """
        counts = self._fitted_counts()
        if history.dim() != 2:
            raise ValueError(f"MostPopular.recommend: history must be [batch, H], got shape {tuple(history.shape)}")
        if history.is_floating_point() or history.dtype == torch.bool:
            raise TypeError(f"MostPopular.recommend: history must be an integer tensor of ids, got {history.dtype}")
        history = history.long()
        num_items = counts.shape[0]
        if history.numel() and (history.min() < 0 or history.max() >= num_items):
            raise ValueError(f"MostPopular.recommend: history ids must lie in [0, {num_items}), got range "
                             f"[{int(history.min())}, {int(history.max())}]")
        k = int(k)
        scores = self.scores(history.shape[0]).to(torch.float64)
        scores.scatter_(1, history, float("-inf"))
        if self.invalid_ids:
            scores[:, list(self.invalid_ids)] = float("-inf")
        available = torch.isfinite(scores).sum(dim=1)
        if k < 1 or (available.numel() and k > int(available.min())):
            raise ValueError(f"MostPopular.recommend: k={k} must be in [1, {int(available.min()) if available.numel() else 0}]"
                             f" (items left after removing history and invalid ids)")
        order = torch.sort(scores, dim=1, descending=True, stable=True).indices
        return order[:, :k]


def _flatten_ids(sequences: SequencesLike) -> Tensor:
    """All ids as one 1-D long tensor (padding zeros included; they are zeroed out of the counts)."""
    if isinstance(sequences, Tensor):
        if sequences.is_floating_point() or sequences.dtype == torch.bool:
            raise TypeError(f"MostPopular.fit: sequences must hold integer ids, got {sequences.dtype}")
        return sequences.reshape(-1).long().cpu()
    if isinstance(sequences, np.ndarray) and sequences.dtype != object:
        if not np.issubdtype(sequences.dtype, np.integer):
            raise TypeError(f"MostPopular.fit: sequences must hold integer ids, got {sequences.dtype}")
        return torch.from_numpy(sequences.reshape(-1).astype(np.int64))
    parts = []
    for i, seq in enumerate(sequences):
        arr = seq.cpu().numpy() if isinstance(seq, Tensor) else np.asarray(seq)
        if arr.size and not np.issubdtype(arr.dtype, np.integer):
            raise TypeError(f"MostPopular.fit: sequence {i} holds non-integer ids (dtype {arr.dtype})")
        parts.append(arr.reshape(-1).astype(np.int64))
    if not parts:
        return torch.zeros(0, dtype=torch.long)
    return torch.from_numpy(np.concatenate(parts))
