"""Negative samplers for sampled retrieval losses: uniform over the catalogue, or in-batch, with logQ.

For P supervised positions with positive ids y_1..y_P, each sampler draws R negatives per position, independently
and with replacement:

* **uniform** (the reference's "local" sampler): n_pr ~ Uniform(catalogue).  q(j) = 1 / |catalogue| is the same
  for every item, so a logQ correction would only shift every logit by one constant: there is none.
* **in_batch**: n_pr ~ Uniform{y_1, ..., y_P}, the batch's own supervised positives *with their multiplicity*, so
  an item that is the next item at 5 positions of the batch is drawn 5 times as often as one that is the next item
  once: q(j) = c_j / P with c_j = #{p : y_p = j}.  Padding never enters the pool (only supervised positions are
  positives), and no item outside the batch is ever a negative.  Popular items are over-represented as negatives;
  the **logQ correction** (Yi et al., RecSys 2019; Bengio & Senecal 2008) removes that bias by scoring every
  candidate j of the softmax, the positive included, with  logit_j - log q(j).

A negative equal to its position's positive (an "accidental hit") is masked by the loss, not here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

NEGATIVE_KINDS = ("uniform", "in_batch")


@dataclass
class NegativeSample:
    """ids [P, R]; with logQ: log q of each position's positive [P] and of each negative [P, R]."""

    ids: Tensor
    log_q_positive: Optional[Tensor] = None
    log_q_negatives: Optional[Tensor] = None


def uniform_negatives(positives: Tensor, pool: Tensor, num: int,
                      generator: Optional[torch.Generator] = None) -> NegativeSample:
    """R ids per position, uniform with replacement from `pool` (the catalogue ids)."""
    if pool.numel() == 0:
        raise ValueError("the negative pool (catalogue) is empty: nothing to sample negatives from")
    draws = torch.randint(0, pool.numel(), (positives.numel(), num), generator=generator, device=positives.device)
    return NegativeSample(pool[draws])


def in_batch_frequencies(positives: Tensor):
    """(distinct ids [U] sorted, their counts c_j [U]) among the batch's supervised positives."""
    return torch.unique(positives, return_counts=True)


def in_batch_log_q(ids: Tensor, distinct: Tensor, counts: Tensor, total: int) -> Tensor:
    """log q(j) = log(c_j / P) for ids drawn from the batch (every id must be one of `distinct`); float64, the
    loss casts it to the logits' dtype."""
    where = torch.searchsorted(distinct, ids)
    return torch.log(counts[where].to(torch.float64) / total)


def in_batch_negatives(positives: Tensor, num: int, generator: Optional[torch.Generator] = None,
                       logq: bool = False) -> NegativeSample:
    """R ids per position drawn uniformly from the batch's P positives (frequency-proportional over items)."""
    if positives.numel() == 0:
        raise ValueError("in-batch negatives need at least one supervised position in the batch")
    draws = torch.randint(0, positives.numel(), (positives.numel(), num), generator=generator,
                          device=positives.device)
    negatives = positives[draws]
    if not logq:
        return NegativeSample(negatives)
    distinct, counts = in_batch_frequencies(positives)
    total = positives.numel()
    return NegativeSample(negatives, in_batch_log_q(positives, distinct, counts, total),
                          in_batch_log_q(negatives, distinct, counts, total))


def sample_negatives(kind: str, positives: Tensor, pool: Tensor, num: int,
                     generator: Optional[torch.Generator] = None, logq: bool = False) -> NegativeSample:
    """Dispatch on `kind` ("uniform" | "in_batch"); `pool` is used by "uniform" only."""
    if kind == "uniform":
        if logq:
            raise ValueError("logq_correction applies to in-batch negatives; uniform negatives have a constant q")
        return uniform_negatives(positives, pool, num, generator)
    if kind == "in_batch":
        return in_batch_negatives(positives, num, generator, logq)
    raise ValueError(f"negatives must be one of {list(NEGATIVE_KINDS)}, got {kind!r}")
