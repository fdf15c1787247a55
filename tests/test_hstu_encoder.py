"""Independent numeric tests of the HSTU encoder (research variant, reference-hstu.md §1.3-§1.4).

The module under test is `merlin_hstu.encoders.hstu` (plus the attention op in `merlin_hstu.kernels.attention_ops`).
This file carries its own plain implementation of the formulas, written with explicit loops over sequences,
positions and heads and touching only the raw parameter tensors taken from the module's state_dict.  It never
calls the module's helpers, so an error in the module cannot cancel out against the same error here.

Plain formulas, per sequence of length L (reference-hstu.md §1.4), N = max_seq_len:

    xn          = LN(x_i)                                   no affine, eps 1e-6, over D
    u|v|q|k     = SiLU(xn @ W_uvqk)                         one bias-free projection, split in that order;
                                                            inside each part, head h owns columns [h*d, (h+1)*d)
    S[h,i,j]    = q_i[h] . k_j[h] + rab[i,j]                no 1/sqrt(d)
    A[h,i,j]    = SiLU(S[h,i,j]) / N  for j <= i (else 0)
    O_i[h]      = sum_j A[h,i,j] v_j[h]                     heads concatenated -> [H*dv]
    y_i         = u_i * LN(O_i)                             LN over all H*dv together
    out_i       = x_i + W_o y_i + b_o
    rab[i,j]    = w_pos[j - i + N - 1] + w_time[bucket(tq_i - t_j)]
    bucket(dt)  = clamp(floor(ln(max(|dt|, 1)) / 0.301), 0, 128)
    tq_i        = t_{i+1} (the next event's time; for the last real position, the target's time)

All numeric comparisons run in float64 with dropout off.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import pytest
import torch

from merlin_hstu.encoders.hstu import HSTUEncoder, HSTUEncoderConfig, STULayer, time_bucket_ids

EPS = 1e-6
ATOL = 1e-6
DIVISOR = 0.301
MAX_BUCKET = 128


# ----------------------------------------------------------------------------------------------------------
# Plain implementation
# ----------------------------------------------------------------------------------------------------------
def plain_silu(z: torch.Tensor) -> torch.Tensor:
    return z / (1.0 + torch.exp(-z))


def plain_layer_norm(vec: torch.Tensor) -> torch.Tensor:
    """LayerNorm of a 1-D vector without affine parameters (biased variance, eps 1e-6)."""
    n = vec.shape[0]
    mean = vec.sum() / n
    var = ((vec - mean) ** 2).sum() / n
    return (vec - mean) / torch.sqrt(var + EPS)


def plain_bucket(dt: float) -> int:
    gap = max(abs(dt), 1.0)
    return min(max(math.floor(math.log(gap) / DIVISOR), 0), MAX_BUCKET)


@dataclass
class PlainLayerParams:
    uvqk: torch.Tensor  # [D, 2*H*dv + 2*H*dqk]
    out_weight: torch.Tensor  # [D, H*dv]
    out_bias: torch.Tensor  # [D]
    pos_weights: Optional[torch.Tensor]  # [2N - 1] or None
    time_weights: Optional[torch.Tensor]  # [129] or None


def params_from_state_dict(state: dict, prefix: str = "") -> PlainLayerParams:
    def get(name: str) -> Optional[torch.Tensor]:
        value = state.get(prefix + name)
        return None if value is None else value.detach().clone()

    return PlainLayerParams(
        uvqk=get("uvqk"),
        out_weight=get("output.weight"),
        out_bias=get("output.bias"),
        pos_weights=get("relative_bias.position_weights"),
        time_weights=get("relative_bias.time_weights"),
    )


def plain_stu_sequence(
    x: torch.Tensor,
    p: PlainLayerParams,
    heads: int,
    dqk: int,
    dv: int,
    n: int,
    event_times: Optional[list[float]],
    query_times: Optional[list[float]],
    buckets_seen: Optional[set] = None,
) -> torch.Tensor:
    """One STU layer on one sequence x [L, D]; query_times[i] is the time row i's prediction is made."""
    length = x.shape[0]
    us, vs, qs, ks = [], [], [], []
    for i in range(length):
        proj = plain_silu(plain_layer_norm(x[i]) @ p.uvqk)
        c = 0
        us.append(proj[c : c + heads * dv]); c += heads * dv
        vs.append(proj[c : c + heads * dv]); c += heads * dv
        qs.append(proj[c : c + heads * dqk]); c += heads * dqk
        ks.append(proj[c : c + heads * dqk]); c += heads * dqk
        assert c == proj.shape[0]

    out = torch.empty_like(x)
    for i in range(length):
        o = torch.zeros(heads * dv, dtype=x.dtype)
        for h in range(heads):
            q_ih = qs[i][h * dqk : (h + 1) * dqk]
            for j in range(i + 1):  # causal: keys j <= i only
                s = torch.dot(q_ih, ks[j][h * dqk : (h + 1) * dqk])
                if p.pos_weights is not None:
                    s = s + p.pos_weights[j - i + n - 1]
                if p.time_weights is not None:
                    bucket = plain_bucket(query_times[i] - event_times[j])
                    if buckets_seen is not None:
                        buckets_seen.add(bucket)
                    s = s + p.time_weights[bucket]
                a = plain_silu(s) / n
                o[h * dv : (h + 1) * dv] += a * vs[j][h * dv : (h + 1) * dv]
        y = us[i] * plain_layer_norm(o)
        out[i] = x[i] + p.out_weight @ y + p.out_bias
    return out


