"""Training and evaluation of multi-task ranking models (training runs through `merlin_hstu.train.loop.fit`).

Any model works that maps a `RankingBatch` to `[num candidates, num tasks]` (logits for binary tasks, values for
regression tasks): DLRM-HSTU (`merlin_hstu.ranking.model`), the DLRM-style baseline (`merlin_hstu.ranking.baselines`).

    result = train_ranking(model, dataset, RankingTrainConfig(epochs=3), log_epoch=print)
    result.metrics          # {"liked": {"auc": .., "gauc": .., "ne": .., "logloss": ..}, ...} on the test split

Loss: `ranking_batch.multitask_loss` (BCE with logits per binary task, squared error per regression task,
summed with the task weights). Optimiser: Adam / AdamW. Seeded: torch's RNG is seeded with `seed` when training
starts (dropout), and the users are shuffled each epoch with numpy default_rng(seed * 1000 + epoch).
Evaluation (`evaluate_ranking`) per binary task: AUC over all candidates, GAUC over users (impression-weighted;
users with one class only are skipped), log loss and NE (see `merlin_hstu.common.metrics`); per regression
task: MSE and RMSE.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from tqdm.auto import tqdm

from merlin_hstu.ranking.batch import RankingBatch, RankingTask, multitask_loss
from merlin_hstu.common.metrics import binary_task_metrics, gauc
from merlin_hstu.train.config import LoopConfig
from merlin_hstu.train.loop import FitResult, fit, module_device, move_to

OPTIMIZERS = ("adam", "adamw")


@dataclass
class RankingTrainConfig(LoopConfig):
    """Optimisation and evaluation settings (defaults: the reference's dense Adam, lr 1e-3, betas .95/.999); the
    loop's own settings (device, precision, schedule, checkpoints, early stopping) come from `LoopConfig`."""

    epochs: int = 3
    batch_size: int = 16  # users per step (each brings its K candidates)
    eval_batch_size: int = 128
    learning_rate: float = 1e-3
    betas: Tuple[float, float] = (0.95, 0.999)
    weight_decay: float = 0.0
    optimizer: str = "adam"  # adam | adamw
    seed: int = 42
    eval_every: int = 1  # evaluate every n epochs (0: only after the last)
    max_steps: int = 0  # stop after this many optimizer steps in total (0: every epoch in full)
    threads: int = 0  # torch intra-op threads (0: torch's default)
    train_split: str = "train"
    eval_split: str = "test"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.betas = tuple(self.betas)
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"RankingTrainConfig.optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        for name in ("epochs", "batch_size", "eval_batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"RankingTrainConfig.{name} must be >= 1, got {getattr(self, name)!r}")
        for name in ("eval_every", "max_steps", "threads"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"RankingTrainConfig.{name} must be >= 0, got {getattr(self, name)!r}")
        if not self.learning_rate > 0:
            raise ValueError(f"RankingTrainConfig.learning_rate must be > 0, got {self.learning_rate!r}")
        if len(self.betas) != 2:
            raise ValueError(f"RankingTrainConfig.betas must be two numbers, got {self.betas!r}")


@dataclass
class RankingTrainResult:
    model: torch.nn.Module
    metrics: Dict[str, Dict[str, float]]  # final evaluation, per task
    epoch_losses: List[float] = field(default_factory=list)  # mean total loss per epoch
    epoch_task_losses: List[Dict[str, float]] = field(default_factory=list)
    epoch_metrics: List[Tuple[int, Dict[str, Dict[str, float]]]] = field(default_factory=list)
    step_times: List[float] = field(default_factory=list)  # forward + backward + update, seconds
    epoch_seconds: List[float] = field(default_factory=list)  # training time per epoch, evaluation excluded
    eval_seconds: float = 0.0
    fit: Optional[FitResult] = None  # the loop's full record (device, precision, validation, early stop)

    @property
    def train_seconds(self) -> float:
        return sum(self.epoch_seconds)


def _check_predictions(predictions: torch.Tensor, batch: RankingBatch) -> None:
    expected = (batch.candidate_item_ids.numel(), len(batch.tasks))
    if tuple(predictions.shape) != expected:
        raise ValueError(f"the model returned shape {tuple(predictions.shape)}; a ranking model's forward(batch) "
                         f"must return [num candidates, num tasks] = {list(expected)}")


