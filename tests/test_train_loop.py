"""The one training loop (merlin_hstu.train.loop): each of the three tasks reproduces the seeded losses of the loop
it replaced (recorded with the old code), checkpoints + resume give the same result as an uninterrupted run (also
after a real SIGKILL), bf16 runs on CPU, and the schedule / clipping / early stopping / checkpoint rotation do what
their formulas say."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from merlin_hstu.train.config import LoopConfig, resolve_device
from merlin_hstu.train.loop import EpochShuffle, checkpoint_paths, fit, lr_lambda

RECORD = json.loads((Path(__file__).parent / "fixtures" / "legacy_8118952" / "record.json").read_text())

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

# Seeded runs agree to float rounding across CPUs, not bit for bit: the matmul kernels (AVX2, AVX-512) sum in
# different orders, and Adam turns last-bit gradient differences into small weight differences.  A loop that
# trained differently (another batch, sample, negative or update) moves these losses by far more (>1e-3).
CROSS_CPU = 1e-5


# ---------------------------------------------------------------------------------------------------------------
# a toy task: least squares on fixed data, validation = -MSE on held-out rows
# ---------------------------------------------------------------------------------------------------------------
class ToyTask:
    name = "toy"
    sample_weighted_loss = False

    def __init__(self, n=64, batch=8, seed=0, validation_curve=None):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 3, generator=g)
        self.y = self.x @ torch.tensor([1.0, -2.0, 0.5]) + 0.1 * torch.randn(n, generator=g)
        self.batch = batch
        self.shuffle = EpochShuffle(seed)
        self.validation_curve = list(validation_curve or [])
        self.evaluations = 0

    def steps_per_epoch(self):
        return -(-len(self.y) // self.batch)

    def epoch_batches(self, epoch):
        order = torch.randperm(len(self.y), generator=self.shuffle.begin_epoch())
        for start in range(0, len(order), self.batch):
            idx = order[start:start + self.batch]
            yield self.x[idx], self.y[idx]

    def batch_size(self, batch):
        return len(batch[1])

    def loss(self, model, batch):
        x, y = batch
        return torch.nn.functional.mse_loss(model(x).squeeze(-1), y), {}

    def evaluate(self, model, split, progress=False):
        if split == "validation" and self.validation_curve:
            value = self.validation_curve[min(self.evaluations, len(self.validation_curve) - 1)]
            self.evaluations += 1
            return {"score": value}
        with torch.no_grad():
            return {"score": -float(torch.nn.functional.mse_loss(model(self.x).squeeze(-1), self.y))}

    def monitor(self, metrics, name):
        return "score", metrics["score"]

    def state_dict(self):
        return {"shuffle": self.shuffle.state_dict()}

    def load_state_dict(self, state, mid_epoch):
        self.shuffle.load_state_dict(state["shuffle"], mid_epoch)


def toy_model(seed=1):
    torch.manual_seed(seed)
    return torch.nn.Linear(3, 1)


def sgd(lr=0.1):
    return lambda model: torch.optim.SGD(model.parameters(), lr=lr)


def test_lr_schedule_follows_its_formula():
    cfg = LoopConfig(warmup_steps=4, lr_schedule="cosine")
    f = lr_lambda(cfg, total_steps=14)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == pytest.approx(1.0) and f(9) == pytest.approx(0.5) and f(14) == pytest.approx(0.0)
    linear = lr_lambda(LoopConfig(lr_schedule="linear"), total_steps=10)
    assert [linear(s) for s in (0, 5, 10, 20)] == pytest.approx([1.0, 0.5, 0.0, 0.0])
    assert lr_lambda(LoopConfig(), 10)(7) == 1.0
    # the optimizer sees it: lr after each step
    model, seen = toy_model(), []
    task = ToyTask(n=16, batch=4)

    class Spy(torch.optim.SGD):
        def step(self, closure=None):
            seen.append(self.param_groups[0]["lr"])
            return super().step(closure)

    fit(task, model, lambda m: Spy(m.parameters(), lr=1.0), LoopConfig(warmup_steps=2, lr_schedule="linear"),
        epochs=2, progress=False)
    assert seen == pytest.approx([0.5, 1.0] + [1.0 - k / 6 for k in range(6)])


def test_gradient_clipping_bounds_the_update():
    """SGD with lr 1: the update equals the gradient clipped to norm c (checked against a plain computation)."""
    task = ToyTask(n=8, batch=8)
    model = toy_model()
    before = [p.detach().clone() for p in model.parameters()]
    batch = next(iter(ToyTask(n=8, batch=8).epoch_batches(0)))
    reference = toy_model()
    loss, _ = task.loss(reference, batch)
    grads = torch.autograd.grad(loss, list(reference.parameters()))
    norm = torch.sqrt(sum((g ** 2).sum() for g in grads))
    clip = 0.01
    assert norm > clip  # so clipping acts
    fit(task, model, sgd(1.0), LoopConfig(grad_clip=clip), epochs=1, progress=False)
    update = [b - p.detach() for b, p in zip(before, model.parameters())]
    for u, g in zip(update, grads):
        torch.testing.assert_close(u, g * (clip / (norm + 1e-6)), rtol=1e-4, atol=1e-7)


def test_early_stopping_stops_at_patience_and_restores_the_best_weights(tmp_path, capsys):
    curve = [0.1, 0.3, 0.2, 0.25, 0.28, 0.9]  # best at epoch 2, then two evaluations without improvement
    task = ToyTask(validation_curve=curve)
    model = toy_model()
    result = fit(task, model, sgd(), LoopConfig(early_stopping_patience=2, validation_fraction=0.1), epochs=10,
                 progress=False, log_epoch=None, desc="toy")
    assert result.stopped_early and result.best_epoch == 2 and len(result.epoch_losses) == 4
    assert [m["score"] for _, m in result.validation_metrics] == curve[:4]
    # without a bar, each validation is a log line that says where early stopping stands
    lines = [line for line in capsys.readouterr().out.splitlines() if "validation" in line]
    assert len(lines) == 4 and lines[0].startswith("toy: epoch 1, loss ")
    assert lines[1].endswith("validation score 0.3000 (best 0.3000 at epoch 2, 0 of 2 without improvement)")
    assert lines[3].endswith("validation score 0.2500 (best 0.3000 at epoch 2, 2 of 2 without improvement)")
    # the restored weights are those after epoch 2: retrain two epochs from the same start and compare
    again = toy_model()
    fit(ToyTask(), again, sgd(), LoopConfig(), epochs=2, progress=False)
    for a, b in zip(model.parameters(), again.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="validation_fraction"):
        LoopConfig(early_stopping_patience=2)


def test_checkpoints_rotate_and_resume_equals_uninterrupted(tmp_path):
    full_model = toy_model()
    full = fit(ToyTask(), full_model, sgd(), LoopConfig(checkpoint_every=3, keep_checkpoints=2), epochs=3,
               checkpoint_dir=tmp_path / "full", progress=False)
    assert [p.name for p in checkpoint_paths(tmp_path / "full")] == ["step-00000021.pt", "step-00000024.pt"]
    for stop in (5, 8, 16):  # mid-epoch (5), exactly at an epoch end (8), mid-epoch of the last epoch (16)
        work = tmp_path / f"stop{stop}"
        model = toy_model()
        part = fit(ToyTask(), model, sgd(), LoopConfig(checkpoint_every=1), epochs=3, checkpoint_dir=work,
                   progress=False, stop_after_steps=stop)
        assert part.steps == stop and part.metrics == {}
        resumed_model = toy_model(seed=99)  # different init: the checkpoint must overwrite everything
        resumed = fit(ToyTask(seed=0), resumed_model, sgd(), LoopConfig(checkpoint_every=1), epochs=3,
                      checkpoint_dir=work, resume=True, progress=False)
        assert resumed.resumed_from == stop
        assert resumed.epoch_losses == full.epoch_losses
        assert resumed.metrics == full.metrics
        for a, b in zip(resumed_model.parameters(), full_model.parameters()):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_resume_refuses_another_configuration(tmp_path):
    fit(ToyTask(), toy_model(), sgd(), LoopConfig(checkpoint_every=2), epochs=1, checkpoint_dir=tmp_path,
        fingerprint="a", progress=False, stop_after_steps=4)
    with pytest.raises(ValueError, match="different configuration"):
        fit(ToyTask(), toy_model(), sgd(), LoopConfig(), epochs=1, checkpoint_dir=tmp_path, fingerprint="b",
            resume=True, progress=False)


def test_non_finite_loss_is_a_clear_error():
    class Exploding(ToyTask):
        def loss(self, model, batch):
            loss, extra = super().loss(model, batch)
            return loss * float("inf"), extra

    with pytest.raises(FloatingPointError, match="learning_rate"):
        fit(Exploding(), toy_model(), sgd(), LoopConfig(), epochs=1, progress=False)


def test_device_and_precision_settings_are_validated():
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    for bad in ("gpu", "cuda:x", "tpu"):
        with pytest.raises(ValueError, match="train.device"):
            LoopConfig(device=bad)
    with pytest.raises(ValueError, match="train.precision"):
        LoopConfig(precision="fp16")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="sees no CUDA device"):
            fit(ToyTask(), toy_model(), sgd(), LoopConfig(device="cuda"), epochs=1, progress=False)


# ---------------------------------------------------------------------------------------------------------------
# the three tasks: the loop reproduces the replaced loops' seeded numbers; bf16 on CPU; resume
# ---------------------------------------------------------------------------------------------------------------
H = 12
RETRIEVAL_ARGS = ["--set", f"data.max_history={H}", "--set", f"model.max_seq_len={H + 5}",
                  "--set", "model.embedding_dim=16", "--set", "model.attention_dim=8", "--set", "model.linear_dim=8",
                  "--set", "train.eval_every=0", "--set", "train.batch_size=64"]


@pytest.fixture(scope="module")
def retrieval_data(tmp_path_factory):
    from merlin_hstu.cli.main import main
    from merlin_hstu.data.synthetic import SyntheticConfig, generate_event_log

    root = tmp_path_factory.mktemp("loop_retrieval")
    events = generate_event_log(SyntheticConfig(num_users=40, num_items=80, min_events=4, max_events=20, seed=5))
    events.to_parquet(root / "events.parquet")
    assert main(["preprocess", "--input", str(root / "events.parquet"), "--output", str(root / "data"),
                 *RETRIEVAL_ARGS]) == 0
    return root / "data"


def test_retrieval_reproduces_the_old_loop_and_trains_in_bf16(retrieval_data, tmp_path):
    from merlin_hstu.retrieval.config import load_config
    from merlin_hstu.retrieval.data import load_processed
    from merlin_hstu.retrieval.train import train_retrieval

    table = load_processed(retrieval_data)
    overrides = [a for a in RETRIEVAL_ARGS if a != "--set"] + ["train.epochs=1", "train.max_steps=4"]
    cfg = load_config("demo", overrides)
    result = train_retrieval(table, cfg, progress=False)
    # recorded by the replaced loop (tests/fixtures/README.md); to float rounding, which differs between CPUs'
    # matmul kernels (AVX2 / AVX-512)
    assert result.epoch_losses == pytest.approx(RECORD["retrieval_losses"], rel=CROSS_CPU)
    again = train_retrieval(table, load_config("demo", overrides), progress=False)
    assert again.epoch_losses == result.epoch_losses  # seeded determinism
    bf16 = train_retrieval(table, load_config("demo", overrides + ["train.precision=bf16", "train.max_steps=8",
                                                                    "train.epochs=3"]), progress=False)
    assert bf16.fit.precision == "bf16" and all(math.isfinite(x) for x in bf16.epoch_losses)
    assert bf16.epoch_losses[0] != RECORD["retrieval_losses"][0]  # autocast really ran in bf16
    assert abs(bf16.epoch_losses[0] - RECORD["retrieval_losses"][0]) < 0.5  # ... and computed the same loss
    assert bf16.epoch_losses[-1] < bf16.epoch_losses[0]


@pytest.fixture(scope="module")
def ranking_dataset(tmp_path_factory):
    sys.path.insert(0, str(Path(__file__).parent))
    from test_ranking_export import CONFIG, event_log

    from merlin_hstu.ranking.data import RankingDataset
    from merlin_hstu.workflows import ranking_workflow as rw

    root = tmp_path_factory.mktemp("loop_ranking")
    processed = rw.preprocess_ranking(event_log(num_users=30), root / "data", CONFIG)
    return RankingDataset.load(processed.output_dir)


def _ranking_model(dataset, seed=0):
    from merlin_hstu.ranking.model import DlrmHSTU, DlrmHSTUConfig

    config = DlrmHSTUConfig(embedding_dim=8, num_blocks=2, num_heads=2, attention_dim=4, linear_dim=4,
                            max_seq_len=13, action_embedding_dim=3, dropout=0.1, input_dropout=0.1,
                            multitask_hidden=8, kernel="pytorch")
    torch.manual_seed(seed)
    return DlrmHSTU(config, dataset.num_items, dataset.contextual_cardinalities, dataset.tasks)


def test_ranking_reproduces_the_old_loop_resumes_and_trains_in_bf16(ranking_dataset, tmp_path):
    from merlin_hstu.ranking.train import RankingTrainConfig, train_ranking

    result = train_ranking(_ranking_model(ranking_dataset), ranking_dataset,
                           RankingTrainConfig(epochs=2, batch_size=8, max_steps=5, eval_every=0), progress=False)
    # recorded by the replaced loop; equal to float rounding, not bit for bit, since the attention runs per length
    # group (kernels/attention_ops.py), which reassociates the matmul sums
    assert result.epoch_losses == pytest.approx(RECORD["ranking_losses"], rel=CROSS_CPU)
    for task, values in RECORD["ranking_metrics"].items():
        assert result.metrics[task] == pytest.approx(values, rel=CROSS_CPU, abs=1e-7), task
    # resume after an interruption in the middle of epoch 2 (3 steps per epoch), with dropout on
    cfg = RankingTrainConfig(epochs=3, batch_size=8, eval_every=1, checkpoint_every=1)
    full = train_ranking(_ranking_model(ranking_dataset), ranking_dataset, cfg, progress=False)
    train_ranking(_ranking_model(ranking_dataset), ranking_dataset, cfg, progress=False, checkpoint_dir=tmp_path,
                  stop_after_steps=4)
    resumed = train_ranking(_ranking_model(ranking_dataset, seed=5), ranking_dataset, cfg, progress=False,
                            checkpoint_dir=tmp_path, resume=True)
    assert resumed.fit.resumed_from == 4
    assert resumed.epoch_losses == full.epoch_losses and resumed.metrics == full.metrics
    assert resumed.epoch_metrics == full.epoch_metrics
    bf16 = train_ranking(_ranking_model(ranking_dataset), ranking_dataset,
                         RankingTrainConfig(epochs=2, batch_size=8, precision="bf16"), progress=False)
    assert all(math.isfinite(x) for x in bf16.epoch_losses) and bf16.epoch_losses != full.epoch_losses[:2]
    assert 0.0 < bf16.metrics["click"]["auc"] < 1.0


def test_ctr_reproduces_the_old_loop_and_resumes(tmp_path):
    from merlin_hstu.ctr.data import SyntheticCriteoConfig, generate_synthetic_criteo, load_criteo_tensors, \
        write_criteo_tsv
    from merlin_hstu.ctr.train import CTRTrainConfig, build_ctr_model, train_ctr
    from merlin_hstu.workflows.criteo_workflow import CriteoWorkflowConfig, preprocess_criteo

    frame = generate_synthetic_criteo(SyntheticCriteoConfig(num_rows=600, seed=3, max_cardinality=50)).frame
    src = write_criteo_tsv(frame, tmp_path / "day_0.tsv")
    out = preprocess_criteo(src, tmp_path / "criteo", CriteoWorkflowConfig(freq_threshold=2, valid_fraction=0.25))
    data = load_criteo_tensors(out.path)
    small = {"embedding_dim": 4, "num_layers": 1, "lcb_feature_num": 2, "fmb_feature_num": 2}

    def model(seed=0):
        torch.manual_seed(seed)
        return build_ctr_model("wukong", data.cardinalities, data.num_dense, small)

    result = train_ctr(model(), data, CTRTrainConfig(epochs=2, batch_size=64, max_steps=6))
    assert result.epoch_losses == pytest.approx(RECORD["ctr_losses"], rel=CROSS_CPU)
    assert result.metrics == pytest.approx(RECORD["ctr_metrics"], rel=CROSS_CPU)
    cfg = CTRTrainConfig(epochs=2, batch_size=64, checkpoint_every=3)  # 8 steps per epoch
    full = train_ctr(model(), data, cfg)
    train_ctr(model(), data, cfg, checkpoint_dir=tmp_path / "ck", stop_after_steps=11)
    resumed = train_ctr(model(seed=3), data, cfg, checkpoint_dir=tmp_path / "ck", resume=True)
    assert resumed.fit.resumed_from == 9  # the newest checkpoint before the interruption
    assert resumed.epoch_losses == full.epoch_losses and resumed.metrics == full.metrics


# ---------------------------------------------------------------------------------------------------------------
# a real SIGKILL: `merlin-hstu train` killed mid-epoch, resumed with --resume, ends where an uninterrupted run does
# ---------------------------------------------------------------------------------------------------------------
def _train_command(data: Path, output: Path, extra=()):
    args = [a for a in RETRIEVAL_ARGS] + ["--set", "train.epochs=40", "--set", "train.batch_size=7",
                                          "--set", "train.threads=1", "--set", "train.eval_every=10"]
    return [sys.executable, "-m", "merlin_hstu.cli.main", "train", "--data", str(data), "--output", str(output),
            "--no-progress", "--checkpoint-every", "5", *args, *extra]


def test_sigkill_mid_epoch_then_resume_equals_an_uninterrupted_run(retrieval_data, tmp_path):
    from process_helpers import sigkill_when

    env = {**os.environ, "MERLIN_HSTU_MALLOC": "default", "PYTHONUNBUFFERED": "1"}
    full = tmp_path / "full"
    subprocess.run(_train_command(retrieval_data, full), check=True, env=env, capture_output=True, timeout=600)
    killed = tmp_path / "killed"
    checkpoints = killed.parent / "killed.incomplete" / "checkpoints"
    sigkill_when(_train_command(retrieval_data, killed), lambda: bool(checkpoint_paths(checkpoints)), env)
    assert not killed.exists()  # nothing half-written under the final name
    steps_at_kill = int(checkpoint_paths(checkpoints)[-1].name[5:-3])  # 6 steps per epoch (40 users, batch 7)
    resumed = subprocess.run(_train_command(retrieval_data, killed, ["--resume"]), env=env, capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not checkpoints.parent.exists()  # the work directory goes once the run is published
    want, got = (json.loads((d / "metrics.json").read_text()) for d in (full, killed))
    assert got["metrics"] == want["metrics"] and got["epoch_losses"] == want["epoch_losses"]
    assert got["epoch_metrics"] == want["epoch_metrics"]
    assert json.loads((killed / "run.json").read_text())["resumed_from"] == steps_at_kill
    a = torch.load(full / "model.pt", weights_only=True)["state_dict"]
    b = torch.load(killed / "model.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_quiet_runs_still_log_progress_lines(capsys):
    """Without a progress bar the loop prints a line at least every `log_interval` seconds (0: every step)."""
    fit(ToyTask(n=16, batch=4), toy_model(), sgd(), LoopConfig(), epochs=2, progress=False, desc="toy",
        log_interval=0.0)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("toy: ")]
    assert len(lines) == 8 and lines[0].startswith("toy: epoch 1, step 1/8, loss ") and "samples/s" in lines[0]
    fit(ToyTask(n=16, batch=4), toy_model(), sgd(), LoopConfig(), epochs=2, progress=False, desc="toy")
    assert "toy: " not in capsys.readouterr().out  # a short run stays quiet


def test_move_to_moves_nested_tensors_and_leaves_what_is_already_there():
    from merlin_hstu.ranking.batch import RankingBatch, RankingTask
    from merlin_hstu.train.loop import move_to

    batch = RankingBatch(history_item_ids=torch.tensor([1, 2]), history_actions=torch.tensor([0, 1]),
                         history_timestamps=torch.tensor([5, 6]), history_offsets=torch.tensor([0, 2]),
                         candidate_item_ids=torch.tensor([3]), candidate_timestamps=torch.tensor([7]),
                         candidate_offsets=torch.tensor([0, 1]), labels=torch.zeros(1, 1),
                         tasks=(RankingTask("click", bit=0),), contextual={"age": torch.tensor([2])})
    cpu = torch.device("cpu")
    assert move_to(batch, cpu) is batch
    nested = {"a": [torch.ones(2), (torch.zeros(1), 3)], "b": "text"}
    assert move_to(nested, cpu) is nested
    from dataclasses import dataclass

    @dataclass
    class Pair:
        values: torch.Tensor
        extra: dict
        name: str = "x"

    meta = torch.device("meta")  # a real move (no second device here): every tensor, at every depth, lands there
    pair = Pair(torch.ones(2), {"age": torch.tensor([2])})
    moved = move_to(pair, meta)
    assert moved is not pair and moved.values.device == meta and moved.extra["age"].device == meta
    assert moved.name == "x" and pair.values.device == cpu
    moved = move_to(nested, meta)
    assert moved["a"][0].device == meta and moved["a"][1][0].device == meta and moved["a"][1][1] == 3


def test_run_fingerprint_ignores_what_a_resume_may_change_and_nothing_else():
    from merlin_hstu.retrieval.config import load_config
    from merlin_hstu.train.loop import run_fingerprint

    base = load_config("hstu-amazon").to_dict()
    same = load_config("hstu-amazon", ["train.threads=1", "train.checkpoint_every=5"]).to_dict()
    same["description"] = "reworded"
    other = load_config("hstu-amazon", ["model.embedding_dim=32"]).to_dict()
    assert run_fingerprint(base, data="d") == run_fingerprint(same, data="d")
    assert run_fingerprint(base, data="d") != run_fingerprint(other, data="d")
    assert run_fingerprint(base, data="d") != run_fingerprint(base, data="e")