def next_time_queries(event_times: list[float], target_time: float) -> list[float]:
    """Row i's query time: the next event's timestamp, and the target's for the last position."""
    return list(event_times[1:]) + [target_time]


def plain_encoder_sequence(x, layers, cfg, event_times, target_time, buckets_seen=None):
    query = None if event_times is None else next_time_queries(event_times, target_time)
    for p in layers:
        x = plain_stu_sequence(
            x, p, cfg.num_heads, cfg.attention_dim, cfg.linear_dim, cfg.max_seq_len, event_times, query,
            buckets_seen,
        )
    return x


def plain_params(encoder: HSTUEncoder) -> list[PlainLayerParams]:
    state = encoder.state_dict()
    return [params_from_state_dict(state, f"layers.{i}.") for i in range(encoder.config.num_blocks)]


# ----------------------------------------------------------------------------------------------------------
# Test data
# ----------------------------------------------------------------------------------------------------------
# Ragged sequences: (event times, target time).  The gaps were picked to hit bucket 0 (equal times, dt < 1.36),
# middle buckets (dt 2, 10, 64, 1e3, 3e6, 1e9), both sides of the clamp (dt 5e16 -> 127, 6e16 and 2e17 -> 128),
# and negative gaps (a query time before the key time, e.g. the target of sequence 3).
SEQUENCES: list[tuple[list[float], float]] = [
    ([0.0, 0.0, 0.5, 2.0, 12.0], 1012.0),
    ([1e9, 1e9 + 3.0], 1e9 + 3e6),
    ([0.0, 3.0, 67.0, 5e16, 6e16, 2e17, 2e17 + 64.0], 2e17 + 1e9),
    ([500.0, 100.0, 100.0, 7000.0], 50.0),
    ([42.0], 42.0),
]


def small_config(**overrides) -> HSTUEncoderConfig:
    kwargs = dict(
        embedding_dim=6, num_blocks=2, num_heads=2, attention_dim=3, linear_dim=4, max_seq_len=12,
        linear_dropout=0.0,
    )
    kwargs.update(overrides)
    return HSTUEncoderConfig(**kwargs)


def build_encoder(cfg: HSTUEncoderConfig, seed: int = 0) -> HSTUEncoder:
    """float64 encoder with parameters scaled up so every term (incl. each bias table entry) moves the output."""
    torch.manual_seed(seed)
    enc = HSTUEncoder(cfg).double().eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for layer in enc.layers:
            layer.uvqk.copy_(torch.randn(layer.uvqk.shape, generator=gen, dtype=torch.float64) * 0.5)
            rb = layer.relative_bias
            for w in (rb.position_weights, rb.time_weights):
                if w is not None:
                    w.copy_(torch.randn(w.shape, generator=gen, dtype=torch.float64))
    return enc


def make_tokens(lengths: list[int], dim: int, seed: int = 7) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(length, dim, generator=gen, dtype=torch.float64) for length in lengths]


