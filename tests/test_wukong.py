"""WuKong blocks, DLRM and logistic regression (merlin_hstu.ctr.wukong, merlin_hstu.ctr.dlrm).

Numeric checks compare against plain loop implementations of the formulas written here, reading the weights out
of the modules: FMB = MLP(LN(flatten(X X^T Y))), LCB = W_L X, layer = LN_d(concat(FMB, LCB) + R X), DLRM's
upper-triangle dot products.
"""
from __future__ import annotations

import math

import pytest
import torch

from merlin_hstu.ctr.train import CTRTrainConfig, build_ctr_model, train_ctr
from merlin_hstu.ctr.data import CTRData, CTRTensors
from merlin_hstu.ctr.dlrm import DLRM, DLRMConfig, LogisticRegression
from merlin_hstu.ctr.wukong import WukongModel, WukongModelConfig
from merlin_hstu.encoders.wukong import (FactorizationMachineBlock, LinearCompressBlock, WukongConfig, WukongLayer,
                                         WukongTower)


# ------------------------------------------------------------------------------------------------
# plain implementations (python loops over rows and features)
# ------------------------------------------------------------------------------------------------
def plain_linear(layer: torch.nn.Linear, v: list) -> list:
    w, b = layer.weight.tolist(), layer.bias.tolist()
    return [sum(w[o][i] * v[i] for i in range(len(v))) + b[o] for o in range(len(w))]


def plain_mlp(seq: torch.nn.Sequential, v: list) -> list:
    for module in seq:
        if isinstance(module, torch.nn.Linear):
            v = plain_linear(module, v)
        elif isinstance(module, torch.nn.ReLU):
            v = [max(0.0, a) for a in v]
        else:
            raise AssertionError(f"unexpected module {module}")
    return v


def plain_layer_norm(v: list, ln) -> list:
    mean = sum(v) / len(v)
    var = sum((a - mean) ** 2 for a in v) / len(v)
    w = ln.weight.tolist() if ln.weight is not None else [1.0] * len(v)
    b = ln.bias.tolist() if ln.bias is not None else [0.0] * len(v)
    return [(a - mean) / math.sqrt(var + ln.eps) * w[i] + b[i] for i, a in enumerate(v)]


def plain_fmb(block: FactorizationMachineBlock, x: torch.Tensor) -> torch.Tensor:
    y = block.compress.tolist()
    n, d, k = block.num_features, block.dim, block.compressed_features
    rows = []
    for row in x.tolist():
        dots = [[sum(row[i][c] * row[m][c] for c in range(d)) for m in range(n)] for i in range(n)]  # X X^T
        fm = [sum(dots[i][m] * y[m][j] for m in range(n)) for i in range(n) for j in range(k)]  # (X X^T) Y, flat
        if isinstance(block.norm, torch.nn.LayerNorm):
            fm = plain_layer_norm(fm, block.norm)
        out = plain_mlp(block.mlp, fm)
        rows.append([out[f * d:(f + 1) * d] for f in range(block.output_features)])
    return torch.tensor(rows)


def plain_lcb(block: LinearCompressBlock, x: torch.Tensor) -> torch.Tensor:
    w = block.weight.tolist()
    return torch.tensor([[[sum(w[o][i] * row[i][c] for i in range(len(row))) for c in range(len(row[0]))]
                          for o in range(len(w))] for row in x.tolist()])


