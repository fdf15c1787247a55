"""Triton forward and backward kernels for jagged HSTU attention, wrapped in one autograd Function.

Same math and mask as `attention_ops.py` (read its docstring first).  With P = SiLU(S) / N * valid:

    forward   S = alpha * Q K^T + bias          O  = P V
    backward  dV = P^T dO                       dP = dO V^T
              dS = dP * SiLU'(S) / N * valid    SiLU'(s) = sig(s) * (1 + s * (1 - sig(s)))
              dQ = alpha * dS K                 dK = alpha * dS^T Q          d bias = sum over heads of dS

HSTU has no softmax, so there are no running row statistics: each (query block, key block) tile adds
independently into the accumulators, and the backward needs nothing saved from the forward but the inputs.

Kernels (one program per (sequence, head, block)):
  * `_fwd`:      query block, loops over the key blocks it may see, accumulates O in fp32.
  * `_bwd_dkdv`: key block, loops over the query blocks that may see it, accumulates dK, dV.
  * `_bwd_dq`:   query block, loops over key blocks, accumulates dQ and (when the bias needs a gradient) writes
                 dS of its tiles into a per-head [B, H, W, W] buffer that is summed over heads afterwards.
                 Two kernels instead of atomics keep the backward deterministic.

Loop bounds skip tiles that are entirely masked (causality, the sliding window); they are conservative, and
the exact element mask is applied inside every tile, so a loose bound costs time, never correctness.

TRITON_INTERPRET=1 must be set before triton is imported for these kernels to run on CPU tensors (the
interpreter runs them with numpy; CI uses it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

INTERPRETED: bool = bool(triton.knobs.runtime.interpret)  # decided when the @triton.jit below ran


# ------------------------------------------------------------------------------------------------------
# Mask helpers (the rules of hstu_attention.valid_attention_mask, on one tile)
# ------------------------------------------------------------------------------------------------------
@triton.jit
def _max_ids(seq_len, n_targets, contextual_seq_len, HAS_CONTEXTUAL: tl.constexpr, HAS_TARGETS: tl.constexpr):
    max_ids = seq_len
    if HAS_CONTEXTUAL:
        max_ids = max_ids - contextual_seq_len + 1
    if HAS_TARGETS:
        max_ids = max_ids - n_targets
    return max_ids


@triton.jit
def _token_ids(pos, max_ids, contextual_seq_len, HAS_CONTEXTUAL: tl.constexpr, HAS_TARGETS: tl.constexpr):
    """Position -> id: contextual prefix tokens share id 0, candidates share id max_ids."""
    ids = pos
    if HAS_CONTEXTUAL:
        ids = tl.maximum(ids - contextual_seq_len + 1, 0)
    if HAS_TARGETS:
        ids = tl.minimum(ids, max_ids)
    return ids


@triton.jit
def _valid_mask(
    offs_m, offs_n, seq_len, max_ids, contextual_seq_len, max_attn_len, min_full_attn_seq_len,
    CAUSAL: tl.constexpr, HAS_CONTEXTUAL: tl.constexpr, HAS_TARGETS: tl.constexpr,
    HAS_MAX_ATTN_LEN: tl.constexpr, HAS_MIN_FULL: tl.constexpr,
):
    row = _token_ids(offs_m, max_ids, contextual_seq_len, HAS_CONTEXTUAL, HAS_TARGETS)
    col = _token_ids(offs_n, max_ids, contextual_seq_len, HAS_CONTEXTUAL, HAS_TARGETS)
    dist = row[:, None] - col[None, :]
    if not CAUSAL:
        dist = tl.where(dist > 0, dist, -dist)
    valid = (offs_m[:, None] == offs_n[None, :]) | (dist > 0)
    if HAS_MAX_ATTN_LEN:
        if HAS_MIN_FULL:
            valid = valid & ((dist <= max_attn_len) | (row[:, None] >= max_ids - min_full_attn_seq_len))
        else:
            valid = valid & (dist <= max_attn_len)
    if HAS_CONTEXTUAL:
        valid = valid | ((row[:, None] == 0) & (col[None, :] < max_ids))
    return valid & (offs_m[:, None] < seq_len) & (offs_n[None, :] < seq_len)


@triton.jit
def _key_range(
    m0, seq_len, max_ids, contextual_seq_len, max_attn_len, min_full_attn_seq_len,
    CAUSAL: tl.constexpr, HAS_CONTEXTUAL: tl.constexpr, HAS_TARGETS: tl.constexpr,
    HAS_MAX_ATTN_LEN: tl.constexpr, HAS_MIN_FULL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """[lo, hi) of key positions that query rows [m0, m0 + BLOCK_M) may see; lo is a multiple of BLOCK_N.

    Causal: a history or candidate row sees keys at positions <= its own (ids never decrease with position);
    only contextual rows (positions < c) see later keys, up to the end of the history.  Window: keys with
    id >= min row id - max_attn_len, i.e. positions >= that id (+ c - 1 with a contextual prefix).
    """
    lo = m0 * 0
    hi = seq_len
    if CAUSAL:
        hi = tl.minimum(m0 + BLOCK_M, seq_len)
        if HAS_CONTEXTUAL:
            hi = tl.where(m0 < contextual_seq_len, seq_len, hi)
        if HAS_MAX_ATTN_LEN:
            r_min = _token_ids(m0, max_ids, contextual_seq_len, HAS_CONTEXTUAL, HAS_TARGETS)
            x = r_min - max_attn_len
            first = x
            if HAS_CONTEXTUAL:
                first = x + contextual_seq_len - 1
            lo = tl.where(x > 0, first, 0)
            if HAS_MIN_FULL:
                m_last = tl.minimum(m0 + BLOCK_M, seq_len) - 1
                r_max = _token_ids(m_last, max_ids, contextual_seq_len, HAS_CONTEXTUAL, HAS_TARGETS)
                lo = tl.where(r_max >= max_ids - min_full_attn_seq_len, 0, lo)
            lo = (lo // BLOCK_N) * BLOCK_N
    return lo, hi


@triton.jit
def _query_end(
    n0, seq_len, max_ids, contextual_seq_len, max_attn_len,
    CAUSAL: tl.constexpr, HAS_CONTEXTUAL: tl.constexpr, HAS_TARGETS: tl.constexpr,
    HAS_MAX_ATTN_LEN: tl.constexpr, HAS_MIN_FULL: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Exclusive end of the (non-contextual) query rows that may see keys [n0, n0 + BLOCK_N)."""
    hi = seq_len
    if CAUSAL and HAS_MAX_ATTN_LEN and not HAS_MIN_FULL:
        n_last = tl.minimum(n0 + BLOCK_N, seq_len) - 1
        y = _token_ids(n_last, max_ids, contextual_seq_len, HAS_CONTEXTUAL, HAS_TARGETS) + max_attn_len
        p_max = y
        if HAS_CONTEXTUAL:
            p_max = y + contextual_seq_len - 1
        hi = tl.minimum(p_max + 1, seq_len)
        if HAS_TARGETS:
            hi = tl.where(y >= max_ids, seq_len, hi)  # candidates (id max_ids) see this block
    return hi