def pad_batch(tokens, sequences, width: int, garbage: bool = True, seed: int = 11):
    """Right-padded x [B, W, D] and timestamps [B, W] (events, then the target time at slot len_b, if it fits).

    Slots past what the encoder may read are filled with garbage, so a leak shows up as a mismatch.
    """
    gen = torch.Generator().manual_seed(seed)
    batch, dim = len(tokens), tokens[0].shape[1]
    x = torch.randn(batch, width, dim, generator=gen, dtype=torch.float64) * 100.0
    ts = torch.rand(batch, width, generator=gen, dtype=torch.float64) * 1e12
    if not garbage:
        x.zero_()
        ts.zero_()
    for b, (tok, (events, target)) in enumerate(zip(tokens, sequences)):
        length = tok.shape[0]
        x[b, :length] = tok
        ts[b, :length] = torch.tensor(events, dtype=torch.float64)
        if length < width:
            ts[b, length] = target
    lengths = torch.tensor([t.shape[0] for t in tokens], dtype=torch.long)
    return x, lengths, ts


def jagged_batch(tokens, sequences):
    values = torch.cat(tokens, dim=0)
    lengths = torch.tensor([t.shape[0] for t in tokens], dtype=torch.long)
    offsets = torch.zeros(len(tokens) + 1, dtype=torch.long)
    offsets[1:] = torch.cumsum(lengths, 0)
    ts_values = torch.tensor([t for events, _ in sequences for t in events], dtype=torch.float64)
    query = torch.tensor([target for _, target in sequences], dtype=torch.float64)
    return values, offsets, ts_values, query


def plain_batch(enc, tokens, sequences, use_time=True, buckets_seen=None):
    layers = plain_params(enc)
    outs = []
    for tok, (events, target) in zip(tokens, sequences):
        outs.append(
            plain_encoder_sequence(
                tok, layers, enc.config, events if use_time else None, target, buckets_seen
            )
        )
    return outs


def assert_close(got: torch.Tensor, want: torch.Tensor, atol: float = ATOL) -> None:
    torch.testing.assert_close(got, want, atol=atol, rtol=0.0)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().abs().max())


# ----------------------------------------------------------------------------------------------------------
# Time buckets
# ----------------------------------------------------------------------------------------------------------
def test_time_bucket_ids_hand_computed():
    # bucket = clamp(floor(ln(max(|dt|, 1)) / 0.301), 0, 128), by hand:
    #   dt = 0      -> ln(1) = 0                                   -> 0
    #   dt = 0.5    -> max(0.5, 1) = 1 -> 0                        -> 0
    #   dt = 1      -> 0                                           -> 0
    #   dt = 1.35   -> ln 1.35 = 0.30010 / 0.301 = 0.997           -> 0
    #   dt = 1.36   -> ln 1.36 = 0.30748 / 0.301 = 1.0215          -> 1
    #   dt = 2      -> 0.693147 / 0.301 = 2.3028                   -> 2
    #   dt = 3      -> 1.098612 / 0.301 = 3.6499                   -> 3
    #   dt = -3     -> |dt| = 3                                    -> 3
    #   dt = 10     -> 2.302585 / 0.301 = 7.6498                   -> 7
    #   dt = 1e3    -> 6.907755 / 0.301 = 22.9494                  -> 22
    #   dt = 1e9    -> 20.723266 / 0.301 = 68.8481                 -> 68
    #   dt = 5e16   -> 38.450799 / 0.301 = 127.7435                -> 127
    #   dt = 6e16   -> 38.633121 / 0.301 = 128.3492                -> 128
    #   dt = 1e60   -> 138.155106 / 0.301 = 458.99 -> clamp        -> 128
    gaps = [0.0, 0.5, 1.0, 1.35, 1.36, 2.0, 3.0, -3.0, 10.0, 1e3, 1e9, 5e16, 6e16, 1e60]
    expected = [0, 0, 0, 0, 1, 2, 3, 3, 7, 22, 68, 127, 128, 128]
    # query time i vs key time 0 (= 0): bucket ids[0, i, 0] is the bucket of gaps[i].
    query = torch.tensor([gaps], dtype=torch.float64)
    keys = torch.zeros(1, len(gaps), dtype=torch.float64)
    ids = time_bucket_ids(query, keys, 128)
    assert ids.shape == (1, len(gaps), len(gaps))
    assert ids.dtype == torch.int64
    assert ids[0, :, 0].tolist() == expected
    assert [plain_bucket(g) for g in gaps] == expected  # the plain helper agrees with the hand values
    # [b, i, j] is bucket(query[b, i] - key[b, j]), not the transpose.
    q2 = torch.tensor([[0.0, 1000.0]], dtype=torch.float64)
    k2 = torch.tensor([[10.0, 0.0]], dtype=torch.float64)
    assert time_bucket_ids(q2, k2, 128)[0].tolist() == [[7, 0], [22, 22]]
    # int64 unix timestamps keep second precision (1.7e9 + 2 - 1.7e9 = 2 -> bucket 2).
    qi = torch.tensor([[1_700_000_002]], dtype=torch.long)
    ki = torch.tensor([[1_700_000_000]], dtype=torch.long)
    assert time_bucket_ids(qi, ki, 128).item() == 2
    # The clamp follows num_buckets.
    assert time_bucket_ids(query, keys, 10)[0, :, 0].tolist() == [min(e, 10) for e in expected]


