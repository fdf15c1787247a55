"""HSTU pointwise attention: the op, its PyTorch reference and the kernel dispatch.

The math (reference-hstu.md §1.4 and §4), per sequence b and head h:

    S[h,i,j] = alpha * <q[i,h], k[j,h]> + bias[b,i,j]              (research HSTU: alpha = 1, no 1/sqrt(d))
    A[h,i,j] = SiLU(S[h,i,j]) / N  *  valid[b,i,j]                   N = max_seq_len, a configured constant
    O[i,h]   = sum_j A[h,i,j] v[j,h]

Dividing by a constant N rather than by the batch's longest sequence is what keeps a sequence's output
independent of its batch mates.  There is no softmax, so no row statistics: rows are independent sums.

`valid` (reference-hstu.md §4, "valid attention mask") works on per-token *ids* rather than positions:

    ids     = arange(W);  max_ids = len
    contextual prefix c > 0:   ids = max(ids - c + 1, 0);  max_ids = len - c + 1   (the c prefix tokens share id 0)
    num_targets given:         max_ids -= num_targets;     ids = min(ids, max_ids) (every candidate gets id max_ids)
    dist    = ids[i] - ids[j]          (|.| when not causal)
    valid   = (i == j) | (dist > 0)
    window  : valid &= dist <= max_attn_len | ids[i] >= max_ids - min_full_attn_seq_len   (when max_attn_len > 0)
    context : valid |= ids[i] == 0 & ids[j] < max_ids                                      (when c > 0)
    and both i, j < len (real tokens only).

So candidates (the last num_targets tokens) see the history and themselves but never each other, contextual
tokens see the whole history and are seen by every history token (inside the window, when there is one:
the window is applied before the contextual rule, as in the reference).

Entry points:
  * `hstu_attention_reference`: padded [B, W, H, d] tensors; the oracle.
  * `hstu_attention_pytorch`: jagged [L, H, d] tensors + offsets; pads, calls the reference, un-pads.
  * `hstu_attention`: the jagged op users call; validates inputs and dispatches to PyTorch or Triton
    (`kernel="pytorch" | "triton" | "auto"`, see `dispatch.py`).
  * `plan_hstu_attention` + `hstu_attention_with_plan`: the same op split in two for a stack of layers that
    attend over one batch.  The plan holds what does not depend on the layer: the resolved kernel, and on the
    PyTorch path the padded view and its [B, W, W] validity mask (on the Triton path the offsets); each
    layer then only brings its q, k, v and bias.  This is how the STU stacks (merlin_hstu.encoders.stu) pick
    their path: the kernel is resolved here, once per forward, never in a model.
  * Length groups (PyTorch path of the plan): a padded batch wastes the [B, H, W, W] work of every row shorter
    than W.  The plan sorts the rows by length and cuts them into at most `length_groups` groups (the cuts that
    minimise sum_g rows_g * width_g^2, `choose_length_groups`), each padded to its own longest row; every
    layer's attention then runs per group and the jagged output is put back in order.  Rows are independent
    sums, so this is the same formula (equal up to float reassociation inside the matmuls).  On ml-1m-prefix
    (history 200) it leaves ~54% of the padded work.  `set_length_groups(0)` turns it off.
  * `hstu_attention_rows`: a few query rows against all keys (KV-cache decoding, M-FALCON), same formula
    and mask as the reference; it takes a `kernel` too (dispatch.OP_KERNELS says which exist for it).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from merlin_hstu.kernels.dispatch import TRITON_DTYPES, resolve_kernel
from merlin_hstu.kernels.pointwise_attention import pointwise_attention


# At most this many length groups per batch on the PyTorch path of a plan (0 or 1: one padded batch).
# MERLIN_HSTU_LENGTH_GROUPS overrides the default, e.g. for A/B timing of the same commit.
_LENGTH_GROUPS = int(os.environ.get("MERLIN_HSTU_LENGTH_GROUPS", "4"))
MIN_GROUP_SAVING = 0.1  # group only when it removes at least this share of the padded [W, W] work
MIN_GROUP_WIDTH = 64  # narrower batches stay one padded batch: the per-group op overhead outweighs the saving
MIN_SPLIT_WIDTH = 32  # narrower groups are not split at the causal diagonal (two calls cost more than they save)


def set_length_groups(groups: int) -> int:
    """Set the plan's maximum number of length groups (0 or 1: off); returns the previous value."""
    global _LENGTH_GROUPS
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 0:
        raise ValueError(f"set_length_groups: groups must be an int >= 0, got {groups!r}")
    previous, _LENGTH_GROUPS = _LENGTH_GROUPS, groups
    return previous


def get_length_groups() -> int:
    return _LENGTH_GROUPS


