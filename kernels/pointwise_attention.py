"""Memory-lean CPU path of the HSTU pointwise attention core (one autograd Function).

    S = alpha * q k^T + bias          [B, H, R, W]
    A = SiLU(S) * valid / N
    O = A v                           [B, R, H, dv]

Plain autograd keeps three [B, H, R, W]-sized tensors per layer for the backward pass: S (for SiLU's
derivative), A (for the A v product) and the float-converted mask.  This Function keeps only S and the boolean
mask, and recomputes A from S in the backward pass, where SiLU's derivative needs sigmoid(S) anyway:

    sig  = sigmoid(S)
    A    = S * sig * valid / N                            (recomputed; one extra multiply)
    dV   = A^T dO
    dA   = dO V^T
    dS   = dA * sig * (1 + S * (1 - sig)) * valid / N
    dq   = alpha * dS k,   dk = alpha * dS^T q,   dbias = sum over heads (and over B when bias is shared) of dS

At the hstu-large-ml1m shape (B 128, H 2, W 201, 8 layers) that is about 0.45 GB less activation memory
(docs/benchmarks.md).  The padded reference in hstu_attention.py stays the plain formula and the test oracle.
"""
from __future__ import annotations

from typing import Optional

import torch


class _PointwiseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, bias, mask, normalizer: float, alpha: float):
        # q [B, R, H, dqk], k [B, W, H, dqk], v [B, W, H, dv], bias [B or 1, R, W] or None, mask [B, R, W] bool
        scores = torch.einsum("bihd,bjhd->bhij", q, k)
        if alpha != 1.0:
            scores.mul_(alpha)
        if bias is not None:
            scores.add_(bias.unsqueeze(1))
        weights = torch.nn.functional.silu(scores).mul_(mask.unsqueeze(1)).div_(normalizer)
        out = torch.einsum("bhij,bjhd->bihd", weights, v)
        ctx.save_for_backward(q, k, v, scores, mask)
        ctx.bias_shape = None if bias is None else bias.shape
        ctx.normalizer, ctx.alpha = normalizer, alpha
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, scores, mask = ctx.saved_tensors
        scale = mask.unsqueeze(1).to(scores.dtype).div_(ctx.normalizer)  # [B, 1, R, W]
        sig = torch.sigmoid(scores)
        grad_v = grad_w = None
        if ctx.needs_input_grad[2]:
            weights = scores * sig * scale
            grad_v = torch.einsum("bhij,bihd->bjhd", weights, grad_out)
            del weights
        grad_w = torch.einsum("bihd,bjhd->bhij", grad_out, v)
        # dS = dA * SiLU'(S) * valid / N, SiLU'(S) = sig * (1 + S * (1 - sig)); built in place in grad_w
        silu_grad = torch.addcmul(sig, scores * sig, 1.0 - sig)
        del sig
        grad_s = grad_w.mul_(silu_grad).mul_(scale)
        del silu_grad, scale
        grad_q = grad_k = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_q = torch.einsum("bhij,bjhd->bihd", grad_s, k)
            if ctx.alpha != 1.0:
                grad_q.mul_(ctx.alpha)
        if ctx.needs_input_grad[1]:
            grad_k = torch.einsum("bhij,bihd->bjhd", grad_s, q)
            if ctx.alpha != 1.0:
                grad_k.mul_(ctx.alpha)
        if ctx.bias_shape is not None and ctx.needs_input_grad[3]:
            grad_bias = grad_s.sum(dim=1)
            if ctx.bias_shape[0] == 1 and grad_bias.shape[0] != 1:
                grad_bias = grad_bias.sum(dim=0, keepdim=True)
        return grad_q, grad_k, grad_v, grad_bias, None, None, None


def pointwise_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, normalizer: float,
                        bias: Optional[torch.Tensor] = None, alpha: float = 1.0) -> torch.Tensor:
    """O = (SiLU(alpha q k^T + bias) * mask / N) v with the lean backward above.

    q [B, R, H, dqk], k [B, W, H, dqk], v [B, W, H, dv], mask [B, R, W] bool, bias [B or 1, R, W] or None.
    Returns [B, R, H, dv].  Rows whose mask is all False are zero."""
    if mask.dtype != torch.bool:
        raise ValueError(f"pointwise_attention: mask must be a bool tensor, got {mask.dtype}")
    return _PointwiseAttention.apply(q, k, v, bias, mask, float(normalizer), float(alpha))