@pytest.mark.parametrize("block", [1, 7, 1 << 19])
def test_time_bucket_ids_blocked_equals_one_expression(monkeypatch, block):
    # The eager path works in place over blocks of rows; it must give the bits of the one-expression formula
    # (the traced form), for int64 unix times, broadcast [1, R] queries and blocks that do not divide B.
    import merlin_hstu.encoders.stu as stu

    monkeypatch.setattr(stu, "_TIME_BUCKET_BLOCK_ELEMENTS", block * 5 * 9)
    g = torch.Generator().manual_seed(3)
    keys = 1_600_000_000 + torch.randint(0, 10**8, (11, 9), generator=g)
    queries = 1_600_000_000 + torch.randint(0, 10**8, (11, 5), generator=g)

    def one_expression(q, k):
        dt = (q.to(torch.float64).unsqueeze(2) - k.to(torch.float64).unsqueeze(1)).abs()
        return (torch.log(dt.clamp(min=1.0)) / stu.TIME_BUCKET_DIVISOR).long().clamp(0, 40)

    for q, k in ((queries, keys), (queries[:1], keys), (queries, keys[:1])):
        got = time_bucket_ids(q, k, 40)
        assert got.dtype == torch.long and got.shape == (11 if q.shape[0] * k.shape[0] > 1 else 1, 5, 9)
        assert torch.equal(got, one_expression(q, k))
    traced = torch.jit.trace(lambda q, k: time_bucket_ids(q, k, 40), (queries, keys))
    assert torch.equal(traced(queries, keys), one_expression(queries, keys))


# ----------------------------------------------------------------------------------------------------------
# Numeric parity against the plain implementation
# ----------------------------------------------------------------------------------------------------------
def test_single_stu_layer_matches_plain():
    cfg = small_config(num_blocks=1)
    enc = build_encoder(cfg, seed=3)
    layer: STULayer = enc.layers[0]
    assert isinstance(layer, STULayer)
    lengths_list = [len(e) for e, _ in SEQUENCES]
    tokens = make_tokens(lengths_list, cfg.embedding_dim)
    width = max(lengths_list) + 1
    batch = len(tokens)
    token_mask = torch.arange(width).unsqueeze(0) < torch.tensor(lengths_list).unsqueeze(1)
    lengths = torch.tensor(lengths_list)
    # Padded query/key times built by hand; garbage in slots the layer must never read.
    gen = torch.Generator().manual_seed(5)
    key_times = torch.rand(batch, width, generator=gen, dtype=torch.float64) * 1e15
    query_times = torch.rand(batch, width, generator=gen, dtype=torch.float64) * 1e15
    for b, (events, target) in enumerate(SEQUENCES):
        key_times[b, : len(events)] = torch.tensor(events, dtype=torch.float64)
        query_times[b, : len(events)] = torch.tensor(next_time_queries(events, target), dtype=torch.float64)
    got = layer(torch.cat(tokens), token_mask, lengths, query_times, key_times)

    params = params_from_state_dict(layer.state_dict())
    buckets: set = set()
    want = torch.cat(
        [
            plain_stu_sequence(tok, params, 2, 3, 4, cfg.max_seq_len, ev, next_time_queries(ev, tg), buckets)
            for tok, (ev, tg) in zip(tokens, SEQUENCES)
        ]
    )
    assert got.shape == want.shape == (sum(lengths_list), cfg.embedding_dim)
    assert_close(got, want)
    # The data really exercises bucket 0, middle buckets and the clamp at 128.
    assert 0 in buckets and MAX_BUCKET in buckets and any(0 < b < MAX_BUCKET for b in buckets)

    # Sensitivity: the comparison would catch an off-by-one query time or a missing time bias.
    own_time = torch.cat(
        [
            plain_stu_sequence(tok, params, 2, 3, 4, cfg.max_seq_len, ev, ev, None)
            for tok, (ev, _) in zip(tokens, SEQUENCES)
        ]
    )
    assert max_diff(got, own_time) > 1e-3
    no_time = PlainLayerParams(params.uvqk, params.out_weight, params.out_bias, params.pos_weights, None)
    without_time = torch.cat(
        [plain_stu_sequence(tok, no_time, 2, 3, 4, cfg.max_seq_len, None, None) for tok in tokens]
    )
    assert max_diff(got, without_time) > 1e-3


