"""Retrieval losses and negative samplers against plain, loop-per-position implementations of their formulas.

Every reference below is written from the formula in merlin_hstu/retrieval/losses.py and negatives.py docstrings, one
position (and one candidate) at a time in float64 Python arithmetic.
"""
from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from merlin_hstu.encoders.hstu import HSTUEncoderConfig
from merlin_hstu.retrieval.losses import (
    MASKED_LOGIT,
    RetrievalLossConfig,
    bce_loss,
    full_softmax_loss,
    retrieval_loss,
    softmax_loss_over_sample,
)
from merlin_hstu.retrieval.negatives import NegativeSample, in_batch_negatives, sample_negatives, uniform_negatives
from merlin_hstu.retrieval.model import HSTURetrievalModel, RetrievalModelConfig, next_item_training_loss, seen_before, \
    supervision
from merlin_hstu.retrieval.similarity import MoLConfig, RetrievalHeadConfig

V, D = 30, 8


def tiny_model(similarity="dot", query_norm="l2", item_norm="l2", seed=0, dropout=0.0, chunk=3):
    torch.manual_seed(seed)
    enc = HSTUEncoderConfig(embedding_dim=D, num_blocks=1, num_heads=1, attention_dim=D, linear_dim=D,
                            max_seq_len=12, linear_dropout=dropout, time_bias=False)
    mol = MoLConfig(query_components=2, item_components=3, component_dim=4, query_hidden_dim=6, item_hidden_dim=5,
                    gate_query_hidden_dim=4, gate_item_hidden_dim=4, gate_logits_hidden_dim=4, item_dropout=dropout,
                    gate_dropout=dropout, train_chunk_size=chunk)
    head = RetrievalHeadConfig(similarity=similarity, query_norm=query_norm, item_norm=item_norm, mol=mol)
    return HSTURetrievalModel(RetrievalModelConfig(num_items=V, encoder=enc, input_dropout=dropout, head=head)).double()


def queries(n=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, D, generator=g, dtype=torch.float64), dim=-1)


def plain_score(model, u, item):
    """s(u, item) for one pair: a dot product of the normalised vectors, or the MoL model (its own plain check is in
    test_mol.py) on a single pair."""
    e = model.item_vectors()[item].detach()
    u = u.detach()
    if not model.head.is_mol:
        return float(sum(float(a) * float(b) for a, b in zip(u, e)))
    with torch.no_grad():
        return float(model.head.similarity(u.unsqueeze(0), e.view(1, 1, -1))[0, 0])


def plain_log_softmax_first(logits):
    m = max(logits)
    return logits[0] - (m + math.log(sum(math.exp(v - m) for v in logits)))


def plain_sampled_softmax(model, user, positives, negatives, tau, log_q=None):
    """log_q: function id -> log q(id), or None (no correction)."""
    total = 0.0
    for p in range(len(positives)):
        pos = positives[p]
        logits = [plain_score(model, user[p], pos) / tau - (log_q(pos) if log_q else 0.0)]
        for n in negatives[p]:
            if n == pos:
                logits.append(MASKED_LOGIT)
            else:
                logits.append(plain_score(model, user[p], n) / tau - (log_q(n) if log_q else 0.0))
        total += -plain_log_softmax_first(logits)
    return total / len(positives)


# --- samplers -----------------------------------------------------------------------------------------
def test_uniform_negatives_draw_from_the_pool_per_position():
    pool = torch.tensor([5, 9, 11])
    sample = uniform_negatives(torch.arange(200), pool, 6, torch.Generator().manual_seed(0))
    assert sample.ids.shape == (200, 6) and set(sample.ids.unique().tolist()) == {5, 9, 11}
    assert sample.log_q_positive is None
    # the reference's draw: one randint over pool positions, [P, R]
    expected = pool[torch.randint(0, 3, (200, 6), generator=torch.Generator().manual_seed(0))]
    assert torch.equal(sample.ids, expected)


