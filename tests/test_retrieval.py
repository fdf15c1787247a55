"""Retrieval model, sampled-softmax loss, leave-one-out data and the training loop."""
import math

import numpy as np
import pytest
import torch

from merlin_hstu.retrieval.config import load_config
from merlin_hstu.retrieval.data import LeaveOneOut, SequenceTable, history_window
from merlin_hstu.encoders.hstu import HSTUEncoderConfig
from merlin_hstu.retrieval.model import (
    HSTURetrievalModel,
    RetrievalLossConfig,
    RetrievalModelConfig,
    SampledSoftmaxConfig,
    next_item_training_loss,
    recommend,
    retrieval_loss,
    sampled_softmax_loss,
)
from merlin_hstu.retrieval.train import evaluate_model, load_run, save_run, train_retrieval


def markov_table(num_users=300, num_items=200, seed=0, with_time=True):
    """Each item has one preferred successor followed 80% of the time."""
    rng = np.random.default_rng(seed)
    succ = rng.integers(3, num_items, size=num_items)
    items, times = [], []
    for _ in range(num_users):
        n = int(rng.integers(5, 30))
        s = [int(rng.integers(3, num_items))]
        for _ in range(n - 1):
            s.append(int(succ[s[-1]]) if rng.random() < 0.8 else int(rng.integers(3, num_items)))
        items.append(np.array(s, dtype=np.int64))
        times.append(1_000_000_000 + np.cumsum(rng.integers(1, 100_000, size=n)))
    return SequenceTable(items, times if with_time else None, np.arange(num_users), num_items)


def small_model(num_items=40, time_bias=True, dim=8):
    enc = HSTUEncoderConfig(embedding_dim=dim, num_blocks=2, num_heads=2, attention_dim=4, linear_dim=4,
                            max_seq_len=16, linear_dropout=0.0, time_bias=time_bias)
    return HSTURetrievalModel(RetrievalModelConfig(num_items=num_items, encoder=enc, input_dropout=0.0))


# --- leave-one-out ------------------------------------------------------------------------------
def test_leave_one_out_follows_the_reference_protocol():
    seq = np.arange(10, 20, dtype=np.int64)  # s_1..s_10
    times = np.arange(100, 110, dtype=np.int64)
    table = SequenceTable([seq, np.array([5, 6], dtype=np.int64)], [times, np.array([1, 2])], np.array([7, 8]), 30)
    split = LeaveOneOut(table, max_history=4)
    # train: target s_9 = 18, history = last 4 of s_1..s_8 -> 14..17
    assert split.train.ids[0].tolist() == [14, 15, 16, 17, 18]
    assert split.train.lengths.tolist() == [4]  # the 2-event user has no train sample (needs 3 events)
    assert split.train.timestamps[0].tolist() == [104, 105, 106, 107, 108]
    # eval: target s_10 = 19, history = 15..18; the 2-event user is evaluated with a 1-item history
    assert split.eval.ids[0].tolist() == [15, 16, 17, 18, 19]
    assert split.eval.ids[1].tolist() == [5, 6, 0, 0, 0]
    batch = next(split.batches(split.eval, 8))
    assert batch["targets"].tolist() == [19, 6]
    assert batch["ids"].shape == (2, 5)
    assert history_window(batch).tolist() == [[15, 16, 17, 18, 0], [5, 0, 0, 0, 0]]
    assert batch["timestamps"][1].tolist()[:2] == [1, 2]


def test_sequence_table_rejects_bad_input():
    with pytest.raises(ValueError, match="no sequences"):
        SequenceTable([], None, np.array([]), 10)
    with pytest.raises(ValueError, match="differ in length"):
        SequenceTable([np.array([3, 4])], [np.array([1])], np.array([1]), 10)


# --- loss ---------------------------------------------------------------------------------------
def plain_sampled_softmax(user, positives, negatives, table, tau):
    """Loop implementation of the (1+R)-way loss, straight from the formula."""
    losses = []
    for p in range(user.shape[0]):
        e = lambda i: table[i] / max(table[i].norm().item(), 1e-6)  # noqa: E731
        logits = [float(user[p] @ e(positives[p])) / tau]
        for n in negatives[p]:
            logits.append(-5e4 if n == positives[p] else float(user[p] @ e(n)) / tau)
        m = max(logits)
        lse = m + math.log(sum(math.exp(v - m) for v in logits))
        losses.append(lse - logits[0])
    return sum(losses) / len(losses)