def test_two_layer_encoder_padded_matches_plain():
    cfg = small_config(num_blocks=2)
    enc = build_encoder(cfg, seed=4)
    lengths_list = [len(e) for e, _ in SEQUENCES]
    tokens = make_tokens(lengths_list, cfg.embedding_dim, seed=8)
    x, lengths, ts = pad_batch(tokens, SEQUENCES, width=max(lengths_list) + 2)
    got = enc(x, lengths, ts)
    buckets: set = set()
    want = plain_batch(enc, tokens, SEQUENCES, buckets_seen=buckets)
    assert 0 in buckets and MAX_BUCKET in buckets and any(0 < b < MAX_BUCKET for b in buckets)
    for b, w in enumerate(want):
        length = w.shape[0]
        assert_close(got[b, :length], w)
        assert torch.count_nonzero(got[b, length:]) == 0  # padding positions come back as zeros
    # Both layers matter: the one-layer plain result is far away.
    one_layer = plain_encoder_sequence(
        tokens[2], plain_params(enc)[:1], cfg, SEQUENCES[2][0], SEQUENCES[2][1]
    )
    assert max_diff(got[2, : tokens[2].shape[0]], one_layer) > 1e-3


def test_padded_equals_jagged_and_plain():
    cfg = small_config()
    enc = build_encoder(cfg, seed=5)
    lengths_list = [len(e) for e, _ in SEQUENCES]
    tokens = make_tokens(lengths_list, cfg.embedding_dim, seed=9)
    x, lengths, ts = pad_batch(tokens, SEQUENCES, width=max(lengths_list) + 3)
    padded = enc(x, lengths, ts)
    values, offsets, ts_values, query = jagged_batch(tokens, SEQUENCES)
    jagged = enc.forward_jagged(values, offsets, ts_values, query)
    mask = torch.arange(x.shape[1]).unsqueeze(0) < lengths.unsqueeze(1)
    assert jagged.shape == values.shape
    assert_close(padded[mask], jagged, atol=1e-10)
    assert_close(jagged, torch.cat(plain_batch(enc, tokens, SEQUENCES)))


def test_jagged_default_query_time_is_last_event_time():
    cfg = small_config()
    enc = build_encoder(cfg, seed=6)
    tokens = make_tokens([len(e) for e, _ in SEQUENCES], cfg.embedding_dim, seed=10)
    values, offsets, ts_values, _ = jagged_batch(tokens, SEQUENCES)
    own_last = [(events, events[-1]) for events, _ in SEQUENCES]
    got = enc.forward_jagged(values, offsets, ts_values)
    assert_close(got, torch.cat(plain_batch(enc, tokens, own_last)))


# ----------------------------------------------------------------------------------------------------------
# Config switches
# ----------------------------------------------------------------------------------------------------------
def test_time_bias_off_has_no_time_params_and_needs_no_timestamps():
    cfg = small_config(time_bias=False)
    enc = build_encoder(cfg, seed=12)
    names = {name for name, _ in enc.named_parameters()}
    assert not any("time" in name for name in names), names
    assert all(layer.relative_bias.time_weights is None for layer in enc.layers)
    assert all(layer.relative_bias.position_weights is not None for layer in enc.layers)
    lengths_list = [len(e) for e, _ in SEQUENCES]
    tokens = make_tokens(lengths_list, cfg.embedding_dim, seed=13)
    x, lengths, ts = pad_batch(tokens, SEQUENCES, width=max(lengths_list) + 1)
    got = enc(x, lengths)  # no timestamps at all
    want = plain_batch(enc, tokens, SEQUENCES, use_time=False)
    for b, w in enumerate(want):
        assert_close(got[b, : w.shape[0]], w)
    values, offsets, _, _ = jagged_batch(tokens, SEQUENCES)
    assert_close(enc.forward_jagged(values, offsets), torch.cat(want))
    # Timestamps, if given anyway, have no effect when the time bias is off.
    assert_close(enc(x, lengths, ts), got, atol=1e-12)


