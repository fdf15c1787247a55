"""Retrieval metrics under the reference protocol, and the most-popular baseline."""
from __future__ import annotations

import math

import pytest
import torch

from merlin_hstu.retrieval.baselines import MostPopular
from merlin_hstu.retrieval.metrics import (
    RetrievalMetricAccumulator,
    format_metrics_table,
    metric_names,
    retrieval_metrics,
    target_ranks,
)


def brute_force_ranks(scores, targets, history, invalid_ids, rank_cap):
    """Independent oracle: build the ranked list explicitly and look the target up in it.

    Candidates are all ids except invalid ones and history ids (the target always stays).  They are sorted by
    descending score, equal scores by ascending id (the documented tie rule); the rank is the
    1-based position in the first `rank_cap` entries, or rank_cap + 1 if the target is not among them.
    """
    out = []
    for b in range(scores.shape[0]):
        target = int(targets[b])
        hist = {int(h) for h in history[b]} if history is not None else set()
        candidates = [j for j in range(scores.shape[1])
                      if j not in invalid_ids and (j not in hist or j == target)]
        candidates.sort(key=lambda j: (-float(scores[b, j]), j))
        top = candidates if rank_cap is None else candidates[:rank_cap]
        out.append(top.index(target) + 1 if target in top else rank_cap + 1)
    return out


# Hand-made example: ids 0..7, id 0 is padding (invalid) and scored highest to prove it is ignored.
HAND_SCORES = torch.tensor([
    #  id0   id1   id2   id3   id4   id5   id6   id7
    [9.0, 0.1, 0.9, 0.5, 0.3, 0.8, 0.2, 0.7],  # user A
    [9.0, 0.1, 0.9, 0.5, 0.3, 0.8, 0.2, 0.7],  # user B
    [9.0, 0.1, 0.9, 0.5, 0.3, 0.8, 0.2, 0.7],  # user C
])
HAND_TARGETS = torch.tensor([3, 2, 1])
HAND_HISTORY = torch.tensor([
    [2, 0],  # A: id2 (0.9) is above the target 3 (0.5) but in history -> filtered; above remain id5, id7 -> rank 3
    [2, 5],  # B: the target id2 is in the history yet still ranked; nothing ranked is above 0.9 -> rank 1
    [7, 0],  # C: target id1 (0.1); above it and ranked: id2, id3, id4, id5, id6 -> rank 6 (uncapped)
])


def test_hand_example_ranks_and_metrics() -> None:
    ranks = target_ranks(HAND_SCORES, HAND_TARGETS, HAND_HISTORY, rank_cap=None)
    assert ranks.tolist() == [3, 1, 6]
    # with a top-4 list user C's target is missing -> rank_cap + 1 = 5
    ranks = target_ranks(HAND_SCORES, HAND_TARGETS, HAND_HISTORY, rank_cap=4)
    assert ranks.dtype == torch.long and ranks.tolist() == [3, 1, 5]

    m = retrieval_metrics(ranks, ks=(1, 3))
    assert list(m) == ["hr@1", "ndcg@1", "hr@3", "ndcg@3", "mrr"]
    # ranks 3, 1, 5 (5 = missing):
    assert m["hr@1"] == pytest.approx(1 / 3)  # only B
    assert m["hr@3"] == pytest.approx(2 / 3)  # A and B
    assert m["ndcg@1"] == pytest.approx((1 / math.log2(2)) / 3)  # B: 1/log2(1+1) = 1
    assert m["ndcg@3"] == pytest.approx((1 / math.log2(4) + 1 / math.log2(2)) / 3)  # (1/2 + 1)/3 = 1/2
    assert m["ndcg@3"] == pytest.approx(1 / 2)
    # MRR: 1/3 + 1/1 + 1/(cap+1) = 1/3 + 1 + 1/5 = 23/15, over 3 users = 23/45
    assert m["mrr"] == pytest.approx(23 / 45)
    # uncapped ranks 3, 1, 6: MRR = (1/3 + 1 + 1/6)/3 = 1/2
    uncapped = target_ranks(HAND_SCORES, HAND_TARGETS, HAND_HISTORY, rank_cap=None)
    assert retrieval_metrics(uncapped, ks=(1,))["mrr"] == pytest.approx(1 / 2)


def test_history_item_above_target_does_not_push_rank() -> None:
    scores = torch.tensor([[0.0, 5.0, 4.0, 1.0]])
    target = torch.tensor([3])
    assert target_ranks(scores, target, torch.tensor([[0, 0]])).item() == 3  # ids 1, 2 above
    assert target_ranks(scores, target, torch.tensor([[1, 0]])).item() == 2
    assert target_ranks(scores, target, torch.tensor([[1, 2]])).item() == 1
    assert target_ranks(scores, target, None).item() == 3  # no history -> no filtering


