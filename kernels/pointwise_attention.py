"""Memory-lean CPU path of the HSTU pointwise attention core (one autograd Function).

    S = alpha * q k^T + bias          [B, H, R, W]
    A = SiLU(S) * valid / N
    O = A v                           [B, R, H, dv]

Plain autograd keeps three [B, H, R, W]-sized tensors per layer for the backward pass: S (for SiLU's
derivative), A (for the A v product) and the float-converted mask.  This Function keeps none of them: it saves
q, k, v, the bias ([B or 1, R, W], a factor H smaller than S) and the boolean mask, and rebuilds S in the
backward pass with one extra q k^T product.  Two exact rewrites keep every [B, H, R, W] pass cheap:

  * invalid entries of S are set to -1e4 instead of multiplying by the mask: SiLU(-1e4) and SiLU'(-1e4) are
    exactly (-)0 in every float type (sigmoid(-1e4) underflows to 0), so A and dS are zero there, as the mask
    makes them.  With a bias and more than one head, the -1e4 goes into the [B, R, W] bias once instead
    (`_masked_bias`: bias -> -1e4 where invalid, saved in place of the bias and the mask), so neither pass
    masks a [B, H, R, W] tensor;
  * 1/N is applied to the small [B, R, H, dv] tensors (O, and dO in the backward pass), not to [B, H, R, W].

Backward, with dO' = dO / N and S rebuilt:

    dV   = SiLU(S)^T dO'                               (SiLU(S) is a temporary, freed before the next line)
    dS   = (dO' V^T) * SiLU'(S)                        (ATen's fused SiLU backward, in place)
    dq   = alpha * dS k,   dk = alpha * dS^T q,   dbias = sum over heads (and over B when bias is shared) of dS

At the hstu-large-ml1m shape (B 128, H 2, W 211, 8 layers) that keeps 23 MB per layer instead of 46 MB (S) and
at most two [B, H, R, W] buffers alive at once in the backward pass (docs/benchmarks.md).  The padded
reference in attention_ops.py stays the plain formula and the test oracle.
"""
from __future__ import annotations

from typing import Optional

import torch

# Any score at or below this has SiLU(s) == SiLU'(s) == 0 exactly in float16/bfloat16/float32/float64.
MASKED_SCORE = -1.0e4


def _scores(q, k, bias, mask, alpha: float) -> torch.Tensor:
    """S = alpha q k^T + bias, with MASKED_SCORE wherever mask is False: [B, H, R, W].

    `mask` None: the masked entries are already in `bias` (`_masked_bias`), so one add does both."""
    scores = torch.einsum("bihd,bjhd->bhij", q, k)
    if alpha != 1.0:
        scores.mul_(alpha)
    if bias is not None:
        scores.add_(bias.unsqueeze(1))
    return scores if mask is None else scores.masked_fill_(~mask.unsqueeze(1), MASKED_SCORE)


def _masked_bias(bias, mask) -> torch.Tensor:
    """bias [B or 1, R, W] with MASKED_SCORE where mask [B, R, W] is False: [B, R, W], a factor H smaller than S.

    Adding it to q k^T gives SiLU(.) == SiLU'(.) == 0 exactly at the masked entries, as the masked fill of S does
    (|alpha q k^T| is far below |MASKED_SCORE|, so the sum stays deep in SiLU's zero range), and the same bits
    everywhere else: one [B, R, W] pass replaces a [B, H, R, W] masked fill in the forward and again in the
    backward pass."""
    return bias.expand(mask.shape).masked_fill(~mask, MASKED_SCORE)


class _PointwiseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, bias, mask, normalizer: float, alpha: float):
        # q [B, R, H, dqk], k [B, W, H, dqk], v [B, W, H, dv], bias [B or 1, R, W] or None, mask [B, R, W] bool
        if bias is not None and q.shape[2] > 1:  # fold the mask into the bias once (see _masked_bias)
            saved_bias, saved_mask = _masked_bias(bias, mask), None
        else:
            saved_bias, saved_mask = bias, mask
        weights = torch.nn.functional.silu(_scores(q, k, saved_bias, saved_mask, alpha), inplace=True)
        out = torch.einsum("bhij,bjhd->bihd", weights, v).div_(normalizer)
        ctx.save_for_backward(q, k, v, saved_bias, saved_mask)
        ctx.normalizer, ctx.alpha = normalizer, alpha
        ctx.shared_bias = bias is not None and bias.shape[0] == 1
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, bias, mask = ctx.saved_tensors
        grad_out = grad_out / ctx.normalizer
        scores = _scores(q, k, bias, mask, ctx.alpha)
        grad_v = None
        if ctx.needs_input_grad[2]:
            grad_v = torch.einsum("bhij,bihd->bjhd", torch.nn.functional.silu(scores), grad_out)
        # dS = (dO' V^T) * SiLU'(S), written into the dO' V^T buffer by ATen's fused SiLU backward
        grad_s = torch.einsum("bihd,bjhd->bhij", grad_out, v)
        torch.ops.aten.silu_backward.grad_input(grad_s, scores, grad_input=grad_s)
        del scores
        grad_q = grad_k = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_q = torch.einsum("bhij,bjhd->bihd", grad_s, k)
            if ctx.alpha != 1.0:
                grad_q.mul_(ctx.alpha)
        if ctx.needs_input_grad[1]:
            grad_k = torch.einsum("bhij,bihd->bjhd", grad_s, q)
            if ctx.alpha != 1.0:
                grad_k.mul_(ctx.alpha)
        if bias is not None and ctx.needs_input_grad[3]:
            grad_bias = grad_s.sum(dim=1)  # zero at masked entries: SiLU'(S) is 0 there
            if ctx.shared_bias and grad_bias.shape[0] != 1:
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