def test_time_bias_on_without_timestamps_raises():
    cfg = small_config()
    enc = build_encoder(cfg, seed=14)
    seqs = [(SEQUENCES[0][0][:3], 0.0), SEQUENCES[1]]
    tokens = make_tokens([3, 2], cfg.embedding_dim)
    x, lengths, _ = pad_batch(tokens, seqs, width=4)
    with pytest.raises(ValueError, match="timestamps"):
        enc(x, lengths)
    values, offsets, _, _ = jagged_batch(tokens, seqs)
    with pytest.raises(ValueError, match="timestamps"):
        enc.forward_jagged(values, offsets)
    mask = torch.arange(4).unsqueeze(0) < lengths.unsqueeze(1)
    with pytest.raises(ValueError, match="timestamps"):
        enc.layers[0](x[mask], mask, lengths)


def test_position_bias_off_matches_plain():
    cfg = small_config(position_bias=False)
    enc = build_encoder(cfg, seed=15)
    assert all(layer.relative_bias.position_weights is None for layer in enc.layers)
    assert not any("position" in name for name, _ in enc.named_parameters())
    lengths_list = [len(e) for e, _ in SEQUENCES]
    tokens = make_tokens(lengths_list, cfg.embedding_dim, seed=16)
    x, lengths, ts = pad_batch(tokens, SEQUENCES, width=max(lengths_list) + 1)
    got = enc(x, lengths, ts)
    want = plain_batch(enc, tokens, SEQUENCES)
    for b, w in enumerate(want):
        assert_close(got[b, : w.shape[0]], w)


def test_no_bias_at_all_matches_plain():
    cfg = small_config(position_bias=False, time_bias=False)
    enc = build_encoder(cfg, seed=17)
    seqs = [([0.0] * n, 0.0) for n in (4, 1, 6)]  # times are unused: no time bias
    tokens = make_tokens([4, 1, 6], cfg.embedding_dim, seed=18)
    x, lengths, _ = pad_batch(tokens, seqs, width=7)
    got = enc(x, lengths)
    for b, w in enumerate(plain_batch(enc, tokens, seqs, use_time=False)):
        assert_close(got[b, : w.shape[0]], w)


# ----------------------------------------------------------------------------------------------------------
# Causality and the constant normaliser N
# ----------------------------------------------------------------------------------------------------------
def test_causality_tokens_and_timestamps():
    cfg = small_config()
    enc = build_encoder(cfg, seed=19)
    events = [0.0, 5.0, 40.0, 900.0, 3e4, 2e6, 8e7]
    target = 1e9
    length = len(events)
    (tok,) = make_tokens([length], cfg.embedding_dim, seed=20)
    x, lengths, ts = pad_batch([tok], [(events, target)], width=length + 1, garbage=False)
    base = enc(x, lengths, ts)[0]
    for pivot in range(1, length):
        # Tokens at positions j >= pivot may only change outputs at positions >= pivot.
        x2 = x.clone()
        x2[0, pivot:length] += torch.randn(length - pivot, cfg.embedding_dim, dtype=torch.float64)
        out = enc(x2, lengths, ts)[0]
        assert_close(out[:pivot], base[:pivot], atol=1e-12)
        assert max_diff(out[pivot:length], base[pivot:length]) > 1e-6
        # Timestamps at positions j >= pivot (the target's slot included).  Row i's query time is t[i+1],
        # so changing t[pivot] may legitimately change row pivot-1: only rows < pivot-1 must stay fixed.
        # Scaling by 1000 moves every affected gap by about 23 buckets.
        ts2 = ts.clone()
        ts2[0, pivot : length + 1] = ts[0, pivot : length + 1] * 1000.0 + 1e3
        out = enc(x, lengths, ts2)[0]
        assert_close(out[: pivot - 1], base[: pivot - 1], atol=1e-12)
        # ... and row pivot-1 does move: its query time is t[pivot], the next position's timestamp.
        assert max_diff(out[pivot - 1], base[pivot - 1]) > 1e-6