def choose_length_groups(lengths: Sequence[int], max_groups: int, min_saving: float = MIN_GROUP_SAVING
                         ) -> Optional[List[np.ndarray]]:
    """Rows of a batch cut into <= max_groups groups of similar length: the row indices of each group (ascending
    length), chosen to minimise sum_g rows_g * width_g^2 (width_g = the group's longest row) by dynamic programming
    over cuts of the sorted lengths (at most 32 candidate cut points).  None when grouping would save less than
    `min_saving` of the one-group cost."""
    lengths = np.asarray(lengths, dtype=np.int64)
    batch = len(lengths)
    if max_groups < 2 or batch < 2:
        return None
    order = np.argsort(lengths, kind="stable")
    ordered = lengths[order]
    full = float(batch) * float(ordered[-1]) ** 2
    if full == 0:
        return None
    # candidate cuts: after the last row of each distinct length, thinned to <= 32 evenly spaced ones
    ends = np.flatnonzero(np.diff(ordered)) + 1
    if len(ends) > 32:
        ends = ends[np.linspace(0, len(ends) - 1, 32).round().astype(int)]
    points = [0, *ends.tolist(), batch]  # group = rows points[a]:points[b]
    n = len(points)

    def cost(a: int, b: int) -> float:
        return float(points[b] - points[a]) * float(ordered[points[b] - 1]) ** 2

    table = [[None] * n for _ in range(max_groups + 1)]
    table[0][0] = (0.0, [0])
    for g in range(1, max_groups + 1):
        for b in range(1, n):
            options = [(table[g - 1][a][0] + cost(a, b), table[g - 1][a][1] + [b])
                       for a in range(b) if table[g - 1][a] is not None]
            table[g][b] = min(options) if options else None
    total, cuts = min(table[g][n - 1] for g in range(1, max_groups + 1) if table[g][n - 1] is not None)
    if total > (1.0 - min_saving) * full or len(cuts) <= 2:
        return None
    return [order[points[a]:points[b]] for a, b in zip(cuts[:-1], cuts[1:])]


# ------------------------------------------------------------------------------------------------------
# Masks
# ------------------------------------------------------------------------------------------------------
def attention_mask(lengths: torch.Tensor, width: int, causal: bool = True) -> torch.Tensor:
    """Boolean [B, W, W] mask: key j is visible to query i when j < len_b (and j <= i if causal)."""
    pos = torch.arange(width, device=lengths.device)
    key_valid = pos.unsqueeze(0) < lengths.unsqueeze(1)  # [B, W]
    mask = key_valid.unsqueeze(1).expand(-1, width, -1)
    if causal:
        mask = mask & (pos.unsqueeze(1) >= pos.unsqueeze(0)).unsqueeze(0)
    return mask


