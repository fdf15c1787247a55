"""Per-element lookup of a small weight vector by bucket id, with a cheap backward pass.

    out[...] = weights[buckets[...]]          weights [K], buckets [...] int64 in [0, K)

HSTU's relative time bias gathers a ~129-entry vector over a [B, W, W] bucket tensor in every layer (5.7 M
lookups per layer at the hstu-large-ml1m shape).  Plain indexing's backward is an accumulating index_put, which
on CPU is a serial loop with bounds bookkeeping; a flat scatter_add into K bins does the same sum several times
faster, and the forward uses `take` on the flat weights.  Values and gradients equal plain indexing
(tests/test_lean_ops.py); the order of the per-bin sums can differ, so float32 gradients agree to rounding.
"""
from __future__ import annotations

import torch


class _BucketGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weights, buckets):
        ctx.save_for_backward(buckets)
        ctx.num_weights = weights.shape[0]
        return weights.take(buckets)

    @staticmethod
    def backward(ctx, grad):
        (buckets,) = ctx.saved_tensors
        grad_weights = grad.new_zeros(ctx.num_weights)
        grad_weights.scatter_add_(0, buckets.reshape(-1), grad.reshape(-1))
        return grad_weights, None


def bucket_gather(weights: torch.Tensor, buckets: torch.Tensor) -> torch.Tensor:
    """weights [K] float, buckets [...] int64 with values in [0, K) -> weights[buckets], shaped like buckets."""
    if weights.dim() != 1:
        raise ValueError(f"bucket_gather: weights must be 1-D, got shape {tuple(weights.shape)}")
    if buckets.dtype != torch.long:
        raise ValueError(f"bucket_gather: buckets must be int64, got {buckets.dtype}")
    if torch.jit.is_tracing() or not (torch.is_grad_enabled() and weights.requires_grad):
        # no backward to make cheap; a traced graph (serving) must hold plain ops, not a Python Function
        return weights.take(buckets)
    return _BucketGather.apply(weights, buckets)
