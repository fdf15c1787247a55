"""Ranking metrics (merlin_hstu.common.metrics) against plain implementations written here: AUC by counting
positive/negative pairs (ties one half), GAUC as a per-user loop with impression weights, log loss and NE from
their formulas."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from merlin_hstu.common.metrics import auc, binary_task_metrics, gauc, log_loss, normalized_entropy


def pairwise_auc(labels, scores) -> float:
    """P(score of a random positive > score of a random negative), ties 1/2, by looping over every pair."""
    pos = [s for y, s in zip(labels, scores) if y > 0.5]
    neg = [s for y, s in zip(labels, scores) if y <= 0.5]
    if not pos or not neg:
        return float("nan")
    wins = 0.0
    for p in pos:
        for n in neg:
            wins += 1.0 if p > n else 0.5 if p == n else 0.0
    return wins / (len(pos) * len(neg))


def loop_gauc(labels, scores, users):
    """sum_u n_u * AUC_u / sum_u n_u over users having both classes; n_u = the user's candidates."""
    total = weight = 0.0
    counted = skipped = 0
    for u in sorted(set(users)):
        idx = [i for i, g in enumerate(users) if g == u]
        value = pairwise_auc([labels[i] for i in idx], [scores[i] for i in idx])
        if math.isnan(value):
            skipped += 1
            continue
        total += len(idx) * value
        weight += len(idx)
        counted += 1
    return total / weight, counted, skipped


def plain_log_loss(labels, probs) -> float:
    return -sum(y * math.log(p) + (1 - y) * math.log(1 - p) for y, p in zip(labels, probs)) / len(labels)


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def test_auc_hand_example_with_ties():
    labels = [1, 0, 1, 0, 1]
    scores = [0.9, 0.3, 0.3, 0.8, 0.1]
    # pairs (pos, neg): (.9,.3)=1 (.9,.8)=1 (.3,.3)=.5 (.3,.8)=0 (.1,.3)=0 (.1,.8)=0 -> 2.5 / 6
    assert auc(labels, scores) == pytest.approx(2.5 / 6)
    assert pairwise_auc(labels, scores) == pytest.approx(2.5 / 6)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auc_matches_pairwise_count_on_random_data_with_ties(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 300)
    scores = np.round(rng.normal(size=300) + labels * 0.7, 1)  # rounding makes many ties
    assert auc(labels, scores) == pytest.approx(pairwise_auc(labels.tolist(), scores.tolist()), abs=1e-12)
    # rank-based: logits and their sigmoid give the same AUC; tensors work like arrays
    assert auc(torch.tensor(labels), torch.sigmoid(torch.tensor(scores))) == pytest.approx(auc(labels, scores))


def test_auc_perfect_inverted_and_one_class():
    assert auc([0, 0, 1, 1], [1, 2, 3, 4]) == 1.0
    assert auc([0, 0, 1, 1], [4, 3, 2, 1]) == 0.0
    assert auc([0, 1], [5, 5]) == 0.5
    assert math.isnan(auc([1, 1, 1], [0.1, 0.2, 0.3]))
    assert math.isnan(auc([0, 0], [0.1, 0.2]))


def test_gauc_hand_example():
    #            user 7 (3 cand.)   user 2 (2 cand.)  user 9 (all positive: skipped)
    labels = [1, 0, 0, 0, 1, 1, 1]
    scores = [0.9, 0.5, 0.95, 0.4, 0.6, 0.1, 0.2]
    users = [7, 7, 7, 2, 2, 9, 9]
    # user 7: positive .9 vs negatives .5 (win), .95 (loss) -> 1/2; user 2: .6 > .4 -> 1
    expected = (3 * 0.5 + 2 * 1.0) / 5
    result = gauc(labels, scores, users)
    assert result.gauc == pytest.approx(expected)
    assert (result.users_counted, result.users_skipped) == (2, 1)


@pytest.mark.parametrize("seed", [0, 1])
def test_gauc_matches_user_loop_on_random_data(seed):
    rng = np.random.default_rng(seed)
    users = rng.integers(0, 40, 400)  # unsorted groups of different sizes
    labels = rng.integers(0, 2, 400)
    scores = np.round(rng.normal(size=400) + 0.5 * labels, 1)
    expected, counted, skipped = loop_gauc(labels.tolist(), scores.tolist(), users.tolist())
    result = gauc(labels, scores, users)
    assert result.gauc == pytest.approx(expected, abs=1e-12)
    assert (result.users_counted, result.users_skipped) == (counted, skipped)


def test_log_loss_and_ne_match_their_formulas():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 200).astype(float)
    logits = rng.normal(size=200) * 2
    probs = [sigmoid(x) for x in logits]
    expected = plain_log_loss(labels.tolist(), probs)
    assert log_loss(labels, probs) == pytest.approx(expected, rel=1e-12)
    assert log_loss(labels, logits, from_logits=True) == pytest.approx(expected, rel=1e-12)
    p = labels.mean()
    base_entropy = -(p * math.log(p) + (1 - p) * math.log(1 - p))
    assert normalized_entropy(labels, logits, from_logits=True) == pytest.approx(expected / base_entropy, rel=1e-12)


def test_ne_of_the_base_rate_predictor_is_one():
    labels = np.array([1, 0, 0, 1, 0, 0, 0, 1], dtype=float)
    constant = np.full(len(labels), labels.mean())
    assert normalized_entropy(labels, constant) == pytest.approx(1.0)


def test_binary_task_metrics_from_logits():
    labels = [1, 0, 1, 0, 0, 1]
    logits = [2.0, -1.0, 0.5, 0.7, -3.0, 0.1]
    users = [1, 1, 1, 2, 2, 2]
    out = binary_task_metrics(labels, logits, groups=users)
    assert out["auc"] == pytest.approx(pairwise_auc(labels, logits))
    assert out["logloss"] == pytest.approx(plain_log_loss(labels, [sigmoid(x) for x in logits]))
    assert out["gauc"] == pytest.approx(loop_gauc(labels, logits, users)[0])
    assert set(binary_task_metrics(labels, logits)) == {"auc", "logloss", "ne"}


def test_bad_inputs_are_rejected():
    with pytest.raises(ValueError, match="shape"):
        auc([1, 0, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="one shape"):
        gauc([1, 0], [0.1, 0.2], [1, 1, 1])
    with pytest.raises(ValueError, match="from_logits=True"):
        log_loss([1, 0], [2.5, -1.0])  # logits passed as probabilities
