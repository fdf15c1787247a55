"""The shared STU layer and stack (merlin_hstu.encoders.stu): the relative bias's two query-time rules against plain
loops over the formulas, cached decoding against the full forward, and the Triton kernels against PyTorch.

Plain bias formulas (module docstring of merlin_hstu/encoders/stu.py), N = max_seq_len:

    rab[b,i,j]  = (w_pos[clamp(p_j - p_i, -(N-1), N-1) + N - 1] + w_time[bucket(tq_i - t_j)]) * keep
    bucket(dt)  = clamp(floor(ln(max(|dt|, 1)) / 0.301), 0, num_time_buckets)
    next_event  p = slot index, tq_i = t[min(i + 1, W - 1)], keep = 1                       (retrieval)
    own_time    p, t given per token, tq_i = t_i, keep = 0 where token i or j is contextual  (ranking)

Cached decoding: rows are independent sums, so encoding R new tokens against the K, V of the S tokens before
them gives the full forward's rows S..S+R-1 exactly (up to float64 rounding), for retrieval's causal mask and for
ranking's target-aware mask with a contextual prefix.
"""
from __future__ import annotations

import math
import os

import pytest
import torch

from merlin_hstu.encoders.stu import (
    HSTUEncoderConfig,
    STUStack,
    TokenMeta,
)
from merlin_hstu.kernels.dispatch import resolve_kernel

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

ATOL = 1e-10


def config(**kw) -> HSTUEncoderConfig:
    base = dict(embedding_dim=8, num_blocks=2, num_heads=2, attention_dim=3, linear_dim=4, max_seq_len=20,
                linear_dropout=0.0, num_time_buckets=40, kernel="pytorch")
    base.update(kw)
    return HSTUEncoderConfig(**base)


def build_stack(cfg: HSTUEncoderConfig, seed: int = 0, dtype=torch.float64) -> STUStack:
    """A stack with weights big enough that every bias entry and every key visibly moves the outputs."""
    torch.manual_seed(seed)
    stack = STUStack(cfg).to(dtype).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in stack.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64).to(dtype) * 0.7)
    return stack


# ----------------------------------------------------------------------------------------------------------
# Plain bias
# ----------------------------------------------------------------------------------------------------------
def plain_bucket(dt: float, num_buckets: int) -> int:
    return min(max(math.floor(math.log(max(abs(dt), 1.0)) / 0.301), 0), num_buckets)


def plain_rel(pj: int, pi: int, n: int) -> int:
    return min(max(pj - pi, -(n - 1)), n - 1) + n - 1


def plain_next_event_bias(w_pos, w_time, times, rows, n, num_buckets):
    """times [B, W] (python floats); rows: query slots -> [B, R, W]."""
    batch, width = len(times), len(times[0])
    out = torch.zeros(batch, len(rows), width, dtype=torch.float64)
    for b in range(batch):
        for r, i in enumerate(rows):
            tq = times[b][min(i + 1, width - 1)]
            for j in range(width):
                out[b, r, j] = w_pos[plain_rel(j, i, n)] + w_time[plain_bucket(tq - times[b][j], num_buckets)]
    return out


def plain_own_time_bias(w_pos, w_time, query, key, n, num_buckets):
    """query / key: per row lists of (position, time, contextual) -> [B, R, W]."""
    out = torch.zeros(len(key), len(query[0]), len(key[0]), dtype=torch.float64)
    for b in range(len(key)):
        for i, (pi, ti, ci) in enumerate(query[b]):
            for j, (pj, tj, cj) in enumerate(key[b]):
                if not (ci or cj):
                    out[b, i, j] = w_pos[plain_rel(pj, pi, n)] + w_time[plain_bucket(ti - tj, num_buckets)]
    return out


def layer_tables(stack: STUStack, layer: int = 0):
    rb = stack.layers[layer].relative_bias
    return rb.position_weights.detach().tolist(), rb.time_weights.detach().tolist()


