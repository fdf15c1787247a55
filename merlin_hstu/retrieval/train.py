"""Retrieval training and evaluation loops (reference protocol), plus run directories on disk.

A run directory holds:
    config.yaml      the ExperimentConfig used
    model.pt         {"model_config": RetrievalModelConfig dict, "state_dict": ...}
    metrics.json     final metrics of the model and of the most-popular baseline, per-epoch losses
It is written to a temporary sibling and renamed, so a directory that exists is complete.
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from tqdm.auto import tqdm

from merlin_hstu.common.atomic_dir import publish_dir, staging_dir
from merlin_hstu.retrieval.baselines import MostPopular
from merlin_hstu.retrieval.config import ExperimentConfig, dump_config, load_config
from merlin_hstu.retrieval.data import LeaveOneOut, SequenceTable, history_window, train_sequences
from merlin_hstu.retrieval.metrics import RetrievalMetricAccumulator, target_ranks
from merlin_hstu.retrieval.model import HSTURetrievalModel, RetrievalModelConfig, next_item_training_loss
from merlin_hstu.retrieval.topk import rankable_from_invalid


@dataclass
class TrainResult:
    model: HSTURetrievalModel
    split: LeaveOneOut
    metrics: dict  # {"HSTU": {...}, "most-popular": {...}}
    epoch_losses: list = field(default_factory=list)
    train_seconds: float = 0.0
    epoch_metrics: list = field(default_factory=list)  # [(epoch, metrics)] when train.eval_every > 0
    step_times: list = field(default_factory=list)  # seconds per optimizer step (forward + backward + update)
    epoch_seconds: list = field(default_factory=list)  # training time per epoch, evaluation excluded
    eval_seconds: float = 0.0


def build_model(table: SequenceTable, cfg: ExperimentConfig) -> HSTURetrievalModel:
    model_cfg = RetrievalModelConfig(num_items=table.num_items, encoder=cfg.model, input_dropout=cfg.train.input_dropout,
                                     head=cfg.head)
    return HSTURetrievalModel(model_cfg)


@torch.no_grad()
def evaluate_model(model: HSTURetrievalModel, split: LeaveOneOut, cfg: ExperimentConfig,
                   progress: bool = False) -> dict:
    """HR/NDCG@K and MRR on the eval samples (last item per user), all catalogue items scored.

    Ranks come from the model's brute-force top-K module (merlin_hstu.retrieval.topk: chunked MIPS or MoL, history-window
    filtered, top-`rank_cap` list), the module serving traces as well."""
    model.eval()
    acc = RetrievalMetricAccumulator(ks=cfg.train.ks)
    topk = model.topk(rankable_from_invalid(split.table.num_items, split.table.non_candidate_ids))
    batches = split.batches(split.eval, cfg.train.eval_batch_size)
    total = split.num_batches(split.eval, cfg.train.eval_batch_size)
    for batch in tqdm(batches, total=total, desc="evaluate", leave=False, disable=not progress):
        query = model.last_user_vector(batch["ids"], batch["lengths"], batch.get("timestamps"))
        acc.update(topk.target_ranks(query, batch["targets"], history_window(batch), rank_cap=cfg.train.rank_cap))
    return acc.compute()


def evaluate_most_popular(split: LeaveOneOut, cfg: ExperimentConfig) -> dict:
    """The same protocol with every user scored by training-set popularity."""
    baseline = MostPopular().fit(train_sequences(split.train), num_items=split.table.num_items)
    acc = RetrievalMetricAccumulator(ks=cfg.train.ks)
    invalid = split.table.non_candidate_ids
    for batch in split.batches(split.eval, cfg.train.eval_batch_size):
        scores = baseline.scores(batch["ids"].shape[0])
        acc.update(target_ranks(scores, batch["targets"], history_window(batch),
                                invalid_ids=invalid, rank_cap=cfg.train.rank_cap))
    return acc.compute()


def train_retrieval(table: SequenceTable, cfg: ExperimentConfig, progress: bool = True,
                    log_epoch: Optional[Callable[[int, float, dict], None]] = None,
                    model_name: str = "HSTU") -> TrainResult:
    """Train a retrieval model (HSTU or SASRec encoder) with the configured head and loss (`cfg.head`,
    `cfg.train.loss` / `negatives`; reference default: dot product, sampled softmax over 128 uniform negatives);
    evaluate it and most-popular.

    `log_epoch(epoch, mean_loss, metrics)` is called after every evaluated epoch (train.eval_every)."""
    log_epoch = log_epoch or (lambda epoch, loss, metrics: None)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    torch.manual_seed(cfg.train.seed)
    split = LeaveOneOut(table, max_history=cfg.data.max_history)
    if len(split.train.lengths) == 0:
        raise ValueError("no user has the >= 3 events a leave-one-out train sample needs")
    model = build_model(table, cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.learning_rate, betas=tuple(cfg.train.betas),
                                  weight_decay=cfg.train.weight_decay)
    loss_cfg = cfg.train.loss_config()
    shuffle_gen = torch.Generator().manual_seed(cfg.train.seed)
    negative_gen = torch.Generator().manual_seed(cfg.train.seed + 1)
    pool = table.candidate_ids
    steps_per_epoch = split.num_batches(split.train, cfg.train.batch_size)
    epoch_losses, epoch_metrics, metrics = [], [], {}
    total_steps = cfg.train.epochs * steps_per_epoch
    if cfg.train.max_steps:
        total_steps = min(total_steps, cfg.train.max_steps)
    bar = tqdm(total=total_steps, desc=f"train {model_name}", unit="step", disable=not progress)
    step_times, epoch_seconds, eval_seconds = [], [], 0.0
    steps_done = 0
    for epoch in range(cfg.train.epochs):
        if cfg.train.max_steps and steps_done >= cfg.train.max_steps:
            break  # a smoke run: the step budget is spent
        model.train()
        total, count = 0.0, 0
        epoch_start = time.perf_counter()
        for batch in split.batches(split.train, cfg.train.batch_size, shuffle=True, generator=shuffle_gen):
            if cfg.train.max_steps and steps_done >= cfg.train.max_steps:
                break
            t0 = time.perf_counter()
            loss = next_item_training_loss(model, batch, pool, loss_cfg, negative_gen)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            value = loss.item()
            step_times.append(time.perf_counter() - t0)
            total, count, steps_done = total + value, count + 1, steps_done + 1
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{value:.3f}")
        epoch_seconds.append(time.perf_counter() - epoch_start)
        epoch_losses.append(total / max(count, 1))
        last = epoch + 1 == cfg.train.epochs or (cfg.train.max_steps and steps_done >= cfg.train.max_steps)
        if cfg.train.eval_every and (epoch + 1) % cfg.train.eval_every == 0 and not last:
            t0 = time.perf_counter()
            epoch_metrics.append((epoch + 1, evaluate_model(model, split, cfg)))
            eval_seconds += time.perf_counter() - t0
            bar.set_postfix(epoch=epoch + 1, loss=f"{epoch_losses[-1]:.3f}", hr10=f"{epoch_metrics[-1][1]['hr@10']:.3f}")
            log_epoch(epoch + 1, epoch_losses[-1], epoch_metrics[-1][1])
    bar.close()
    train_seconds = sum(epoch_seconds)
    t0 = time.perf_counter()
    metrics[model_name] = evaluate_model(model, split, cfg, progress=progress)
    eval_seconds += time.perf_counter() - t0
    metrics["most-popular"] = evaluate_most_popular(split, cfg)
    if cfg.train.eval_every:
        epoch_metrics.append((len(epoch_losses), metrics[model_name]))
        log_epoch(len(epoch_losses), epoch_losses[-1], metrics[model_name])
    return TrainResult(model, split, metrics, epoch_losses, train_seconds, epoch_metrics, step_times,
                       epoch_seconds, eval_seconds)


def plot_training_curves(record: dict, path: Path) -> Optional[Path]:
    """Loss per epoch and, when recorded, HR@10 / NDCG@10 per epoch against the most-popular level."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # plotting is a convenience; the numbers are in metrics.json
        return None
    has_eval = bool(record.get("epoch_metrics"))
    fig, axes = plt.subplots(1, 2 if has_eval else 1, figsize=(10 if has_eval else 5, 3.6), squeeze=False)
    losses = record["epoch_losses"]
    axes[0, 0].plot(range(1, len(losses) + 1), losses, marker="o")
    axes[0, 0].set(title=f"training loss ({record.get('loss', 'sampled_softmax')})", xlabel="epoch", ylabel="loss")
    if has_eval:
        ax = axes[0, 1]
        epochs = [m["epoch"] for m in record["epoch_metrics"]]
        for key in ("hr@10", "ndcg@10"):
            ax.plot(epochs, [m[key] for m in record["epoch_metrics"]], marker="o", label=f"model {key}")
        pop = record["metrics"].get("most-popular", {})
        if "hr@10" in pop:
            ax.axhline(pop["hr@10"], color="gray", linestyle="--", label="most-popular hr@10")
        ax.set(title="evaluation (leave-one-out, last item)", xlabel="epoch")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --- run directories ------------------------------------------------------------------------------
