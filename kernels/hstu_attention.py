"""HSTU pointwise attention: the pure-PyTorch reference path.

This is the CPU path, the default path and the oracle that every faster kernel is tested against.
The math (reference-hstu.md §1.4):

    S[b,h,i,j] = <q[b,i,h], k[b,j,h]> + rab[b,i,j]        (no 1/sqrt(d) scale)
    A[b,h,i,j] = SiLU(S) / N  * valid[b,i,j]                N is a configured constant
    O[b,i,h]   = sum_j A[b,h,i,j] v[b,j,h]

`valid` is causal (j <= i) and restricted to real tokens (j < len_b).  Dividing by a constant N rather
than by the batch's longest sequence is what keeps a sequence's output independent of its batch mates.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def attention_mask(lengths: torch.Tensor, width: int, causal: bool = True) -> torch.Tensor:
    """Boolean [B, W, W] mask: key j is visible to query i when j < len_b (and j <= i if causal)."""
    pos = torch.arange(width, device=lengths.device)
    key_valid = pos.unsqueeze(0) < lengths.unsqueeze(1)  # [B, W]
    mask = key_valid.unsqueeze(1).expand(-1, width, -1)
    if causal:
        mask = mask & (pos.unsqueeze(1) >= pos.unsqueeze(0)).unsqueeze(0)
    return mask


def hstu_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lengths: torch.Tensor,
    normalizer: float,
    rab: Optional[torch.Tensor] = None,
    causal: bool = True,
) -> torch.Tensor:
    """Padded HSTU attention.

    q, k: [B, W, H, dqk]; v: [B, W, H, dv]; lengths: [B]; rab: [B or 1, W, W] or None.
    Returns [B, W, H, dv]; rows at or past len_b are zero.
    """
    width = q.shape[1]
    scores = torch.einsum("bihd,bjhd->bhij", q, k)
    if rab is not None:
        scores = scores + rab.unsqueeze(1)
    mask = attention_mask(lengths, width, causal)
    query_valid = torch.arange(width, device=q.device).unsqueeze(0) < lengths.unsqueeze(1)
    mask = mask & query_valid.unsqueeze(2)
    weights = F.silu(scores) * (mask.unsqueeze(1).to(scores.dtype) / normalizer)
    return torch.einsum("bhij,bjhd->bihd", weights, v)
