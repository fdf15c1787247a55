"""Mixture of logits (merlin_hstu.retrieval.similarity.MixtureOfLogits) against a plain implementation of its formula.

`plain_mol` below computes one (query, item) pair at a time from the module's weights with explicit matrix
products and Python sums, following reference-hstu.md §1.7 / the similarity module docstring.
"""
from __future__ import annotations

import math

import pytest
import torch

from merlin_hstu.retrieval.similarity import (
    MixtureOfLogits,
    MoLConfig,
    RetrievalHead,
    RetrievalHeadConfig,
    mutual_information_loss,
)

DQ, DX = 6, 5


def make_mol(seed=0, **overrides):
    torch.manual_seed(seed)
    cfg = dict(query_components=3, item_components=2, component_dim=4, temperature=0.1, query_hidden_dim=7,
               item_hidden_dim=0, gate_query_hidden_dim=5, gate_item_hidden_dim=4, gate_logits_hidden_dim=3,
               gate_dropout=0.0, item_dropout=0.0, query_dropout=0.0, train_chunk_size=4)
    cfg.update(overrides)
    return MixtureOfLogits(MoLConfig(**cfg), DQ, DX).double().eval()


def linear(layer, x):
    return layer.weight @ x + (layer.bias if layer.bias is not None else 0.0)


def silu(x):
    return x * torch.sigmoid(x)


def projection(seq, x):
    """Dropout (off) -> [SwiGLU ->] Linear, spelled out."""
    layers = list(seq)[1:]
    if len(layers) == 2:  # SwiGLU(x) = SiLU(x W_a + b_a) * (x W_b + b_b)
        both = linear(layers[0].proj, x)
        half = both.shape[0] // 2
        x = silu(both[:half]) * both[half:]
    return linear(layers[-1], x)


def mlp(seq, x):
    return linear(seq[2], silu(linear(seq[0], x)))


@torch.no_grad()
def plain_mol(mol: MixtureOfLogits, q: torch.Tensor, x: torch.Tensor):
    """One pair -> (score, gate pi as a list)."""
    c = mol.config
    qp = projection(mol.query_projection, q).view(c.query_components, c.component_dim)
    xp = projection(mol.item_projection, x).view(c.item_components, c.component_dim)
    if c.component_l2_norm:
        qp = torch.stack([r / max(float(r.norm()), c.eps) for r in qp])
        xp = torch.stack([r / max(float(r.norm()), c.eps) for r in xp])
    logits = [float(qp[i] @ xp[j]) / c.temperature for i in range(c.query_components)
              for j in range(c.item_components)]
    gq, gx = mlp(mol.gate_query, q), mlp(mol.gate_item, x)
    gl = mlp(mol.gate_logits, torch.tensor(logits, dtype=q.dtype))
    gate = [float(silu(gq[k] * gx[k] + gl[k])) for k in range(len(logits))]
    m = max(gate)
    weights = [math.exp(g - m) for g in gate]
    pi = [w / sum(weights) for w in weights]
    return sum(p * l for p, l in zip(pi, logits)), pi


def test_scores_and_gates_match_the_plain_formula_in_every_entry_point():
    mol = make_mol()
    g = torch.Generator().manual_seed(1)
    query = torch.randn(4, DQ, generator=g, dtype=torch.float64)
    items = torch.randn(9, DX, generator=g, dtype=torch.float64)
    ids = torch.randint(0, 9, (4, 6), generator=g)
    want = [[plain_mol(mol, query[p], items[ids[p, m]])[0] for m in range(6)] for p in range(4)]
    with torch.no_grad():
        direct = mol(query, items[ids])  # per-pair path
        comps, gate = mol.item_side(items)
        by_ids, gates = mol.score_ids(query, comps, gate, ids, gate_column=2)  # chunked (4 queries per chunk -> 1)
        qc, qg = mol.query_side(query)
        catalogue = mol.score_catalogue(qc, qg, comps, gate).gather(1, ids)
    for got in (direct, by_ids, catalogue):
        torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-10, atol=1e-10)
    # the gate is a distribution over the K = 3 x 2 component logits, and equals the plain softmax
    assert gates.shape == (4, 6)
    torch.testing.assert_close(gates.sum(-1), torch.ones(4, dtype=torch.float64), rtol=0, atol=1e-12)
    for p in range(4):
        _, pi = plain_mol(mol, query[p], items[ids[p, 2]])
        torch.testing.assert_close(gates[p], torch.tensor(pi, dtype=torch.float64), rtol=1e-10, atol=1e-12)


def test_swiglu_item_projection_and_no_component_norm_match_too():
    mol = make_mol(seed=3, item_hidden_dim=4, component_l2_norm=False)
    q = torch.randn(DQ, dtype=torch.float64)
    x = torch.randn(2, DX, dtype=torch.float64)
    with torch.no_grad():
        got = mol(q.unsqueeze(0), x.unsqueeze(0))[0]
    for j in range(2):
        assert got[j].item() == pytest.approx(plain_mol(mol, q, x[j])[0], rel=1e-10)


