"""Retrieval losses over supervised positions: sampled softmax, full softmax, binary cross-entropy.

Notation: P supervised positions, query u_p (already normalised by the head), positive id y_p, similarity s(u, x)
(dot or MoL, see merlin_hstu.retrieval.similarity), temperature tau, catalogue C (the ids a model ranks).

* **sampled_softmax** (the reference's loss; reference-hstu.md §1.8): R negatives n_p1..n_pR per position
  (merlin_hstu.retrieval.negatives: uniform over C, or in-batch), logits z_p0 = s(u_p, y_p) / tau, z_pr = s(u_p, n_pr) / tau,
  minus log q(.) with the logQ correction; a negative equal to the positive gets z = -5e4 (masked);
  loss = mean_p [ -log softmax(z_p)_0 ].
* **full_softmax**: every catalogue item is a negative: z_pj = s(u_p, j) / tau for j in C (plus y_p itself),
  loss = mean_p [ logsumexp_j z_pj - z_p,y_p ].  Equal to sampled softmax whose negatives are C minus y_p.
  With `history_negatives=False` the items position p has already seen (its own row's ids 0..p) leave the sum
  too, except y_p: the metrics (merlin_hstu.retrieval.metrics) never rank them, so training does not spend its
  gradient pushing them down.
* **bce** (reference `BCELoss`): one negative n_p, tau = 1;
  loss = sum_p w_p 0.5 (BCE(z_p0, 1) + BCE(z_p1, 0)) / sum_p w_p with w_p = [n_p != y_p].

With MoL and `mi_loss_weight` > 0, `mi_loss_weight * mutual_information_loss(gates of (u_p, y_p))` is added (the
reference adds the aux loss of the positive pairs with weight 0.001 in its RAILS configs).

A loss function takes `model`: anything with `item_vectors()` (the normalised item table [V, D]) and `head`
(a `merlin_hstu.retrieval.similarity.RetrievalHead`); `HSTURetrievalModel` and the T4R task's output layer both are.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from merlin_hstu.retrieval.negatives import NEGATIVE_KINDS, NegativeSample, sample_negatives
from merlin_hstu.retrieval.similarity import mutual_information_loss

LOSSES = ("sampled_softmax", "full_softmax", "bce")
MASKED_LOGIT = -5e4  # the logit of a sampled negative that equals the positive (and of non-catalogue items)


@dataclass
class RetrievalLossConfig:
    """The training objective.  The defaults are the reference's: 128 uniform negatives, sampled softmax, tau 0.05.

    Invalid combinations raise at construction, with the fix in the message.
    """

    num_negatives: int = 128
    temperature: float = 0.05
    loss: str = "sampled_softmax"  # sampled_softmax | full_softmax | bce
    negatives: str = "uniform"  # uniform | in_batch (sampled losses)
    logq_correction: bool = False  # subtract log q(j) from each logit (in-batch negatives only)
    mi_loss_weight: float = 0.0  # weight of MoL's mutual-information aux loss (MoL only)
    history_negatives: bool = True  # False: items a position has already seen are not its negatives (full softmax)

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {list(LOSSES)}, got {self.loss!r}")
        if self.negatives not in NEGATIVE_KINDS:
            raise ValueError(f"negatives must be one of {list(NEGATIVE_KINDS)}, got {self.negatives!r}")
        if isinstance(self.num_negatives, bool) or not isinstance(self.num_negatives, int) or self.num_negatives < 1:
            raise ValueError(f"num_negatives must be an int >= 1, got {self.num_negatives!r}")
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) \
                or not math.isfinite(self.temperature) or self.temperature <= 0:
            raise ValueError(f"temperature must be a finite number > 0, got {self.temperature!r}")
        if not isinstance(self.mi_loss_weight, (int, float)) or self.mi_loss_weight < 0:
            raise ValueError(f"mi_loss_weight must be >= 0, got {self.mi_loss_weight!r}")
        if self.loss == "bce" and (self.num_negatives != 1 or self.temperature != 1.0):
            raise ValueError(
                f"loss='bce' scores one sampled negative per position at temperature 1, as the reference's BCELoss "
                f"does; got num_negatives={self.num_negatives}, temperature={self.temperature}: set "
                "num_negatives=1 and temperature=1.0")
        if self.loss == "full_softmax" and self.negatives != "uniform":
            raise ValueError(
                f"loss='full_softmax' uses every catalogue item as a negative and samples none; negatives="
                f"{self.negatives!r} would be ignored: leave negatives at 'uniform' or use loss='sampled_softmax'")
        if not isinstance(self.history_negatives, bool):
            raise ValueError(f"history_negatives must be true or false, got {self.history_negatives!r}")
        if not self.history_negatives and self.loss != "full_softmax":
            raise ValueError(
                f"history_negatives=false masks each position's already-seen items out of the softmax; it is "
                f"implemented for loss='full_softmax' only, got loss={self.loss!r}: set loss='full_softmax' or "
                "history_negatives=true")
        if self.logq_correction and (self.negatives != "in_batch" or self.loss != "sampled_softmax"):
            raise ValueError(
                "logq_correction corrects the popularity bias of in-batch negatives in the sampled softmax; with "
                f"loss={self.loss!r}, negatives={self.negatives!r} it would change nothing or is undefined: set "
                "loss='sampled_softmax', negatives='in_batch', or drop logq_correction")


# The reference's name for the default objective; kept so existing code and configs read the same.
SampledSoftmaxConfig = RetrievalLossConfig


def _head(model):
    head = getattr(model, "head", None)
    if head is None:
        raise TypeError(f"{type(model).__name__} has no `head` (merlin_hstu.retrieval.similarity.RetrievalHead); "
                        "retrieval losses need it to score queries against items")
    return head


def _add_mi_loss(loss: Tensor, gates: Optional[Tensor], config: RetrievalLossConfig) -> Tensor:
    if gates is None or not config.mi_loss_weight:
        return loss
    return loss + config.mi_loss_weight * mutual_information_loss(gates)


def _wants_gates(head, config: RetrievalLossConfig) -> Optional[int]:
    return 0 if head.is_mol and config.mi_loss_weight else None


def sampled_softmax_loss(model, user: Tensor, positives: Tensor, negative_pool: Tensor,
                         config: RetrievalLossConfig, generator: Optional[torch.Generator] = None) -> Tensor:
    """Token-level mean (1 + R)-way softmax loss (see the module docstring).

    user [P, D] (normalised), positives [P] item ids, negative_pool [M] catalogue ids (uniform negatives).
    With the dot product the catalogue is normalised once ([V, D]) and, when it is smaller than the gathered
    rows would be (V <= R * D), the logits come from one dense [P, V] matmul and a gather.
    """
    sample = sample_negatives(config.negatives, positives, negative_pool, config.num_negatives, generator,
                              config.logq_correction)
    return softmax_loss_over_sample(model, user, positives, sample, config)


def _at_least_fp32(scores: Tensor) -> Tensor:
    """bf16 / fp16 scores (autocast) -> fp32, so the loss's softmax / logsumexp / BCE reduce in fp32; fp32 and
    fp64 scores are returned as they are."""
    return scores if scores.dtype in (torch.float32, torch.float64) else scores.float()


def softmax_loss_over_sample(model, user: Tensor, positives: Tensor, sample: NegativeSample,
                             config: RetrievalLossConfig) -> Tensor:
    """The sampled softmax for given negatives `sample.ids` [P, R] (and their log q when logQ-corrected)."""
    head = _head(model)
    ids = torch.cat([positives.unsqueeze(1), sample.ids], dim=1)  # [P, 1 + R]
    scores, gates = head.pair_scores(user, model.item_vectors(), ids, _wants_gates(head, config))
    logits = _at_least_fp32(scores) / config.temperature  # fp32 softmax / BCE statistics under bf16 autocast
    if sample.log_q_positive is not None:
        log_q = torch.cat([sample.log_q_positive.unsqueeze(1), sample.log_q_negatives], dim=1)
        logits = logits - log_q.to(logits.dtype)
    accidental = torch.cat([torch.zeros_like(positives, dtype=torch.bool).unsqueeze(1),
                            sample.ids == positives.unsqueeze(1)], dim=1)
    logits = logits.masked_fill(accidental, MASKED_LOGIT)
    return _add_mi_loss(-F.log_softmax(logits, dim=1)[:, 0].mean(), gates, config)


def full_softmax_loss(model, user: Tensor, positives: Tensor, catalogue: Tensor,
                      config: RetrievalLossConfig, seen: Optional[Tensor] = None) -> Tensor:
    """Softmax over the whole catalogue (ids `catalogue`; other table rows are masked, the positive never is).

    seen [P, W]: each position's already-seen ids (0 = padding), masked too when `config.history_negatives` is
    False; `merlin_hstu.retrieval.model.seen_before` builds it."""
    if not config.history_negatives and seen is None:
        raise ValueError("history_negatives=false needs each position's seen ids (seen=[P, W]); the caller passed "
                         "none: build them with merlin_hstu.retrieval.model.seen_before(ids, supervised)")
    head = _head(model)
    items = model.item_vectors()
    logits = _at_least_fp32(head.catalogue_scores(user, items)) / config.temperature  # [P, V]
    not_ranked = torch.ones(items.shape[0], dtype=torch.bool, device=user.device)
    not_ranked[catalogue] = False
    outside = not_ranked.unsqueeze(0).expand_as(logits).clone()
    if not config.history_negatives:
        outside.scatter_(1, seen.to(device=user.device, dtype=torch.long), True)
        outside[:, 0] = not_ranked[0]  # 0 pads `seen`: row 0 keeps its catalogue status
    outside[torch.arange(positives.numel(), device=user.device), positives] = False
    logits = logits.masked_fill(outside, MASKED_LOGIT)
    loss = (torch.logsumexp(logits, dim=1) - logits.gather(1, positives.unsqueeze(1)).squeeze(1)).mean()
    gate_column = _wants_gates(head, config)
    if gate_column is not None:  # gates of the (query, positive) pairs, for the aux loss
        _, gates = head.pair_scores(user, items, positives.unsqueeze(1), gate_column)
        loss = _add_mi_loss(loss, gates, config)
    return loss


def bce_loss(model, user: Tensor, positives: Tensor, negative_pool: Tensor, config: RetrievalLossConfig,
             generator: Optional[torch.Generator] = None) -> Tensor:
    """Binary cross-entropy on the positive and one sampled negative per position (see the module docstring)."""
    head = _head(model)
    sample = sample_negatives(config.negatives, positives, negative_pool, 1, generator)
    ids = torch.cat([positives.unsqueeze(1), sample.ids], dim=1)  # [P, 2]
    scores, gates = head.pair_scores(user, model.item_vectors(), ids, _wants_gates(head, config))
    logits = _at_least_fp32(scores) / config.temperature  # fp32 softmax / BCE statistics under bf16 autocast
    weights = (sample.ids[:, 0] != positives).to(logits.dtype)  # drop positions whose negative is the positive
    per_position = 0.5 * (F.binary_cross_entropy_with_logits(logits[:, 0], torch.ones_like(logits[:, 0]),
                                                               reduction="none")
                          + F.binary_cross_entropy_with_logits(logits[:, 1], torch.zeros_like(logits[:, 1]),
                                                               reduction="none"))
    loss = (per_position * weights).sum() / weights.sum().clamp(min=1.0)
    return _add_mi_loss(loss, gates, config)


def retrieval_loss(model, user: Tensor, positives: Tensor, catalogue: Tensor, config: RetrievalLossConfig,
                   generator: Optional[torch.Generator] = None, seen: Optional[Tensor] = None) -> Tensor:
    """The configured loss.  `catalogue` holds the ids uniform negatives and the full softmax range over; `seen`
    [P, W] each position's already-seen ids (needed with `history_negatives=False`)."""
    if config.loss == "full_softmax":
        return full_softmax_loss(model, user, positives, catalogue, config, seen)
    if config.loss == "bce":
        return bce_loss(model, user, positives, catalogue, config, generator)
    return sampled_softmax_loss(model, user, positives, catalogue, config, generator)
