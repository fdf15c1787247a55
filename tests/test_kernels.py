"""HSTU attention: the mask, the PyTorch op and the Triton kernels against a plain implementation.

The Triton kernels run on CPU under the Triton interpreter (TRITON_INTERPRET=1, exported by `make test`; it
must be set before triton is first imported).  Without it those tests skip and say why.

The oracle below is written from the spec (reference-hstu.md §1.4 and §4), one sequence and one head at a
time, in float64, with the mask decided element by element in plain Python.  It shares no code with
`merlin_hstu.kernels`:

    S = alpha * q k^T + bias[b, :n, :n]      A = SiLU(S) / N * visible      O = A v
    visible(i, j): ids from positions (contextual prefix -> id 0, candidates -> id max_ids), then
        (i == j or dist > 0) [and dist <= max_attn_len unless id_i >= max_ids - min_full] [or id_i == 0 and
        id_j < max_ids with a contextual prefix], dist = id_i - id_j (|.| when not causal)

Gradients of the oracle come from autograd through it (float64).  Tolerances (the kernels compute in fp32,
fp32 inputs, exact fp32 products): forward and every gradient within rtol 1e-4, atol 1e-5 of the oracle
(values are O(0.01..1)); the PyTorch op is held to rtol 1e-5, atol 1e-6.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import textwrap
from typing import Optional

import pytest
import torch

from merlin_hstu.kernels import (
    get_default_kernel,
    hstu_attention,
    resolve_kernel,
    set_default_kernel,
    use_kernel,
    valid_attention_mask,
)

INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")
try:
    import triton  # noqa: F401  (imported after the environment is read: the interpreter flag is fixed now)

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - triton is in the pinned venv
    HAVE_TRITON = False

needs_interpreter = pytest.mark.skipif(
    not (HAVE_TRITON and INTERPRET),
    reason="Triton kernel tests run on CPU only under the Triton interpreter: set TRITON_INTERPRET=1 before "
           "starting pytest (`make test` does)" if HAVE_TRITON else "triton is not installed",
)

RTOL, ATOL = 1e-4, 1e-5


# ----------------------------------------------------------------------------------------------------------
# Plain oracle
# ----------------------------------------------------------------------------------------------------------
def plain_visible(i: int, j: int, length: int, n_targets: Optional[int], ctx: int, causal: bool,
                  max_attn_len: int, min_full: int) -> bool:
    max_ids = length
    if ctx > 0:
        max_ids = length - ctx + 1
    if n_targets is not None:
        max_ids -= n_targets

    def ident(p: int) -> int:
        out = max(p - ctx + 1, 0) if ctx > 0 else p
        return min(out, max_ids) if n_targets is not None else out

    dist = ident(i) - ident(j)
    if not causal:
        dist = abs(dist)
    ok = i == j or dist > 0
    if max_attn_len > 0:
        ok = ok and (dist <= max_attn_len or (min_full > 0 and ident(i) >= max_ids - min_full))
    if ctx > 0 and ident(i) == 0 and ident(j) < max_ids:
        ok = True
    return ok


def plain_mask(length, n_targets=None, ctx=0, causal=True, max_attn_len=0, min_full=0) -> torch.Tensor:
    return torch.tensor(
        [[plain_visible(i, j, length, n_targets, ctx, causal, max_attn_len, min_full) for j in range(length)]
         for i in range(length)],
        dtype=torch.bool,
    ).reshape(length, length)


def plain_attention(q, k, v, offsets, norm, alpha=1.0, bias=None, num_targets=None, ctx=0, causal=True,
                    max_attn_len=0, min_full=0) -> torch.Tensor:
    """float64, one sequence and one head at a time; returns [L, H, dv] float64."""
    rows = []
    for b in range(len(offsets) - 1):
        start, end = int(offsets[b]), int(offsets[b + 1])
        n = end - start
        nt = None if num_targets is None else int(num_targets[b])
        allowed = plain_mask(n, nt, ctx, causal, max_attn_len, min_full).double()
        heads = []
        for h in range(q.shape[1]):
            s = alpha * (q[start:end, h].double() @ k[start:end, h].double().T)
            if bias is not None:
                s = s + bias[b if bias.shape[0] > 1 else 0, :n, :n].double()
            a = s * torch.sigmoid(s) / norm * allowed
            heads.append(a @ v[start:end, h].double())
        rows.append(torch.stack(heads, dim=1) if heads else q.new_zeros(n, 0, v.shape[2]).double())
    return torch.cat(rows, dim=0)


# ----------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------
def offsets_of(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0] + lengths).cumsum(0)


def make_inputs(lengths, heads, dqk, dv, seed, bias: str = "batch", bias_width: Optional[int] = None):
    gen = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    q = torch.randn(total, heads, dqk, generator=gen)
    k = torch.randn(total, heads, dqk, generator=gen)
    v = torch.randn(total, heads, dv, generator=gen)
    width = bias_width or max(lengths + [1]) + 3  # wider than the longest sequence: the extra must be ignored
    attn_bias = None
    if bias == "batch":
        attn_bias = torch.randn(len(lengths), width, width, generator=gen)
    elif bias == "shared":
        attn_bias = torch.randn(1, width, width, generator=gen)
    elif bias == "expanded":  # stride-0 batch dimension, as a broadcast position-only bias would be
        attn_bias = torch.randn(1, width, width, generator=gen).expand(len(lengths), width, width)
    for t in (q, k, v):
        t.requires_grad_(True)
    if attn_bias is not None:
        attn_bias.requires_grad_(True)
    return q, k, v, attn_bias


def grads(out: torch.Tensor, inputs, seed: int = 99):
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.dtype)
    leaves = [t for t in inputs if t is not None and t.requires_grad]
    return torch.autograd.grad((out * weight).sum(), leaves)


def assert_matches_oracle(lengths, heads, dqk, dv, *, kernel, seed=0, bias="batch", norm=48, alpha=1.0,
                          num_targets=None, ctx=0, causal=True, max_attn_len=0, min_full=0, rtol=RTOL, atol=ATOL,
                          **kernel_kwargs):
    q, k, v, attn_bias = make_inputs(lengths, heads, dqk, dv, seed, bias)
    offsets = offsets_of(lengths)
    nt = None if num_targets is None else torch.tensor(num_targets)
    mask_kwargs = dict(num_targets=nt, contextual_seq_len=ctx, causal=causal, max_attn_len=max_attn_len,
                       min_full_attn_seq_len=min_full)
    if kernel == "triton" and kernel_kwargs:
        from merlin_hstu.kernels.triton_hstu_attention import triton_hstu_attention

        got = triton_hstu_attention(q, k, v, offsets, norm, alpha=alpha, attn_bias=attn_bias, **mask_kwargs,
                                    **kernel_kwargs)
    else:
        got = hstu_attention(q, k, v, offsets, norm, alpha=alpha, attn_bias=attn_bias, kernel=kernel, **mask_kwargs)
    want = plain_attention(q, k, v, offsets, norm, alpha, attn_bias, nt, ctx, causal, max_attn_len, min_full)
    assert got.shape == want.shape == (sum(lengths), heads, dv)
    assert got.dtype == q.dtype
    torch.testing.assert_close(got.double(), want, rtol=rtol, atol=atol)
    inputs = (q, k, v, attn_bias)
    for name, g, w in zip("q k v bias".split(), grads(got, inputs), grads(want, inputs)):
        assert g.shape == w.shape, name
        torch.testing.assert_close(g, w, rtol=rtol, atol=atol, msg=lambda m: f"d{name}: {m}")
    assert float(want.detach().abs().max()) > 1e-2  # the comparison is not between two near-zero tensors
    return got


# ----------------------------------------------------------------------------------------------------------
# The mask: hand-written cases of each rule, then the rules element by element
# ----------------------------------------------------------------------------------------------------------
def rows(*text: str) -> torch.Tensor:
    return torch.tensor([[c == "1" for c in line] for line in text], dtype=torch.bool)


def test_mask_hand_written_cases():
    def mask(length, **kw):
        nt = kw.pop("num_targets", None)
        nt_t = None if nt is None else torch.tensor([nt])
        return valid_attention_mask(torch.tensor([length]), length, num_targets=nt_t, **kw)[0]

    # 5 tokens, the last 2 are candidates: they see the history (0..2) and themselves, not each other.
    assert torch.equal(mask(5, num_targets=2), rows("10000", "11000", "11100", "11110", "11101"))
    # every token a candidate: each sees only itself.
    assert torch.equal(mask(3, num_targets=3), rows("100", "010", "001"))
    # contextual prefix of 2 in 5 tokens: the prefix sees the whole history; history sees prefix + causal past.
    assert torch.equal(mask(5, contextual_seq_len=2), rows("11111", "11111", "11100", "11110", "11111"))
    # contextual 1 + 1 candidate in 4 tokens: the prefix sees history but not the candidate.
    assert torch.equal(mask(4, contextual_seq_len=1, num_targets=1), rows("1110", "1100", "1110", "1111"))
    # sliding window 2: key j visible when 0 <= i - j <= 2.
    assert torch.equal(mask(5, max_attn_len=2), rows("10000", "11000", "11100", "01110", "00111"))
    # window 1, but the last 2 history rows attend fully.
    assert torch.equal(mask(5, max_attn_len=1, min_full_attn_seq_len=2),
                       rows("10000", "11000", "01100", "11110", "11111"))
    # not causal, 1 candidate: history sees everything (the candidate too); the candidate sees all.
    assert torch.equal(mask(3, causal=False, num_targets=1), rows("111", "111", "111"))
    # not causal, 2 candidates: they still do not see each other.
    assert torch.equal(mask(3, causal=False, num_targets=2), rows("111", "110", "101"))
    # rows / columns past the length are never visible.
    padded = valid_attention_mask(torch.tensor([2]), 4)[0]
    assert torch.equal(padded, rows("1000", "1100", "0000", "0000"))


MASK_CASES = [
    dict(),
    dict(causal=False),
    dict(num_targets=True),
    dict(ctx=3),
    dict(max_attn_len=5),
    dict(num_targets=True, ctx=2),
    dict(num_targets=True, ctx=2, max_attn_len=4),
    dict(num_targets=True, max_attn_len=3, min_full=5),
    dict(num_targets=True, ctx=1, max_attn_len=6, min_full=2),
    dict(causal=False, num_targets=True, ctx=2, max_attn_len=5),
]
MASK_IDS = ["causal", "noncausal", "targets", "contextual", "window", "targets+ctx", "targets+ctx+window",
            "targets+window+minfull", "all", "noncausal+all"]

LENGTHS = [0, 1, 17, 40, 5, 33, 16, 2]
TARGETS = [0, 1, 3, 5, 5, 0, 16, 2]  # includes 0, all-candidate sequences (5 of 5, 16 of 16, 2 of 2) and 1 of 1


def case_kwargs(case: dict) -> dict:
    kw = dict(case)
    if kw.pop("num_targets", False):
        kw["num_targets"] = TARGETS
    return kw


@pytest.mark.parametrize("case", MASK_CASES, ids=MASK_IDS)
def test_mask_matches_rules_element_by_element(case):
    kw = case_kwargs(case)
    width = max(LENGTHS) + 2
    nt = kw.get("num_targets")
    got = valid_attention_mask(
        torch.tensor(LENGTHS), width, causal=kw.get("causal", True),
        num_targets=None if nt is None else torch.tensor(nt), contextual_seq_len=kw.get("ctx", 0),
        max_attn_len=kw.get("max_attn_len", 0), min_full_attn_seq_len=kw.get("min_full", 0),
    )
    for b, n in enumerate(LENGTHS):
        want = torch.zeros(width, width, dtype=torch.bool)
        want[:n, :n] = plain_mask(n, None if nt is None else nt[b], kw.get("ctx", 0), kw.get("causal", True),
                                  kw.get("max_attn_len", 0), kw.get("min_full", 0))
        assert torch.equal(got[b], want), f"sequence {b}"


# ----------------------------------------------------------------------------------------------------------
# PyTorch op vs oracle (fast; every mask)
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", MASK_CASES, ids=MASK_IDS)
def test_pytorch_op_matches_oracle(case):
    assert_matches_oracle(LENGTHS, 2, 8, 12, kernel="pytorch", seed=1, alpha=0.8, rtol=1e-5, atol=1e-6,
                          **case_kwargs(case))


def test_pytorch_op_float64_and_no_bias():
    q, k, v, _ = make_inputs([3, 6], 1, 4, 4, seed=2, bias="none")
    q64, k64, v64 = (t.detach().double() for t in (q, k, v))
    got = hstu_attention(q64, k64, v64, offsets_of([3, 6]), 6, kernel="auto")
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, plain_attention(q64, k64, v64, offsets_of([3, 6]), 6), rtol=1e-12, atol=1e-14)


# ----------------------------------------------------------------------------------------------------------
# Triton kernels (interpreter) vs oracle
# ----------------------------------------------------------------------------------------------------------
BIASES = ["batch", "shared", "none", "expanded", "batch", "shared", "batch", "none", "expanded", "batch"]


@needs_interpreter
@pytest.mark.parametrize("case,bias", list(zip(MASK_CASES, BIASES)), ids=MASK_IDS)
def test_triton_matches_oracle_every_mask(case, bias):
    assert_matches_oracle(LENGTHS, 2, 8, 12, kernel="triton", seed=3, bias=bias, alpha=0.8, **case_kwargs(case))


@needs_interpreter
@pytest.mark.parametrize(
    "seed,heads,dqk,dv,block_m,block_n",
    [(10, 1, 16, 16, 16, 32), (11, 3, 20, 6, 32, 16), (12, 2, 5, 33, 16, 16)],
)
def test_triton_random_shapes_and_tiles(seed, heads, dqk, dv, block_m, block_n):
    """Random lengths (0..45, mostly not multiples of the tile), heads, dqk != dv (incl. dims that are not
    powers of two), unequal query/key tiles, and the full mask with random settings."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 46, (5,), generator=gen).tolist() + [0, 1]
    targets = [int(torch.randint(0, n + 1, (1,), generator=gen)) for n in lengths]
    ctx = int(torch.randint(0, 4, (1,), generator=gen))
    window = int(torch.randint(0, 12, (1,), generator=gen))
    assert_matches_oracle(lengths, heads, dqk, dv, kernel="triton", seed=seed, num_targets=targets, ctx=ctx,
                          max_attn_len=window, min_full=seed % 3, norm=50, block_m=block_m, block_n=block_n)