@triton.jit
def _scores(q, k, Bias_base, offs_m, offs_n, seq_len, stride_bm, stride_bn, alpha,
            HAS_BIAS: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    s = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * alpha
    if HAS_BIAS:
        b_ptrs = Bias_base + offs_m[:, None].to(tl.int64) * stride_bm + offs_n[None, :] * stride_bn
        b_mask = (offs_m[:, None] < seq_len) & (offs_n[None, :] < seq_len)
        s += tl.load(b_ptrs, mask=b_mask, other=0.0).to(tl.float32)
    return s


@triton.jit
def _load_rows(base, rows, offs_d, stride_t, seq_len, D):
    ptrs = base + rows[:, None].to(tl.int64) * stride_t + offs_d[None, :]
    return tl.load(ptrs, mask=(rows[:, None] < seq_len) & (offs_d[None, :] < D), other=0.0)


@triton.jit
def _store_rows(base, rows, offs_d, stride_t, seq_len, D, value):
    ptrs = base + rows[:, None].to(tl.int64) * stride_t + offs_d[None, :]
    tl.store(ptrs, value.to(base.dtype.element_ty), mask=(rows[:, None] < seq_len) & (offs_d[None, :] < D))


# ------------------------------------------------------------------------------------------------------
# Forward
# ------------------------------------------------------------------------------------------------------
@triton.jit
def _fwd(
    Q, K, V, Bias, Out, seq_offsets, num_targets,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    stride_bb, stride_bm, stride_bn,
    alpha, inv_norm, contextual_seq_len, max_attn_len, min_full_attn_seq_len,
    H, DQK, DV,
    CAUSAL: tl.constexpr, HAS_CONTEXTUAL: tl.constexpr, HAS_TARGETS: tl.constexpr,
    HAS_MAX_ATTN_LEN: tl.constexpr, HAS_MIN_FULL: tl.constexpr, HAS_BIAS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    off_bh = tl.program_id(0)
    off_b = off_bh // H
    off_h = off_bh % H
    m0 = tl.program_id(1) * BLOCK_M
    seq_start = tl.load(seq_offsets + off_b).to(tl.int64)
    seq_len = (tl.load(seq_offsets + off_b + 1) - seq_start).to(tl.int32)
    if m0 >= seq_len:
        return
    n_targets = seq_len * 0
    if HAS_TARGETS:
        n_targets = tl.load(num_targets + off_b).to(tl.int32)
    max_ids = _max_ids(seq_len, n_targets, contextual_seq_len, HAS_CONTEXTUAL, HAS_TARGETS)

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_dqk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    Q_base = Q + seq_start * stride_qt + off_h * stride_qh
    K_base = K + seq_start * stride_kt + off_h * stride_kh
    V_base = V + seq_start * stride_vt + off_h * stride_vh
    Bias_base = Bias + off_b.to(tl.int64) * stride_bb
    q = _load_rows(Q_base, offs_m, offs_dqk, stride_qt, seq_len, DQK)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)

    lo, hi = _key_range(m0, seq_len, max_ids, contextual_seq_len, max_attn_len, min_full_attn_seq_len,
                        CAUSAL, HAS_CONTEXTUAL, HAS_TARGETS, HAS_MAX_ATTN_LEN, HAS_MIN_FULL, BLOCK_M, BLOCK_N)
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        k = _load_rows(K_base, offs_n, offs_dqk, stride_kt, seq_len, DQK)
        s = _scores(q, k, Bias_base, offs_m, offs_n, seq_len, stride_bm, stride_bn, alpha, HAS_BIAS,
                    INPUT_PRECISION)
        valid = _valid_mask(offs_m, offs_n, seq_len, max_ids, contextual_seq_len, max_attn_len,
                            min_full_attn_seq_len, CAUSAL, HAS_CONTEXTUAL, HAS_TARGETS, HAS_MAX_ATTN_LEN,
                            HAS_MIN_FULL)
        p = tl.where(valid, s * tl.sigmoid(s) * inv_norm, 0.0)
        v = _load_rows(V_base, offs_n, offs_dv, stride_vt, seq_len, DV)
        acc += tl.dot(p.to(v.dtype), v, input_precision=INPUT_PRECISION)

    O_base = Out + seq_start * stride_ot + off_h * stride_oh
    _store_rows(O_base, offs_m, offs_dv, stride_ot, seq_len, DV, acc)


# ------------------------------------------------------------------------------------------------------
# Backward
# ------------------------------------------------------------------------------------------------------
@triton.jit
def _dkdv_tile(
    dk, dv, k, v, m0, offs_n, Q_base, DO_base, Bias_base, stride_qt, stride_dot, stride_bm, stride_bn,
    seq_len, max_ids, alpha, inv_norm, contextual_seq_len, max_attn_len, min_full_attn_seq_len, DQK, DV,
    CAUSAL: tl.constexpr, HAS_CONTEXTUAL: tl.constexpr, HAS_TARGETS: tl.constexpr,
    HAS_MAX_ATTN_LEN: tl.constexpr, HAS_MIN_FULL: tl.constexpr, HAS_BIAS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    offs_m = m0 + tl.arange(0, BLOCK_M)
    q = _load_rows(Q_base, offs_m, tl.arange(0, BLOCK_DQK), stride_qt, seq_len, DQK)
    do = _load_rows(DO_base, offs_m, tl.arange(0, BLOCK_DV), stride_dot, seq_len, DV)
    s = _scores(q, k, Bias_base, offs_m, offs_n, seq_len, stride_bm, stride_bn, alpha, HAS_BIAS, INPUT_PRECISION)
    valid = _valid_mask(offs_m, offs_n, seq_len, max_ids, contextual_seq_len, max_attn_len,
                        min_full_attn_seq_len, CAUSAL, HAS_CONTEXTUAL, HAS_TARGETS, HAS_MAX_ATTN_LEN,
                        HAS_MIN_FULL)
    sig = tl.sigmoid(s)
    p = tl.where(valid, s * sig * inv_norm, 0.0)
    dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=INPUT_PRECISION)
    dp = tl.dot(do, tl.trans(v), input_precision=INPUT_PRECISION)
    ds = tl.where(valid, dp * sig * (1.0 + s * (1.0 - sig)) * inv_norm, 0.0)
    dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=INPUT_PRECISION)
    return dk, dv


