"""What the release before the package split (commit 8118952) computed and wrote still holds (tests/fixtures/README.md):

* the same weights and inputs give the same retrieval HSTU, DLRM-HSTU and M-FALCON outputs to 1e-6;
* model repositories it exported (pickled serving graphs naming its module paths, fitted NVTabular workflows) load
  and answer the recorded requests with the recorded outputs.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

FIXTURES = Path(__file__).parent / "fixtures"
LEGACY = FIXTURES / "legacy_8118952"
ATOL = 1e-6

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def recorded():
    return torch.load(FIXTURES / "equality_8118952.pt", weights_only=False)


def retrieval_inputs():
    g = torch.Generator().manual_seed(7)
    lengths = torch.tensor([12, 7, 3, 10])
    ids = torch.randint(1, 50, (4, 12), generator=g)
    times = 1_000_000 + torch.randint(1, 5_000, (4, 12), generator=g).cumsum(1)
    return ids, lengths, times


def test_retrieval_hstu_outputs_equal_the_recorded_ones(recorded):
    from merlin_hstu.retrieval.model import HSTURetrievalModel, RetrievalModelConfig

    rec = recorded["retrieval"]
    model = HSTURetrievalModel(RetrievalModelConfig.from_dict(rec["config"]))
    model.load_state_dict(rec["state_dict"])
    model.eval()
    ids, lengths, times = retrieval_inputs()
    with torch.no_grad():
        torch.testing.assert_close(model.user_vectors(ids, lengths, times), rec["user_vectors"], rtol=0, atol=ATOL)
        x = torch.randn(int(lengths.sum()), 16, generator=torch.Generator().manual_seed(3))
        offsets = torch.nn.functional.pad(lengths.cumsum(0), (1, 0))
        jagged_times = torch.cat([times[b, :lengths[b]] for b in range(4)])
        got = model.encoder.forward_jagged(x, offsets, jagged_times, query_timestamps=times[:, -1] + 50)
        torch.testing.assert_close(got, rec["jagged"], rtol=0, atol=ATOL)
    assert rec["user_vectors"].abs().sum() > 0


TASKS_SPEC = (("click", 0, "binary"), ("like", 1, "binary"), ("watch", None, "regression"))


def ranking_batch(tasks):
    from merlin_hstu.ranking.batch import RankingBatch

    g = torch.Generator().manual_seed(11)
    hl, cl = torch.tensor([9, 4, 13]), torch.tensor([3, 5, 2])
    lh, lc = int(hl.sum()), int(cl.sum())
    return RankingBatch(
        history_item_ids=torch.randint(1, 60, (lh,), generator=g),
        history_actions=torch.randint(0, 8, (lh,), generator=g),
        history_timestamps=1_000_000 + torch.randint(1, 20_000, (lh,), generator=g).cumsum(0),
        history_offsets=torch.nn.functional.pad(hl.cumsum(0), (1, 0)),
        candidate_item_ids=torch.randint(1, 60, (lc,), generator=g),
        candidate_timestamps=2_000_000 + torch.randint(0, 100_000, (lc,), generator=g),
        candidate_offsets=torch.nn.functional.pad(cl.cumsum(0), (1, 0)),
        labels=torch.zeros(lc, 3), tasks=tasks,
        contextual={"age": torch.tensor([0, 3, 2]), "city": torch.tensor([1, 2, 0])})


@pytest.mark.parametrize("layout", ["combined", "interleaved-ctxfull", "wukong"])
def test_dlrm_hstu_and_mfalcon_outputs_equal_the_recorded_ones(recorded, layout):
    from merlin_hstu.ranking.batch import RankingTask
    from merlin_hstu.ranking.mfalcon import MFalconScorer, UserHistory
    from merlin_hstu.ranking.model import DlrmHSTU, DlrmHSTUConfig

    rec = recorded["ranking"][layout]
    tasks = tuple(RankingTask(name, bit=bit, kind=kind) if bit is not None else RankingTask(name, kind=kind)
                  for name, bit, kind in TASKS_SPEC)
    config = DlrmHSTUConfig(embedding_dim=16, num_blocks=3, num_heads=2, attention_dim=8, linear_dim=8,
                            max_seq_len=96, dropout=0.3, input_dropout=0.3, kernel="pytorch", **rec["kwargs"])
    model = DlrmHSTU(config, num_items=60, contextual_cardinalities={"age": 4, "city": 3}, tasks=tasks)
    model.load_state_dict(rec["state_dict"])
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(ranking_batch(tasks)), rec["forward"], rtol=0, atol=ATOL)
    g = torch.Generator().manual_seed(5)
    history = UserHistory(torch.randint(1, 60, (25,), generator=g), torch.randint(0, 8, (25,), generator=g),
                          1_000_000 + torch.randint(1, 20_000, (25,), generator=g).cumsum(0), {"age": 2, "city": 1})
    candidates = torch.randint(1, 60, (11,), generator=g)
    times = 1_600_000 + torch.randint(0, 100_000, (11,), generator=g)
    scorer = MFalconScorer(model)
    scorer.set_history(history)
    torch.testing.assert_close(scorer.score(candidates, times, micro_batch=4), rec["mfalcon"], rtol=0, atol=ATOL)
    scorer.update(torch.tensor([5, 6, 7]), torch.tensor([1, 2, 3]), torch.tensor([1_700_000, 1_700_100, 1_700_200]))
    torch.testing.assert_close(scorer.score(candidates, times, micro_batch=4), rec["mfalcon_after_update"],
                               rtol=0, atol=ATOL)


# ------------------------------------------------------------------------------------------------------------
# repositories exported by the old release
# ------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def record():
    return json.loads((LEGACY / "record.json").read_text())


def _load_ensemble(path: Path):
    from merlin.dag import postorder_iter_nodes
    from merlin.systems.dag.ensemble import Ensemble

    ensemble = Ensemble.load(str(path))
    for node in postorder_iter_nodes(ensemble.graph.output_node, flatten_subgraphs=True):
        node.op.load_artifacts(str(path))  # what the repository's executor model does when Triton loads it
    return ensemble


def test_old_ranking_repository_loads_and_scores_as_recorded(record):
    from merlin.dag.runtime import Runtime

    ensemble = _load_ensemble(LEGACY / "ranking_repo" / "executor_model" / "1" / "ensemble")
    assert type(ensemble.graph.output_node.op).__module__ == "merlin_hstu.serving.ranking"  # via the alias module
    requests = record["ranking_requests"]
    frame = pd.DataFrame({"history_item_id": [r["history_item_ids"] for r in requests],
                          "history_action": [r["history_actions"] for r in requests],
                          "history_timestamp": [r["history_timestamps"] for r in requests],
                          "candidate_item_id": [r["candidate_item_ids"] for r in requests],
                          "query_timestamp": [-1] * len(requests),
                          "age": [r["contextual"]["age"] for r in requests],
                          "country": [r["contextual"]["country"] for r in requests]})
    out = ensemble.transform(frame, runtime=Runtime())
    for task, want in record["ranking_served"].items():
        got = [np.asarray(x).tolist() for x in out[task]]
        assert len(got) == len(want)
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, rtol=0, atol=ATOL)


def test_old_ctr_repository_loads_and_predicts_as_recorded(record):
    from merlin.dag.runtime import Runtime

    from merlin_hstu.serving.ctr import OUTPUT

    ensemble = _load_ensemble(LEGACY / "ctr_repo" / "executor_model" / "1" / "ensemble")
    raw = pd.read_parquet(LEGACY / "ctr_request.parquet")
    got = ensemble.transform(raw, runtime=Runtime())[OUTPUT].to_numpy()
    np.testing.assert_allclose(got, record["ctr_served_from_disk"], rtol=0, atol=ATOL)
    np.testing.assert_allclose(got, record["ctr_served"], rtol=0, atol=ATOL)


def test_old_retrieval_repository_serves_the_recorded_top_k(record):
    from merlin_hstu.serving.client import request_from_events
    from merlin_hstu.serving.contract import RequestContract
    from merlin_hstu.serving.core import ServingEnsemble
    from merlin_hstu.serving.export import read_serving_record

    repo = LEGACY / "retrieval_repo"
    contract = RequestContract(**read_serving_record(repo)["contract"])
    served = ServingEnsemble.load(repo / "hstu_topk_batched" / "1" / "ensemble", contract)
    events = pd.read_parquet(LEGACY / "retrieval_request_events.parquet")
    ids, scores = served.run([contract.validate(request_from_events(contract, events))])[0]
    np.testing.assert_array_equal(np.asarray(ids), record["retrieval_served"]["ids"])
    np.testing.assert_allclose(np.asarray(scores), record["retrieval_served"]["scores"], rtol=0, atol=ATOL)


def test_old_fitted_workflows_load_and_transform():
    """The fitted workflows inside the old repositories (pickles naming merlin_hstu.workflows.* ops) still load."""
    import nvtabular as nvt

    for path in (LEGACY / "retrieval_repo" / "hstu_topk_batched" / "1" / "ensemble" / "workflow",
                 LEGACY / "ranking_repo" / "executor_model" / "1" / "ensemble" / "workflow",):
        workflow = nvt.Workflow.load(str(path))
        assert workflow.output_schema.column_names
