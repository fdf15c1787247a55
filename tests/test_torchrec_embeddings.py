"""torchrec tables (`model.embeddings: torchrec`, merlin_hstu.common.embeddings) against nn.Embedding.

With the same weights every model's outputs and gradients equal the nn.Embedding path's to 1e-6 (they are in fact
equal bit for bit on the CPU: the unsharded collections look up the same rows); state dicts keep one set of names,
so runs, checkpoints and the legacy fixtures load in either backend; the fbgemm jagged helpers equal a plain
padding loop.
"""
from __future__ import annotations

import math

import pytest
import torch

from merlin_hstu.common.embeddings import (jagged_to_padded, padded_to_jagged, table_parameter_ids, to_torchrec,
                                           torchrec_tables)

ATOL = 1e-6
pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _named_grads(model):
    """Gradients by state-dict name (the torchrec collection's parameters under their nn.Embedding names)."""
    names = {}
    tables = torchrec_tables(model)
    if tables is not None:
        for spec in tables.specs:
            names[id(tables.local_weight(spec))] = f"{spec.key}.weight"
    return {names.get(id(p), n): p.grad for n, p in model.named_parameters() if p.grad is not None}


def _assert_same(reference, other):
    assert set(reference) == set(other)
    for key in reference:
        torch.testing.assert_close(other[key], reference[key], rtol=0, atol=ATOL, msg=key)


def _pair(build):
    torch.manual_seed(0)
    plain = build("torch")
    torch.manual_seed(0)
    rec = build("torchrec")
    _assert_same(plain.state_dict(), rec.state_dict())  # the same weights, under the same names
    assert torchrec_tables(plain) is None and torchrec_tables(rec) is not None
    return plain, rec


