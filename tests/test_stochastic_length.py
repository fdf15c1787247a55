"""Stochastic length (merlin_hstu.ranking.stochastic_length, HSTU paper §3.3).

The formula, written out here independently: threshold L = floor(N^(alpha/2)); a history of n <= L events is kept
whole; a longer one is kept whole with probability p = N^alpha / n^2 and otherwise replaced by L of its events
(uniformly chosen, chronological order kept), so E[kept length] = p n + (1 - p) L.
"""
from __future__ import annotations

import math

import pytest
import torch

from merlin_hstu.ranking.model import DlrmHSTU, DlrmHSTUConfig
from merlin_hstu.ranking.batch import RankingBatch, RankingTask
from merlin_hstu.ranking.stochastic_length import StochasticLength, StochasticLengthConfig


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def plain_threshold(n_max: int, alpha: float) -> int:
    return math.floor(n_max ** (alpha / 2))


def plain_keep_probability(n: int, n_max: int, alpha: float) -> float:
    return 1.0 if n <= plain_threshold(n_max, alpha) else n_max ** alpha / n ** 2


def test_threshold_probability_and_expectation_hand_computed():
    cfg = StochasticLengthConfig(alpha=1.5, max_len=100)
    assert cfg.threshold == 31  # floor(100^0.75) = floor(31.62)
    assert cfg.keep_probability(31) == 1.0
    assert cfg.keep_probability(32) == pytest.approx(1000 / 1024)
    assert cfg.keep_probability(60) == pytest.approx(1000 / 3600)
    assert cfg.keep_probability(100) == pytest.approx(0.1)
    assert cfg.expected_length(100) == pytest.approx(0.1 * 100 + 0.9 * 31)
    assert cfg.expected_length(20) == 20
    assert StochasticLengthConfig(alpha=2.0, max_len=64).threshold == 64  # alpha = 2: nothing up to N is cut
    assert StochasticLengthConfig(alpha=1.2, max_len=16).threshold == 5  # floor(16^0.6) = floor(5.28)


@pytest.mark.parametrize("alpha,n_max,n", [(1.5, 100, 60), (1.5, 100, 100), (1.2, 200, 150), (1.8, 50, 45)])
def test_empirical_keep_rate_and_mean_length_match_the_formula(alpha, n_max, n):
    trials = 4000
    sampler = StochasticLength(StochasticLengthConfig(alpha=alpha, max_len=n_max), seed=3)
    lengths = torch.full((trials,), n)
    _, kept = sampler.sample_indices(lengths)
    threshold = plain_threshold(n_max, alpha)
    p = plain_keep_probability(n, n_max, alpha)
    assert set(kept.tolist()) <= {n, threshold}
    whole = (kept == n).float().mean().item()
    sigma = math.sqrt(p * (1 - p) / trials)
    assert abs(whole - p) < 4 * sigma + 1e-9, (whole, p)
    mean = kept.float().mean().item()
    expected = p * n + (1 - p) * threshold
    assert abs(mean - expected) < 4 * sigma * (n - threshold) + 1e-9, (mean, expected)


def test_short_histories_are_always_kept_whole():
    sampler = StochasticLength(StochasticLengthConfig(alpha=1.5, max_len=100), seed=0)
    lengths = torch.tensor([0, 1, 5, 31] * 200)
    index, kept = sampler.sample_indices(lengths)
    assert torch.equal(kept, lengths)
    assert torch.equal(index, torch.arange(int(lengths.sum())))


def test_subsequence_is_an_ordered_uniform_subset():
    n, trials = 60, 3000
    sampler = StochasticLength(StochasticLengthConfig(alpha=1.5, max_len=100), seed=1)  # L = 31
    lengths = torch.full((trials,), n)
    index, kept = sampler.sample_indices(lengths)
    starts = torch.cat([torch.zeros(1, dtype=torch.long), kept.cumsum(0)[:-1]])
    counts = torch.zeros(n)
    cut = 0
    for t in range(trials):
        local = index[starts[t]:starts[t] + kept[t]] - t * n  # positions inside sequence t
        assert bool((local >= 0).all() and (local < n).all())
        assert bool((local[1:] > local[:-1]).all())  # strictly increasing: distinct and chronological
        if kept[t] == 31:
            counts[local] += 1
            cut += 1
    freq = counts / cut  # each position is in a uniform 31-of-60 subset with probability 31/60
    sigma = math.sqrt((31 / 60) * (29 / 60) / cut)
    assert (freq - 31 / 60).abs().max() < 5 * sigma