@pytest.mark.parametrize("dense", [True, False])
def test_sampled_softmax_matches_the_formula(dense):
    torch.manual_seed(0)
    model = small_model().double()
    user = torch.nn.functional.normalize(torch.randn(6, 8, dtype=torch.float64), dim=-1)
    positives = torch.tensor([3, 4, 5, 6, 7, 3])
    pool = torch.arange(3, 9)  # small pool: accidental hits are certain
    cfg = SampledSoftmaxConfig(num_negatives=5, temperature=0.05)
    # 40 catalogue rows: dense when 40 <= R * D (R=5, D=8); a 1-dim embedding forces the gather path
    if not dense:
        model.item_embedding.weight.data = model.item_embedding.weight.data[:, :1].clone()
        user = user[:, :1] / user[:, :1].abs()
    assert (model.item_embedding.num_embeddings <= 5 * model.item_embedding.weight.shape[1]) == dense
    got = sampled_softmax_loss(model, user, positives, pool, cfg, torch.Generator().manual_seed(3))
    draws = torch.randint(0, pool.numel(), (6, 5), generator=torch.Generator().manual_seed(3))
    negatives = pool[draws]
    assert (negatives == positives.unsqueeze(1)).any(), "the test should exercise accidental hits"
    want = plain_sampled_softmax(user, positives.tolist(), negatives.tolist(), model.item_embedding.weight.detach(), 0.05)
    assert got.item() == pytest.approx(want, rel=1e-9)


def test_every_history_position_predicts_the_next_item():
    """The loss of a batch equals the loss computed directly on the supervised (position, next item) pairs:
    row 0 (len 3) supervises positions 0, 1, 2 with 4, 5, 6 (the last predicts the target), row 1 position 0."""
    torch.manual_seed(0)
    model = small_model(time_bias=False).eval()
    ids = torch.tensor([[3, 4, 5, 6, 0], [7, 8, 0, 0, 0]])
    lengths = torch.tensor([3, 1])
    pool = torch.arange(3, 40)
    user = model.user_vectors(ids, lengths)
    picked = user[torch.tensor([0, 0, 0, 1]), torch.tensor([0, 1, 2, 0])]
    positives = torch.tensor([4, 5, 6, 8])
    for cfg in (SampledSoftmaxConfig(), RetrievalLossConfig(loss="full_softmax")):
        got = next_item_training_loss(model, {"ids": ids, "lengths": lengths}, pool, cfg,
                                      torch.Generator().manual_seed(7))
        want = retrieval_loss(model, picked, positives, pool, cfg, torch.Generator().manual_seed(7))
        assert got.item() == pytest.approx(want.item(), rel=1e-6)
    # and a different supervision set gives a different loss (the comparison is not vacuous)
    other = retrieval_loss(model, picked, torch.tensor([4, 5, 9, 8]), pool, RetrievalLossConfig(loss="full_softmax"))
    assert other.item() != pytest.approx(got.item(), rel=1e-6)


def test_user_vectors_ignore_positions_at_and_after_len():
    torch.manual_seed(0)
    model = small_model().eval()
    ids = torch.tensor([[3, 4, 5, 9, 9]])
    ts = torch.tensor([[10, 20, 30, 40, 50]])
    a = model.last_user_vector(ids, torch.tensor([3]), ts)
    b = model.last_user_vector(torch.tensor([[3, 4, 5, 30, 0]]), torch.tensor([3]), torch.tensor([[10, 20, 30, 40, 0]]))
    torch.testing.assert_close(a, b)
    assert a.norm().item() == pytest.approx(1.0, abs=1e-6)
    # but the query time at position len (the target's time) does matter through the time bias
    c = model.last_user_vector(ids, torch.tensor([3]), torch.tensor([[10, 20, 30, 10**8, 50]]))
    assert not torch.allclose(a, c)