def test_next_event_rule_matches_plain_loops():
    cfg = config(max_seq_len=9, num_time_buckets=30)
    stack = build_stack(cfg)
    # Gaps hit bucket 0 (equal times, dt < 1.36), middle buckets, the clamp at 30 (dt > e^(30 * 0.301) = 8.4e3)
    # and negative gaps (a next time before the key's).
    times = torch.tensor([[0.0, 0.0, 0.5, 2.0, 12.0, 1e3, 1e5, 1e5 + 3.0, 40.0],
                          [7.0, 3.0, 3.0, 1e4, 1e4 + 2.0, 5.0, 5.0, 9.0, 1e6]], dtype=torch.float64)
    key = TokenMeta(torch.arange(9).unsqueeze(0), times)
    w_pos, w_time = layer_tables(stack, 1)
    for rows in (None, torch.tensor([0, 4, 8]), torch.arange(6, 9)):
        index = stack.bias_index(key, rule="next_event", rows=rows)
        got = stack.layers[1].relative_bias(index)
        slots = list(range(9)) if rows is None else rows.tolist()
        want = plain_next_event_bias(w_pos, w_time, times.tolist(), slots, cfg.max_seq_len, cfg.num_time_buckets)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    # The rule really is "next": the last row keeps its own time, every other row uses the next slot's.
    buckets = stack.bias_index(key, rule="next_event").time_bucket
    assert buckets[1, 2, 3].item() == plain_bucket(1e4 - 1e4, 30) == 0  # row 2's query time is t[3] = 1e4
    assert buckets[1, 8, 8].item() == 0 and buckets[1, 7, 8].item() == 0  # row 7 asks at t[8] = 1e6
    # ... and differs from the own-time rule on the same tokens.
    with torch.no_grad():
        own = stack.layers[1].relative_bias(stack.bias_index(key, rule="own_time"))
        nxt = stack.layers[1].relative_bias(stack.bias_index(key, rule="next_event"))
    assert float((own - nxt).abs().max()) > 1e-3


def test_own_time_rule_matches_plain_loops():
    cfg = config(max_seq_len=6, num_time_buckets=25)
    stack = build_stack(cfg, seed=3)
    # Two users: [contextual x2 | events (positions 0.., two tokens per event for the first) | candidates].
    # Position gaps up to 11 pass the clamp at N - 1 = 5 on both sides.
    users = [
        [(0, 0, True), (0, 0, True), (0, 100, False), (0, 100, False), (1, 101, False), (1, 101, False),
         (4, 5_000, False), (4, 5_000, False), (11, 9e6, False), (11, 10, False)],
        [(0, 0, True), (0, 0, True), (0, 50, False), (3, 51, False), (5, 2e4, False), (6, 2e4, False),
         (6, 1.0, False), (6, 4e5, False), (0, 0, False), (0, 0, False)],  # the last two: padding slots
    ]

    def meta(rows):
        return TokenMeta(torch.tensor([[p for p, _, _ in r] for r in rows]),
                         torch.tensor([[t for _, t, _ in r] for r in rows], dtype=torch.float64),
                         torch.tensor([[c for _, _, c in r] for r in rows]))

    key = meta(users)
    w_pos, w_time = layer_tables(stack)
    want = plain_own_time_bias(w_pos, w_time, users, users, cfg.max_seq_len, cfg.num_time_buckets)
    got = stack.layers[0].relative_bias(stack.bias_index(key, rule="own_time"))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    # rows, and explicit query metadata (candidates scored against keys that include them)
    rows = torch.tensor([1, 6, 8])
    got = stack.layers[0].relative_bias(stack.bias_index(key, rule="own_time", rows=rows))
    torch.testing.assert_close(got, want[:, rows], rtol=0, atol=1e-12)
    query_rows = [[(7, 3e6, False), (0, 0, True)], [(2, 60, False), (9, 2e4, False)]]
    got = stack.layers[0].relative_bias(stack.bias_index(key, rule="own_time", query=meta(query_rows)))
    want = plain_own_time_bias(w_pos, w_time, query_rows, users, cfg.max_seq_len, cfg.num_time_buckets)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    assert (got[0, 1] == 0).all() and (got[:, :, :2] == 0).all()  # contextual rows and columns get no bias


