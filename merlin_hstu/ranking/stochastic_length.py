"""Stochastic length (SL, HSTU paper arXiv 2402.17152 §3.3): subsample long training histories.

User histories have a long tail, and attention costs O(n^2) per history.  SL caps the expected cost near
O(N^alpha) (N = the longest history the system handles, alpha in (1, 2]) by replacing long histories, at random,
with short subsequences.  With threshold L = floor(N^(alpha/2)), a history of n events is

    kept whole                                          if n <= L
    replaced by a subsequence of L of its events        with probability 1 - N^alpha / n^2   (if n > L)
    kept whole                                          with probability N^alpha / n^2       (if n > L)

so the expected kept length of a long history is  E[len] = p n + (1 - p) L,  p = N^alpha / n^2, and the expected
attention work  E[len^2] <= N^alpha + L^2 = 2 N^alpha.  The subsequence is L events drawn uniformly without
replacement, kept in chronological order (the paper's (x_{i_k})).  SL is a training-time augmentation only:
`DlrmHSTU` applies it when `model.training` and never at evaluation or inference, so scores are unaffected.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional

import torch
from torch import Tensor

from merlin_hstu.ranking.batch import RankingBatch


@dataclass(frozen=True)
class StochasticLengthConfig:
    alpha: float  # in (1, 2]: 2 keeps every history whole, smaller subsamples more
    max_len: int  # N: the longest history length the system handles

    def __post_init__(self) -> None:
        if not 1.0 < self.alpha <= 2.0:
            raise ValueError(f"stochastic length alpha must be in (1, 2], got {self.alpha}; "
                             "use None to switch stochastic length off")
        if not isinstance(self.max_len, int) or self.max_len <= 0:
            raise ValueError(f"stochastic length max_len (N) must be a positive int, got {self.max_len!r}")

    @property
    def threshold(self) -> int:
        """L = floor(N^(alpha/2)): histories up to this length are always kept whole."""
        return int(math.floor(self.max_len ** (self.alpha / 2) + 1e-9))

    def keep_probability(self, n: int) -> float:
        """Probability that a history of length n is kept whole."""
        return 1.0 if n <= self.threshold else min(1.0, self.max_len ** self.alpha / float(n) ** 2)

    def expected_length(self, n: int) -> float:
        p = self.keep_probability(n)
        return p * n + (1.0 - p) * min(n, self.threshold)


class StochasticLength:
    """Seeded SL sampler.  `sample_indices(lengths)` -> kept positions; `__call__(batch)` -> subsampled batch."""

    def __init__(self, config: StochasticLengthConfig, seed: int = 0):
        self.config = config
        self.generator = torch.Generator().manual_seed(seed)

    def sample_indices(self, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """lengths [B] -> (kept flat indices into the jagged history values, new lengths [B]).

        The draws run on the CPU generator (reproducible whatever the data's device)."""
        cfg, threshold = self.config, self.config.threshold
        lengths_cpu = lengths.detach().cpu().long()
        starts = torch.cumsum(lengths_cpu, 0) - lengths_cpu
        kept, new_lengths = [], []
        for start, n in zip(starts.tolist(), lengths_cpu.tolist()):
            if n > threshold and torch.rand((), generator=self.generator).item() >= cfg.keep_probability(n):
                # L distinct positions uniformly at random, chronological order kept.
                pick = torch.randperm(n, generator=self.generator)[:threshold].sort().values
                kept.append(pick + start)
                new_lengths.append(threshold)
            else:
                kept.append(torch.arange(start, start + n))
                new_lengths.append(n)
        index = torch.cat(kept) if kept else torch.zeros(0, dtype=torch.long)
        return index.to(lengths.device), torch.tensor(new_lengths, dtype=torch.long, device=lengths.device)

    def __call__(self, batch: RankingBatch) -> RankingBatch:
        index, new_lengths = self.sample_indices(batch.history_lengths)
        offsets = torch.nn.functional.pad(torch.cumsum(new_lengths, 0), (1, 0)).to(batch.history_offsets.dtype)
        watch: Optional[Tensor] = None if batch.history_watch_time is None else batch.history_watch_time[index]
        return replace(batch, history_item_ids=batch.history_item_ids[index],
                       history_actions=batch.history_actions[index],
                       history_timestamps=batch.history_timestamps[index], history_offsets=offsets,
                       history_watch_time=watch)