@torch.no_grad()
def predict_ranking(model: torch.nn.Module, batches: Iterable[RankingBatch], progress: bool = False,
                    total: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray, np.ndarray, Tuple[RankingTask, ...]]:
    """(predictions [L, T], labels [L, T], user of each candidate [L], tasks) over all batches, in eval mode."""
    was_training = model.training
    model.eval()
    preds, labels, users, tasks = [], [], [], None
    offset = 0  # batches without user ids: number the rows across batches
    device = module_device(model)
    try:
        for batch in tqdm(batches, total=total, desc="evaluate", leave=False, disable=not progress):
            out = model(move_to(batch, device))
            _check_predictions(out, batch)
            if tasks is None:
                tasks = batch.tasks
            elif batch.tasks != tasks:
                raise ValueError("all batches of one evaluation must have the same tasks")
            preds.append(out.detach().float().cpu().numpy())
            labels.append(batch.labels.cpu().numpy())
            rows = batch.candidate_row.cpu()
            ids = batch.user_ids.cpu()[rows] if batch.user_ids is not None else rows + offset
            users.append(ids.numpy())
            offset += batch.batch_size
    finally:
        model.train(was_training)
    if tasks is None:
        raise ValueError("evaluate_ranking got no batches")
    return np.concatenate(preds), np.concatenate(labels), np.concatenate(users), tasks


def task_metrics(predictions: np.ndarray, labels: np.ndarray, users: np.ndarray,
                 tasks: Sequence[RankingTask]) -> Dict[str, Dict[str, float]]:
    """Per task: binary -> auc, gauc, gauc_users (users counted), ne, logloss; regression -> mse, rmse."""
    out = {}
    for t, task in enumerate(tasks):
        if task.kind == "binary":
            metrics = binary_task_metrics(labels[:, t], predictions[:, t])  # auc, logloss, ne (from logits)
            per_user = gauc(labels[:, t], predictions[:, t], users)
            out[task.name] = {"auc": metrics["auc"], "gauc": per_user.gauc, "ne": metrics["ne"],
                              "logloss": metrics["logloss"], "gauc_users": float(per_user.users_counted)}
        else:
            mse = float(np.mean((predictions[:, t].astype(np.float64) - labels[:, t]) ** 2))
            out[task.name] = {"mse": mse, "rmse": math.sqrt(mse)}
    return out


def evaluate_ranking(model: torch.nn.Module, batches: Iterable[RankingBatch], progress: bool = False,
                     total: Optional[int] = None) -> Dict[str, Dict[str, float]]:
    """{task: {auc, gauc, ne, logloss, gauc_users}} for binary tasks, {task: {mse, rmse}} for regression.

    GAUC groups candidates by `batch.user_ids` (or by row when a batch has none)."""
    predictions, labels, users, tasks = predict_ranking(model, batches, progress=progress, total=total)
    return task_metrics(predictions, labels, users, tasks)


def format_task_metrics(metrics: Dict[str, Dict[str, float]]) -> str:
    """`liked: auc .7012 gauc .6523 ne .9312 | loved: ...` (one line)."""
    parts = []
    for task, values in metrics.items():
        keys = [k for k in ("auc", "gauc", "ne", "mse") if k in values]
        parts.append(f"{task}: " + " ".join(f"{k} {values[k]:.4f}" for k in keys))
    return " | ".join(parts)


def make_optimizer(model: torch.nn.Module, config: RankingTrainConfig) -> torch.optim.Optimizer:
    cls = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    return cls(model.parameters(), lr=config.learning_rate, betas=tuple(config.betas),
               weight_decay=config.weight_decay)