def save_run(run_dir: str | Path, result: TrainResult, cfg: ExperimentConfig, extra: Optional[dict] = None) -> Path:
    final = Path(run_dir)
    tmp = staging_dir(final)
    try:
        (tmp / "config.yaml").write_text(dump_config(cfg))
        torch.save({"model_config": result.model.config.to_dict(), "state_dict": result.model.state_dict()},
                   tmp / "model.pt")
        record = {"metrics": result.metrics, "epoch_losses": result.epoch_losses, "loss": cfg.train.loss,
                  "epoch_metrics": [{"epoch": e, **m} for e, m in result.epoch_metrics],
                  "train_seconds": result.train_seconds, **(extra or {})}
        (tmp / "metrics.json").write_text(json.dumps(record, indent=2, default=str))
        plot_training_curves(record, tmp / "training_curves.png")
        publish_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def load_run(run_dir: str | Path) -> tuple:
    """-> (HSTURetrievalModel in eval mode, ExperimentConfig, metrics record)."""
    run_dir = Path(run_dir)
    for name in ("config.yaml", "model.pt"):
        if not (run_dir / name).is_file():
            raise FileNotFoundError(f"{run_dir} is not a merlin-hstu run directory: {name} is missing")
    cfg = load_config(run_dir / "config.yaml")
    blob = torch.load(run_dir / "model.pt", map_location="cpu", weights_only=True)
    model = HSTURetrievalModel(RetrievalModelConfig.from_dict(blob["model_config"]))
    model.load_state_dict(blob["state_dict"])
    model.eval()
    metrics_path = run_dir / "metrics.json"
    record = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
    return model, cfg, record
