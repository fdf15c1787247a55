"""`merlin-hstu bench --task ranking --dataset D [--model dlrm-hstu|dlrm-baseline]`: multi-task ranking benchmark.

Trains the model on the dataset's training users over `--seeds` seeds, evaluates on the test users after every
epoch, and prints per task AUC / GAUC / NE per epoch and at the end (mean and std over seeds) beside the
item-prior baseline (no learning: the smoothed per-item positive rate), then seconds per step, epoch time and
peak RSS. Writes `<output>/bench.json`, `bench.md` and `bench.png` (loss and per-task AUC / GAUC per epoch).

Datasets: a directory written by `merlin-hstu preprocess-ranking`, or a name of
`merlin_hstu.workflows.ranking_workflow.RANKING_DATASETS` (`ml-1m-prefix-ranking` is staged here), preprocessed
once into `<--cache>/<name>-k<K>-u<max_uih_len>`.

Overrides (`--set SECTION.KEY=VALUE`, repeatable; values are YAML):
  model.*  fields of the model's config (DlrmHSTUConfig for dlrm-hstu, DlrmBaselineConfig for dlrm-baseline)
  train.*  fields of RankingTrainConfig (batch_size, learning_rate, betas, weight_decay, optimizer, ...)
  data.*   num_candidates, max_uih_len (named datasets: preprocessing), test_fraction, split_seed,
           train_windows (samples per training user, 0 = every K-window of its history), tasks (list of names)
"""
from __future__ import annotations

import dataclasses
import json
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch

from merlin_hstu.common.atomic_dir import write_file
from merlin_hstu.common.overrides import overrides_by_section
from merlin_hstu.common.plots import pyplot, save_figure
from merlin_hstu.bench.retrieval import mean_std, machine_info, machine_summary, peak_rss_gb
from merlin_hstu.ranking.baselines import ItemPriorBaseline
from merlin_hstu.ranking.config import MODELS as RANKING_MODELS
from merlin_hstu.ranking.config import RankingDataConfig, RankingExperimentConfig
from merlin_hstu.ranking.data import META_FILE, RankingDataset
from merlin_hstu.ranking.train import (
    RankingTrainConfig,
    save_run,
    evaluate_ranking,
    format_task_metrics,
    train_ranking,
)

DEFAULT_MODEL = "dlrm-hstu"
DATA_DEFAULTS = {"num_candidates": 10, "max_uih_len": 200, "test_fraction": None, "split_seed": None,
                 "train_windows": 1, "tasks": None}
TABLE_METRICS = ("auc", "gauc", "ne")


#: --model name -> builder(dataset, model overrides) -> a module with forward(RankingBatch) -> [Lc, T]
MODELS: Dict[str, Callable[[RankingDataset, dict], torch.nn.Module]] = RANKING_MODELS


def _dataclass_from(cls, values: dict, what: str):
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown {what} option(s) {unknown}; valid: {sorted(known)}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def parse_overrides(items: List[str]) -> Dict[str, dict]:
    """['model.embedding_dim=32', 'train.batch_size=64'] -> {"model": {...}, "train": {...}, "data": {...}}."""
    out = overrides_by_section(items, ("model", "train", "data"))
    unknown = sorted(set(out["data"]) - set(DATA_DEFAULTS))
    if unknown:
        raise ValueError(f"--set data.{unknown[0]}: unknown data option {unknown[0]!r}; valid: {sorted(DATA_DEFAULTS)}")
    return out


def resolve_ranking_dataset(name_or_path: str, input_dir: Optional[str], cache_root: Path, num_candidates: int,
                            max_uih_len: int) -> Tuple[Path, str]:
    """A preprocess-ranking directory: the given one, or a named dataset preprocessed once into the cache."""
    path = Path(name_or_path)
    if (path / META_FILE).is_file():
        return path, str(path)
    from merlin_hstu.workflows.ranking_workflow import RANKING_DATASETS, preprocess_ranking_dataset

    if name_or_path not in RANKING_DATASETS:
        raise ValueError(f"unknown ranking dataset {name_or_path!r}: use one of {sorted(RANKING_DATASETS)} or a "
                         "directory written by `merlin-hstu preprocess-ranking`")
    from merlin_hstu.common.atomic_dir import exclusive

    out = cache_root / f"{name_or_path}-k{num_candidates}-u{max_uih_len}"
    with exclusive(out):  # one process builds it; others sharing the cache wait, then read it
        if not (out / META_FILE).is_file():
            print(f"preprocessing {name_or_path} -> {out}")
            t0 = time.perf_counter()
            done = preprocess_ranking_dataset(name_or_path, input_dir, out, num_candidates=num_candidates,
                                              max_uih_len=max_uih_len, overwrite=True)
            print(f"  {done.num_rows:,} users in {time.perf_counter() - t0:.1f} s (NVTabular)")
    return out, name_or_path


def _model_config(model: torch.nn.Module) -> dict:
    config = getattr(model, "config", None)
    if config is None:
        return {}
    return config.to_dict() if hasattr(config, "to_dict") else dataclasses.asdict(config)


