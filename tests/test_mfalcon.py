"""M-FALCON (merlin_hstu.ranking.mfalcon): cached scoring == the full model one candidate at a time; incremental
KV-cache updates == recomputing from scratch; the rows-only attention == the reference's rows; the bench runs."""
from __future__ import annotations

import json

import pytest
import torch

from merlin_hstu.kernels.attention_ops import hstu_attention_reference, hstu_attention_rows, valid_attention_mask
from merlin_hstu.ranking.mfalcon import MFalconScorer, UserHistory, score_without_cache
from merlin_hstu.ranking.model import DlrmHSTU, DlrmHSTUConfig
from merlin_hstu.ranking.batch import RankingTask

TASKS = (RankingTask("click", bit=0), RankingTask("like", bit=1), RankingTask("watch", kind="regression"))
CONTEXT = {"age": 4, "city": 3}
ATOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def build(seed=0, **kw) -> DlrmHSTU:
    torch.manual_seed(seed)
    base = dict(embedding_dim=16, num_blocks=3, num_heads=2, attention_dim=8, linear_dim=8, max_seq_len=96,
                dropout=0.3, input_dropout=0.3, kernel="pytorch")
    base.update(kw)
    model = DlrmHSTU(DlrmHSTUConfig(**base), num_items=60, contextual_cardinalities=CONTEXT, tasks=TASKS)
    with torch.no_grad():  # larger weights than the init, so the layers' outputs depend visibly on their inputs
        for layer in model.layers:
            layer.uvqk.mul_(10.0)
            layer.relative_bias.position_weights.mul_(20.0)
            layer.relative_bias.time_weights.mul_(20.0)
    return model.eval()


def user(n=25, seed=1) -> UserHistory:
    g = torch.Generator().manual_seed(seed)
    times = 1_000_000 + torch.randint(1, 20_000, (n,), generator=g).cumsum(0)
    return UserHistory(torch.randint(1, 60, (n,), generator=g), torch.randint(0, 8, (n,), generator=g), times,
                       {"age": 2, "city": 1})


def candidates(m=11, seed=2):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 60, (m,), generator=g)
    times = 1_600_000 + torch.randint(0, 100_000, (m,), generator=g)  # each candidate its own query time
    return ids, times


MODES = [dict(), dict(interleave=True), dict(contextual_full_attention=True),
         dict(interleave=True, contextual_full_attention=True)]
MODE_IDS = ["combined", "interleaved", "ctxfull", "interleaved-ctxfull"]


@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
def test_mfalcon_equals_one_by_one_full_model(mode):
    model = build(**mode)
    history = user()
    ids, times = candidates()
    want = score_without_cache(model, history, ids, times, micro_batch=1)
    scorer = MFalconScorer(model)
    scorer.set_history(history)
    for m in (1, 4, 11, 64):
        torch.testing.assert_close(scorer.score(ids, times, micro_batch=m), want, rtol=0, atol=ATOL)
    # the full model on micro-batches (no cache) agrees too: candidates never see each other
    torch.testing.assert_close(score_without_cache(model, history, ids, times, micro_batch=4), want, rtol=0, atol=ATOL)
    # and the scores are not trivially equal: candidates and their query times matter
    assert want[:, 0].std() > 1e-3


def test_default_query_time_is_last_history_event():
    model = build()
    history = user()
    ids, _ = candidates()
    got = MFalconScorer(model).score(ids, micro_batch=5, history=history)
    want = score_without_cache(model, history, ids, int(history.timestamps[-1]), micro_batch=1)
    torch.testing.assert_close(got, want, rtol=0, atol=ATOL)


@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
def test_incremental_update_equals_full_recompute(mode):
    model = build(**mode)
    full = user(30)
    part = UserHistory(full.item_ids[:17], full.actions[:17], full.timestamps[:17], full.contextual)
    incremental = MFalconScorer(model)
    incremental.set_history(part)
    incremental.update(full.item_ids[17:18], full.actions[17:18], full.timestamps[17:18])  # one event
    incremental.update(full.item_ids[18:], full.actions[18:], full.timestamps[18:])  # then twelve
    fresh = MFalconScorer(model)
    fresh.set_history(full)
    a, b = incremental.cache, fresh.cache
    assert a.num_events == b.num_events == 30 and a.num_tokens == b.num_tokens
    for name in ("position", "time", "contextual"):
        assert torch.equal(getattr(a.meta, name), getattr(b.meta, name))
    for layer in range(model.config.num_blocks):
        torch.testing.assert_close(a.keys[layer], b.keys[layer], rtol=0, atol=ATOL)
        torch.testing.assert_close(a.values[layer], b.values[layer], rtol=0, atol=ATOL)
    ids, times = candidates()
    want = score_without_cache(model, full, ids, times, micro_batch=1)
    torch.testing.assert_close(incremental.score(ids, times, micro_batch=3), want, rtol=0, atol=ATOL)