def valid_attention_mask(
    lengths: torch.Tensor,
    width: int,
    *,
    causal: bool = True,
    num_targets: Optional[torch.Tensor] = None,
    contextual_seq_len: int = 0,
    max_attn_len: int = 0,
    min_full_attn_seq_len: int = 0,
    rows: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Boolean [B, W, W]: valid[b, i, j] is True when query i may attend to key j (module docstring rules).

    Rows and columns at or past len_b are always False.  Without candidates the ids do not depend on the
    sequence, so the id arithmetic runs once on [W, W] and only the length-dependent parts are per sequence.
    `rows` ([R] query positions) returns only those rows, [B, R, W], equal to the full mask's rows: what cached
    (KV-cache) decoding needs for its few new queries against all keys.
    """
    pos = torch.arange(width, device=lengths.device)
    qpos = pos if rows is None else rows.to(device=lengths.device, dtype=torch.long)
    max_ids = lengths.unsqueeze(1)  # [B, 1]
    ids = pos.unsqueeze(0)  # [1, W]: shared by all sequences until candidates clamp it
    if contextual_seq_len > 0:
        ids = (ids - contextual_seq_len + 1).clamp(min=0)
        max_ids = max_ids - contextual_seq_len + 1
    if num_targets is not None:
        max_ids = max_ids - num_targets.unsqueeze(1).to(max_ids.dtype)
        ids = torch.minimum(ids, max_ids)  # [B, W]
    row, col = ids[:, qpos].unsqueeze(2), ids.unsqueeze(1)  # [B or 1, R, 1], [B or 1, 1, W]
    dist = row - col
    if not causal:
        dist = dist.abs()
    valid = (qpos.unsqueeze(1) == pos.unsqueeze(0)).unsqueeze(0) | (dist > 0)
    if max_attn_len > 0:
        in_window = dist <= max_attn_len
        if min_full_attn_seq_len > 0:
            in_window = in_window | (row >= (max_ids - min_full_attn_seq_len).unsqueeze(2))
        valid = valid & in_window
    if contextual_seq_len > 0:
        valid = valid | ((row == 0) & (col < max_ids.unsqueeze(2)))
    real = pos.unsqueeze(0) < lengths.unsqueeze(1)  # [B, W]
    return valid & real[:, qpos].unsqueeze(2) & real.unsqueeze(1)


# ------------------------------------------------------------------------------------------------------
# PyTorch reference
# ------------------------------------------------------------------------------------------------------
def hstu_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lengths: torch.Tensor,
    normalizer: float,
    rab: Optional[torch.Tensor] = None,
    causal: bool = True,
    *,
    alpha: float = 1.0,
    num_targets: Optional[torch.Tensor] = None,
    contextual_seq_len: int = 0,
    max_attn_len: int = 0,
    min_full_attn_seq_len: int = 0,
    mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Padded HSTU attention.

    q, k: [B, W, H, dqk]; v: [B, W, H, dv]; lengths: [B]; rab: [B or 1, W, W] or None (shared by all heads).
    Returns [B, W, H, dv]; rows at or past len_b are zero.  Trace-friendly: W comes from the tensors' shape.
    `mask`: the `valid_attention_mask` of these lengths and options, when the caller already has it (a layer
    stack builds it once for all its layers); it is not recomputed or checked against the options.
    """
    width = q.shape[1]
    if mask is None:
        mask = valid_attention_mask(
            lengths, width, causal=causal, num_targets=num_targets, contextual_seq_len=contextual_seq_len,
            max_attn_len=max_attn_len, min_full_attn_seq_len=min_full_attn_seq_len,
        )
    return _masked_pointwise_attention(q, k, v, mask, normalizer, rab, alpha)


def _masked_pointwise_attention(q, k, v, mask, normalizer: float, rab, alpha: float) -> torch.Tensor:
    """The formula itself: q [B, R, H, dqk] against k [B, W, H, dqk], v [B, W, H, dv]; mask [B, R, W];
    rab [B or 1, R, W] or None.  Returns [B, R, H, dv]."""
    if torch.is_grad_enabled() and not torch.jit.is_tracing() and any(
            t is not None and t.requires_grad for t in (q, k, v, rab)):
        # Training: the same formula with a backward pass that keeps S only (pointwise_attention.py).
        return pointwise_attention(q, k, v, mask, normalizer, rab, alpha)
    scores = torch.einsum("bihd,bjhd->bhij", q, k)
    if alpha != 1.0:
        scores = scores * alpha
    if rab is not None:
        scores = scores + rab.unsqueeze(1)
    weights = F.silu(scores) * (mask.unsqueeze(1).to(scores.dtype) / normalizer)
    return torch.einsum("bhij,bjhd->bihd", weights, v)


def hstu_attention_rows(
    q_rows: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rows: torch.Tensor,
    lengths: torch.Tensor,
    normalizer: float,
    rab: Optional[torch.Tensor] = None,
    causal: bool = True,
    *,
    alpha: float = 1.0,
    num_targets: Optional[torch.Tensor] = None,
    contextual_seq_len: int = 0,
    max_attn_len: int = 0,
    min_full_attn_seq_len: int = 0,
    kernel: Optional[str] = None,
) -> torch.Tensor:
    """Cached decoding: the rows `rows` of `hstu_attention_reference`, computing only those queries.

    q_rows: [B, R, H, dqk] the queries at positions `rows` ([R]); k: [B, W, H, dqk] and v: [B, W, H, dv] all
    keys/values (a KV cache followed by the new tokens); rab: [B or 1, R, W] the bias of those rows.  Returns
    [B, R, H, dv] == hstu_attention_reference(q, k, v, ...)[:, rows] for any q whose rows `rows` are q_rows,
    because rows are independent sums (no softmax).  M-FALCON and incremental updates use it.
    kernel: "pytorch" | "triton" | "auto" | None, resolved by `dispatch.resolve_kernel(op="hstu_attention_rows")`;
    this op has a PyTorch implementation only, so every name runs it (dispatch.OP_KERNELS).
    """
    chosen = resolve_kernel(kernel, q_rows, k, v, op="hstu_attention_rows")
    if chosen != "pytorch":  # unreachable while OP_KERNELS lists no other kernel for this op
        raise NotImplementedError(f"hstu_attention_rows has no {chosen!r} implementation")
    if rows.dim() != 1 or rows.numel() != q_rows.shape[1]:
        raise ValueError(f"hstu_attention_rows: rows must be a 1-D tensor of the {q_rows.shape[1]} query "
                         f"positions, got shape {tuple(rows.shape)}")
    if k.shape[:3] != (q_rows.shape[0], k.shape[1], q_rows.shape[2]) or v.shape[:3] != k.shape[:3]:
        raise ValueError(f"hstu_attention_rows: k, v must be [B, W, H, d] with q_rows' B and H; got "
                         f"q_rows {tuple(q_rows.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    mask = valid_attention_mask(
        lengths, k.shape[1], causal=causal, num_targets=num_targets, contextual_seq_len=contextual_seq_len,
        max_attn_len=max_attn_len, min_full_attn_seq_len=min_full_attn_seq_len, rows=rows,
    )
    return _masked_pointwise_attention(q_rows, k, v, mask, normalizer, rab, alpha)


def jagged_to_padded(values: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
    """[L, *rest] jagged values -> [B, W, *rest] with zeros past each length (token_mask: [B, W] bool)."""
    batch, width = token_mask.shape
    return values.new_zeros((batch, width) + tuple(values.shape[1:])).index_put((token_mask,), values)


def hstu_attention_pytorch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seq_offsets: torch.Tensor,
    max_seq_len: int,
    *,
    alpha: float = 1.0,
    causal: bool = True,
    num_targets: Optional[torch.Tensor] = None,
    contextual_seq_len: int = 0,
    max_attn_len: int = 0,
    min_full_attn_seq_len: int = 0,
    attn_bias: Optional[torch.Tensor] = None,
    max_len: Optional[int] = None,
) -> torch.Tensor:
    """Jagged HSTU attention in plain PyTorch: pad to the longest sequence, run the reference, un-pad.

    q, k: [L, H, dqk]; v: [L, H, dv]; seq_offsets: [B+1]; attn_bias: [B or 1, W, W] with W >= max length.
    `max_len` (the longest sequence) saves a host sync when the caller already knows it.
    """
    lengths = seq_offsets[1:] - seq_offsets[:-1]
    if max_len is None:
        max_len = int(lengths.max()) if lengths.numel() else 0
    token_mask = torch.arange(max_len, device=q.device).unsqueeze(0) < lengths.unsqueeze(1)
    rab = None if attn_bias is None else attn_bias[:, :max_len, :max_len]
    out = hstu_attention_reference(
        jagged_to_padded(q, token_mask), jagged_to_padded(k, token_mask), jagged_to_padded(v, token_mask),
        lengths, float(max_seq_len), rab, causal, alpha=alpha, num_targets=num_targets,
        contextual_seq_len=contextual_seq_len, max_attn_len=max_attn_len,
        min_full_attn_seq_len=min_full_attn_seq_len,
    )
    return out[token_mask]


# ------------------------------------------------------------------------------------------------------
# The op
# ------------------------------------------------------------------------------------------------------
def _check_inputs(q, k, v, seq_offsets, max_seq_len, num_targets, attn_bias, contextual_seq_len,
                  max_attn_len, min_full_attn_seq_len) -> int:
    """Validate shapes/values with clear messages; returns the longest sequence length."""
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"hstu_attention: q, k, v must be [L, H, d]; got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.shape != k.shape:
        raise ValueError(f"hstu_attention: q and k must have the same shape [L, H, dqk]; "
                         f"got {tuple(q.shape)} and {tuple(k.shape)}")
    if v.shape[:2] != q.shape[:2]:
        raise ValueError(f"hstu_attention: v must be [L, H, dv] with q's L and H; got v {tuple(v.shape)}, "
                         f"q {tuple(q.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or not q.dtype.is_floating_point:
        raise ValueError(f"hstu_attention: q, k, v must share one float dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if seq_offsets.dim() != 1 or seq_offsets.numel() < 1 or seq_offsets.dtype not in (torch.int32, torch.int64):
        raise ValueError("hstu_attention: seq_offsets must be a 1-D int32/int64 tensor [B+1] of cumulative "
                         f"lengths; got {seq_offsets.dtype} {tuple(seq_offsets.shape)}")
    for name, value in (("contextual_seq_len", contextual_seq_len), ("max_attn_len", max_attn_len),
                        ("min_full_attn_seq_len", min_full_attn_seq_len)):
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"hstu_attention: {name} must be an int >= 0, got {value!r}")
    if not isinstance(max_seq_len, int) or max_seq_len <= 0:
        raise ValueError(f"hstu_attention: max_seq_len (the normaliser N) must be a positive int, got {max_seq_len!r}")
    lengths = seq_offsets[1:] - seq_offsets[:-1]
    batch = lengths.shape[0]
    # One host sync for all value checks.
    stats = torch.stack([
        seq_offsets[0].long(), seq_offsets[-1].long(),
        lengths.min().long() if batch else seq_offsets[0].long() * 0,
        lengths.max().long() if batch else seq_offsets[0].long() * 0,
    ]).tolist()
    first, last, min_len, max_len = stats
    if first != 0 or last != q.shape[0] or min_len < 0:
        raise ValueError(f"hstu_attention: seq_offsets must start at 0, be non-decreasing and end at L={q.shape[0]}; "
                         f"got first={first}, last={last}, smallest length={min_len}")
    if max_len > max_seq_len:
        raise ValueError(f"hstu_attention: a sequence of {max_len} tokens exceeds max_seq_len={max_seq_len}; "
                         "raise max_seq_len or truncate the sequences")
    if num_targets is not None:
        if num_targets.shape != (batch,) or num_targets.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"hstu_attention: num_targets must be an int tensor [B={batch}], "
                             f"got {num_targets.dtype} {tuple(num_targets.shape)}")
        if batch and bool(((num_targets < 0) | (num_targets.to(lengths.dtype) > lengths)).any()):
            raise ValueError("hstu_attention: num_targets must be in [0, length] for every sequence")
    if attn_bias is not None:
        if (attn_bias.dim() != 3 or attn_bias.shape[0] not in (1, batch) or attn_bias.shape[1] < max_len
                or attn_bias.shape[2] < max_len or not attn_bias.dtype.is_floating_point):
            raise ValueError(f"hstu_attention: attn_bias must be a float [B={batch} or 1, W, W] tensor with "
                             f"W >= the longest sequence ({max_len}); got {attn_bias.dtype} {tuple(attn_bias.shape)}")
    return max_len


def hstu_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seq_offsets: torch.Tensor,
    max_seq_len: int,
    *,
    alpha: float = 1.0,
    causal: bool = True,
    num_targets: Optional[torch.Tensor] = None,
    contextual_seq_len: int = 0,
    max_attn_len: int = 0,
    min_full_attn_seq_len: int = 0,
    attn_bias: Optional[torch.Tensor] = None,
    kernel: Optional[str] = None,
) -> torch.Tensor:
    """Jagged HSTU attention; returns [L, H, dv] (see the module docstring for the math and the mask).

    q, k: [L, H, dqk]; v: [L, H, dv], sequences laid end to end as given by seq_offsets [B+1].
    max_seq_len: the normaliser N (and an upper bound on every length).
    num_targets: [B] candidates at the end of each sequence (target-aware mask), or None.
    attn_bias: dense relative bias [B or 1, W, W] (query position i, key position j inside each sequence),
        shared by all heads; it gets a gradient (d bias = dS summed over heads).  The research HSTU's learned
        position/time tables reach the op this way: gather them into [B, W, W] and autograd carries the
        gradient back to the tables.
    kernel: "pytorch" | "triton" | "auto" | None (None and "auto" defer to the global default).
    """
    max_len = _check_inputs(q, k, v, seq_offsets, max_seq_len, num_targets, attn_bias, contextual_seq_len,
                            max_attn_len, min_full_attn_seq_len)
    tensors = [q, k, v] + ([attn_bias] if attn_bias is not None else [])
    lengths = seq_offsets[1:] - seq_offsets[:-1]
    plan = _build_plan(resolve_kernel(kernel, *tensors), lengths, max_seq_len, max_len, seq_offsets=seq_offsets,
                       max_len=max_len, alpha=float(alpha), causal=bool(causal), num_targets=num_targets,
                       contextual_seq_len=contextual_seq_len, max_attn_len=max_attn_len,
                       min_full_attn_seq_len=min_full_attn_seq_len)
    return hstu_attention_with_plan(q, k, v, plan, attn_bias)