class RankingTrainingTask:
    """Multi-task ranking for `merlin_hstu.train.loop.fit`: the dataset's samples shuffled each epoch with
    numpy default_rng(seed * 1000 + epoch) (stateless, so resuming needs no generator state), loss =
    `multitask_loss`, evaluation = `evaluate_ranking`."""

    name = "ranking"
    sample_weighted_loss = False
    streams = True  # train.streaming: a StreamingRankingDataset (ranking.config.RankingDataConfig.load)

    def __init__(self, dataset, config: RankingTrainConfig):
        self.dataset, self.config = dataset, config
        self.streaming = getattr(dataset, "streaming", False)
        if bool(config.streaming) != self.streaming:
            kind = "streamed" if self.streaming else "in memory"
            raise ValueError(f"train.streaming={str(bool(config.streaming)).lower()} but the ranking dataset is "
                             f"{kind}; load it with RankingDataConfig.load(path, train_config)")

    def steps_per_epoch(self) -> int:
        if self.streaming and self.dataset.world_size > 1:
            return self.dataset.rank_steps(self.config.batch_size)
        return self.dataset.num_batches(self.config.train_split, self.config.batch_size)

    def epoch_batches(self, epoch: int):
        return self.dataset.batches(self.config.train_split, self.config.batch_size, shuffle=True,
                                    seed=self.config.seed * 1000 + epoch)

    def batch_size(self, batch: RankingBatch) -> int:
        return batch.batch_size

    def rank_batches(self, epoch: int, rank: int, world_size: int):
        """This rank's contiguous slice of every global batch of `epoch_batches(epoch)` (the same order); streamed:
        its share of each global batch from its own row groups."""
        from merlin_hstu.distributed.context import rank_slice

        if self.streaming:  # each rank its own row groups: its share of every global batch
            if (rank, world_size) != (self.dataset.rank, self.dataset.world_size):
                raise ValueError(f"the streamed ranking dataset was opened for rank {self.dataset.rank} of "
                                 f"{self.dataset.world_size}, not {rank} of {world_size}")
            yield from self.dataset.rank_batches(self.config.batch_size, self.config.seed * 1000 + epoch)
            return
        samples = self.dataset.sample_index(self.config.train_split)
        order = np.random.default_rng(self.config.seed * 1000 + epoch).permutation(len(samples))
        size = self.config.batch_size
        for start in range(0, len(order), size):
            rows = order[start:start + size]
            if len(rows) < world_size:
                raise ValueError(f"a global batch of {len(rows)} samples (the last of the epoch) cannot be split over "
                                 f"{world_size} processes; change train.batch_size or --nproc")
            yield self.dataset.batch(samples.take(rows[rank_slice(len(rows), rank, world_size)]))

    def loss_count(self, batch: RankingBatch) -> int:
        return int(batch.candidate_item_ids.numel())  # every task's loss is a mean over candidates

    def loss(self, model, batch: RankingBatch):
        predictions = model(batch)
        _check_predictions(predictions, batch)
        return multitask_loss(predictions.float(), batch.labels, batch.tasks)

    def evaluate(self, model, split: str, progress: bool = False):
        name = {"eval": self.config.eval_split, "validation": "validation"}[split]
        total = self.dataset.num_batches(name, self.config.eval_batch_size)
        if total == 0:
            raise ValueError(f"split {name!r} has no users to evaluate on")
        return evaluate_ranking(model, self.dataset.batches(name, self.config.eval_batch_size), progress=progress,
                                total=total)

    def monitor(self, metrics, name: Optional[str]):
        """`task.metric` (e.g. "liked.auc"); default: the first binary task's AUC (or the first task's -MSE)."""
        if name is None:
            task = next((t for t in self.dataset.tasks if t.kind == "binary"), self.dataset.tasks[0])
            name = f"{task.name}.auc" if task.kind == "binary" else f"{task.name}.mse"
        task_name, _, metric = name.partition(".")
        if task_name not in metrics or metric not in metrics[task_name]:
            raise ValueError(f"train.early_stopping_metric={name!r}: use TASK.METRIC with a task of "
                             f"{sorted(metrics)} and a metric of {sorted(next(iter(metrics.values())))}")
        value = float(metrics[task_name][metric])
        return name, -value if metric in ("mse", "rmse", "ne", "logloss") else value

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict, mid_epoch: bool) -> None:
        pass