def test_target_in_history_is_still_ranked() -> None:
    scores = torch.tensor([[0.0, 5.0, 4.0, 1.0]])
    ranks = target_ranks(scores, torch.tensor([2]), torch.tensor([[2, 2, 0]]))
    assert ranks.item() == 2  # id 1 (5.0) is above; the target id 2 itself is kept


def test_rank_cap_missing_target_counts_as_cap_plus_one() -> None:
    torch.manual_seed(0)
    scores = torch.rand(1, 50)
    target = int(scores[0, 1:].argmin()) + 1  # the lowest-scored valid id: 48 valid ids above it
    ranks = target_ranks(scores, torch.tensor([target]), torch.zeros(1, 3, dtype=torch.long), rank_cap=10)
    assert ranks.item() == 11
    m = retrieval_metrics(ranks, ks=(10,))
    assert m["hr@10"] == 0.0 and m["ndcg@10"] == 0.0
    assert m["mrr"] == pytest.approx(1 / 11)
    assert target_ranks(scores, torch.tensor([target]), None, rank_cap=None).item() == 49


def test_invalid_ids_are_never_ranked() -> None:
    scores = torch.tensor([[10.0, 9.0, 8.0, 1.0, 0.5]])
    target = torch.tensor([3])
    assert target_ranks(scores, target, None, invalid_ids=()).item() == 4
    assert target_ranks(scores, target, None, invalid_ids=(0,)).item() == 3
    assert target_ranks(scores, target, None, invalid_ids=(0, 1)).item() == 2
    with pytest.raises(ValueError, match="targets contain invalid ids"):
        target_ranks(scores, torch.tensor([1]), None, invalid_ids=(0, 1))


def test_ties_are_broken_by_item_id() -> None:
    scores = torch.tensor([[0.0, 2.0, 1.0, 1.0, 1.0]])
    # id 1 is higher; id 2 ties with target 3 and has the smaller id; id 4 ties but comes after
    assert target_ranks(scores, torch.tensor([3]), None).item() == 3
    assert target_ranks(scores, torch.tensor([2]), None).item() == 2
    # a degenerate constant-score model does not get rank 1 for everyone
    flat = torch.zeros(2, 100)
    assert target_ranks(flat, torch.tensor([50, 99]), None).tolist() == [50, 99]  # ids 1.. ahead; 0 is invalid