def run_bench(args) -> int:
    model_name = args.model or DEFAULT_MODEL
    if model_name not in MODELS:
        raise ValueError(f"unknown ranking model {model_name!r}; use one of {sorted(MODELS)}")
    sets = parse_overrides(list(args.overrides))
    data = {**DATA_DEFAULTS, **sets["data"]}
    train_values = {"epochs": args.epochs, **sets["train"]}
    if args.max_steps:
        train_values["max_steps"] = args.max_steps
    if args.threads:
        train_values["threads"] = args.threads
    if args.no_epoch_eval:
        train_values["eval_every"] = 0
    train_cfg = _dataclass_from(RankingTrainConfig, train_values, "train (RankingTrainConfig)")
    if train_cfg.streaming:
        raise ValueError("bench --task ranking reads the dataset in memory (its item-prior baseline counts every "
                         "event); train a streamed ranking model with `merlin-hstu train --task ranking --set "
                         "train.streaming=true`, or drop train.streaming here")

    data_dir, dataset_name = resolve_ranking_dataset(args.dataset, args.input, Path(args.cache),
                                                     int(data["num_candidates"]), int(data["max_uih_len"]))
    dataset = RankingDataset.load(data_dir, tasks=data["tasks"], test_fraction=data["test_fraction"],
                                  split_seed=data["split_seed"], train_windows=int(data["train_windows"]))
    out = Path(args.output or f"runs/bench/{Path(dataset_name).name}-{model_name}")
    if train_cfg.threads:
        torch.set_num_threads(train_cfg.threads)  # before machine_info, which reports the thread count
    info = machine_info()
    print(f"machine: {machine_summary(info)}")
    print(f"dataset {dataset_name} ({data_dir}):")
    print("  " + dataset.summary().replace("\n", "\n  "))
    print(f"model {model_name}; tasks {[t.name for t in dataset.tasks]}; {train_cfg.epochs} epochs; "
          f"seeds {args.seeds}; batch {train_cfg.batch_size}; lr {train_cfg.learning_rate}")

    prior = ItemPriorBaseline.fit(dataset, train_cfg.train_split)
    prior_metrics = evaluate_ranking(prior, dataset.batches(train_cfg.eval_split, train_cfg.eval_batch_size))
    print(f"item prior (no learning): {format_task_metrics(prior_metrics)}")

    runs, model_config, num_params = [], {}, 0
    for i in range(args.seeds):
        seed = args.seed + i
        print(f"\n--- seed {seed} ---")
        torch.manual_seed(seed)  # model initialisation
        model = MODELS[model_name](dataset, dict(sets["model"]))
        model_config = _model_config(model)
        num_params = sum(p.numel() for p in model.parameters())
        if i == 0:
            print(f"{num_params:,} parameters; config {model_config}")
        cfg = dataclasses.replace(train_cfg, seed=seed)

        def log_epoch(epoch, loss, metrics):
            print(f"epoch {epoch:3d}  loss {loss:.4f}  {format_task_metrics(metrics)}")

        result = train_ranking(model, dataset, cfg, progress=not args.no_progress, log_epoch=log_epoch,
                               name=model_name)
        experiment = RankingExperimentConfig(
            name=f"bench-{model_name}", description=f"merlin-hstu bench --task ranking, seed {seed}",
            data=RankingDataConfig(train_windows=int(data["train_windows"]), test_fraction=data["test_fraction"],
                                   split_seed=data["split_seed"], tasks=data["tasks"]),
            model={"type": model_name, **sets["model"]}, train=cfg)
        run_dir = save_run(out / f"run-seed{seed}", model, experiment, result, dataset)
        print(f"model saved as a run directory: {run_dir} (merlin-hstu evaluate / export --run {run_dir})")
        steady = result.step_times[1:] or result.step_times  # the first step includes warm-up
        runs.append({
            "seed": seed,
            "metrics": result.metrics,
            "epoch_losses": result.epoch_losses,
            "epoch_task_losses": result.epoch_task_losses,
            "epoch_metrics": [{"epoch": e, "metrics": m} for e, m in result.epoch_metrics],
            "seconds_per_step_median": statistics.median(steady),
            "steps": len(result.step_times),
            "epoch_seconds": result.epoch_seconds,
            "eval_seconds": result.eval_seconds,
        })
    record = summarize(runs, model_name, model_config, num_params, train_cfg, data, dataset, dataset_name,
                       prior_metrics, info, args)
    write_outputs(record, out)
    print()
    print(record["markdown"])
    print(f"\nwrote {out / 'bench.json'}, {out / 'bench.md'}, {out / 'bench.png'}")
    return 0


def _table(rows: Dict[str, Dict[str, Dict[str, float]]], tasks: List[Tuple[str, str]]) -> str:
    """Markdown table: one row per model; per binary task AUC / GAUC / NE, per regression task MSE."""
    columns = [(t, m) for t, kind in tasks for m in (TABLE_METRICS if kind == "binary" else ("mse",))]
    lines = ["| model | " + " | ".join(f"{t} {m.upper()}" for t, m in columns) + " |",
             "|---|" + "---|" * len(columns)]
    for name, metrics in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{metrics[t][m]:.4f}" for t, m in columns) + " |")
    return "\n".join(lines)