# ------------------------------------------------------------------------------------------------------
# One batch, many layers: the plan
# ------------------------------------------------------------------------------------------------------
@dataclass
class HSTUAttentionPlan:
    """The layer-independent half of `hstu_attention` for one jagged batch (build it with `plan_hstu_attention`).

    Sequence b is rows offsets[b]:offsets[b+1] of the jagged q, k, v; on the padded (PyTorch) path its token t
    sits at [b, t] of a [B, W] view, W = `width` >= the longest sequence (the bias given with the plan is
    [B or 1, W, W], or wider).
    """

    kernel: str  # the resolved kernel: "pytorch" | "triton"
    lengths: torch.Tensor  # [B]
    max_seq_len: int  # N, the normaliser
    width: int  # W
    alpha: float
    causal: bool
    num_targets: Optional[torch.Tensor]
    contextual_seq_len: int
    max_attn_len: int
    min_full_attn_seq_len: int
    token_mask: Optional[torch.Tensor] = None  # [B, W] padded view (PyTorch path)
    mask: Optional[torch.Tensor] = None  # [B, W, W] valid_attention_mask (PyTorch path)
    seq_offsets: Optional[torch.Tensor] = None  # [B+1] (Triton path)
    max_len: Optional[int] = None  # the longest sequence (Triton path)
    groups: Optional[List["LengthGroup"]] = None  # PyTorch path with length groups (then `mask` is None)
    output_order: Optional[torch.Tensor] = None  # [L]: jagged row -> its row in the groups' concatenated output