def randomize(module: torch.nn.Module, seed: int) -> None:
    """Non-trivial LayerNorm affine parameters too (they start at 1 / 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)


# ------------------------------------------------------------------------------------------------
# blocks against plain loops
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layer_norm", [True, False])
def test_fmb_matches_plain_loops(layer_norm):
    torch.manual_seed(0)
    block = FactorizationMachineBlock(num_features=5, dim=3, output_features=2, compressed_features=4,
                                      mlp_hidden=(6,), layer_norm=layer_norm)
    randomize(block, 1)
    x = torch.randn(3, 5, 3)
    out = block(x)
    assert out.shape == (3, 2, 3)
    torch.testing.assert_close(out, plain_fmb(block, x), rtol=1e-4, atol=1e-4)
    # the optimised order X (X^T Y) equals the textbook (X X^T) Y
    torch.testing.assert_close(block.interactions(x), (x @ x.transpose(1, 2)) @ block.compress, rtol=1e-5, atol=1e-5)


def test_lcb_matches_plain_loops():
    torch.manual_seed(0)
    block = LinearCompressBlock(num_features=6, dim=4, output_features=3)
    x = torch.randn(2, 6, 4)
    torch.testing.assert_close(block(x), plain_lcb(block, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("num_features", [5, 7])  # 7 == n_F + n_L: identity residual; 5: projected residual
def test_layer_matches_plain_formula(num_features):
    torch.manual_seed(0)
    cfg = WukongConfig(num_layers=1, fmb_feature_num=3, lcb_feature_num=4, compressed_feature_num=2, fmb_mlp=(5,))
    layer = WukongLayer(num_features, 3, cfg)
    randomize(layer, 2)
    layer.eval()
    x = torch.randn(2, num_features, 3)
    mixed = torch.cat([plain_fmb(layer.fmb, x), plain_lcb(layer.lcb, x)], dim=1)
    skip = x if num_features == 7 else plain_lcb(layer.residual, x)
    assert (layer.residual is None) == (num_features == 7)
    expected = torch.tensor([[plain_layer_norm(v, layer.norm) for v in row] for row in (mixed + skip).tolist()])
    torch.testing.assert_close(layer(x), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("n, d, layers, n_f, n_l, k", [
    (3, 4, 1, 2, 2, 1),
    (13, 8, 2, 8, 8, 8),
    (39, 16, 3, 4, 12, 6),
    (2, 1, 4, 1, 1, 2),
])
def test_tower_and_model_shapes(n, d, layers, n_f, n_l, k):
    cfg = WukongConfig(num_layers=layers, fmb_feature_num=n_f, lcb_feature_num=n_l, compressed_feature_num=k,
                       fmb_mlp=(8, 8))
    tower = WukongTower(n, d, cfg)
    assert len(tower.layers) == layers and tower.output_features == n_f + n_l
    assert tower(torch.randn(5, n, d)).shape == (5, n_f + n_l, d)
    num_dense = n // 2
    cards = [3] * (n - num_dense)
    model = WukongModel(cards, num_dense, WukongModelConfig(embedding_dim=d, tower=cfg, top_mlp=(4,)))
    logits = model(torch.randn(5, num_dense), torch.randint(0, 3, (5, n - num_dense)))
    assert logits.shape == (5,) and torch.isfinite(logits).all()


def test_shape_errors_are_explained():
    tower = WukongTower(4, 8, WukongConfig(num_layers=1))
    with pytest.raises(ValueError, match=r"num_features=4 .* got 5"):
        tower(torch.randn(2, 5, 8))
    with pytest.raises(ValueError, match=r"dim=8 but got 6.*same dim d"):
        tower(torch.randn(2, 4, 6))
    with pytest.raises(ValueError, match=r"\[batch, num_features=4, dim=8\].*torch.stack"):
        tower(torch.randn(2, 32))
    with pytest.raises(ValueError, match="WukongConfig.fmb_feature_num must be a positive int"):
        WukongConfig(fmb_feature_num=0)
    with pytest.raises(ValueError, match="WukongConfig.fmb_mlp must be a list of positive ints"):
        WukongConfig(fmb_mlp="wide")
    with pytest.raises(ValueError, match="WukongConfig.dropout"):
        WukongConfig(dropout=1.5)
    model = WukongModel([4, 5], 2, WukongModelConfig(embedding_dim=4, tower=WukongConfig(num_layers=1)))
    with pytest.raises(ValueError, match=r"dense must be \[batch, 2\]"):
        model(torch.randn(3, 3), torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"sparse must be \[batch, 2\]"):
        model(torch.randn(3, 2), torch.zeros(3, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"categorical feature 1 has ids outside \[0, 5\)"):
        model(torch.randn(3, 2), torch.tensor([[0, 1], [1, 5], [2, 2]]))


# ------------------------------------------------------------------------------------------------
# DLRM and logistic regression against the plain formulas
# ------------------------------------------------------------------------------------------------
def test_dlrm_matches_plain_formula():
    torch.manual_seed(0)
    cards, num_dense = [4, 6, 5], 3
    model = DLRM(cards, num_dense, DLRMConfig(embedding_dim=4, bottom_mlp=(5,), top_mlp=(6,)))
    dense, sparse = torch.randn(4, num_dense), torch.tensor([[0, 1, 2], [3, 5, 4], [1, 0, 0], [2, 2, 1]])
    expected = []
    for x, ids in zip(dense.tolist(), sparse.tolist()):
        v0 = [max(0.0, a) for a in plain_mlp(model.bottom[:-1], x)]  # bottom MLP ends in ReLU
        vectors = [v0] + [model.embeddings[j].weight[i].tolist() for j, i in enumerate(ids)]
        dots = [sum(a * b for a, b in zip(vectors[i], vectors[j]))
                for i in range(len(vectors)) for j in range(i + 1, len(vectors))]
        expected.append(plain_mlp(model.top, v0 + dots)[0])
    assert len(model.pair_rows) == 6  # (3 + 1) * 3 / 2 pairs
    torch.testing.assert_close(model(dense, sparse), torch.tensor(expected), rtol=1e-4, atol=1e-4)
    no_dense = DLRM(cards, 0, DLRMConfig(embedding_dim=4))
    assert no_dense(torch.zeros(4, 0), sparse).shape == (4,)


def test_logistic_regression_matches_plain_formula():
    model = LogisticRegression([3, 4], 2)
    randomize(model, 3)
    dense, sparse = torch.randn(3, 2), torch.tensor([[0, 3], [2, 1], [1, 0]])
    w, b = model.dense.weight[0].tolist(), model.dense.bias.item()
    expected = [model.bias.item() + b + sum(wi * xi for wi, xi in zip(w, x))
                + sum(model.weights[j].weight[i, 0].item() for j, i in enumerate(ids))
                for x, ids in zip(dense.tolist(), sparse.tolist())]
    torch.testing.assert_close(model(dense, sparse), torch.tensor(expected), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# learning: planted order-3 interaction
# ------------------------------------------------------------------------------------------------
def order3_split(n: int, seed: int) -> CTRTensors:
    """5 categorical features of 4 values; logit = 3 s(c0) s(c1) s(c2) with s = +-1 per value, c3 and c4 are
    noise.  The label has no order-1 or order-2 dependence on any feature: logistic regression sees nothing."""
    g = torch.Generator().manual_seed(seed)
    sparse = torch.randint(0, 4, (n, 5), generator=g)
    sign = torch.tensor([1.0, -1.0, 1.0, -1.0])
    logit = 3.0 * sign[sparse[:, 0]] * sign[sparse[:, 1]] * sign[sparse[:, 2]]
    labels = (torch.rand(n, generator=g) < torch.sigmoid(logit)).float()
    return CTRTensors(torch.zeros(n, 0), sparse, labels, [], [f"c{j}" for j in range(5)], [4] * 5)


def test_wukong_stack_beats_logistic_regression_on_order3_interactions():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model: one thread is faster, and immune to a busy machine
    try:
        data = CTRData("order3", order3_split(4000, 0), order3_split(2000, 1))
        torch.manual_seed(0)
        logreg = train_ctr(build_ctr_model("logreg", [4] * 5, 0), data,
                           CTRTrainConfig(epochs=5, batch_size=256, learning_rate=0.05))
        torch.manual_seed(0)
        wukong = build_ctr_model("wukong", [4] * 5, 0, {
            "embedding_dim": 8, "num_layers": 2, "lcb_feature_num": 4, "fmb_feature_num": 4,
            "compressed_feature_num": 4, "fmb_mlp": (32,), "top_mlp": (32,)})
        result = train_ctr(wukong, data, CTRTrainConfig(epochs=8, batch_size=256, learning_rate=0.01))
    finally:
        torch.set_num_threads(threads)
    assert logreg.metrics["auc"] < 0.55  # nothing to see at order 1
    assert result.metrics["auc"] > 0.9  # the Bayes AUC here is about 0.95
    assert result.metrics["logloss"] < logreg.metrics["logloss"] - 0.3
    assert result.epoch_losses[-1] < result.epoch_losses[0]