@triton.jit
def _bwd_dkdv(
    Q, K, V, Bias, DO, DK, DV_out, seq_offsets, num_targets,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dkt, stride_dkh, stride_dvt, stride_dvh,
    stride_bb, stride_bm, stride_bn,
    alpha, inv_norm, contextual_seq_len, max_attn_len, min_full_attn_seq_len,
    H, DQK, DV,
    CAUSAL: tl.constexpr, HAS_CONTEXTUAL: tl.constexpr, HAS_TARGETS: tl.constexpr,
    HAS_MAX_ATTN_LEN: tl.constexpr, HAS_MIN_FULL: tl.constexpr, HAS_BIAS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    off_bh = tl.program_id(0)
    off_b = off_bh // H
    off_h = off_bh % H
    n0 = tl.program_id(1) * BLOCK_N
    seq_start = tl.load(seq_offsets + off_b).to(tl.int64)
    seq_len = (tl.load(seq_offsets + off_b + 1) - seq_start).to(tl.int32)
    if n0 >= seq_len:
        return
    n_targets = seq_len * 0
    if HAS_TARGETS:
        n_targets = tl.load(num_targets + off_b).to(tl.int32)
    max_ids = _max_ids(seq_len, n_targets, contextual_seq_len, HAS_CONTEXTUAL, HAS_TARGETS)

    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_dqk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    Q_base = Q + seq_start * stride_qt + off_h * stride_qh
    DO_base = DO + seq_start * stride_dot + off_h * stride_doh
    Bias_base = Bias + off_b.to(tl.int64) * stride_bb
    k = _load_rows(K + seq_start * stride_kt + off_h * stride_kh, offs_n, offs_dqk, stride_kt, seq_len, DQK)
    v = _load_rows(V + seq_start * stride_vt + off_h * stride_vh, offs_n, offs_dv, stride_vt, seq_len, DV)
    dk = tl.zeros([BLOCK_N, BLOCK_DQK], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)

    # Query rows that may see this key block: contextual rows [0, c) (they see the whole history), then,
    # when causal, rows from the block's own start; the window caps the end.
    lo = seq_len * 0
    if CAUSAL:
        lo = (n0 // BLOCK_M) * BLOCK_M
        if HAS_CONTEXTUAL:
            ctx_end = tl.cdiv(contextual_seq_len, BLOCK_M) * BLOCK_M
            for m0 in range(0, tl.minimum(ctx_end, seq_len), BLOCK_M):
                dk, dv = _dkdv_tile(
                    dk, dv, k, v, m0, offs_n, Q_base, DO_base, Bias_base, stride_qt, stride_dot, stride_bm,
                    stride_bn, seq_len, max_ids, alpha, inv_norm, contextual_seq_len, max_attn_len,
                    min_full_attn_seq_len, DQK, DV, CAUSAL, HAS_CONTEXTUAL, HAS_TARGETS, HAS_MAX_ATTN_LEN,
                    HAS_MIN_FULL, HAS_BIAS, INPUT_PRECISION, BLOCK_M, BLOCK_DQK, BLOCK_DV,
                )
            lo = tl.maximum(lo, ctx_end)
    hi = _query_end(n0, seq_len, max_ids, contextual_seq_len, max_attn_len, CAUSAL, HAS_CONTEXTUAL,
                    HAS_TARGETS, HAS_MAX_ATTN_LEN, HAS_MIN_FULL, BLOCK_N)
    for m0 in range(lo, hi, BLOCK_M):
        dk, dv = _dkdv_tile(
            dk, dv, k, v, m0, offs_n, Q_base, DO_base, Bias_base, stride_qt, stride_dot, stride_bm, stride_bn,
            seq_len, max_ids, alpha, inv_norm, contextual_seq_len, max_attn_len, min_full_attn_seq_len, DQK, DV,
            CAUSAL, HAS_CONTEXTUAL, HAS_TARGETS, HAS_MAX_ATTN_LEN, HAS_MIN_FULL, HAS_BIAS, INPUT_PRECISION,
            BLOCK_M, BLOCK_DQK, BLOCK_DV,
        )

    _store_rows(DK + seq_start * stride_dkt + off_h * stride_dkh, offs_n, offs_dqk, stride_dkt, seq_len, DQK,
                dk * alpha)
    _store_rows(DV_out + seq_start * stride_dvt + off_h * stride_dvh, offs_n, offs_dv, stride_dvt, seq_len, DV,
                dv)


@triton.jit
def _bwd_dq(
    Q, K, V, Bias, DO, DQ, DBias, seq_offsets, num_targets,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dqt, stride_dqh,
    stride_bb, stride_bm, stride_bn,
    stride_dbb, stride_dbh, stride_dbm, stride_dbn,
    alpha, inv_norm, contextual_seq_len, max_attn_len, min_full_attn_seq_len,
    H, DQK, DV,
    CAUSAL: tl.constexpr, HAS_CONTEXTUAL: tl.constexpr, HAS_TARGETS: tl.constexpr,
    HAS_MAX_ATTN_LEN: tl.constexpr, HAS_MIN_FULL: tl.constexpr, HAS_BIAS: tl.constexpr,
    STORE_DBIAS: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    off_bh = tl.program_id(0)
    off_b = off_bh // H
    off_h = off_bh % H
    m0 = tl.program_id(1) * BLOCK_M
    seq_start = tl.load(seq_offsets + off_b).to(tl.int64)
    seq_len = (tl.load(seq_offsets + off_b + 1) - seq_start).to(tl.int32)
    if m0 >= seq_len:
        return
    n_targets = seq_len * 0
    if HAS_TARGETS:
        n_targets = tl.load(num_targets + off_b).to(tl.int32)
    max_ids = _max_ids(seq_len, n_targets, contextual_seq_len, HAS_CONTEXTUAL, HAS_TARGETS)

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_dqk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    K_base = K + seq_start * stride_kt + off_h * stride_kh
    V_base = V + seq_start * stride_vt + off_h * stride_vh
    Bias_base = Bias + off_b.to(tl.int64) * stride_bb
    DB_base = DBias + off_b.to(tl.int64) * stride_dbb + off_h.to(tl.int64) * stride_dbh
    q = _load_rows(Q + seq_start * stride_qt + off_h * stride_qh, offs_m, offs_dqk, stride_qt, seq_len, DQK)
    do = _load_rows(DO + seq_start * stride_dot + off_h * stride_doh, offs_m, offs_dv, stride_dot, seq_len, DV)
    dq = tl.zeros([BLOCK_M, BLOCK_DQK], dtype=tl.float32)

    lo, hi = _key_range(m0, seq_len, max_ids, contextual_seq_len, max_attn_len, min_full_attn_seq_len,
                        CAUSAL, HAS_CONTEXTUAL, HAS_TARGETS, HAS_MAX_ATTN_LEN, HAS_MIN_FULL, BLOCK_M, BLOCK_N)
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        k = _load_rows(K_base, offs_n, offs_dqk, stride_kt, seq_len, DQK)
        v = _load_rows(V_base, offs_n, offs_dv, stride_vt, seq_len, DV)
        s = _scores(q, k, Bias_base, offs_m, offs_n, seq_len, stride_bm, stride_bn, alpha, HAS_BIAS,
                    INPUT_PRECISION)
        valid = _valid_mask(offs_m, offs_n, seq_len, max_ids, contextual_seq_len, max_attn_len,
                            min_full_attn_seq_len, CAUSAL, HAS_CONTEXTUAL, HAS_TARGETS, HAS_MAX_ATTN_LEN,
                            HAS_MIN_FULL)
        sig = tl.sigmoid(s)
        dp = tl.dot(do, tl.trans(v), input_precision=INPUT_PRECISION)
        ds = tl.where(valid, dp * sig * (1.0 + s * (1.0 - sig)) * inv_norm, 0.0)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=INPUT_PRECISION)
        if STORE_DBIAS:
            db_ptrs = DB_base + offs_m[:, None].to(tl.int64) * stride_dbm + offs_n[None, :] * stride_dbn
            tl.store(db_ptrs, ds, mask=(offs_m[:, None] < seq_len) & (offs_n[None, :] < seq_len))

    _store_rows(DQ + seq_start * stride_dqt + off_h * stride_dqh, offs_m, offs_dqk, stride_dqt, seq_len, DQK,
                dq * alpha)


# ------------------------------------------------------------------------------------------------------
# Host side
# ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Config:
    """Everything about one call that is not a tensor."""

    normalizer: float
    alpha: float
    causal: bool
    contextual_seq_len: int
    max_attn_len: int
    min_full_attn_seq_len: int
    max_len: int
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def default_blocks(dqk: int, dv: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(block_m, block_n, num_warps, num_stages).

    The interpreter gets 16x16 tiles (cheap numpy per tile, and short test sequences still span several
    tiles).  On GPU, 64x64 tiles with 4 warps are a safe start for 16-bit inputs with d <= 128 (they compile
    for sm80/sm90 within A100 shared memory); fp32 (exact products, no tensor-core shortcut) and d > 128 get
    32x32.  Not tuned: no GPU was available when these kernels were written (see docs/kernels.md).
    """
    if INTERPRETED:
        return 16, 16, 1, 1
    if max(dqk, dv) > 128 or dtype == torch.float32:
        return 32, 32, 4, 1
    return 64, 64, 4, 2


def _pow2_at_least_16(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def _input_precision(dtype: torch.dtype) -> Optional[str]:
    """fp32 inputs use exact fp32 products (no TF32), so the fp32 kernel matches the fp32 reference."""
    return "ieee" if dtype == torch.float32 else None


def _flags(cfg: _Config, num_targets, has_bias: bool) -> dict:
    return dict(
        CAUSAL=cfg.causal,
        HAS_CONTEXTUAL=cfg.contextual_seq_len > 0,
        HAS_TARGETS=num_targets is not None,
        HAS_MAX_ATTN_LEN=cfg.max_attn_len > 0,
        HAS_MIN_FULL=cfg.max_attn_len > 0 and cfg.min_full_attn_seq_len > 0,
        HAS_BIAS=has_bias,
    )


def _bias_strides(bias: Optional[torch.Tensor]) -> tuple[int, int, int]:
    if bias is None:
        return 0, 0, 0
    stride_b = 0 if bias.shape[0] == 1 else bias.stride(0)
    return stride_b, bias.stride(1), bias.stride(2)


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _forward(q, k, v, seq_offsets, num_targets, bias, cfg: _Config) -> torch.Tensor:
    total, heads, dqk = q.shape
    dv = v.shape[2]
    batch = seq_offsets.shape[0] - 1
    out = torch.zeros(total, heads, dv, device=q.device, dtype=q.dtype)
    if total == 0 or cfg.max_len == 0:
        return out
    grid = (batch * heads, triton.cdiv(cfg.max_len, cfg.block_m))
    _fwd[grid](
        q, k, v, bias if bias is not None else q, out, seq_offsets,
        num_targets if num_targets is not None else seq_offsets,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        *_bias_strides(bias),
        cfg.alpha, 1.0 / cfg.normalizer, cfg.contextual_seq_len, cfg.max_attn_len, cfg.min_full_attn_seq_len,
        heads, dqk, dv,
        **_flags(cfg, num_targets, bias is not None),
        INPUT_PRECISION=_input_precision(q.dtype),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_DQK=_pow2_at_least_16(dqk), BLOCK_DV=_pow2_at_least_16(dv),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out


def _backward(dout, q, k, v, seq_offsets, num_targets, bias, bias_needs_grad: bool, cfg: _Config):
    total, heads, dqk = q.shape
    dv_dim = v.shape[2]
    batch = seq_offsets.shape[0] - 1
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    dbias = None
    if bias_needs_grad:
        # Per-head dS, summed over heads (and over the batch for a broadcast [1, W, W] bias) below.
        dbias_heads = torch.zeros(batch, heads, cfg.max_len, cfg.max_len, device=q.device, dtype=torch.float32)
    if total == 0 or cfg.max_len == 0:
        if bias_needs_grad:
            dbias = torch.zeros_like(bias)
        return dq, dk, dv, dbias
    flags = _flags(cfg, num_targets, bias is not None)
    common = dict(
        INPUT_PRECISION=_input_precision(q.dtype), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        BLOCK_DQK=_pow2_at_least_16(dqk), BLOCK_DV=_pow2_at_least_16(dv_dim),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    bias_arg = bias if bias is not None else q
    targets_arg = num_targets if num_targets is not None else seq_offsets
    scalars = (cfg.alpha, 1.0 / cfg.normalizer, cfg.contextual_seq_len, cfg.max_attn_len,
               cfg.min_full_attn_seq_len, heads, dqk, dv_dim)
    _bwd_dkdv[(batch * heads, triton.cdiv(cfg.max_len, cfg.block_n))](
        q, k, v, bias_arg, dout, dk, dv, seq_offsets, targets_arg,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        dout.stride(0), dout.stride(1), dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
        *_bias_strides(bias), *scalars, **flags, **common,
    )
    dbias_arg = dbias_heads if bias_needs_grad else q
    dbias_strides = dbias_heads.stride() if bias_needs_grad else (0, 0, 0, 0)
    _bwd_dq[(batch * heads, triton.cdiv(cfg.max_len, cfg.block_m))](
        q, k, v, bias_arg, dout, dq, dbias_arg, seq_offsets, targets_arg,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        dout.stride(0), dout.stride(1), dq.stride(0), dq.stride(1),
        *_bias_strides(bias), *dbias_strides, *scalars, **flags, STORE_DBIAS=bias_needs_grad, **common,
    )
    if bias_needs_grad:
        summed = dbias_heads.sum(dim=1)  # [B, max_len, max_len]
        if bias.shape[0] == 1:
            summed = summed.sum(dim=0, keepdim=True)
        dbias = torch.zeros(bias.shape, device=bias.device, dtype=bias.dtype)
        dbias[:, : cfg.max_len, : cfg.max_len] = summed.to(bias.dtype)
    return dq, dk, dv, dbias


class HSTUAttentionFunction(torch.autograd.Function):
    """Autograd for the Triton kernels: forward saves only the inputs; backward recomputes S tile by tile."""

    @staticmethod
    def forward(ctx, q, k, v, seq_offsets, num_targets, attn_bias, cfg: _Config):
        q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
        out = _forward(q, k, v, seq_offsets, num_targets, attn_bias, cfg)
        ctx.save_for_backward(q, k, v, seq_offsets, num_targets, attn_bias)
        ctx.cfg = cfg
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, seq_offsets, num_targets, attn_bias = ctx.saved_tensors
        bias_needs_grad = attn_bias is not None and ctx.needs_input_grad[5]
        dq, dk, dv, dbias = _backward(_last_dim_contiguous(dout), q, k, v, seq_offsets, num_targets, attn_bias,
                                      bias_needs_grad, ctx.cfg)
        return dq, dk, dv, None, None, dbias, None


def triton_hstu_attention(
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
    block_m: Optional[int] = None,
    block_n: Optional[int] = None,
) -> torch.Tensor:
    """Jagged HSTU attention with the Triton kernels (inputs as in `hstu_attention`, already validated there).

    Runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1.  `block_m` / `block_n` override the tile
    sizes (powers of two >= 16); `max_len` is the longest sequence (computed here when not given).
    """
    if not INTERPRETED and not q.is_cuda:
        raise RuntimeError(
            "the Triton HSTU attention kernels need CUDA tensors; on CPU they run only under the Triton "
            "interpreter, which needs TRITON_INTERPRET=1 in the environment before triton is first imported. "
            "Use kernel='pytorch' (or 'auto') for CPU tensors."
        )
    if max_len is None:
        lengths = seq_offsets[1:] - seq_offsets[:-1]
        max_len = int(lengths.max()) if lengths.numel() else 0
    bm, bn, warps, stages = default_blocks(q.shape[2], v.shape[2], q.dtype)
    for name, value in (("block_m", block_m), ("block_n", block_n)):
        if value is not None and (value < 16 or value & (value - 1)):
            raise ValueError(f"triton_hstu_attention: {name} must be a power of two >= 16, got {value}")
    cfg = _Config(
        normalizer=float(max_seq_len), alpha=float(alpha), causal=bool(causal),
        contextual_seq_len=int(contextual_seq_len), max_attn_len=int(max_attn_len),
        min_full_attn_seq_len=int(min_full_attn_seq_len), max_len=int(max_len),
        block_m=block_m or bm, block_n=block_n or bn, num_warps=warps, num_stages=stages,
    )
    return HSTUAttentionFunction.apply(q, k, v, seq_offsets, num_targets, attn_bias, cfg)