def summarize(runs, model_name, model_config, num_params, train_cfg, data, dataset, dataset_name, prior_metrics,
              info, args) -> dict:
    tasks = [(t.name, t.kind) for t in dataset.tasks]
    keys = [(t, m) for t in runs[0]["metrics"] for m in runs[0]["metrics"][t]]
    stats = {(t, m): mean_std(r["metrics"][t][m] for r in runs) for t, m in keys}
    mean = {t: {m: stats[(t, m)][0] for tt, m in keys if tt == t} for t in runs[0]["metrics"]}
    std = {t: {m: stats[(t, m)][1] for tt, m in keys if tt == t} for t in runs[0]["metrics"]}
    rows = {f"{model_name} (mean of {len(runs)})": mean}
    if len(runs) > 1:
        rows[f"{model_name} (std)"] = std
    rows["item prior (no learning)"] = prior_metrics
    sps = mean_std(r["seconds_per_step_median"] for r in runs)
    epochs = [s for r in runs for s in r["epoch_seconds"]]
    timing = {"seconds_per_step": sps[0], "seconds_per_step_std": sps[1],
              "epoch_seconds_median": statistics.median(epochs) if epochs else None,
              "eval_seconds_per_run": statistics.fmean(r["eval_seconds"] for r in runs),
              "steps_per_run": runs[0]["steps"], "peak_rss_gb": peak_rss_gb()}
    command = (f"merlin-hstu bench --task ranking --dataset {args.dataset} --model {model_name} "
               f"--epochs {args.epochs} --seeds {args.seeds}" + (f" --seed {args.seed}" if args.seed != 42 else "")
               + (f" --max-steps {args.max_steps}" if args.max_steps else "")
               + (f" --threads {args.threads}" if args.threads else "")
               + (" --no-epoch-eval" if args.no_epoch_eval else "")
               + "".join(f" --set {s}" for s in args.overrides))
    lines = [
        f"### {model_name} on {dataset_name}, {train_cfg.epochs} epochs, seeds {[r['seed'] for r in runs]}",
        "",
        f"Machine: {machine_summary(info)}. Date {datetime.now(timezone.utc):%Y-%m-%d}. "
        f"Test users {len(dataset.rows(train_cfg.eval_split)):,} ({dataset.num_samples(train_cfg.eval_split):,} "
        f"samples); training samples {dataset.num_samples(train_cfg.train_split):,} "
        f"(train_windows={dataset.train_windows}).",
        "",
        _table(rows, tasks),
        "",
        f"- {num_params:,} parameters; batch {train_cfg.batch_size} samples; {timing['steps_per_run']} steps per run",
        f"- seconds per training step (median over steady steps, mean over seeds): {timing['seconds_per_step']:.4f}",
        f"- training time per epoch (median): {timing['epoch_seconds_median']:.1f} s; evaluation per run "
        f"{timing['eval_seconds_per_run']:.1f} s",
        f"- peak RSS of the process: {timing['peak_rss_gb']:.2f} GB",
        f"- command: `{command}`",
    ]
    return {"dataset": dataset_name, "model": model_name, "model_config": model_config, "num_params": num_params,
            "train_config": dataclasses.asdict(train_cfg), "data": {**data, "meta": dataset.meta},
            "machine": info, "runs": runs, "mean": mean, "std": std, "item_prior": prior_metrics,
            "timing": timing, "markdown": "\n".join(lines), "command": command,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def plot_ranking_curves(record: dict, path: Path) -> Optional[Path]:
    """Loss per epoch and per-task AUC / GAUC per epoch (first seed), item prior dashed."""
    plt = pyplot()
    if plt is None:  # the numbers are in bench.json
        return None
    run = record["runs"][0]
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))
    losses = run["epoch_losses"]
    axes[0].plot(range(1, len(losses) + 1), losses, marker="o")
    axes[0].set(title="training loss (sum over tasks)", xlabel="epoch")
    for ax, metric in zip(axes[1:], ("auc", "gauc")):
        for task, prior in record["item_prior"].items():
            if metric not in prior:
                continue
            line, = ax.plot([e["epoch"] for e in run["epoch_metrics"]],
                            [e["metrics"][task][metric] for e in run["epoch_metrics"]], marker="o", label=task)
            ax.axhline(prior[metric], color=line.get_color(), linestyle="--", linewidth=1)
        ax.set(title=f"test {metric.upper()} (dashed: item prior)", xlabel="epoch")
        ax.legend(fontsize=8)
    from matplotlib.ticker import MaxNLocator

    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(f"{record['model']} on {record['dataset']} (seed {run['seed']})", fontsize=9)
    return save_figure(fig, path)


def write_outputs(record: dict, out: Path) -> None:
    """bench.json / bench.md / bench.png, each written to a temporary name and renamed."""
    out.mkdir(parents=True, exist_ok=True)
    for name, text in (("bench.json", json.dumps(record, indent=2, default=str)), ("bench.md", record["markdown"])):
        write_file(out / name, text)
    write_file(out / "bench.png", lambda tmp: plot_ranking_curves(record, tmp))