def test_bias_parts_switch_off_and_bad_use_raises():
    times = torch.tensor([[1.0, 5.0, 30.0]], dtype=torch.float64)
    key = TokenMeta(torch.arange(3).unsqueeze(0), times)
    pos_only = build_stack(config(time_bias=False))
    index = pos_only.bias_index(TokenMeta(key.position), rule="next_event")  # no timestamps needed
    w_pos = pos_only.layers[0].relative_bias.position_weights.detach()
    want = torch.tensor([[[w_pos[j - i + 19].item() for j in range(3)] for i in range(3)]], dtype=torch.float64)
    torch.testing.assert_close(pos_only.layers[0].relative_bias(index), want, rtol=0, atol=0)
    assert build_stack(config(time_bias=False, position_bias=False)).bias_index(key, rule="own_time") is None
    with pytest.raises(ValueError, match="no timestamps were given"):
        build_stack(config()).bias_index(TokenMeta(key.position), rule="next_event")
    with pytest.raises(ValueError, match="rule must be one of"):
        build_stack(config()).bias_index(key, rule="previous")


# ----------------------------------------------------------------------------------------------------------
# Cached decoding == the full forward's rows
# ----------------------------------------------------------------------------------------------------------
def full_forward(stack, x, bias, **mask):
    length = x.shape[0]
    token_mask = torch.ones(1, bias_width(bias), dtype=torch.bool)
    token_mask[0, length:] = False
    return stack(x, token_mask, torch.tensor([length]), bias, **mask)


def bias_width(index):
    return index.relative_position.shape[-1]


@pytest.mark.parametrize("split", [(4,), (1, 3), (2, 1, 1)], ids=["one-pass", "1+3", "2+1+1"])
def test_cached_forward_equals_full_forward_retrieval_causal(split):
    """Retrieval: prefix of S tokens cached, then R new tokens; slot L holds the query time of the last row."""
    cfg = config(max_seq_len=20)
    stack = build_stack(cfg, seed=5)
    length = 11
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(length, cfg.embedding_dim, generator=gen, dtype=torch.float64)
    times = torch.cat([torch.randint(0, 10**6, (length,), generator=gen).sort().values.double(),
                       torch.tensor([2e6], dtype=torch.float64)]).unsqueeze(0)  # [1, L + 1]
    key = TokenMeta(torch.arange(length + 1).unsqueeze(0), times)
    full = full_forward(stack, x, stack.bias_index(key, rule="next_event"))
    cache = stack.new_cache(dtype=torch.float64)
    start = length - sum(split)
    with torch.no_grad():
        # Prefill: the prefix's rows against the prefix's keys; the index's extra column (slot S, the next event's
        # time) is what row S-1 asks at, and the attention ignores it.
        stack.cached_forward(x[:start], cache, stack.bias_index(key[:, :start + 1], rule="next_event",
                                                                rows=torch.arange(start)), append=True)
        for r in split:
            rows = torch.arange(start, start + r)
            bias = stack.bias_index(key[:, :start + r + 1], rule="next_event", rows=rows)
            scratch = stack.cached_forward(x[start:start + r], cache, bias)  # not appended: same rows
            got = stack.cached_forward(x[start:start + r], cache, bias, append=True)
            torch.testing.assert_close(got, full[start:start + r], rtol=0, atol=ATOL)
            torch.testing.assert_close(scratch, got, rtol=0, atol=0)
            start += r
    assert all(c.length == length for c in cache)
    # Not trivially equal: without the cached prefix the last rows come out different.
    alone = stack.cached_forward(x[-split[-1]:], stack.new_cache(dtype=torch.float64), stack.bias_index(
        TokenMeta(key.position[:, :split[-1] + 1], times[:, -split[-1] - 1:]), rule="next_event",
        rows=torch.arange(split[-1])))
    assert float((alone - full[-split[-1]:]).abs().max()) > 1e-3