def test_in_batch_sampling_never_draws_padding_and_only_batch_positives():
    ids = torch.tensor([[3, 4, 5, 6, 0, 0], [7, 8, 0, 0, 0, 0], [4, 4, 9, 0, 0, 0]])
    lengths = torch.tensor([3, 1, 2])
    mask, labels = supervision(ids, lengths)
    positives = labels[mask]
    assert positives.tolist() == [4, 5, 6, 8, 4, 9]  # every history position predicts ids[i+1]; no padding
    sample = in_batch_negatives(positives, 50, torch.Generator().manual_seed(1))
    assert 0 not in sample.ids.tolist()[0] and (sample.ids != 0).all()
    assert set(sample.ids.unique().tolist()) <= set(positives.tolist())
    # frequency-proportional: 4 is the next item twice in 6 positions -> drawn about 1/3 of the time
    big = in_batch_negatives(positives, 3000, torch.Generator().manual_seed(2)).ids
    assert abs(float((big == 4).double().mean()) - 2 / 6) < 0.01


def test_logq_matches_its_formula():
    positives = torch.tensor([4, 5, 4, 9, 4, 5, 12])
    sample = in_batch_negatives(positives, 5, torch.Generator().manual_seed(3), logq=True)
    counts = Counter(positives.tolist())
    for p, pos in enumerate(positives.tolist()):
        assert sample.log_q_positive[p].item() == pytest.approx(math.log(counts[pos] / 7), rel=1e-6)
        for r, n in enumerate(sample.ids[p].tolist()):
            assert sample.log_q_negatives[p, r].item() == pytest.approx(math.log(counts[n] / 7), rel=1e-6)


# --- losses against plain implementations -----------------------------------------------------------
@pytest.mark.parametrize("similarity", ["dot", "mol"])
@pytest.mark.parametrize("negatives,logq", [("uniform", False), ("in_batch", False), ("in_batch", True)])
def test_sampled_softmax_matches_plain_loop(similarity, negatives, logq):
    model = tiny_model(similarity).eval()
    user = queries()
    positives = torch.tensor([3, 4, 5, 4, 6, 3, 4])
    pool = torch.arange(3, 8)  # small pool: accidental hits are certain
    cfg = RetrievalLossConfig(num_negatives=6, temperature=0.1, negatives=negatives, logq_correction=logq)
    got = retrieval_loss(model, user, positives, pool, cfg, torch.Generator().manual_seed(5))
    sample = sample_negatives(negatives, positives, pool, 6, torch.Generator().manual_seed(5), logq)
    assert (sample.ids == positives.unsqueeze(1)).any(), "the test must exercise accidental hits"
    counts = Counter(positives.tolist())
    log_q = (lambda j: math.log(counts[j] / len(positives))) if logq else None
    want = plain_sampled_softmax(model, user, positives.tolist(), sample.ids.tolist(), 0.1, log_q)
    assert got.item() == pytest.approx(want, rel=1e-9)


@pytest.mark.parametrize("similarity", ["dot", "mol"])
def test_full_softmax_matches_plain_loop_and_sampled_softmax_over_the_whole_catalogue(similarity):
    model = tiny_model(similarity, item_norm="none").eval()
    user = queries()
    positives = torch.tensor([3, 4, 5, 4, 6, 29, 4])
    catalogue = torch.arange(3, V)
    cfg = RetrievalLossConfig(loss="full_softmax", temperature=0.2)
    got = full_softmax_loss(model, user, positives, catalogue, cfg)
    want = 0.0
    for p, pos in enumerate(positives.tolist()):
        logits = [plain_score(model, user[p], pos) / 0.2] + [plain_score(model, user[p], j) / 0.2
                                                             for j in catalogue.tolist() if j != pos]
        want -= plain_log_softmax_first(logits)
    assert got.item() == pytest.approx(want / len(positives), rel=1e-9)
    # negatives = the whole catalogue minus the positive: the sampled softmax is the full softmax
    rest = torch.stack([catalogue[catalogue != pos] for pos in positives.tolist()])
    sampled = softmax_loss_over_sample(model, user, positives, NegativeSample(rest),
                                       RetrievalLossConfig(num_negatives=rest.shape[1], temperature=0.2))
    assert sampled.item() == pytest.approx(got.item(), rel=1e-9)
    # rows outside the catalogue (0, 1, 2: padding, null, OOV) are never negatives
    model.item_embedding.weight.data[:3] *= 100.0
    assert full_softmax_loss(model, user, positives, catalogue, cfg).item() == pytest.approx(got.item(), rel=1e-9)


