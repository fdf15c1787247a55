"""HLLM's training objective: cosine similarity with a learnable temperature, in-batch plus sampled negatives, and
false negatives masked.

For P supervised positions with query u_p, positive item y_p, and negatives n_1..n_M (the batch's distinct
positive ids, then R ids drawn uniformly from the training catalogue, shared by every position):

    s        = min(exp(w), max_scale)                    learnable logit scale, w initialised to log(1 / 0.07)
    z_p0     = s * cos(u_p, e(y_p))
    z_pm     = s * cos(u_p, e(n_m))                      masked (-inf) when n_m == y_p, or when
                                                        cos(e(y_p), e(n_m)) > 0.99: a false negative - another
                                                        item that is (nearly) the positive, e.g. the same text
    loss     = mean_p [ logsumexp(z_p0, z_p1..z_pM) - z_p0 ]

The false-negative test compares item embeddings only (no gradient flows through the mask).  Distinct in-batch
ids are used (an item appears once among the negatives), so the [P, M] logits stay bounded by P x (catalogue + R).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MASKED = float("-inf")


class LogitScale(nn.Module):
    """s = min(exp(w), cap) with w learnable, initialised to log(1 / initial_temperature)."""

    def __init__(self, initial_temperature: float = 0.07, cap: float = 100.0):
        super().__init__()
        self.cap = float(cap)
        self.log_scale = nn.Parameter(torch.tensor(math.log(1.0 / initial_temperature)))

    def forward(self) -> Tensor:
        return self.log_scale.exp().clamp(max=self.cap)


def normalize(x: Tensor) -> Tensor:
    return F.normalize(x, dim=-1, eps=1e-6)


def false_negative_mask(positive_ids: Tensor, positive_vectors: Tensor, negative_ids: Tensor,
                        negative_vectors: Tensor, threshold: float) -> Tensor:
    """bool [P, M]: negative m of position p is the positive itself or a false negative (cosine > threshold)."""
    with torch.no_grad():
        same = negative_ids.unsqueeze(0) == positive_ids.unsqueeze(1)
        similar = normalize(positive_vectors) @ normalize(negative_vectors).T > threshold
    return same | similar


def hllm_loss(user: Tensor, positive_ids: Tensor, positive_vectors: Tensor, negative_ids: Tensor,
              negative_vectors: Tensor, scale: Tensor, threshold: float = 0.99) -> Tensor:
    """The module docstring's loss.  user [P, D], positive_ids [P], positive_vectors [P, D], negative_ids [M],
    negative_vectors [M, D] (vectors need not be normalised: cosines are taken here), scale: a scalar tensor."""
    if user.shape != positive_vectors.shape:
        raise ValueError(f"user {tuple(user.shape)} and positive vectors {tuple(positive_vectors.shape)} must match")
    if negative_vectors.shape[0] != negative_ids.shape[0]:
        raise ValueError(f"{negative_ids.shape[0]} negative ids but {negative_vectors.shape[0]} negative vectors")
    u, pos, neg = normalize(user), normalize(positive_vectors), normalize(negative_vectors)
    positive = scale * (u * pos).sum(dim=-1, keepdim=True)  # [P, 1]
    negative = scale * (u @ neg.T)  # [P, M]
    masked = false_negative_mask(positive_ids, positive_vectors, negative_ids, negative_vectors, threshold)
    logits = torch.cat([positive, negative.masked_fill(masked, MASKED)], dim=1)
    return (torch.logsumexp(logits, dim=1) - logits[:, 0]).mean()


def batch_negatives(positive_ids: Tensor, pool: Tensor, num_sampled: int, in_batch: bool,
                    generator: torch.Generator = None) -> Tensor:
    """The negative ids of a batch: its distinct positives (in_batch) followed by `num_sampled` uniform draws from
    `pool` (with replacement; the training catalogue)."""
    parts = []
    if in_batch:
        parts.append(torch.unique(positive_ids))
    if num_sampled:
        if pool.numel() == 0:
            raise ValueError("the negative pool (training catalogue) is empty: nothing to sample negatives from")
        draws = torch.randint(0, pool.numel(), (num_sampled,), generator=generator, device=pool.device)
        parts.append(pool[draws].to(positive_ids.device))
    return torch.cat(parts) if parts else positive_ids.new_zeros(0)