@needs_interpreter
def test_triton_plain_causal_across_tiles():
    """The encoder's mask (causal, no candidates) on lengths around tile edges, two tile shapes."""
    lengths = [15, 16, 17, 31, 32, 33, 1, 0]
    for block_m, block_n in ((16, 16), (32, 16)):
        assert_matches_oracle(lengths, 2, 8, 8, kernel="triton", seed=4, bias="batch", block_m=block_m,
                              block_n=block_n)


@needs_interpreter
def test_triton_noncontiguous_inputs_and_bias_without_grad():
    """q/k/v as strided views of one projection (as the STU layer makes them); a bias that needs no grad."""
    gen = torch.Generator().manual_seed(5)
    lengths = [7, 0, 19]
    heads, d = 2, 6
    proj = torch.randn(sum(lengths), 3 * heads * d, generator=gen, requires_grad=True)
    q, k, v = (t.view(-1, heads, d) for t in proj.split(heads * d, dim=1))
    assert q.stride(0) == 3 * heads * d
    bias = torch.randn(3, 20, 20, generator=gen)
    offsets = offsets_of(lengths)
    got = hstu_attention(q, k, v, offsets, 30, attn_bias=bias, kernel="triton")
    want = plain_attention(q, k, v, offsets, 30, bias=bias)
    torch.testing.assert_close(got.double(), want, rtol=RTOL, atol=ATOL)
    (g,) = grads(got, (proj,))
    (w,) = grads(want, (proj,))
    torch.testing.assert_close(g, w, rtol=RTOL, atol=ATOL)