@pytest.mark.parametrize("similarity", ["dot", "mol"])
def test_full_softmax_without_history_negatives_matches_plain_loop(similarity):
    """history_negatives=False: position i of a row sums over the catalogue minus the row's ids 0..i, and its own
    positive stays in the sum even when it was seen before (the metrics always rank the target)."""
    model = tiny_model(similarity, item_norm="none").eval()
    ids = torch.tensor([[5, 9, 7, 9, 12, 0, 0], [3, 4, 20, 0, 0, 0, 0], [29, 6, 6, 8, 11, 13, 4]])
    lengths = torch.tensor([5, 2, 6])  # rows: a repeat (9, supervised as a positive after it was seen), a short row
    supervised, labels = supervision(ids, lengths)
    user = queries(int(supervised.sum()), seed=3)
    catalogue = torch.arange(3, V)
    cfg = RetrievalLossConfig(loss="full_softmax", temperature=0.2, history_negatives=False)
    got = full_softmax_loss(model, user, labels[supervised], catalogue, cfg, seen_before(ids, supervised))
    want, p = 0.0, 0
    for row in range(ids.shape[0]):
        for i in range(int(lengths[row])):
            target = int(ids[row, i + 1])
            if target == 0:
                continue
            seen = set(ids[row, :i + 1].tolist())
            logits = [plain_score(model, user[p], target) / 0.2] + [
                plain_score(model, user[p], j) / 0.2 for j in catalogue.tolist() if j != target and j not in seen]
            want -= plain_log_softmax_first(logits)
            p += 1
    assert p == int(supervised.sum())
    assert got.item() == pytest.approx(want / p, rel=1e-9)
    # the default keeps seen items as negatives: a different (larger) loss on the same inputs
    default = full_softmax_loss(model, user, labels[supervised], catalogue, RetrievalLossConfig(loss="full_softmax",
                                                                                                 temperature=0.2))
    assert default.item() > got.item()
    # next_item_training_loss builds the seen ids itself
    batch = {"ids": ids, "lengths": lengths}
    through_model = next_item_training_loss(model, batch, catalogue, cfg)
    expected = full_softmax_loss(model, model.user_vectors(ids, lengths)[supervised], labels[supervised], catalogue,
                                 cfg, seen_before(ids, supervised))
    assert through_model.item() == pytest.approx(expected.item(), rel=1e-12)
    with pytest.raises(ValueError, match="seen_before"):
        full_softmax_loss(model, user, labels[supervised], catalogue, cfg)


def test_seen_before_lists_each_positions_prefix():
    ids = torch.tensor([[5, 9, 7, 0], [3, 4, 0, 0]])
    supervised, _ = supervision(ids, torch.tensor([3, 2]))
    assert seen_before(ids, supervised).tolist() == [[5, 0, 0, 0], [5, 9, 0, 0], [3, 0, 0, 0]]