def test_outputs_do_not_depend_on_batch_mates_or_padded_width():
    cfg = small_config()
    enc = build_encoder(cfg, seed=21)
    short = SEQUENCES[3]  # length 4
    longer = SEQUENCES[2]  # length 7
    tok_short, tok_long = make_tokens([len(short[0]), len(longer[0])], cfg.embedding_dim, seed=22)
    # Jagged: alone (internal width 5) vs next to a longer sequence (internal width 8).
    v1, o1, t1, q1 = jagged_batch([tok_short], [short])
    alone = enc.forward_jagged(v1, o1, t1, q1)
    v2, o2, t2, q2 = jagged_batch([tok_long, tok_short], [longer, short])
    together = enc.forward_jagged(v2, o2, t2, q2)
    assert_close(together[len(longer[0]) :], alone, atol=1e-10)
    # Padded: the same sequence at widths 5, 8 and 12 (= max_seq_len), with garbage in the extra slots.
    outs = []
    for width in (5, 8, cfg.max_seq_len):
        x, lengths, ts = pad_batch([tok_short], [short], width=width, seed=width)
        outs.append(enc(x, lengths, ts)[0, : len(short[0])])
    for out in outs:
        assert_close(out, alone, atol=1e-10)
    # Sanity: N really is the configured constant (a normaliser of len or W would give a different answer).
    want = plain_encoder_sequence(tok_short, plain_params(enc), cfg, short[0], short[1])
    assert_close(alone, want)


def test_padded_width_above_max_seq_len_raises():
    cfg = small_config()
    enc = build_encoder(cfg, seed=23)
    seqs = [([1.0, 2.0, 3.0], 4.0)]
    tokens = make_tokens([3], cfg.embedding_dim)
    x, lengths, ts = pad_batch(tokens, seqs, width=cfg.max_seq_len + 1)
    with pytest.raises(ValueError, match="max_seq_len"):
        enc(x, lengths, ts)
    (long_tok,) = make_tokens([cfg.max_seq_len + 1], cfg.embedding_dim)
    offsets = torch.tensor([0, cfg.max_seq_len + 1])
    times = torch.arange(cfg.max_seq_len + 1, dtype=torch.float64)
    with pytest.raises(ValueError, match="max_seq_len"):
        enc.forward_jagged(long_tok, offsets, times)
    # A width of exactly max_seq_len is fine.
    x, lengths, ts = pad_batch(tokens, seqs, width=cfg.max_seq_len)
    assert enc(x, lengths, ts).shape == x.shape


def test_jagged_accepts_sequence_of_length_max_seq_len():
    """A sequence of exactly N tokens fits the padded path (width N); the jagged path must accept it too.

    With the time bias off there is no query-time slot to hold, so both paths must give the plain result.
    """
    cfg = small_config(time_bias=False, max_seq_len=6)
    enc = build_encoder(cfg, seed=24)
    (tok,) = make_tokens([cfg.max_seq_len], cfg.embedding_dim, seed=25)
    padded = enc(tok.unsqueeze(0), torch.tensor([cfg.max_seq_len]))[0]
    want = plain_encoder_sequence(tok, plain_params(enc), cfg, None, None)
    assert_close(padded, want)
    jagged = enc.forward_jagged(tok, torch.tensor([0, cfg.max_seq_len]))
    assert_close(jagged, want)


# ----------------------------------------------------------------------------------------------------------
# Parameters, initialisation, gradients, reproducibility
# ----------------------------------------------------------------------------------------------------------
def test_parameter_inventory_and_shapes():
    cfg = small_config()
    enc = HSTUEncoder(cfg)
    h, dqk, dv, d, n = 2, 3, 4, 6, cfg.max_seq_len
    shapes = {name: tuple(p.shape) for name, p in enc.named_parameters()}
    expected = {}
    for i in range(cfg.num_blocks):
        expected.update(
            {
                f"layers.{i}.uvqk": (d, 2 * h * dv + 2 * h * dqk),
                f"layers.{i}.output.weight": (d, h * dv),
                f"layers.{i}.output.bias": (d,),
                f"layers.{i}.relative_bias.position_weights": (2 * n - 1,),
                f"layers.{i}.relative_bias.time_weights": (129,),
            }
        )
    # Exactly these: LayerNorms carry no parameters and the projection has no bias.
    assert shapes == expected
    defaults = HSTUEncoderConfig()
    assert defaults.layer_norm_eps == 1e-6
    assert defaults.num_time_buckets == 128
    assert defaults.max_seq_len == 211