@dataclass
class LengthGroup:
    """Rows `rows` of a plan's batch, padded to their own longest length `width` (module docstring)."""

    rows: torch.Tensor  # [b] batch indices
    width: int
    gather: torch.Tensor  # [b * width] jagged row of each slot, row-major; padding slots point at row L (a zero row)
    token_mask: torch.Tensor  # [b, width]
    real_slots: torch.Tensor  # [l] the flat slots (< b * width) that hold real tokens, in jagged order
    mask: torch.Tensor  # [b, width, width] valid_attention_mask of these rows
    blocks: tuple = ()  # causal row blocks [(r0, r1), ...]: queries r0..r1-1 attend to no key >= r1 (empty: one block)


def _build_plan(chosen: str, lengths, max_seq_len: int, width: int, *, token_mask=None, seq_offsets=None,
                max_len: Optional[int] = None, alpha: float, causal: bool, num_targets, contextual_seq_len: int,
                max_attn_len: int, min_full_attn_seq_len: int) -> HSTUAttentionPlan:
    plan = HSTUAttentionPlan(chosen, lengths, max_seq_len, width, alpha, causal, num_targets, contextual_seq_len,
                             max_attn_len, min_full_attn_seq_len)
    if chosen == "triton":  # jagged kernels: offsets only, no padded view
        plan.seq_offsets = F.pad(torch.cumsum(lengths, 0), (1, 0)) if seq_offsets is None else seq_offsets
        plan.max_len = (int(lengths.max()) if lengths.numel() else 0) if max_len is None else max_len
    else:
        if token_mask is None:
            token_mask = torch.arange(width, device=lengths.device).unsqueeze(0) < lengths.unsqueeze(1)
        plan.token_mask = token_mask
        mask_options = dict(causal=causal, contextual_seq_len=contextual_seq_len, max_attn_len=max_attn_len,
                            min_full_attn_seq_len=min_full_attn_seq_len)
        chosen_groups = None
        if (_LENGTH_GROUPS > 1 and width >= MIN_GROUP_WIDTH and not torch.jit.is_tracing()
                and lengths.device.type == "cpu"):
            chosen_groups = choose_length_groups(lengths.tolist(), _LENGTH_GROUPS)
        if chosen_groups is None:
            plan.mask = valid_attention_mask(lengths, width, num_targets=num_targets, **mask_options)
        else:
            plan.groups, plan.output_order = _length_groups(lengths, chosen_groups, num_targets, mask_options)
    return plan


