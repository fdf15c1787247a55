"""Length groups on the PyTorch path of an attention plan (kernels/attention_ops.py): the chosen cuts are the
optimal ones (brute force), and grouped attention (with the causal split) equals the one-padded-batch path in
values and gradients for every mask rule, in the op and through the STU stack."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from merlin_hstu.kernels import attention_ops
from merlin_hstu.kernels.attention_ops import (
    choose_length_groups,
    group_bias,
    hstu_attention_with_plan,
    plan_hstu_attention,
    set_length_groups,
)


@pytest.fixture()
def groups_off_after():
    previous = attention_ops.get_length_groups()
    yield
    set_length_groups(previous)


def brute_force_cost(lengths, max_groups):
    """min over every split of the sorted lengths into <= max_groups contiguous groups of sum rows * width^2."""
    ordered = sorted(lengths)
    n, best = len(ordered), None
    for g in range(1, max_groups + 1):
        for cuts in itertools.combinations(range(1, n), g - 1):
            bounds = [0, *cuts, n]
            cost = sum((b - a) * ordered[b - 1] ** 2 for a, b in zip(bounds[:-1], bounds[1:]))
            best = cost if best is None else min(best, cost)
    return best


@pytest.mark.parametrize("seed", range(6))
def test_chosen_groups_are_optimal_and_cover_every_row_once(seed):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 60, size=int(rng.integers(5, 12))).tolist()
    groups = choose_length_groups(lengths, 3, min_saving=0.0)
    assert groups is not None
    rows = np.concatenate(groups)
    assert sorted(rows.tolist()) == list(range(len(lengths)))
    cost = sum(len(g) * max(lengths[i] for i in g) ** 2 for g in groups)
    assert cost == brute_force_cost(lengths, 3)  # <= 32 candidate cuts: every distinct length is a candidate here
    widths = [max(lengths[i] for i in g) for g in groups]
    assert widths == sorted(widths)


def test_no_groups_when_they_save_little():
    assert choose_length_groups([50] * 10, 4) is None  # equal lengths: nothing to save
    assert choose_length_groups([50] * 9 + [49], 4) is None  # saves < 10%
    assert choose_length_groups([5, 50], 1) is None and choose_length_groups([7], 4) is None
    assert choose_length_groups([3] * 8 + [100] * 8, 4) is not None


MASKS = [dict(causal=True), dict(causal=False), dict(num_targets=True), dict(contextual_seq_len=3),
         dict(max_attn_len=5), dict(num_targets=True, contextual_seq_len=2, max_attn_len=7)]


@pytest.mark.parametrize("spec", MASKS, ids=["causal", "noncausal", "targets", "ctx", "window", "all"])
@pytest.mark.parametrize("shared_bias", [False, True], ids=["batch-bias", "shared-bias"])
def test_grouped_attention_equals_one_padded_batch(spec, shared_bias, groups_off_after):
    torch.manual_seed(0)
    lengths = torch.tensor([3, 70, 40, 9, 66, 1, 35, 12, 80, 4])
    heads, dqk, dv, width = 2, 8, 6, 80
    total = int(lengths.sum())
    q, k, v = (torch.randn(total, heads, d, dtype=torch.float64, requires_grad=True) for d in (dqk, dqk, dv))
    bias = torch.randn(1 if shared_bias else len(lengths), width, width, dtype=torch.float64, requires_grad=True)
    options = dict(spec)
    if options.pop("num_targets", False):
        options["num_targets"] = torch.minimum(torch.tensor(2), lengths)
    token_mask = torch.arange(width).unsqueeze(0) < lengths.unsqueeze(1)
    results = {}
    for groups in (0, 4):
        set_length_groups(groups)
        plan = plan_hstu_attention(lengths, 96, token_mask=token_mask, kernel="pytorch", alpha=0.7, **options)
        assert (plan.groups is None) == (groups == 0)
        if plan.groups is not None:
            # the causal split applies where no query of the first half sees a key of the second: causal masks
            # (windows included), not bidirectional ones, not a contextual prefix (its rows see every key)
            causal_only = options.get("causal", True) and not options.get("contextual_seq_len")
            assert len(plan.groups) > 1 and any(g.blocks for g in plan.groups) == causal_only
        out = hstu_attention_with_plan(q, k, v, plan, bias)
        grads = torch.autograd.grad(out.pow(2).sum(), (q, k, v, bias))
        results[groups] = (out.detach(), grads)
        if plan.groups is not None:  # one bias per group (what STULayer passes) gives the same
            per_group = [group_bias(bias, g) for g in plan.groups]
            torch.testing.assert_close(hstu_attention_with_plan(q, k, v, plan, per_group), out)
    torch.testing.assert_close(results[4][0], results[0][0], rtol=1e-12, atol=1e-12)
    for got, want in zip(results[4][1], results[0][1]):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_stu_stack_with_groups_equals_without(groups_off_after):
    from merlin_hstu.encoders.hstu import HSTUEncoder, HSTUEncoderConfig

    torch.manual_seed(1)
    encoder = HSTUEncoder(HSTUEncoderConfig(embedding_dim=16, num_blocks=2, num_heads=2, attention_dim=8,
                                            linear_dim=8, max_seq_len=96, linear_dropout=0.0, kernel="pytorch"))
    encoder.double()
    lengths = torch.tensor([90, 5, 60, 2, 33, 88, 14, 47])
    x = torch.randn(len(lengths), 91, 16, dtype=torch.float64)
    times = torch.randint(0, 10_000, (len(lengths), 91)).cumsum(1)
    outs = {}
    for groups in (0, 4):
        set_length_groups(groups)
        xi = x.clone().requires_grad_(True)
        out = encoder(xi, lengths, times)
        out.pow(2).sum().backward()
        outs[groups] = (out.detach(), xi.grad, [p.grad.clone() for p in encoder.parameters()])
        encoder.zero_grad(set_to_none=True)
    torch.testing.assert_close(outs[4][0], outs[0][0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(outs[4][1], outs[0][1], rtol=1e-10, atol=1e-12)
    for got, want in zip(outs[4][2], outs[0][2]):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
