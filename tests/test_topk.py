"""Brute-force top-K (merlin_hstu.retrieval.topk): chunked == unchunked, history filtering, tie order, the evaluation ranks,
MoL top-K against plain scoring, and traceability."""
from __future__ import annotations

import pytest
import torch

from merlin_hstu.retrieval.metrics import target_ranks as reference_target_ranks
from merlin_hstu.retrieval.similarity import MixtureOfLogits, MoLConfig
from merlin_hstu.retrieval.topk import BruteForceTopK, MIPSBruteForceTopK, MoLBruteForceTopK, rankable_from_invalid


class GivenScores(BruteForceTopK):
    """A top-K over a fixed [B, V] score matrix (lets a test place exact ties across chunk borders)."""

    def __init__(self, scores, chunk_size, rankable=None):
        super().__init__(scores.shape[1], chunk_size, rankable)
        self.given = scores

    def score_chunk(self, prepared, start, end):
        return self.given[:, start:end]


def plain_topk(scores, k, exclude=None, rankable=None):
    """Sort every row by (-score, id) in Python, skipping excluded and unrankable ids."""
    out = []
    for b, row in enumerate(scores.tolist()):
        banned = set(exclude[b].tolist()) if exclude is not None else set()
        order = sorted((-s, v) for v, s in enumerate(row)
                       if v not in banned and (rankable is None or bool(rankable[v])))
        out.append([v for _, v in order[:k]])
    return out


def test_chunked_equals_unchunked_and_the_plain_sort():
    g = torch.Generator().manual_seed(0)
    items = torch.nn.functional.normalize(torch.randn(53, 8, generator=g), dim=-1)
    query = torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=-1)
    rankable = rankable_from_invalid(53, (0, 1, 2, 40))
    exclude = torch.randint(0, 53, (6, 5), generator=g)
    exclude[0, :2] = -1  # ignored slots
    results = []
    for chunk in (1, 7, 53, 1000):
        topk = MIPSBruteForceTopK(items, chunk, rankable)
        results.append(topk(query, 12, exclude))
    for values, ids in results[1:]:
        assert torch.equal(ids, results[0][1])
        torch.testing.assert_close(values, results[0][0])
    assert results[0][1].tolist() == plain_topk(query @ items.T, 12, exclude, rankable)
    assert torch.equal(MIPSBruteForceTopK(items, 7).scores(query), torch.cat(
        [query @ items[s:s + 7].T for s in range(0, 53, 7)], dim=1))


def test_ties_are_broken_by_id_across_chunk_borders():
    scores = torch.tensor([[1.0, 3.0, 2.0, 3.0, 3.0, 0.0, 2.0, 3.0],
                           [0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5]])
    for chunk in (1, 3, 8):
        _, ids = GivenScores(scores, chunk)(torch.zeros(2, 1), 6)
        assert ids.tolist() == [[1, 3, 4, 7, 2, 6], [0, 1, 2, 3, 4, 5]]


def test_history_filtering_unrankable_ids_and_short_catalogues():
    scores = torch.arange(10, dtype=torch.float32).flip(0).unsqueeze(0)  # id 0 best, id 9 worst
    topk = GivenScores(scores, 4, rankable_from_invalid(10, (0, 5)))
    values, ids = topk(torch.zeros(1, 1), 3, exclude=torch.tensor([[1, 3, -1]]))
    assert ids.tolist() == [[2, 4, 6]]
    values, ids = topk(torch.zeros(1, 1), 10)
    assert ids[0, :8].tolist() == [1, 2, 3, 4, 6, 7, 8, 9]
    assert torch.isinf(values[0, 8:]).all()  # only 8 rankable ids: the remaining slots are -inf
    with pytest.raises(ValueError, match="k must be in"):
        topk(torch.zeros(1, 1), 11)
    with pytest.raises(ValueError, match="NaN"):
        GivenScores(torch.tensor([[0.0, float("nan")]]), 1)(torch.zeros(1, 1), 1)


@pytest.mark.parametrize("chunk", [3, 50])
def test_target_ranks_equal_the_metrics_module_including_ties_and_repeats(chunk):
    g = torch.Generator().manual_seed(1)
    scores = torch.randint(0, 6, (40, 50), generator=g).float()  # many exact ties
    targets = torch.randint(3, 50, (40,), generator=g)
    history = torch.randint(0, 50, (40, 8), generator=g)
    history[::3, 0] = targets[::3]  # repeat consumption: the target is in its own history window
    invalid = (0, 1, 2)
    topk = GivenScores(scores, chunk, rankable_from_invalid(50, invalid))
    for cap in (None, 5, 20, 2500):
        got = topk.target_ranks(torch.zeros(40, 1), targets, history, rank_cap=cap)
        want = reference_target_ranks(scores, targets, history, invalid_ids=invalid, rank_cap=cap)
        assert torch.equal(got, want), cap
    with pytest.raises(ValueError, match="not rankable"):
        topk.target_ranks(torch.zeros(1, 1), torch.tensor([1]))


def test_mol_topk_matches_plain_pairwise_scoring_and_is_chunk_invariant():
    torch.manual_seed(0)
    mol = MixtureOfLogits(MoLConfig(query_components=3, item_components=2, component_dim=4, query_hidden_dim=8,
                                    gate_query_hidden_dim=4, gate_item_hidden_dim=4, gate_logits_hidden_dim=4),
                          6, 6).double().eval()
    items = torch.randn(37, 6, dtype=torch.float64)
    query = torch.randn(5, 6, dtype=torch.float64)
    with torch.no_grad():
        plain = torch.stack([mol(query[b:b + 1], items.unsqueeze(0))[0] for b in range(5)])  # pair by pair
        exclude = torch.randint(0, 37, (5, 4))
        want = plain_topk(plain, 8, exclude)
        for chunk in (4, 37):
            topk = MoLBruteForceTopK(mol, items, chunk)
            torch.testing.assert_close(topk.scores(query), plain, rtol=1e-10, atol=1e-10)
            values, ids = topk(query, 8, exclude)
            assert ids.tolist() == want
            torch.testing.assert_close(values, plain.gather(1, ids), rtol=1e-10, atol=1e-10)


def test_mol_topk_scores_trace_for_any_batch_size():
    torch.manual_seed(0)
    mol = MixtureOfLogits(MoLConfig(query_hidden_dim=16, component_dim=8), 10, 10).eval()
    topk = MoLBruteForceTopK(mol, torch.randn(45, 10), chunk_size=16)

    class Scores(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, query):
            return self.inner.scores(query)

    with torch.no_grad():
        traced = torch.jit.trace(Scores(topk), torch.randn(2, 10))
        for batch in (1, 3, 9):
            query = torch.randn(batch, 10)
            torch.testing.assert_close(traced(query), topk.scores(query), rtol=1e-6, atol=1e-6)