def _forward_backward(model, fn):
    model.train()
    torch.manual_seed(5)  # the same dropout masks in both models
    out = fn(model)
    (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
    return out.detach(), _named_grads(model)


# ---------------------------------------------------------------------------------------------------------------
# retrieval: HSTU and SASRec, with and without action inputs
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("encoder,actions", [("hstu", "none"), ("hstu", "concat"), ("hstu", "interleave"),
                                             ("sasrec", "none")])
def test_retrieval_outputs_and_gradients_equal_nn_embedding(encoder, actions):
    from merlin_hstu.encoders.hstu import HSTUEncoderConfig
    from merlin_hstu.encoders.sasrec import SASRecEncoderConfig
    from merlin_hstu.retrieval.model import HSTURetrievalModel, RetrievalInputsConfig, RetrievalModelConfig

    enc = (HSTUEncoderConfig(embedding_dim=16, num_blocks=2, num_heads=2, attention_dim=8, linear_dim=8,
                             max_seq_len=40, kernel="pytorch") if encoder == "hstu"
           else SASRecEncoderConfig(embedding_dim=16, num_blocks=2, num_heads=2, max_seq_len=40))
    inputs = RetrievalInputsConfig(actions=actions, action_embedding_dim=4 if actions == "concat" else 0)

    def build(backend):
        return HSTURetrievalModel(RetrievalModelConfig(num_items=50, encoder=enc, inputs=inputs,
                                                       num_actions=6 if actions != "none" else 0,
                                                       embeddings=backend))

    plain, rec = _pair(build)
    g = torch.Generator().manual_seed(1)
    lengths = torch.tensor([11, 5, 1, 8])
    ids = torch.randint(1, 50, (4, 12), generator=g)
    ids[torch.arange(12)[None] > lengths[:, None]] = 0  # padding after the target at position len
    times = 1_000_000 + torch.randint(1, 5_000, (4, 12), generator=g).cumsum(1)
    acts = torch.randint(1, 6, (4, 12), generator=g) * (ids > 0) if actions != "none" else None

    def fn(model):
        return torch.cat([model.user_vectors(ids, lengths, times, acts).flatten(),
                          model.score_all_items(ids, lengths, times, acts).flatten()])

    out_plain, grads_plain = _forward_backward(plain, fn)
    out_rec, grads_rec = _forward_backward(rec, fn)
    torch.testing.assert_close(out_rec, out_plain, rtol=0, atol=ATOL)
    _assert_same(grads_plain, grads_rec)
    # the state dicts load across backends
    rec.load_state_dict(plain.state_dict())
    plain.load_state_dict(rec.state_dict())


def test_retrieval_training_through_the_loop_is_identical(tmp_path):
    """train_retrieval with torchrec tables: the same step losses and metrics as nn.Embedding (one process)."""
    import numpy as np

    from merlin_hstu.retrieval.config import dump_config, load_config
    from merlin_hstu.retrieval.data import SequenceTable
    from merlin_hstu.retrieval.train import load_run, save_run, train_retrieval

    rng = np.random.default_rng(2)
    items = [rng.integers(3, 40, size=int(rng.integers(4, 12))).astype(np.int64) for _ in range(30)]
    times = [1_000_000 + np.cumsum(rng.integers(1, 1000, size=len(s))) for s in items]
    table = SequenceTable(items, times, np.arange(30), 40)
    overrides = ["model.embedding_dim=16", "model.attention_dim=8", "model.linear_dim=8", "data.max_history=10",
                 "model.max_seq_len=15", "train.batch_size=8", "train.epochs=2", "train.max_steps=6"]
    plain = train_retrieval(table, load_config("demo", overrides), progress=False)
    cfg = load_config("demo", overrides + ["model.embeddings=torchrec"])
    assert "embeddings: torchrec" in dump_config(cfg)
    rec = train_retrieval(table, cfg, progress=False)
    assert rec.fit.step_losses == plain.fit.step_losses
    assert rec.metrics == plain.metrics
    save_run(tmp_path / "run", rec, cfg)
    loaded, _, _ = load_run(tmp_path / "run")  # a loaded run has plain tables, the trained weights
    assert isinstance(loaded.item_embedding, torch.nn.Embedding)
    torch.testing.assert_close(loaded.item_embedding.weight, rec.model.item_embedding.weight, rtol=0, atol=0)


def test_legacy_retrieval_fixture_loads_into_torchrec_tables():
    """A state dict the release before the package split saved loads into torchrec tables and reproduces its
    recorded outputs (tests/fixtures, as tests/test_legacy_fixtures.py checks for nn.Embedding)."""
    from pathlib import Path

    from merlin_hstu.retrieval.model import HSTURetrievalModel, RetrievalModelConfig

    import dataclasses

    rec = torch.load(Path(__file__).parent / "fixtures" / "equality_8118952.pt", weights_only=False)["retrieval"]
    config = dataclasses.replace(RetrievalModelConfig.from_dict(rec["config"]), embeddings="torchrec")
    model = HSTURetrievalModel(config)
    assert torchrec_tables(model) is not None
    model.load_state_dict(rec["state_dict"])
    model.eval()
    g = torch.Generator().manual_seed(7)
    lengths = torch.tensor([12, 7, 3, 10])
    ids = torch.randint(1, 50, (4, 12), generator=g)
    times = 1_000_000 + torch.randint(1, 5_000, (4, 12), generator=g).cumsum(1)
    with torch.no_grad():
        torch.testing.assert_close(model.user_vectors(ids, lengths, times), rec["user_vectors"], rtol=0, atol=ATOL)


# ---------------------------------------------------------------------------------------------------------------
# DLRM-HSTU (item and contextual tables)
# ---------------------------------------------------------------------------------------------------------------
def test_dlrm_hstu_outputs_and_gradients_equal_nn_embedding():
    from pathlib import Path

    from merlin_hstu.ranking.batch import RankingTask
    from merlin_hstu.ranking.model import DlrmHSTU, DlrmHSTUConfig

    import sys
    sys.path.insert(0, str(Path(__file__).parent))
    from test_legacy_fixtures import ranking_batch

    tasks = (RankingTask("click", bit=0), RankingTask("like", bit=1), RankingTask("watch", kind="regression"))

    def build(backend):
        config = DlrmHSTUConfig(embedding_dim=16, num_blocks=2, num_heads=2, attention_dim=8, linear_dim=8,
                                max_seq_len=96, kernel="pytorch", interleave=True, embeddings=backend)
        return DlrmHSTU(config, num_items=60, contextual_cardinalities={"age": 4, "city": 3}, tasks=tasks)

    plain, rec = _pair(build)
    assert set(rec.contextual_embeddings) == {"age", "city"}
    batch = ranking_batch(tasks)
    out_plain, grads_plain = _forward_backward(plain, lambda m: m(batch))
    out_rec, grads_rec = _forward_backward(rec, lambda m: m(batch))
    torch.testing.assert_close(out_rec, out_plain, rtol=0, atol=ATOL)
    _assert_same(grads_plain, grads_rec)
    rec.load_state_dict(plain.state_dict())


def test_legacy_dlrm_hstu_fixture_loads_into_torchrec_tables():
    """The recorded DLRM-HSTU weights of the old release load into torchrec tables and give its recorded output."""
    import sys
    from pathlib import Path

    from merlin_hstu.ranking.batch import RankingTask
    from merlin_hstu.ranking.model import DlrmHSTU, DlrmHSTUConfig

    sys.path.insert(0, str(Path(__file__).parent))
    from test_legacy_fixtures import TASKS_SPEC, ranking_batch

    rec = torch.load(Path(__file__).parent / "fixtures" / "equality_8118952.pt", weights_only=False)
    rec = rec["ranking"]["combined"]
    tasks = tuple(RankingTask(name, bit=bit, kind=kind) if bit is not None else RankingTask(name, kind=kind)
                  for name, bit, kind in TASKS_SPEC)
    config = DlrmHSTUConfig(embedding_dim=16, num_blocks=3, num_heads=2, attention_dim=8, linear_dim=8,
                            max_seq_len=96, dropout=0.3, input_dropout=0.3, kernel="pytorch", embeddings="torchrec",
                            **rec["kwargs"])
    model = DlrmHSTU(config, num_items=60, contextual_cardinalities={"age": 4, "city": 3}, tasks=tasks)
    model.load_state_dict(rec["state_dict"])
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(ranking_batch(tasks)), rec["forward"], rtol=0, atol=ATOL)