def train_ranking(model: torch.nn.Module, dataset, config: Optional[RankingTrainConfig] = None,
                  progress: bool = True,
                  log_epoch: Optional[Callable[[int, float, Dict[str, Dict[str, float]]], None]] = None,
                  name: str = "model", checkpoint_dir=None, resume: bool = False, fingerprint: str = "",
                  stop_after_steps: int = 0) -> RankingTrainResult:
    """Train `model` on `dataset.batches(config.train_split, ...)` through the one training loop; evaluate on
    `config.eval_split`.

    `dataset` is a `merlin_hstu.ranking.data.RankingDataset` (anything with `batches(split, batch_size, shuffle,
    seed)` and `num_batches(split, batch_size)`). `log_epoch(epoch, mean loss, metrics)` is called after every
    evaluated epoch. The final evaluation is always run and is `result.metrics`.
    """
    config = config or RankingTrainConfig()
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    if config.validation_fraction:
        dataset.hold_out_validation(config.validation_fraction, seed=config.seed)
    if dataset.num_batches(config.eval_split, config.eval_batch_size) == 0:
        raise ValueError(f"split {config.eval_split!r} has no users to evaluate on")
    task = RankingTrainingTask(dataset, config)
    if task.steps_per_epoch() == 0:
        raise ValueError(f"split {config.train_split!r} has no users to train on")
    fitted = fit(task, model, lambda m: make_optimizer(m, config), config, epochs=config.epochs,
                 max_steps=config.max_steps, eval_every=config.eval_every, checkpoint_dir=checkpoint_dir,
                 resume=resume, fingerprint=fingerprint, progress=progress, desc=f"train {name}",
                 log_epoch=log_epoch, stop_after_steps=stop_after_steps)
    return RankingTrainResult(model=model, metrics=fitted.metrics, epoch_losses=fitted.epoch_losses,
                              epoch_task_losses=fitted.epoch_extra_losses, epoch_metrics=fitted.epoch_metrics,
                              step_times=fitted.step_times, epoch_seconds=fitted.epoch_seconds,
                              eval_seconds=fitted.eval_seconds, fit=fitted)


# ---------------------------------------------------------------------------------------------------------------
# run directories (merlin_hstu.train.run_dir)
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class DatasetShape:
    """What a ranking model's size depends on: enough to rebuild it without the dataset."""

    num_items: int
    contextual_cardinalities: Dict[str, int]
    tasks: Tuple[RankingTask, ...]
    num_action_bits: int

    @classmethod
    def of(cls, dataset) -> "DatasetShape":
        return cls(int(dataset.num_items), dict(dataset.contextual_cardinalities), tuple(dataset.tasks),
                   int(dataset.num_action_bits))


def save_run(run_dir, model: torch.nn.Module, cfg, result: RankingTrainResult, dataset,
             extra: Optional[dict] = None):
    """Publish a ranking run directory: config.yaml (RankingExperimentConfig), model.pt (weights + the dataset's
    shape), metrics.json, run.json (task, data, device, ...), training_curves.png."""
    from dataclasses import asdict

    from merlin_hstu.ranking.config import dump_config
    from merlin_hstu.train.run_dir import cpu_state_dict, plot_losses, publish_run, run_record

    shape = DatasetShape.of(dataset)
    blob = {"task": "ranking", "model_type": cfg.model_type,
            "shape": {"num_items": shape.num_items, "contextual_cardinalities": shape.contextual_cardinalities,
                      "tasks": [asdict(t) for t in shape.tasks], "num_action_bits": shape.num_action_bits},
            "state_dict": cpu_state_dict(model)}
    record = {"metrics": result.metrics, "epoch_losses": result.epoch_losses,
              "epoch_task_losses": result.epoch_task_losses,
              "epoch_metrics": [{"epoch": e, **m} for e, m in result.epoch_metrics],
              "train_seconds": result.train_seconds, **(extra or {})}
    run = run_record(result.fit, cfg.model_type, getattr(dataset, "path", None), steps=len(result.step_times))
    return publish_run(run_dir, "ranking", dump_config(cfg), blob, record, run,
                       lambda path: plot_losses(result.epoch_losses, path, "ranking"))


def load_run(run_dir) -> tuple:
    """-> (ranking model in eval mode on the CPU, RankingExperimentConfig, record)."""
    from merlin_hstu.ranking.config import load_config
    from merlin_hstu.train.run_dir import read_record

    run_dir = Path(run_dir)
    cfg = load_config(run_dir / "config.yaml")
    blob = torch.load(run_dir / "model.pt", map_location="cpu", weights_only=False)
    s = blob["shape"]
    shape = DatasetShape(int(s["num_items"]), dict(s["contextual_cardinalities"]),
                         tuple(RankingTask(**t) for t in s["tasks"]), int(s["num_action_bits"]))
    # a loaded run has plain nn.Embedding tables whatever trained it (model.embeddings: the same weights)
    from merlin_hstu.ranking.config import MODELS

    model = MODELS[cfg.model_type](shape, {k: v for k, v in cfg.model_fields().items() if k != "embeddings"})
    model.load_state_dict(blob["state_dict"])
    return model.eval(), cfg, read_record(run_dir)