def _length_groups(lengths: torch.Tensor, chosen: List[np.ndarray], num_targets, mask_options: dict):
    """LengthGroups of `chosen` row sets, and the permutation that puts their concatenated jagged outputs back
    in jagged order."""
    offsets = F.pad(torch.cumsum(lengths, 0), (1, 0))
    total = int(offsets[-1])
    groups, placed = [], []
    for rows_np in chosen:
        rows = torch.as_tensor(rows_np, dtype=torch.long, device=lengths.device)
        group_lengths = lengths[rows]
        width = int(group_lengths.max())
        slots = torch.arange(width, device=lengths.device).unsqueeze(0)
        token_mask = slots < group_lengths.unsqueeze(1)
        gather = torch.where(token_mask, offsets[rows].unsqueeze(1) + slots, torch.full_like(slots, total))
        targets = None if num_targets is None else num_targets[rows]
        mask = valid_attention_mask(group_lengths, width, num_targets=targets, **mask_options)
        real_slots = torch.nonzero(token_mask.reshape(-1)).squeeze(1)
        groups.append(LengthGroup(rows, width, gather.reshape(-1), token_mask, real_slots, mask,
                                  causal_blocks(mask, width)))
        placed.append(gather[token_mask])
    order = torch.empty(total, dtype=torch.long, device=lengths.device)
    order[torch.cat(placed)] = torch.arange(total, device=lengths.device)
    return groups, order