def test_gate_dropout_is_renormalised():
    """In training the dropped gate is rescaled to sum 1, so equal component logits give exactly that logit
    (K = 32 logits at dropout 0.5: a row loses all of them with probability 2^-32)."""
    mol = make_mol(gate_dropout=0.5, query_components=4, item_components=8).train()
    logits = torch.full((64, 32), 2.5, dtype=torch.float64)
    gates = torch.randn(64, 32, dtype=torch.float64)
    scores, probs = mol.mix(logits, gates, gates.flip(0))
    torch.testing.assert_close(scores, torch.full((64,), 2.5, dtype=torch.float64))
    torch.testing.assert_close(probs.sum(-1), torch.ones(64, dtype=torch.float64))  # pi itself, before dropout
    varied = torch.randn(64, 32, dtype=torch.float64)
    a, _ = mol.mix(varied, gates, gates)
    b, _ = mol.mix(varied, gates, gates)
    assert not torch.equal(a, b)  # dropout is on in training ...
    mol.eval()
    c, _ = mol.mix(varied, gates, gates)
    d, _ = mol.mix(varied, gates, gates)
    assert torch.equal(c, d)  # ... and off in evaluation


def test_mutual_information_loss_matches_its_formula():
    probs = torch.softmax(torch.randn(5, 4, dtype=torch.float64), dim=-1)
    mean = [sum(float(probs[n, k]) for n in range(5)) / 5 for k in range(4)]
    h_mean = -sum(m * math.log(m) for m in mean)
    h_each = [-sum(float(p) * math.log(float(p)) for p in row) for row in probs]
    assert mutual_information_loss(probs).item() == pytest.approx(-h_mean + sum(h_each) / 5, rel=1e-10)
    # one-hot gates spread evenly over the components reach the minimum -log K
    onehot = torch.eye(4, dtype=torch.float64)
    assert mutual_information_loss(onehot).item() == pytest.approx(-math.log(4), abs=1e-5)


def test_chunked_recomputed_scores_and_gradients_equal_one_chunk():
    g = torch.Generator().manual_seed(2)
    query = torch.randn(11, DQ, generator=g, dtype=torch.float64)
    items = torch.randn(7, DX, generator=g, dtype=torch.float64)
    ids = torch.randint(0, 7, (11, 5), generator=g)
    results = []
    for chunk in (2, 100):  # 6 checkpointed chunks vs one plain chunk
        mol = make_mol(seed=4, train_chunk_size=chunk).train()  # dropouts are 0: deterministic
        q = query.clone().requires_grad_(True)
        comps, gate = mol.item_side(items)
        scores, gates = mol.score_ids(q, comps, gate, ids, gate_column=0)
        (scores.square().sum() + gates.sum() * 0.1).backward()
        results.append((scores.detach(), q.grad, [p.grad.clone() for p in mol.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-10, atol=1e-12)
    for a, b in zip(results[0][2], results[1][2]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_head_pair_scores_distinct_id_and_whole_table_paths_agree():
    torch.manual_seed(0)
    head = RetrievalHead(RetrievalHeadConfig(similarity="mol", mol=MoLConfig(query_hidden_dim=8, component_dim=4,
                                                                              item_dropout=0.0, gate_dropout=0.0)),
                         DQ, DQ).double().eval()
    items = torch.randn(40, DQ, dtype=torch.float64)
    query = torch.randn(3, DQ, dtype=torch.float64)
    few = torch.randint(0, 40, (3, 4))  # 12 ids < 40 rows: item side of the distinct ids only
    many = torch.randint(0, 40, (3, 20))  # 60 ids >= 40 rows: item side of the whole table
    with torch.no_grad():
        for ids in (few, many):
            got, _ = head.pair_scores(query, items, ids)
            want = head.similarity(query, items[ids])
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
        full = head.catalogue_scores(query, items)
        torch.testing.assert_close(full.gather(1, many), head.similarity(query, items[many]), rtol=1e-10, atol=1e-10)


def test_mol_config_rejects_bad_values():
    with pytest.raises(ValueError, match="MoLConfig.query_components must be a positive int"):
        MoLConfig(query_components=0)
    with pytest.raises(ValueError, match="MoLConfig.temperature must be > 0"):
        MoLConfig(temperature=0.0)
    with pytest.raises(ValueError, match="gate_dropout must be in"):
        MoLConfig(gate_dropout=1.0)
    with pytest.raises(ValueError, match="unknown key"):
        RetrievalHeadConfig(similarity="mol", mol={"components": 3})
    with pytest.raises(ValueError, match="query and item vectors of one size"):
        RetrievalHead(RetrievalHeadConfig(), 8, 6)
