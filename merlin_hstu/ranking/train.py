"""Training and evaluation loops for multi-task ranking models.

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
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from tqdm.auto import tqdm

from merlin_hstu.ranking.batch import RankingBatch, RankingTask, multitask_loss
from merlin_hstu.common.metrics import binary_task_metrics, gauc

OPTIMIZERS = ("adam", "adamw")


@dataclass
class RankingTrainConfig:
    """Optimisation and evaluation settings (defaults: the reference's dense Adam, lr 1e-3, betas .95/.999)."""

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
    try:
        for batch in tqdm(batches, total=total, desc="evaluate", leave=False, disable=not progress):
            out = model(batch)
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


def train_ranking(model: torch.nn.Module, dataset, config: Optional[RankingTrainConfig] = None,
                  progress: bool = True,
                  log_epoch: Optional[Callable[[int, float, Dict[str, Dict[str, float]]], None]] = None,
                  name: str = "model") -> RankingTrainResult:
    """Train `model` on `dataset.batches(config.train_split, ...)`; evaluate on `config.eval_split`.

    `dataset` is a `merlin_hstu.ranking.data.RankingDataset` (anything with `batches(split, batch_size, shuffle,
    seed)` and `num_batches(split, batch_size)`). `log_epoch(epoch, mean loss, metrics)` is called after every
    evaluated epoch. The final evaluation is always run and is `result.metrics`.
    """
    config = config or RankingTrainConfig()
    log_epoch = log_epoch or (lambda epoch, loss, metrics: None)
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    optimizer = make_optimizer(model, config)
    steps_per_epoch = dataset.num_batches(config.train_split, config.batch_size)
    if steps_per_epoch == 0:
        raise ValueError(f"split {config.train_split!r} has no users to train on")
    total_steps = config.epochs * steps_per_epoch
    if config.max_steps:
        total_steps = min(total_steps, config.max_steps)
    n_eval = dataset.num_batches(config.eval_split, config.eval_batch_size)
    if n_eval == 0:
        raise ValueError(f"split {config.eval_split!r} has no users to evaluate on")

    def evaluate(show: bool) -> Dict[str, Dict[str, float]]:
        return evaluate_ranking(model, dataset.batches(config.eval_split, config.eval_batch_size), progress=show,
                                total=n_eval)

    result = RankingTrainResult(model=model, metrics={})
    bar = tqdm(total=total_steps, desc=f"train {name}", unit="step", disable=not progress)
    steps = 0
    for epoch in range(config.epochs):
        if config.max_steps and steps >= config.max_steps:
            break  # a smoke run: the step budget is spent
        model.train()
        total, task_totals, count = 0.0, {}, 0
        epoch_start = time.perf_counter()
        for batch in dataset.batches(config.train_split, config.batch_size, shuffle=True,
                                     seed=config.seed * 1000 + epoch):
            if config.max_steps and steps >= config.max_steps:
                break
            t0 = time.perf_counter()
            predictions = model(batch)
            _check_predictions(predictions, batch)
            loss, per_task = multitask_loss(predictions, batch.labels, batch.tasks)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            value = loss.item()
            result.step_times.append(time.perf_counter() - t0)
            if not math.isfinite(value):
                raise FloatingPointError(f"the training loss became {value} at step {steps + 1} (epoch {epoch + 1}); "
                                         "lower the learning rate")
            total, count, steps = total + value, count + 1, steps + 1
            for task, v in per_task.items():
                task_totals[task] = task_totals.get(task, 0.0) + v.item()
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{value:.4f}")
        result.epoch_seconds.append(time.perf_counter() - epoch_start)
        result.epoch_losses.append(total / max(count, 1))
        result.epoch_task_losses.append({k: v / max(count, 1) for k, v in task_totals.items()})
        last = epoch + 1 == config.epochs or bool(config.max_steps and steps >= config.max_steps)
        if config.eval_every and (epoch + 1) % config.eval_every == 0 and not last:
            t0 = time.perf_counter()
            metrics = evaluate(False)
            result.eval_seconds += time.perf_counter() - t0
            result.epoch_metrics.append((epoch + 1, metrics))
            log_epoch(epoch + 1, result.epoch_losses[-1], metrics)
    bar.close()
    t0 = time.perf_counter()
    result.metrics = evaluate(progress)
    result.eval_seconds += time.perf_counter() - t0
    result.epoch_metrics.append((len(result.epoch_losses), result.metrics))
    log_epoch(len(result.epoch_losses), result.epoch_losses[-1] if result.epoch_losses else float("nan"),
              result.metrics)
    return result