@pytest.mark.parametrize("full_ctx", [False, True], ids=["ctx-causal", "ctx-full"])
def test_cached_forward_equals_full_forward_ranking_target_aware(full_ctx):
    """Ranking: [contextual c | history | m candidates] with the target-aware mask; the history is cached once and
    each micro-batch of candidates is scored against it (not appended), as M-FALCON does."""
    cfg = config(max_seq_len=24)
    stack = build_stack(cfg, seed=7)
    c, n, m = 2, 9, 5
    length = c + n + m
    ctx_len = c if full_ctx else 0
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(length, cfg.embedding_dim, generator=gen, dtype=torch.float64)
    position = torch.cat([torch.zeros(c, dtype=torch.long), torch.arange(n), torch.full((m,), n)])
    time = torch.cat([torch.zeros(c), torch.randint(1, 10**6, (n,), generator=gen).sort().values.double(),
                      1e6 + torch.randint(0, 10**5, (m,), generator=gen).double()])
    contextual = torch.arange(length) < c
    meta = TokenMeta(position, time, contextual)
    full = full_forward(stack, x, stack.bias_index(meta[None], rule="own_time"), num_targets=torch.tensor([m]),
                        contextual_seq_len=ctx_len)
    cache = stack.new_cache(dtype=torch.float64)
    s = c + n
    with torch.no_grad():
        stack.cached_forward(x[:s], cache, stack.bias_index(meta[None, :s], rule="own_time"),
                             contextual_seq_len=ctx_len, append=True)
        for lo, hi in ((0, 2), (2, 5)):  # two micro-batches of candidates
            cand = meta[s + lo:s + hi]
            bias = stack.bias_index(meta[:s].cat(cand)[None], rule="own_time", query=cand[None])
            got = stack.cached_forward(x[s + lo:s + hi], cache, bias, num_targets=hi - lo, contextual_seq_len=ctx_len)
            torch.testing.assert_close(got, full[s + lo:s + hi], rtol=0, atol=ATOL)
    assert all(layer.length == s for layer in cache)  # candidates were never appended
    # Candidates never see each other: one candidate alone against the cache gives the same row.
    alone = stack.cached_forward(x[s + 3:s + 4], cache, stack.bias_index(
        meta[:s].cat(meta[s + 3:s + 4])[None], rule="own_time", query=meta[None, s + 3:s + 4]), num_targets=1,
        contextual_seq_len=ctx_len)
    torch.testing.assert_close(alone, full[s + 3:s + 4], rtol=0, atol=ATOL)
    # ... but they do see the history: dropping the cache changes them.
    empty = stack.new_cache(dtype=torch.float64)
    bare = stack.cached_forward(x[s:], empty, stack.bias_index(meta[None, s:], rule="own_time"), num_targets=m)
    assert float((bare - full[s:]).abs().max()) > 1e-3


def test_cached_forward_checks_its_cache():
    cfg = config(max_seq_len=6)
    stack = build_stack(cfg)
    x = torch.randn(7, cfg.embedding_dim, dtype=torch.float64)
    key = TokenMeta(torch.arange(7).unsqueeze(0), torch.arange(7).double().unsqueeze(0))
    with torch.no_grad(), pytest.raises(ValueError, match="exceed the cache's 6 slots"):
        stack.cached_forward(x, stack.new_cache(dtype=torch.float64), stack.bias_index(key, rule="next_event"))
    with pytest.raises(ValueError, match="one cache per layer"):
        stack.cached_forward(x[:2], stack.new_cache(dtype=torch.float64)[:1], None)