# ---------------------------------------------------------------------------------------------------------------
# CTR: WuKong and DLRM (EmbeddingBagCollection)
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["wukong", "dlrm"])
def test_ctr_outputs_and_gradients_equal_nn_embedding(kind):
    from merlin_hstu.ctr.train import build_ctr_model, count_parameters

    cards = [7, 11, 5, 9]
    small = {"embedding_dim": 8, **({"num_layers": 1, "lcb_feature_num": 2, "fmb_feature_num": 2}
                                    if kind == "wukong" else {})}
    plain, rec = _pair(lambda backend: build_ctr_model(kind, cards, 3, {**small, "embeddings": backend}))
    assert torchrec_tables(rec).pooled
    g = torch.Generator().manual_seed(3)
    dense = torch.randn(6, 3, generator=g)
    sparse = torch.stack([torch.randint(0, c, (6,), generator=g) for c in cards], dim=1)
    out_plain, grads_plain = _forward_backward(plain, lambda m: m(dense, sparse))
    out_rec, grads_rec = _forward_backward(rec, lambda m: m(dense, sparse))
    torch.testing.assert_close(out_rec, out_plain, rtol=0, atol=ATOL)
    _assert_same(grads_plain, grads_rec)
    assert count_parameters(rec, embeddings=False) == count_parameters(plain, embeddings=False)
    assert count_parameters(rec) == count_parameters(plain)


# ---------------------------------------------------------------------------------------------------------------
# helpers, names and errors
# ---------------------------------------------------------------------------------------------------------------
def test_fbgemm_jagged_helpers_equal_a_plain_padding_loop():
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([3, 0, 5, 1])
    values = torch.randn(int(lengths.sum()), 4, generator=g, requires_grad=True)
    padded = jagged_to_padded(values, lengths, 6)
    expected = torch.zeros(4, 6, 4)
    start = 0
    for row, n in enumerate(lengths.tolist()):
        expected[row, :n] = values[start:start + n].detach()
        start += n
    torch.testing.assert_close(padded.detach(), expected, rtol=0, atol=0)
    padded.sum().backward()
    assert torch.equal(values.grad, torch.ones_like(values))
    ids = torch.arange(24).reshape(4, 6)
    assert padded_to_jagged(ids, lengths).tolist() == [0, 1, 2, 12, 13, 14, 15, 16, 18]


def test_table_names_that_break_a_module_dict_are_refused():
    model = torch.nn.Module()
    model.items = torch.nn.Embedding(4, 4)  # "items" is a ModuleDict method: torchrec's collection would break
    with pytest.raises(ValueError, match="clashes with a ModuleDict attribute"):
        to_torchrec(model, {"items": "item"})


def test_embeddings_setting_is_validated_everywhere():
    from merlin_hstu.ctr.train import build_ctr_model
    from merlin_hstu.ranking.model import DlrmHSTUConfig
    from merlin_hstu.retrieval.config import load_config

    for make in (lambda: load_config("demo", ["model.embeddings=tensorflow"]),
                 lambda: DlrmHSTUConfig(embeddings="tensorflow"),
                 lambda: build_ctr_model("dlrm", [3, 4], 2, {"embeddings": "tensorflow"})):
        with pytest.raises(ValueError, match="model.embeddings must be one of"):
            make()
    assert "embeddings" not in load_config("demo").to_dict()["model"]  # torch configs dump as before


def test_table_parameters_are_found_in_both_backends():
    from merlin_hstu.ctr.train import build_ctr_model

    for backend in ("torch", "torchrec"):
        model = build_ctr_model("dlrm", [3, 4], 2, {"embedding_dim": 4, "embeddings": backend})
        assert sum(p.numel() for p in model.parameters() if id(p) in table_parameter_ids(model)) == 7 * 4
    assert math.isfinite(float(model(torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.long)).sum().detach()))