@pytest.mark.parametrize("similarity", ["dot", "mol"])
@pytest.mark.parametrize("negatives", ["uniform", "in_batch"])
def test_bce_matches_plain_loop(similarity, negatives):
    model = tiny_model(similarity).eval()
    user = queries(9)
    positives = torch.tensor([3, 4, 5, 4, 6, 3, 4, 5, 3])
    pool = torch.arange(3, 6)
    cfg = RetrievalLossConfig(loss="bce", num_negatives=1, temperature=1.0, negatives=negatives)
    got = bce_loss(model, user, positives, pool, cfg, torch.Generator().manual_seed(8))
    neg = sample_negatives(negatives, positives, pool, 1, torch.Generator().manual_seed(8)).ids[:, 0].tolist()
    assert any(n == p for n, p in zip(neg, positives.tolist())) and any(n != p for n, p in zip(neg, positives.tolist()))
    num = den = 0.0
    for p, pos in enumerate(positives.tolist()):
        if neg[p] == pos:
            continue  # the reference drops the whole position when its negative is the positive
        zp, zn = plain_score(model, user[p], pos), plain_score(model, user[p], neg[p])
        num += 0.5 * (math.log(1 + math.exp(-zp)) + math.log(1 + math.exp(zn)))
        den += 1
    assert got.item() == pytest.approx(num / den, rel=1e-9)


def test_mol_mi_loss_is_added_with_its_weight():
    from merlin_hstu.retrieval.similarity import mutual_information_loss

    model = tiny_model("mol").eval()
    user, positives, pool = queries(), torch.tensor([3, 4, 5, 4, 6, 3, 4]), torch.arange(3, 12)
    plain = retrieval_loss(model, user, positives, pool, RetrievalLossConfig(), torch.Generator().manual_seed(1))
    weighted = retrieval_loss(model, user, positives, pool, RetrievalLossConfig(mi_loss_weight=0.5),
                              torch.Generator().manual_seed(1))
    items = model.item_vectors()
    _, gates = model.head.pair_scores(user, items, positives.unsqueeze(1), gate_column=0)
    assert weighted.item() == pytest.approx(plain.item() + 0.5 * mutual_information_loss(gates).item(), rel=1e-9)


# --- configuration ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,message", [
    (dict(loss="bce"), "num_negatives=1 and temperature=1.0"),
    (dict(loss="bce", num_negatives=1, temperature=0.05), "temperature=1.0"),
    (dict(loss="full_softmax", negatives="in_batch"), "samples none"),
    (dict(logq_correction=True), "in-batch negatives"),
    (dict(loss="bce", num_negatives=1, temperature=1.0, negatives="in_batch", logq_correction=True), "logq"),
    (dict(temperature=0.0), "temperature must be a finite number > 0"),
    (dict(temperature=-1.0), "temperature must be"),
    (dict(num_negatives=0), "num_negatives must be an int >= 1"),
    (dict(loss="softmax"), "loss must be one of"),
    (dict(negatives="popularity"), "negatives must be one of"),
    (dict(history_negatives=False), "loss='full_softmax' only"),
    (dict(loss="full_softmax", history_negatives="no"), "history_negatives must be true or false"),
])
def test_invalid_combinations_are_rejected_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RetrievalLossConfig(**kwargs)


def test_config_file_rejects_invalid_objectives_with_the_key_names():
    from merlin_hstu.retrieval.config import load_config

    with pytest.raises(ValueError, match="train.num_negatives"):
        load_config("hstu-ml1m", ["train.loss=bce"])
    with pytest.raises(ValueError, match="head.similarity=mol"):
        load_config("hstu-ml1m", ["train.mi_loss_weight=0.001"])
    with pytest.raises(ValueError, match="unknown key"):
        load_config("hstu-mol-ml1m", ["head.mol.components=3"])
    with pytest.raises(ValueError, match="similarity must be one of"):
        load_config("hstu-ml1m", ["head.similarity=cosine"])
    cfg = load_config("hstu-ml1m", ["train.loss=bce", "train.num_negatives=1", "train.temperature=1"])
    assert cfg.train.loss_config().loss == "bce"
    with pytest.raises(ValueError, match="train.history_negatives"):
        load_config("hstu-ml1m", ["train.history_negatives=false"])
    cfg = load_config("sasrec-amazon", ["train.history_negatives=false"])
    assert cfg.train.loss_config().history_negatives is False
    assert cfg.to_dict()["train"]["history_negatives"] is False
    # the default is not written out: configs from before the key dump (and fingerprint) as they did
    assert "history_negatives" not in load_config("sasrec-amazon").to_dict()["train"]