def test_bad_inputs_are_named() -> None:
    scores = torch.rand(2, 5)
    with pytest.raises(ValueError, match="targets must be ids in"):
        target_ranks(scores, torch.tensor([1, 5]), None)
    with pytest.raises(ValueError, match="targets must be"):
        target_ranks(scores, torch.tensor([1]), None)
    with pytest.raises(TypeError, match="targets must be an integer"):
        target_ranks(scores, torch.tensor([1.0, 2.0]), None)
    with pytest.raises(ValueError, match="history ids must lie in"):
        target_ranks(scores, torch.tensor([1, 2]), torch.tensor([[7], [1]]))
    with pytest.raises(ValueError, match="NaN"):
        target_ranks(torch.full((2, 5), float("nan")), torch.tensor([1, 2]), None)
    with pytest.raises(ValueError, match="ranks are 1-based"):
        retrieval_metrics(torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="empty"):
        retrieval_metrics(torch.tensor([], dtype=torch.long))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_brute_force_on_random_data(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    batch, num_items, hist_len, cap = 24, 60, 12, 20
    # scores rounded to one decimal so ties occur and the tie rule is exercised
    scores = torch.round(torch.randn(batch, num_items, generator=gen) * 10) / 10
    targets = torch.randint(2, num_items, (batch,), generator=gen)
    history = torch.randint(0, num_items, (batch, hist_len), generator=gen)
    history[:, -3:] = 0  # padding
    history[::4, 0] = targets[::4]  # some targets inside their own history
    invalid = (0, 1)
    got = target_ranks(scores, targets, history, invalid_ids=invalid, rank_cap=cap)
    want = brute_force_ranks(scores, targets, history, set(invalid), cap)
    assert got.tolist() == want
    assert (got == cap + 1).any() and (got <= 10).any()  # both regimes are covered

    got_nocap = target_ranks(scores, targets, history, invalid_ids=invalid, rank_cap=None)
    assert got_nocap.tolist() == brute_force_ranks(scores, targets, history, set(invalid), None)

    # metrics against a plain python average
    m = retrieval_metrics(got, ks=(5, 10))
    r = want
    assert m["hr@5"] == pytest.approx(sum(x <= 5 for x in r) / batch)
    assert m["ndcg@10"] == pytest.approx(sum(1 / math.log2(x + 1) for x in r if x <= 10) / batch)
    assert m["mrr"] == pytest.approx(sum(1 / x for x in r) / batch)


def test_accumulator_equals_one_shot() -> None:
    gen = torch.Generator().manual_seed(3)
    ranks = torch.randint(1, 2502, (1000,), generator=gen)
    ranks[:300] = torch.randint(1, 20, (300,), generator=gen)
    acc = RetrievalMetricAccumulator()
    for chunk in torch.split(ranks, [1, 127, 128, 500, 244]):
        acc.update(chunk)
    assert acc.count == 1000
    one_shot = retrieval_metrics(ranks)
    streamed = acc.compute()
    assert list(streamed) == list(one_shot) == metric_names((10, 50, 200))
    for key in one_shot:
        assert streamed[key] == pytest.approx(one_shot[key], rel=1e-12, abs=1e-15)
    acc.reset()
    assert acc.count == 0
    with pytest.raises(ValueError, match="no ranks"):
        acc.compute()


def test_format_metrics_table() -> None:
    rows = {
        "most-popular": {"hr@10": 0.0337, "ndcg@10": 0.01694, "mrr": 0.0193},
        "hstu-large": {"hr@10": 0.065, "ndcg@10": 0.0324},
    }
    text = format_metrics_table(rows)
    lines = text.splitlines()
    assert lines[0].split() == ["model", "hr@10", "ndcg@10", "mrr"]
    assert set(lines[1]) <= {"-", " "}
    assert lines[2].split() == ["most-popular", "0.0337", "0.0169", "0.0193"]
    assert lines[3].split() == ["hstu-large", "0.0650", "0.0324", "-"]
    # fixed width: every column's right edge is at the same offset in every row
    assert lines[2].index("0.0337") == lines[3].index("0.0650")
    assert len(lines[0]) == len(lines[2])
    only = format_metrics_table(rows, keys=["mrr"])
    assert only.splitlines()[0].split() == ["model", "mrr"]


# ---------------------------------------------------------------- most-popular baseline

def test_most_popular_counts_from_padded_tensor_and_lists() -> None:
    seqs = [[3, 1, 3, 2], [3, 4], [1]]
    padded = torch.tensor([[3, 1, 3, 2], [3, 4, 0, 0], [1, 0, 0, 0]])
    from_lists = MostPopular().fit(seqs, num_items=6)
    from_tensor = MostPopular().fit(padded, num_items=6)
    # hand counts: id0 ignored, id1 x2, id2 x1, id3 x3, id4 x1, id5 x0
    assert from_lists.counts.tolist() == [0, 2, 1, 3, 1, 0]
    assert torch.equal(from_lists.counts, from_tensor.counts)
    scores = from_tensor.scores(3)
    assert scores.shape == (3, 6)
    assert all(torch.equal(row, from_tensor.counts) for row in scores)


def test_most_popular_recommend_excludes_history_and_padding() -> None:
    model = MostPopular().fit([[3, 1, 3, 2], [3, 4], [1], [5, 5, 5, 5]], num_items=6)
    # counts: id5 4, id3 3, id1 2, id2 1, id4 1
    history = torch.tensor([[0, 0], [5, 3], [2, 0]])
    recs = model.recommend(history, k=3)
    assert recs.tolist() == [[5, 3, 1], [1, 2, 4], [5, 3, 1]]  # ties (id2, id4) broken by smaller id
    assert not (recs == 0).any()
    with pytest.raises(ValueError, match="k=5"):
        model.recommend(history, k=5)


def test_most_popular_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="num_items=4"):
        MostPopular().fit([[1, 2, 4]], num_items=4)
    with pytest.raises(TypeError, match="integer"):
        MostPopular().fit(torch.tensor([[1.0, 2.0]]), num_items=4)
    with pytest.raises(RuntimeError, match="call fit"):
        MostPopular().scores(2)


def test_most_popular_through_the_protocol_matches_brute_force() -> None:
    gen = torch.Generator().manual_seed(5)
    train = torch.randint(0, 40, (50, 15), generator=gen)  # zeros act as padding
    model = MostPopular(invalid_ids=(0, 1)).fit(train, num_items=40)
    assert model.counts[1] == 0  # invalid ids are not counted
    history = train[:16, :8]
    targets = torch.randint(2, 40, (16,), generator=gen)
    scores = model.scores(16)
    got = target_ranks(scores, targets, history, invalid_ids=(0, 1), rank_cap=25)
    assert got.tolist() == brute_force_ranks(scores, targets, history, {0, 1}, 25)