# ----------------------------------------------------------------------------------------------------------
# The kernel switch reaches the stack and the cached path through the op's dispatch
# ----------------------------------------------------------------------------------------------------------
def test_rows_op_routes_triton_to_pytorch_in_the_dispatch():
    x = torch.zeros(2)
    assert resolve_kernel("triton", x) == "triton"
    assert resolve_kernel("triton", x, op="hstu_attention_rows") == "pytorch"
    with pytest.raises(ValueError, match="op must be one of"):
        resolve_kernel("pytorch", x, op="flash")
    # A stack configured for Triton decodes from a cache with the same numbers as one configured for PyTorch.
    ref = build_stack(config(), seed=9)
    tri = STUStack(config(kernel="triton")).double().eval()
    tri.load_state_dict(ref.state_dict())
    x = torch.randn(6, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(10))
    key = TokenMeta(torch.arange(6).unsqueeze(0), torch.arange(6).double().unsqueeze(0) * 100.0)
    outs = []
    with torch.no_grad():
        for stack in (ref, tri):
            cache = stack.new_cache(dtype=torch.float64)
            outs.append(stack.cached_forward(x, cache, stack.bias_index(key, rule="next_event"), append=True))
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)


INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


@pytest.mark.skipif(not INTERPRET, reason="the Triton kernels run on CPU only under the interpreter: set "
                                          "TRITON_INTERPRET=1 before starting pytest (`make test` does)")
def test_stack_forward_and_backward_triton_equals_pytorch():
    pytest.importorskip("triton")
    cfg_kw = dict(embedding_dim=8, num_blocks=2, num_heads=2, attention_dim=4, linear_dim=6, max_seq_len=24)
    ref = build_stack(config(**cfg_kw), seed=11, dtype=torch.float32)
    tri = STUStack(config(kernel="triton", **cfg_kw)).eval()
    tri.load_state_dict(ref.state_dict())
    # Three users laid out as [contextual 2 | history | candidates], the ranking mask with every feature.
    lengths = torch.tensor([9, 3, 13])
    num_targets = torch.tensor([3, 1, 4])
    width = int(lengths.max())
    token_mask = torch.arange(width).unsqueeze(0) < lengths.unsqueeze(1)
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(int(lengths.sum()), 8, generator=gen)
    slot = torch.arange(width).expand(3, -1)
    events = (slot - 2).clamp(min=0)
    position = torch.minimum(events, (lengths - 2 - num_targets).unsqueeze(1))  # candidates: one past the history
    time = torch.randint(0, 10**6, (3, width), generator=gen).sort(dim=1).values
    meta = TokenMeta(position, time, slot < 2)
    outs, grads = [], []
    for stack in (ref, tri):
        xi = x.clone().requires_grad_(True)
        out = stack(xi, token_mask, lengths, stack.bias_index(meta, rule="own_time"), num_targets=num_targets,
                    contextual_seq_len=2)
        loss = (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(13))).sum()
        names = [name for name, _ in stack.named_parameters()]
        grads.append(dict(zip(names + ["input"], torch.autograd.grad(loss, list(stack.parameters()) + [xi]))))
        outs.append(out)

    def close(got, want, what):  # fp32 with different summation orders, through layer norms
        torch.testing.assert_close(got, want, rtol=1e-4, atol=2e-5 * float(want.abs().max()),
                                   msg=lambda m: f"{what}: {m}")

    close(outs[1].detach(), outs[0].detach(), "output")
    assert float((outs[0] - x).detach().abs().max()) > 1e-2
    for name, g in grads[0].items():
        close(grads[1][name], g, name)
    assert float(grads[0]["layers.0.relative_bias.time_weights"].abs().max()) > 0
    assert float(grads[0]["layers.1.relative_bias.position_weights"].abs().max()) > 0