# --- every combination trains --------------------------------------------------------------------------
COMBINATIONS = [
    ("sampled_softmax", "uniform", False, "dot"), ("sampled_softmax", "in_batch", False, "dot"),
    ("sampled_softmax", "in_batch", True, "dot"), ("full_softmax", "uniform", False, "dot"),
    ("bce", "uniform", False, "dot"), ("bce", "in_batch", False, "dot"),
    ("sampled_softmax", "uniform", False, "mol"), ("sampled_softmax", "in_batch", True, "mol"),
    ("full_softmax", "uniform", False, "mol"), ("bce", "uniform", False, "mol"),
    ("full_softmax-no-history", "uniform", False, "dot"),
]


@pytest.mark.parametrize("loss,negatives,logq,similarity", COMBINATIONS)
def test_a_tiny_training_run_decreases_the_loss(loss, negatives, logq, similarity):
    model = tiny_model(similarity, query_norm="layer_norm" if similarity == "mol" else "l2", chunk=1024)
    model = model.float().train()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, V, (8, 10), generator=g)
    lengths = torch.randint(4, 10, (8,), generator=g)
    ids = ids.masked_fill(torch.arange(10).unsqueeze(0) > lengths.unsqueeze(1), 0)
    batch = {"ids": ids, "lengths": lengths}
    bce = loss == "bce"
    history_negatives = not loss.endswith("-no-history")
    cfg = RetrievalLossConfig(num_negatives=1 if bce else 8, temperature=1.0 if bce else 0.1,
                              loss=loss.removesuffix("-no-history"), history_negatives=history_negatives,
                              negatives=negatives, logq_correction=logq,
                              mi_loss_weight=0.001 if similarity == "mol" else 0.0)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    losses = []
    for step in range(25):
        # the same negatives every step: the loss of one fixed problem must fall
        value = next_item_training_loss(model, batch, torch.arange(3, V), cfg, torch.Generator().manual_seed(1))
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
        losses.append(value.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.7 * losses[0], losses


# --- the bench CLI's retrieval flags ---------------------------------------------------------------------
def test_bench_flags_select_the_objective_and_reject_bad_combinations(tmp_path, capsys):
    import json

    from merlin_hstu.cli.main import main
    from merlin_hstu.data.synthetic import SyntheticConfig, generate_event_log

    log = tmp_path / "log.parquet"
    generate_event_log(SyntheticConfig(num_users=40, num_items=80, min_events=4, max_events=15, seed=2)).to_parquet(log)
    small = ["--set", "data.max_history=10", "--set", "model.max_seq_len=12", "--set", "model.embedding_dim=8",
             "--set", "model.attention_dim=8", "--set", "model.linear_dim=8"]
    assert main(["preprocess", "--input", str(log), "--output", str(tmp_path / "data"), *small]) == 0
    bench = ["bench", "--dataset", str(tmp_path / "data"), "--model", "demo", "--epochs", "1", "--max-steps", "1",
             "--no-progress", "--no-epoch-eval", *small]
    assert main([*bench, "--loss", "bce", "--negatives", "in_batch", "--num-negatives", "1", "--temperature", "1",
                 "--output", str(tmp_path / "bce")]) == 0
    record = json.loads((tmp_path / "bce" / "bench.json").read_text())
    assert record["model"] == "demo+bce+in_batch+n1+t1.0"
    assert (record["config"]["train"]["loss"], record["config"]["train"]["negatives"]) == ("bce", "in_batch")
    assert "--loss bce --negatives in_batch --num-negatives 1 --temperature 1.0" in record["markdown"]
    assert main([*bench, "--similarity", "mol", "--set", "head.mol.query_hidden_dim=8", "--set",
                 "head.mol.component_dim=4", "--output", str(tmp_path / "mol")]) == 0
    assert json.loads((tmp_path / "mol" / "bench.json").read_text())["config"]["head"]["similarity"] == "mol"
    capsys.readouterr()
    assert main([*bench, "--loss", "bce", "--output", str(tmp_path / "bad")]) == 2
    assert "num_negatives=1 and temperature=1.0" in capsys.readouterr().err
    # the side-by-side step timer runs every named variant on the same batches
    from merlin_hstu.bench import heads as retrieval_bench

    assert retrieval_bench.main(["--dataset", str(tmp_path / "data"), "--model", "demo", "--rounds", "1",
                                 "--variants", "dot-sampled,dot-bce,dot-full,dot-full-unseen",
                                 "--output", str(tmp_path / "heads")]) == 0
    rows = json.loads((tmp_path / "heads" / "heads.json").read_text())["rows"]
    assert [r["variant"] for r in rows] == ["dot-sampled", "dot-bce", "dot-full", "dot-full-unseen"]
    assert rows[0]["ratio"] == 1.0 and all(r["seconds_per_step"] > 0 for r in rows)


def test_bench_summary_prints_stored_reference_times_as_anchors_never_as_a_ratio():
    """A ratio printed by `bench` must be of two figures measured in that run: the reference implementation's
    stored step times are shown with their provenance and no ratio is taken against them."""
    import argparse

    from merlin_hstu.bench.retrieval import REFERENCE_STEP_ANCHORS, summarize
    from merlin_hstu.retrieval.config import load_config

    cfg = load_config("hstu-large-ml1m")
    metrics = {"hr@10": 0.07, "ndcg@10": 0.035}
    runs = [{"seed": s, "metrics": metrics, "most_popular": metrics, "seconds_per_step_median": 1.0 + s,
             "epoch_seconds": [30.0], "eval_seconds": 9.0} for s in (0, 1)]
    args = argparse.Namespace(dataset="ml-1m-prefix", model="hstu-large-ml1m", epochs=3, seeds=2, no_epoch_eval=False,
                              max_steps=None, threads=2, overrides=[], loss=None, negatives=None, num_negatives=None,
                              temperature=None, similarity=None)
    from merlin_hstu.bench.retrieval import machine_info

    record = summarize(runs, cfg, "ml-1m-prefix", machine_info(), args)
    text = record["markdown"]
    anchor = REFERENCE_STEP_ANCHORS["hstu-large-ml1m"]
    assert f"{anchor['reference_s_per_step']} s/step" in text and "stored anchor, not measured in this run" in text
    assert "2026-12-02" in text and "ratio " not in text.replace("no ratio is taken", "").replace("for a ratio", "")
    assert record["timing"]["seconds_per_step"] == 1.5
    assert record["reference_anchor"]["source"].startswith("measured side by side")


@pytest.mark.parametrize("loss", ["sampled_softmax", "full_softmax", "bce"])
def test_losses_reduce_in_fp32_under_bf16_autocast(loss):
    """bf16 autocast (`--precision bf16`) runs the matmuls in bf16, but the softmax / logsumexp / BCE statistics of
    the loss stay in fp32: the loss is a float32 tensor close to the fp32 loss, not a bf16 value rounded to 8 bits."""
    model = tiny_model("dot").float().eval()  # the other tests' models are float64; training runs float32
    user = queries(64, seed=3).float()
    positives = torch.randint(3, 8, (64,), generator=torch.Generator().manual_seed(2))
    pool = torch.arange(3, 8)
    kw = dict(num_negatives=1, temperature=1.0) if loss == "bce" else dict(num_negatives=4, temperature=0.05)
    cfg = RetrievalLossConfig(loss=loss, **kw)
    fp32 = retrieval_loss(model, user, positives, pool, cfg, torch.Generator().manual_seed(5))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = retrieval_loss(model, user, positives, pool, cfg, torch.Generator().manual_seed(5))
    assert fp32.dtype == bf16.dtype == torch.float32
    assert bf16.item() == pytest.approx(fp32.item(), rel=0.05)