def ranking_batch(lengths, seed=0) -> RankingBatch:
    total = int(sum(lengths))
    values = torch.arange(total) + 1
    cands = [2] * len(lengths)
    lc = sum(cands)
    return RankingBatch(
        history_item_ids=values, history_actions=values * 10, history_timestamps=values * 100,
        history_offsets=torch.tensor([0] + list(lengths)).cumsum(0), candidate_item_ids=torch.arange(lc) + 1,
        candidate_timestamps=torch.full((lc,), 10 ** 6), candidate_offsets=torch.tensor([0] + cands).cumsum(0),
        labels=torch.zeros(lc, 1), tasks=(RankingTask("click", bit=0),), history_watch_time=values.float() / 2)


def test_batch_events_stay_aligned_and_candidates_untouched():
    batch = ranking_batch([50, 3, 80, 10])
    sampler = StochasticLength(StochasticLengthConfig(alpha=1.2, max_len=64), seed=5)  # L = floor(64^0.6) = 12
    out = sampler(batch)
    assert torch.equal(out.history_actions, out.history_item_ids * 10)
    assert torch.equal(out.history_timestamps, out.history_item_ids * 100)
    assert torch.equal(out.history_watch_time, out.history_item_ids.float() / 2)
    lengths = out.history_lengths.tolist()
    assert lengths[1] == 3 and lengths[3] == 10 and lengths[0] in (50, 12) and lengths[2] in (80, 12)
    for b in range(4):  # each row's events come from that row, in order
        lo, hi = int(batch.history_offsets[b]), int(batch.history_offsets[b + 1])
        row = out.history_item_ids[int(out.history_offsets[b]):int(out.history_offsets[b + 1])]
        assert bool(((row > lo) & (row <= hi)).all()) and bool((row[1:] > row[:-1]).all())
    for name in ("candidate_item_ids", "candidate_timestamps", "candidate_offsets", "labels"):
        assert torch.equal(getattr(out, name), getattr(batch, name))


def test_seeded_sampler_is_reproducible():
    lengths = torch.tensor([90, 70, 200, 5] * 10)
    cfg = StochasticLengthConfig(alpha=1.4, max_len=100)
    a = StochasticLength(cfg, seed=7).sample_indices(lengths)
    b = StochasticLength(cfg, seed=7).sample_indices(lengths)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_model_applies_stochastic_length_in_training_only():
    torch.manual_seed(0)
    cfg = DlrmHSTUConfig(embedding_dim=8, num_blocks=1, num_heads=1, attention_dim=4, linear_dim=4, max_seq_len=64,
                         dropout=0.0, input_dropout=0.0, stochastic_length_alpha=1.2, stochastic_length_max_len=16,
                         seed=11, kernel="pytorch")  # L = 5; a 40-event history is kept whole with p = 0.017
    model = DlrmHSTU(cfg, num_items=400, contextual_cardinalities={}, tasks=(RankingTask("click", bit=0),))
    batch = ranking_batch([40, 40, 4, 40])
    model.eval()
    state = model.stochastic_length.generator.get_state()
    eval_out = model(batch)
    assert torch.equal(model.stochastic_length.generator.get_state(), state)  # no draws in eval
    assert torch.equal(model(batch), eval_out)
    model.train()
    train_out = model(batch)
    # the same draws, replayed by a fresh sampler with the model's seed, then the model in eval mode
    replay = StochasticLength(cfg.stochastic_length_config(), seed=11)(batch)
    assert replay.history_lengths.tolist() != batch.history_lengths.tolist()
    model.eval()
    torch.testing.assert_close(train_out, model(replay), rtol=0, atol=1e-6)
    assert (train_out - eval_out).abs().max() > 1e-6
    rows = batch.candidate_row
    torch.testing.assert_close(train_out[rows == 2], eval_out[rows == 2], rtol=0, atol=1e-6)  # short row untouched


def test_bad_config_values_raise():
    with pytest.raises(ValueError, match=r"alpha must be in \(1, 2\]"):
        StochasticLengthConfig(alpha=1.0, max_len=10)
    with pytest.raises(ValueError, match="max_len"):
        StochasticLengthConfig(alpha=1.5, max_len=0)