def test_initialisation_statistics():
    torch.manual_seed(1234)
    cfg = HSTUEncoderConfig(
        embedding_dim=512, num_blocks=4, num_heads=2, attention_dim=64, linear_dim=64, max_seq_len=1000
    )
    enc = HSTUEncoder(cfg)
    uvqk = torch.cat([layer.uvqk.detach().flatten() for layer in enc.layers])  # 4 * 512 * 512 values
    assert abs(float(uvqk.std()) - 0.02) < 0.02 * 0.02
    assert abs(float(uvqk.mean())) < 0.02 * 0.01

    for layer in enc.layers:
        w = layer.output.weight.detach()
        fan_out, fan_in = w.shape  # [D, H*dv] = [512, 128]
        assert (fan_out, fan_in) == (512, 128)
        bound = math.sqrt(6.0 / (fan_in + fan_out))  # xavier-uniform
        assert float(w.abs().max()) <= bound
        assert float(w.abs().max()) > 0.99 * bound
        assert abs(float(w.std()) - bound / math.sqrt(3.0)) < 0.03 * bound / math.sqrt(3.0)
        b = layer.output.bias.detach()
        b_bound = 1.0 / math.sqrt(fan_in)
        assert float(b.abs().max()) <= b_bound
        assert float(b.abs().max()) > 0.9 * b_bound

    pos = torch.cat([layer.relative_bias.position_weights.detach() for layer in enc.layers])
    time = torch.cat([layer.relative_bias.time_weights.detach() for layer in enc.layers])
    assert all(layer.relative_bias.position_weights.numel() == 2 * 1000 - 1 for layer in enc.layers)
    assert all(layer.relative_bias.time_weights.numel() == 129 for layer in enc.layers)
    assert abs(float(pos.std()) - 0.02) < 0.02 * 0.05  # 7996 draws
    assert abs(float(time.std()) - 0.02) < 0.02 * 0.15  # 516 draws
    assert abs(float(pos.mean())) < 0.002 and abs(float(time.mean())) < 0.004
    # No LayerNorm module with parameters anywhere.
    for module in enc.modules():
        if isinstance(module, torch.nn.LayerNorm):
            assert not list(module.parameters())


def test_gradients_reach_every_parameter():
    cfg = small_config(linear_dropout=0.2)
    enc = build_encoder(cfg, seed=26).train()
    lengths_list = [len(e) for e, _ in SEQUENCES]
    tokens = make_tokens(lengths_list, cfg.embedding_dim, seed=27)
    x, lengths, ts = pad_batch(tokens, SEQUENCES, width=max(lengths_list) + 1)
    x.requires_grad_(True)
    out = enc(x, lengths, ts)
    (out**2).sum().backward()
    for name, param in enc.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
        assert float(param.grad.abs().sum()) > 0.0, name
    assert torch.isfinite(x.grad).all()
    mask = torch.arange(x.shape[1]).unsqueeze(0) < lengths.unsqueeze(1)
    assert torch.count_nonzero(x.grad[~mask]) == 0  # padding never feeds the output


def test_seeded_forward_is_bit_reproducible():
    def run(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        cfg = small_config(linear_dropout=0.3)
        enc = HSTUEncoder(cfg).double().train()  # dropout active: it must be seeded too
        lengths_list = [len(e) for e, _ in SEQUENCES]
        tokens = make_tokens(lengths_list, cfg.embedding_dim, seed=seed)
        x, lengths, ts = pad_batch(tokens, SEQUENCES, width=max(lengths_list) + 1, seed=seed)
        train_out = enc(x, lengths, ts)
        # Dropout really acts in train mode (and is off in eval, which the parity tests rely on).
        assert max_diff(train_out, enc.eval()(x, lengths, ts)) > 1e-6
        return train_out

    first, second = run(31), run(31)
    assert torch.equal(first, second)
    assert not torch.equal(first, run(32))