def plan_hstu_attention(
    lengths: torch.Tensor,
    max_seq_len: int,
    *,
    token_mask: Optional[torch.Tensor] = None,
    width: Optional[int] = None,
    alpha: float = 1.0,
    causal: bool = True,
    num_targets: Optional[torch.Tensor] = None,
    contextual_seq_len: int = 0,
    max_attn_len: int = 0,
    min_full_attn_seq_len: int = 0,
    kernel: Optional[str] = None,
    like: Sequence[torch.Tensor] = (),
) -> HSTUAttentionPlan:
    """Resolve the kernel and build the shared per-batch state of `hstu_attention` once, for many layers.

    lengths [B]: the jagged batch (sequence b is the next lengths[b] rows of q, k, v); the padded width W is
    `token_mask.shape[1]` (a [B, W] bool view the caller already has), else `width`, else the longest length.
    The mask options are `hstu_attention`'s.  `like`: tensors of the device and dtype q, k, v will have, for
    "auto" (`dispatch.resolve_kernel`).  Under torch.jit.trace nothing here reads a tensor value on the
    PyTorch path, so a traced graph keeps W from the input's shape.
    """
    for name, value in (("contextual_seq_len", contextual_seq_len), ("max_attn_len", max_attn_len),
                        ("min_full_attn_seq_len", min_full_attn_seq_len)):
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"plan_hstu_attention: {name} must be an int >= 0, got {value!r}")
    if not isinstance(max_seq_len, int) or max_seq_len <= 0:
        raise ValueError(f"plan_hstu_attention: max_seq_len (the normaliser N) must be a positive int, "
                         f"got {max_seq_len!r}")
    if lengths.dim() != 1 or lengths.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"plan_hstu_attention: lengths must be a 1-D int tensor [B], got {lengths.dtype} "
                         f"{tuple(lengths.shape)}")
    batch = lengths.shape[0]
    if token_mask is not None:
        if token_mask.dim() != 2 or token_mask.shape[0] != batch or token_mask.dtype != torch.bool:
            raise ValueError(f"plan_hstu_attention: token_mask must be a bool [B={batch}, W] tensor, got "
                             f"{token_mask.dtype} {tuple(token_mask.shape)}")
        width = token_mask.shape[1]
    if num_targets is not None and (num_targets.shape != (batch,)
                                    or num_targets.dtype not in (torch.int32, torch.int64)):
        raise ValueError(f"plan_hstu_attention: num_targets must be an int tensor [B={batch}], "
                         f"got {num_targets.dtype} {tuple(num_targets.shape)}")
    max_len = None
    if not torch.jit.is_tracing():  # one host sync for every value check
        max_len, min_len, bad_targets = (torch.stack([
            lengths.max().long() if batch else lengths.new_zeros((), dtype=torch.long),
            lengths.min().long() if batch else lengths.new_zeros((), dtype=torch.long),
            ((num_targets < 0) | (num_targets.to(lengths.dtype) > lengths)).any().long()
            if num_targets is not None and batch else lengths.new_zeros((), dtype=torch.long),
        ]).tolist())
        if width is None:
            width = max_len
        if min_len < 0 or max_len > min(width, max_seq_len):
            raise ValueError(f"plan_hstu_attention: lengths must be in [0, min(W={width}, max_seq_len="
                             f"{max_seq_len})]; got lengths from {min_len} to {max_len}")
        if bad_targets:
            raise ValueError("plan_hstu_attention: num_targets must be in [0, length] for every sequence")
    elif width is None:
        raise ValueError("plan_hstu_attention: under torch.jit.trace give token_mask or width (the padded width "
                         "must come from a shape, not from the lengths' values)")
    return _build_plan(resolve_kernel(kernel, *like), lengths, max_seq_len, width, token_mask=token_mask,
                       max_len=max_len, alpha=float(alpha), causal=bool(causal), num_targets=num_targets,
                       contextual_seq_len=contextual_seq_len, max_attn_len=max_attn_len,
                       min_full_attn_seq_len=min_full_attn_seq_len)


