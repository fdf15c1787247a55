"""Sampled logits through a dense similarity matrix, without keeping it: logits[p, c] = <user[p], table[ids[p, c]]>.

When the catalogue V is smaller than the R * D floats a gathered [P, R, D] block would take (ML-1M: 3,953
items vs 128 negatives * 50 dims), one [P, V] matmul followed by a gather is the cheapest way to get the
sampled logits.  Under plain autograd, though, the gather keeps the whole [P, V] matrix alive until the
backward pass and the backward pass materialises a second [P, V] gradient: 2 * 220 MB at the
hstu-large-ml1m shape, on top of every activation.  This Function computes row chunks of the [P, V] matrix,
keeps only the gathered [P, C] logits, and rebuilds each chunk's sparse gradient in the backward pass:

    forward : logits[c] = (user[c] @ table^T).gather(1, ids[c])             for row chunks c
    backward: G_c = scatter_add(zeros[|c|, V], ids[c], grad[c])
              grad_user[c] = G_c @ table;   grad_table += G_c^T @ user[c]
              G_c[ids[c]] = 0                               (the buffer is zero again for the next chunk)

Same numbers as `(user @ table.T).gather(1, ids)` (the test compares them); memory O(chunk * V), one chunk
buffer per pass, reused (a fresh 32 MB block per chunk would be a fresh mmap, page-faulted and zeroed each time).
"""
from __future__ import annotations

import torch

# Rows per chunk are chosen so that one [rows, V] float block is about this many elements (32 MB in fp32).
CHUNK_ELEMENTS = 8 * 1024 * 1024


def _chunk_rows(num_items: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(num_items, 1))


class _GatheredLogits(torch.autograd.Function):
    @staticmethod
    def forward(ctx, user, table, ids):
        rows = _chunk_rows(table.shape[0])
        out = user.new_empty(ids.shape)
        table_t = table.t()
        dense = user.new_empty(min(rows, user.shape[0]), table.shape[0])  # one buffer reused by every chunk
        for start in range(0, user.shape[0], rows):
            stop = min(start + rows, user.shape[0])
            block = torch.mm(user[start:stop], table_t, out=dense[: stop - start])
            torch.gather(block, 1, ids[start:stop], out=out[start:stop])
        ctx.save_for_backward(user, table, ids)
        return out

    @staticmethod
    def backward(ctx, grad):
        user, table, ids = ctx.saved_tensors
        rows = _chunk_rows(table.shape[0])
        need_user, need_table = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_user = torch.empty_like(user) if need_user else None
        grad_table = torch.zeros_like(table) if need_table else None
        grad = grad.contiguous()
        # One zeroed buffer, reused: no fresh pages per chunk, and after each chunk only the entries it wrote are
        # reset to zero (C per row instead of a V-wide fill).
        buffer = grad.new_zeros(min(rows, user.shape[0]), table.shape[0])
        for start in range(0, user.shape[0], rows):
            stop = min(start + rows, user.shape[0])
            dense = buffer[: stop - start]
            chunk_ids = ids[start:stop]
            dense.scatter_add_(1, chunk_ids, grad[start:stop])
            if need_user:
                torch.mm(dense, table, out=grad_user[start:stop])
            if need_table:
                grad_table.addmm_(dense.t(), user[start:stop])
            dense.scatter_(1, chunk_ids, 0.0)
        return grad_user, grad_table, None


def gathered_logits(user: torch.Tensor, table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """user [P, D], table [V, D], ids [P, C] (int64 row ids of table) -> [P, C] dot products."""
    if user.dim() != 2 or table.dim() != 2 or user.shape[1] != table.shape[1]:
        raise ValueError(f"gathered_logits: user must be [P, D] and table [V, D] with one D; got "
                         f"{tuple(user.shape)} and {tuple(table.shape)}")
    if ids.dim() != 2 or ids.shape[0] != user.shape[0] or ids.dtype != torch.long:
        raise ValueError(f"gathered_logits: ids must be an int64 [P={user.shape[0]}, C] tensor, got "
                         f"{ids.dtype} {tuple(ids.shape)}")
    return _GatheredLogits.apply(user, table, ids)
