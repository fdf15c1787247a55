"""Sampled logits without a [P, V] matrix kept alive: logits[p, c] = <user[p], table[ids[p, c]]>.

Two exact evaluations of the same formula, one autograd Function each (`gathered_logits` picks):

Sparse (CPU, float32 / float64, no autocast).  The ids are the pattern of a sparse [P, V] matrix with C entries
per row (CSR: row p holds columns ids[p, :]), and every pass is a sparse kernel whose cost is P * C * D, not
P * V * D:

    forward : logits = SDDMM(pattern, user, table^T)            torch.sparse.sampled_addmm: one dot per entry
    backward: G = CSR(pattern, grad)                            [P, V], C entries per row
              grad_user  = G @ table                             torch.sparse.mm (CSR x dense)
              grad_table = G^T @ user                            G^T built as a CSR [V, P] directly: a stable sort
                                                                 of the ids (int16 / int32 keys) and their counts

Repeated ids in a row are separate entries, so their gradients add up, as in plain indexing.  At the
hstu-large-ml1m shape (P 13k, C 129, D 50, V 3,953; 1 thread) the forward and backward take ~40 ms instead of
the dense path's ~280 ms (docs/benchmarks.md).

Dense (other devices and dtypes, autocast).  When the catalogue V is smaller than the C * D floats a gathered
[P, C, D] block would take, one [P, V] matmul followed by a gather is the cheapest dense way.  Row chunks of the
[P, V] matrix are computed, only the gathered [P, C] logits kept, and each chunk's sparse gradient rebuilt in the
backward pass:

    forward : logits[c] = (user[c] @ table^T).gather(1, ids[c])             for row chunks c
    backward: G_c = scatter_add(zeros[|c|, V], ids[c], grad[c])
              grad_user[c] = G_c @ table;   grad_table += G_c^T @ user[c]
              G_c[ids[c]] = 0                               (the buffer is zero again for the next chunk)

Memory O(chunk * V), one chunk buffer per pass, reused (a fresh 32 MB block per chunk would be a fresh mmap,
page-faulted and zeroed each time).

Both equal `(user @ table.T).gather(1, ids)` up to float summation order (tests/test_lean_ops.py compares them
with a plain per-entry formula, values and gradients).
"""
from __future__ import annotations

import warnings

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


class _SparseGatheredLogits(torch.autograd.Function):
    @staticmethod
    def forward(ctx, user, table, ids):
        rows, per_row = ids.shape
        crow = torch.arange(0, rows * per_row + 1, per_row, device=ids.device)
        columns = ids.reshape(-1)
        with warnings.catch_warnings():  # "sparse CSR support is in beta": the ops used here are tested
            warnings.simplefilter("ignore")
            pattern = torch.sparse_csr_tensor(crow, columns, user.new_zeros(rows * per_row),
                                              (rows, table.shape[0]), check_invariants=False)
            out = torch.sparse.sampled_addmm(pattern, user, table.t(), beta=0.0).values().view(rows, per_row)
        ctx.save_for_backward(user, table, ids, crow)
        return out

    @staticmethod
    def backward(ctx, grad):
        user, table, ids, crow = ctx.saved_tensors
        rows, per_row = ids.shape
        num_items = table.shape[0]
        columns, values = ids.reshape(-1), grad.reshape(-1).contiguous()
        grad_user = grad_table = None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if ctx.needs_input_grad[0]:
                g = torch.sparse_csr_tensor(crow, columns, values, (rows, num_items), check_invariants=False)
                grad_user = torch.sparse.mm(g, table)
            if ctx.needs_input_grad[1]:
                # G^T as a CSR [V, P]: entries ordered by item (a stable sort keeps each item's rows ascending)
                keys = columns.to(torch.int16 if num_items <= torch.iinfo(torch.int16).max else torch.int32)
                order = torch.sort(keys, stable=True).indices
                item_crow = torch.zeros(num_items + 1, dtype=torch.long, device=ids.device)
                torch.cumsum(torch.bincount(columns, minlength=num_items), 0, out=item_crow[1:])
                g_t = torch.sparse_csr_tensor(item_crow, torch.div(order, per_row, rounding_mode="floor"),
                                              values[order], (num_items, rows), check_invariants=False)
                grad_table = torch.sparse.mm(g_t, user)
        return grad_user, grad_table, None


SPARSE_DTYPES = (torch.float32, torch.float64)


def _sparse_path(user: torch.Tensor, table: torch.Tensor) -> bool:
    return (user.device.type == "cpu" and user.dtype == table.dtype and user.dtype in SPARSE_DTYPES
            and not torch.is_autocast_enabled("cpu") and not torch.jit.is_tracing())


def gathered_logits(user: torch.Tensor, table: torch.Tensor, ids: torch.Tensor, *,
                    method: str = "auto") -> torch.Tensor:
    """user [P, D], table [V, D], ids [P, C] (int64 row ids of table) -> [P, C] dot products.

    method: "sparse" | "dense" | "auto" (sparse on CPU for float32 / float64 outside autocast, else dense).
    Rows with more entries than the table has rows (C > V) always take the dense path."""
    if user.dim() != 2 or table.dim() != 2 or user.shape[1] != table.shape[1]:
        raise ValueError(f"gathered_logits: user must be [P, D] and table [V, D] with one D; got "
                         f"{tuple(user.shape)} and {tuple(table.shape)}")
    if ids.dim() != 2 or ids.shape[0] != user.shape[0] or ids.dtype != torch.long:
        raise ValueError(f"gathered_logits: ids must be an int64 [P={user.shape[0]}, C] tensor, got "
                         f"{ids.dtype} {tuple(ids.shape)}")
    if method not in ("auto", "sparse", "dense"):
        raise ValueError(f"gathered_logits: method must be 'auto', 'sparse' or 'dense', got {method!r}")
    sparse = _sparse_path(user, table) if method == "auto" else method == "sparse"
    # torch's sparse kernels refuse a pattern with more entries than the dense matrix has (C > V: only tiny
    # catalogues, where the dense path is cheap anyway)
    if sparse and 0 < ids.numel() and ids.shape[1] <= table.shape[0]:
        return _SparseGatheredLogits.apply(user, table, ids)
    return _GatheredLogits.apply(user, table, ids)