@needs_interpreter
def test_triton_empty_batch_and_all_empty_sequences():
    for lengths in ([0, 0, 0], []):
        q, k, v, bias = make_inputs(lengths, 2, 4, 4, seed=6, bias="batch" if lengths else "none",
                                    bias_width=4)
        out = hstu_attention(q, k, v, offsets_of(lengths), 8, attn_bias=bias, kernel="triton")
        assert out.shape == (0, 2, 4)
        gq, = torch.autograd.grad(out.sum(), q, allow_unused=True)
        assert gq is None or gq.shape == q.shape


# ----------------------------------------------------------------------------------------------------------
# Kernel switch and the encoder
# ----------------------------------------------------------------------------------------------------------
def test_kernel_switch_resolution():
    x = torch.zeros(2, 2)
    assert get_default_kernel() == "auto"
    assert resolve_kernel("auto", x) == "pytorch"  # CPU tensors -> PyTorch under auto
    assert resolve_kernel(None, x) == "pytorch"
    assert resolve_kernel("triton", x) == "triton"  # explicit wins
    with use_kernel("triton"):
        assert get_default_kernel() == "triton"
        assert resolve_kernel("auto", x) == "triton"
        assert resolve_kernel("pytorch", x) == "pytorch"
    assert get_default_kernel() == "auto"
    set_default_kernel("pytorch")
    try:
        assert resolve_kernel("auto", x) == "pytorch"
    finally:
        set_default_kernel("auto")
    with pytest.raises(ValueError, match="set_default_kernel.*'pytorch', 'triton', 'auto'"):
        set_default_kernel("cuda")
    with pytest.raises(ValueError, match="kernel must be one of"):
        resolve_kernel("fast", x)