def hstu_attention_with_plan(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: HSTUAttentionPlan,
    attn_bias: Union[None, torch.Tensor, Sequence[torch.Tensor]] = None,
) -> torch.Tensor:
    """`hstu_attention` of jagged q, k [L, H, dqk], v [L, H, dv] over the batch `plan` describes -> [L, H, dv].

    attn_bias: [B or 1, W', W'] with W' >= the plan's width (PyTorch path) or >= the longest sequence (Triton
    path); shared by all heads, and it gets a gradient, as in `hstu_attention`.  With a length-grouped plan it
    may also be one bias per group (`group_bias` of the full one), so the full [B, W, W] is never built.
    """
    if q.dim() != 3 or k.shape != q.shape or v.dim() != 3 or v.shape[:2] != q.shape[:2]:
        raise ValueError(f"hstu_attention: q, k must be [L, H, dqk] and v [L, H, dv]; got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    batch = plan.lengths.shape[0]
    need = plan.max_len if plan.kernel == "triton" else plan.width
    if isinstance(attn_bias, (list, tuple)):  # one bias per length group (STULayer with a grouped plan)
        if plan.groups is None or len(attn_bias) != len(plan.groups):
            raise ValueError(f"hstu_attention: a list of {len(attn_bias)} biases needs a plan with that many "
                             "length groups (one [b or 1, w, w] bias per group)")
        return _grouped_attention(q, k, v, plan, attn_bias)
    if attn_bias is not None and (attn_bias.dim() != 3 or attn_bias.shape[0] not in (1, batch)
                                  or attn_bias.shape[1] < need or attn_bias.shape[2] < need):
        raise ValueError(f"hstu_attention: attn_bias must be a float [B={batch} or 1, W, W] tensor with W >= {need} "
                         f"(the plan's width); got {tuple(attn_bias.shape)}")
    if plan.kernel == "triton":
        if q.dtype not in TRITON_DTYPES:
            raise ValueError(f"hstu_attention: the Triton kernels take float32/bfloat16/float16, got {q.dtype}; "
                             "use kernel='pytorch' (or 'auto') for this dtype")
        from merlin_hstu.kernels.triton_hstu_attention import triton_hstu_attention

        return triton_hstu_attention(
            q, k, v, plan.seq_offsets, plan.max_seq_len, alpha=plan.alpha, causal=plan.causal,
            num_targets=plan.num_targets, contextual_seq_len=plan.contextual_seq_len,
            max_attn_len=plan.max_attn_len, min_full_attn_seq_len=plan.min_full_attn_seq_len, attn_bias=attn_bias,
            max_len=plan.max_len)
    if plan.groups is not None:
        return _grouped_attention(q, k, v, plan, attn_bias)
    token_mask, width = plan.token_mask, plan.width
    if attn_bias is not None and (attn_bias.shape[1] != width or attn_bias.shape[2] != width):
        attn_bias = attn_bias[:, :width, :width]
    out = _masked_pointwise_attention(
        jagged_to_padded(q, token_mask), jagged_to_padded(k, token_mask), jagged_to_padded(v, token_mask),
        plan.mask, float(plan.max_seq_len), attn_bias, plan.alpha)
    return out[token_mask]


def _grouped_attention(q, k, v, plan: HSTUAttentionPlan, attn_bias) -> torch.Tensor:
    """The PyTorch path over the plan's length groups: gather each group's padded q, k, v (one indexed read of
    the jagged rows plus a zero row), attend, then put the groups' jagged outputs back in order.  `attn_bias`: a
    [B or 1, W, W] tensor (sliced per group) or one [b or 1, w, w] bias per group (`group_bias`)."""
    # index_select (backward: index_add) rather than advanced indexing (backward: a much slower accumulating
    # index_put on CPU) for every gather and scatter here
    outputs = []
    zero = lambda t: torch.cat([t, t.new_zeros((1,) + tuple(t.shape[1:]))])  # noqa: E731 - row L: padding
    q_ext, k_ext, v_ext = zero(q), zero(k), zero(v)

    def padded(t: torch.Tensor, group: LengthGroup) -> torch.Tensor:
        return t.index_select(0, group.gather).view(len(group.rows), group.width, *t.shape[1:])

    for g, group in enumerate(plan.groups):
        if attn_bias is None:
            bias = None
        elif isinstance(attn_bias, (list, tuple)):
            bias = attn_bias[g]
        else:
            bias = group_bias(attn_bias, group)
        qg, kg, vg = padded(q_ext, group), padded(k_ext, group), padded(v_ext, group)
        n = float(plan.max_seq_len)
        if group.blocks:  # row block r0:r1 against keys :r1 only (the rest of its row is masked)
            out = torch.cat([_masked_pointwise_attention(
                qg[:, r0:r1], kg[:, :r1], vg[:, :r1], group.mask[:, r0:r1, :r1], n,
                None if bias is None else bias[:, r0:r1, :r1], plan.alpha) for r0, r1 in group.blocks], dim=1)
        else:
            out = _masked_pointwise_attention(qg, kg, vg, group.mask, n, bias, plan.alpha)
        outputs.append(out.reshape(-1, *out.shape[2:]).index_select(0, group.real_slots))
    return torch.cat(outputs).index_select(0, plan.output_order)


def causal_blocks(mask: torch.Tensor, width: int) -> tuple:
    """Row blocks of a [b, w, w] mask whose upper-right part is empty (causal masks, windows included; not a
    contextual prefix or a bidirectional mask, checked on the mask itself): with k blocks the attention work is
    (k + 1) / 2k of w^2.  Two blocks from MIN_SPLIT_WIDTH (measured with `bench ab` on hstu-large-ml1m, 2 threads:
    four blocks were slower than two, 0.67x vs 0.61x of the ungrouped step; the extra calls cost more than the
    FLOPs they save at these widths), else none."""
    for count, min_width in ((2, MIN_SPLIT_WIDTH),):
        if width < min_width:
            continue
        bounds = [width * i // count for i in range(count + 1)]
        blocks = tuple(zip(bounds[:-1], bounds[1:]))
        if not any(bool(mask[:, r0:r1, r1:].any()) for r0, r1 in blocks[:-1]):
            return blocks
    return ()


def group_bias(bias: torch.Tensor, group: LengthGroup) -> torch.Tensor:
    """A [B or 1, W, W] (or wider) bias cut to one length group: its rows (unless shared), its width."""
    if bias.shape[0] != 1:
        bias = bias[group.rows]
    return bias[:, :group.width, :group.width]