def test_update_changes_the_scores():
    model = build()
    history = user(20)
    ids, times = candidates()
    scorer = MFalconScorer(model)
    before = scorer.score(ids, times, micro_batch=8, history=history)
    scorer.update(torch.tensor([5, 6]), torch.tensor([1, 3]), history.timestamps[-1:] + torch.tensor([10, 20]))
    after = scorer.score(ids, times, micro_batch=8)
    assert (after - before).abs().max() > 1e-4


ROW_CASES = [dict(), dict(num_targets=True), dict(ctx=2), dict(num_targets=True, ctx=2),
             dict(num_targets=True, max_attn_len=3, min_full=2), dict(causal=False, num_targets=True, ctx=1)]


@pytest.mark.parametrize("case", ROW_CASES, ids=["causal", "targets", "ctx", "targets+ctx", "window", "noncausal"])
def test_rows_attention_equals_reference_rows(case):
    g = torch.Generator().manual_seed(0)
    b, w, h, d = 2, 12, 2, 5
    q, k, v = (torch.randn(b, w, h, d, generator=g, dtype=torch.float64) for _ in range(3))
    rab = torch.randn(b, w, w, generator=g, dtype=torch.float64)
    lengths = torch.tensor([12, 9])
    kw = dict(causal=case.get("causal", True), num_targets=torch.tensor([4, 3]) if case.get("num_targets") else None,
              contextual_seq_len=case.get("ctx", 0), max_attn_len=case.get("max_attn_len", 0),
              min_full_attn_seq_len=case.get("min_full", 0))
    full = hstu_attention_reference(q, k, v, lengths, 16.0, rab, **kw)
    mask = valid_attention_mask(lengths, w, **{k_: v_ for k_, v_ in kw.items()})
    for rows in (torch.arange(7, 12), torch.tensor([0, 3, 8]), torch.arange(12)):
        got = hstu_attention_rows(q[:, rows], k, v, rows, lengths, 16.0, rab[:, rows], **kw)
        torch.testing.assert_close(got, full[:, rows], rtol=1e-12, atol=1e-12)
        assert torch.equal(valid_attention_mask(lengths, w, rows=rows, **kw), mask[:, rows])


def test_bad_use_raises_clear_errors():
    model = build()
    scorer = MFalconScorer(model)
    ids, times = candidates()
    with pytest.raises(ValueError, match="no history"):
        scorer.score(ids, times)
    with pytest.raises(ValueError, match="call set_history first"):
        scorer.update(ids[:1], torch.tensor([0]), times[:1])
    scorer.set_history(user())
    with pytest.raises(ValueError, match="micro_batch must be a positive int"):
        scorer.score(ids, times, micro_batch=0)
    with pytest.raises(ValueError, match="candidate_timestamps has 2 values for 11 candidates"):
        scorer.score(ids, times[:2])
    with pytest.raises(ValueError, match="exceed DlrmHSTUConfig.max_seq_len=96"):
        scorer.score(torch.randint(1, 60, (80,)), micro_batch=80)
    with pytest.raises(ValueError, match="candidate_item_ids holds ids outside"):
        scorer.score(torch.tensor([60]))
    with pytest.raises(ValueError, match="must have one length"):
        UserHistory(torch.arange(3), torch.arange(2), torch.arange(3))
    model.train()
    with pytest.raises(ValueError, match="call model.eval"):
        scorer.score(ids, times)
    with pytest.raises(ValueError, match="DlrmHSTU model"):
        MFalconScorer(torch.nn.Linear(2, 2))


def test_bench_mfalcon_runs_and_writes_records(tmp_path, capsys):
    from merlin_hstu.cli.main import main

    rc = main(["bench", "mfalcon", "--history", "40", "--candidates", "24", "--micro-batches", "8,24", "--sample", "3",
               "--repeats", "1", "--no-cache-batches", "1", "--embedding-dim", "16", "--num-blocks", "1",
               "--head-dim", "8", "--num-items", "500", "--output", str(tmp_path), "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "one-by-one full" in out and "M-FALCON best" in out
    record = json.loads((tmp_path / "mfalcon.json").read_text())
    modes = [(r["mode"], r["m"]) for r in record["rows"]]
    assert modes == [("mfalcon", 8), ("mfalcon", 24), ("one-by-one cached", 1), ("one-by-one full", 1),
                     ("no-cache", 8), ("no-cache", 24)]
    assert record["max_abs_diff_vs_one_by_one"] < ATOL
    assert (tmp_path / "mfalcon.md").read_text().startswith("# M-FALCON benchmark")