def test_encoder_config_validates_kernel():
    from merlin_hstu.encoders.hstu import HSTUEncoderConfig

    assert HSTUEncoderConfig().kernel == "auto"
    with pytest.raises(ValueError, match="HSTUEncoderConfig.kernel must be one of"):
        HSTUEncoderConfig(kernel="flash")


def _encoder_pair():
    from merlin_hstu.encoders.hstu import HSTUEncoder, HSTUEncoderConfig

    common = dict(embedding_dim=16, num_blocks=2, num_heads=2, attention_dim=8, linear_dim=12, max_seq_len=40,
                  linear_dropout=0.0)
    torch.manual_seed(0)
    ref = HSTUEncoder(HSTUEncoderConfig(kernel="pytorch", **common))
    tri = HSTUEncoder(HSTUEncoderConfig(kernel="triton", **common))
    with torch.no_grad():  # big enough weights that the bias tables and attention move the output
        for p in ref.parameters():
            p.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(p.numel()))
    tri.load_state_dict(ref.state_dict())
    return ref, tri


@needs_interpreter
def test_encoder_same_results_with_either_kernel():
    ref, tri = _encoder_pair()
    lengths = torch.tensor([5, 1, 0, 20, 17])
    offsets = torch.nn.functional.pad(lengths.cumsum(0), (1, 0))
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(int(offsets[-1]), 16, generator=gen)
    ts = torch.randint(0, 10**7, (int(offsets[-1]),), generator=gen).sort().values
    outs, param_grads = [], []
    for enc in (ref, tri):
        out = enc.forward_jagged(x, offsets, ts)
        outs.append(out)
        loss = (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(2))).sum()
        param_grads.append(dict(zip([n for n, _ in enc.named_parameters()],
                                    torch.autograd.grad(loss, list(enc.parameters())))))
    # Both run fp32 (summation orders differ) through two layers with layer norms, whose outputs and
    # gradients reach O(10..100) with these weights: tolerance atol = 2e-5 * max|reference|, rtol 1e-4.
    def close(got, want, what):
        atol = 2e-5 * float(want.detach().abs().max())
        torch.testing.assert_close(got, want, rtol=RTOL, atol=atol, msg=lambda m: f"{what}: {m}")

    close(outs[1], outs[0], "output")
    assert float((outs[0] - x).detach().abs().max()) > 1e-2
    for name, g in param_grads[0].items():
        close(param_grads[1][name], g, name)
    assert float(param_grads[0]["layers.0.relative_bias.time_weights"].abs().max()) > 0
    # The global switch reaches a module left at "auto".
    from merlin_hstu.encoders.hstu import HSTUEncoder, HSTUEncoderConfig

    auto = HSTUEncoder(HSTUEncoderConfig(**{**ref.config.to_dict(), "kernel": "auto"}))
    auto.load_state_dict(ref.state_dict())
    with use_kernel("triton"):
        torch.testing.assert_close(auto.forward_jagged(x, offsets, ts), outs[1], rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------------------------------------
# Input validation
# ----------------------------------------------------------------------------------------------------------
def test_bad_inputs_name_the_problem():
    q, k, v, bias = make_inputs([3, 4], 2, 4, 5, seed=7)
    off = offsets_of([3, 4])
    with pytest.raises(ValueError, match="exceeds max_seq_len=3"):
        hstu_attention(q, k, v, off, 3)
    with pytest.raises(ValueError, match="seq_offsets must start at 0.*end at L=7"):
        hstu_attention(q, k, v, torch.tensor([0, 3, 6]), 8)
    with pytest.raises(ValueError, match="seq_offsets must be a 1-D int32/int64"):
        hstu_attention(q, k, v, off.float(), 8)
    with pytest.raises(ValueError, match="num_targets must be in \\[0, length\\]"):
        hstu_attention(q, k, v, off, 8, num_targets=torch.tensor([4, 0]))
    with pytest.raises(ValueError, match="num_targets must be an int tensor \\[B=2\\]"):
        hstu_attention(q, k, v, off, 8, num_targets=torch.tensor([1]))
    with pytest.raises(ValueError, match="attn_bias must be a float \\[B=2 or 1, W, W\\].*longest sequence \\(4\\)"):
        hstu_attention(q, k, v, off, 8, attn_bias=torch.zeros(2, 3, 3))
    with pytest.raises(ValueError, match="q and k must have the same shape"):
        hstu_attention(q, k[:, :1], v, off, 8)
    with pytest.raises(ValueError, match="max_attn_len must be an int >= 0"):
        hstu_attention(q, k, v, off, 8, max_attn_len=-1)
    with pytest.raises(ValueError, match="Triton kernels take float32/bfloat16/float16"):
        hstu_attention(q.double(), k.double(), v.double(), off, 8, kernel="triton")


# ----------------------------------------------------------------------------------------------------------
# GPU compilation (no GPU needed: Triton compiles to PTX/cubin with its bundled ptxas)
# ----------------------------------------------------------------------------------------------------------
COMPILE_SCRIPT = textwrap.dedent("""
    import os
    os.environ.pop("TRITON_INTERPRET", None)
    import triton
    from triton.compiler import ASTSource
    from triton.backends.compiler import GPUTarget
    from merlin_hstu.kernels import triton_hstu_attention as m

    PTRS = {"Q", "K", "V", "Bias", "Out", "DO", "DK", "DV_out", "DQ"}
    for fn in (m._fwd, m._bwd_dkdv, m._bwd_dq):
        consts = dict(CAUSAL=True, HAS_CONTEXTUAL=True, HAS_TARGETS=True, HAS_MAX_ATTN_LEN=True,
                      HAS_MIN_FULL=True, HAS_BIAS=True, INPUT_PRECISION=None, BLOCK_M=64, BLOCK_N=64,
                      BLOCK_DQK=64, BLOCK_DV=128)
        if fn is m._bwd_dq:
            consts["STORE_DBIAS"] = True
        sig = {}
        for name in fn.arg_names:
            if name in consts:
                sig[name] = "constexpr"
            elif name in PTRS:
                sig[name] = "*bf16"
            elif name == "DBias":
                sig[name] = "*fp32"
            elif name in ("seq_offsets", "num_targets"):
                sig[name] = "*i64"
            elif name in ("alpha", "inv_norm"):
                sig[name] = "fp32"
            else:
                sig[name] = "i32"
        kernel = triton.compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", 80, 32),
                                options=dict(num_warps=4, num_stages=2))
        assert kernel.asm["cubin"], fn.__name__
        print("compiled", fn.__name__, kernel.metadata.shared)
""")


@pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed")
def test_kernels_compile_for_sm80_bf16(tmp_path):
    """The interpreter is lenient about types; the real compiler is not.  Compile every kernel (all mask
    features on, bf16) for an A100 target in a fresh process without TRITON_INTERPRET."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    proc = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=300)
    if proc.returncode != 0 and "ptxas" in proc.stderr and "No such file" in proc.stderr:
        pytest.skip("triton's bundled ptxas is not available")
    assert proc.returncode == 0, proc.stderr[-3000:]
    compiled = [line.split()[1] for line in proc.stdout.splitlines() if line.startswith("compiled")]
    assert compiled == ["_fwd", "_bwd_dkdv", "_bwd_dq"]
    for line in proc.stdout.splitlines():
        assert int(line.split()[2]) <= 166912  # fits A100 shared memory per block


# ----------------------------------------------------------------------------------------------------------
# Benchmark command (CPU: PyTorch path only)
# ----------------------------------------------------------------------------------------------------------
def test_bench_kernels_runs_on_cpu(capsys, tmp_path):
    from merlin_hstu.kernels import bench

    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    out_json = tmp_path / "bench.json"
    args = parser.parse_args(["--device", "cpu", "--lengths", "32,64", "--dims", "16", "--total-tokens", "128",
                              "--heads", "2", "--iters", "1", "--warmup", "0", "--json", str(out_json)])
    assert bench.run(args) == 0
    text = capsys.readouterr().out
    assert "no CUDA device" in text and "PyTorch reference only" in text
    import json

    rows_ = json.loads(out_json.read_text())["results"]
    assert {r["impl"] for r in rows_} == {"pytorch"}
    assert {(r["max_len"], r["dist"]) for r in rows_} == {(32, "uniform"), (32, "zipf"), (64, "uniform"),
                                                          (64, "zipf")}
    for r in rows_:
        assert r["total_tokens"] == 128 and r["dtype"] == "float32"
        assert r["fwd_ms"] > 0 and r["bwd_ms"] > 0 and r["fwd_bwd_ms"] > 0 and r["fwd_tflops"] > 0