# --- training loop ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_cfg():
    return load_config("demo", [
        "data.max_history=12", "model.max_seq_len=16", "model.embedding_dim=16", "model.attention_dim=8",
        "model.linear_dim=8", "train.epochs=6", "train.batch_size=32", "train.num_negatives=32",
        "train.input_dropout=0.0", "model.linear_dropout=0.0", "train.learning_rate=0.01",
    ])


def test_training_learns_planted_transitions_and_is_reproducible(tiny_cfg):
    table = markov_table()
    a = train_retrieval(table, tiny_cfg, progress=False)
    assert a.epoch_losses[-1] < a.epoch_losses[0]
    hstu, pop = a.metrics["HSTU"], a.metrics["most-popular"]
    assert hstu["hr@10"] > 2 * pop["hr@10"], a.metrics
    assert set(hstu) >= {"hr@10", "ndcg@10", "hr@50", "mrr"}
    b = train_retrieval(table, tiny_cfg, progress=False)
    assert a.epoch_losses == b.epoch_losses  # seeded CPU runs are bit-reproducible
    for pa, pb in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(pa, pb)


def test_run_directory_round_trip(tiny_cfg, tmp_path):
    table = markov_table(num_users=60, with_time=False)
    cfg = load_config("demo", ["data.max_history=12", "model.max_seq_len=16", "train.epochs=1",
                               "model.time_bias=false"])
    result = train_retrieval(table, cfg, progress=False)
    run = save_run(tmp_path / "run", result, cfg)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no temp dirs left behind
    model, cfg2, record = load_run(run)
    assert cfg2 == cfg
    split = LeaveOneOut(table, cfg.data.max_history)
    assert evaluate_model(model, split, cfg) == pytest.approx(result.metrics["HSTU"])
    assert record["metrics"]["HSTU"] == pytest.approx(result.metrics["HSTU"])
    with pytest.raises(FileNotFoundError, match="not a merlin-hstu run directory: config.yaml is missing"):
        load_run(tmp_path)


def test_recommend_excludes_history_and_special_rows(tiny_cfg):
    table = markov_table(num_users=20)
    model = small_model(num_items=table.num_items)
    recs = recommend(model, table, [0, 5], k=10, max_history=12)
    for row, items in zip([0, 5], recs):
        assert len(set(items)) == 10
        assert not set(items) & set(table.items[row][-12:].tolist())
        assert min(items) >= table.first_item_id


def test_explicit_candidate_pool_limits_ranking_and_negatives():
    table = markov_table(num_users=10)
    table.candidates = np.arange(3, 150)
    table.__post_init__()
    assert table.candidate_ids.tolist() == list(range(3, 150))
    assert table.non_candidate_ids == (0, 1, 2, *range(150, 200))
    with pytest.raises(ValueError, match="candidate ids"):
        SequenceTable(table.items, None, table.keys, 200, candidates=np.array([0, 5]))


@pytest.mark.parametrize("similarity", ["dot", "mol"])
def test_evaluation_through_topk_equals_ranking_every_score(similarity):
    """evaluate_model (top-K module, top-rank_cap list) == metrics.target_ranks over score_all_items."""
    from merlin_hstu.retrieval.metrics import RetrievalMetricAccumulator, target_ranks

    table = markov_table(num_users=80)
    cfg = load_config("demo", ["data.max_history=12", "model.max_seq_len=16", "model.embedding_dim=16",
                               "model.attention_dim=8", "model.linear_dim=8", "train.rank_cap=20",
                               f"head.similarity={similarity}", "head.topk_chunk_size=37",
                               "head.mol.query_hidden_dim=16", "head.mol.component_dim=8"])
    from merlin_hstu.retrieval.train import build_model

    torch.manual_seed(0)
    model = build_model(table, cfg).eval()
    split = LeaveOneOut(table, cfg.data.max_history)
    acc = RetrievalMetricAccumulator(ks=cfg.train.ks)
    with torch.no_grad():
        for batch in split.batches(split.eval, cfg.train.eval_batch_size):
            scores = model.score_all_items(batch["ids"], batch["lengths"], batch["timestamps"])
            acc.update(target_ranks(scores, batch["targets"], history_window(batch),
                                    invalid_ids=table.non_candidate_ids, rank_cap=20))
    assert evaluate_model(model, split, cfg) == pytest.approx(acc.compute(), abs=1e-12)
