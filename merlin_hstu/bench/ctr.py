"""CTR training / evaluation for WuKong, DLRM and logistic regression, and `merlin-hstu bench --task ctr`.

    merlin-hstu bench --task ctr --dataset synthetic-criteo --model wukong,dlrm,logreg --seeds 3
    merlin-hstu bench --task ctr --dataset ml-1m-prefix-ctr --model wukong --set model.num_layers=3
    merlin-hstu bench --task ctr --dataset synthetic-criteo --model wukong --set scaling=true

Datasets: `synthetic-criteo` (the planted-interaction generator of `merlin_hstu.ctr.data`, written as a Criteo TSV
and run through the NVTabular Criteo workflow once, cached under --cache), `ml-1m-prefix-ctr` (the MovieLens
prefix as a CTR table) or a directory written by `merlin_hstu.workflows.criteo_workflow.preprocess_criteo`.
`--model` takes one model or a comma list; models listed together run in one process, one after another per
seed, so their step-time ratios are measured side by side.

Training: Adam on binary cross-entropy of the logits, shuffled mini-batches, fixed seeds.  Metrics on the
validation split after the last epoch: AUC, log loss, normalized entropy (`merlin_hstu.common.metrics`).
Step time: median over the steps after the first (warm-up) of forward + backward + update.

Overrides (`--set KEY=VALUE`, repeatable):
    model.<field>   WuKong: embedding_dim, top_mlp, top_dropout and the tower's num_layers, lcb_feature_num,
                    fmb_feature_num, compressed_feature_num, fmb_mlp, fmb_layer_norm, dropout;
                    DLRM: embedding_dim, bottom_mlp, top_mlp.  Applied to every listed model that has the field.
    train.<field>   CTRTrainConfig: batch_size, learning_rate, weight_decay, eval_batch_size
    data.<field>    synthetic-criteo: SyntheticCriteoConfig fields (num_rows, seed, ...) and freq_threshold
    scaling=true    the WuKong scaling curve instead: AUC / log loss over scaling.layers x scaling.widths
                    (width w sets lcb = fmb = compressed feature counts to w); writes scaling.png
"""
from __future__ import annotations

import dataclasses
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Dict, List, Optional

import torch

from merlin_hstu.bench.retrieval import machine_info, machine_summary, mean_std
from merlin_hstu.common.atomic_dir import write_file
from merlin_hstu.common.plots import pyplot, save_figure
from merlin_hstu.common.overrides import overrides_by_section, replace_fields
from merlin_hstu.ctr.config import CTRExperimentConfig
from merlin_hstu.ctr.data import CTRData, load_ctr_dataset
from merlin_hstu.ctr.dlrm import DLRMConfig
from merlin_hstu.ctr.wukong import WukongModelConfig
from merlin_hstu.encoders.wukong import WukongConfig
from merlin_hstu.ctr.train import MODELS, CTRTrainConfig, build_ctr_model, save_run, train_ctr

DEFAULT_SCALING_LAYERS = (1, 2, 3)
DEFAULT_SCALING_WIDTHS = (4, 8, 16)


# ---------------------------------------------------------------------------------------------------------
# bench
# ---------------------------------------------------------------------------------------------------------
def parse_overrides(items) -> Dict[str, Dict[str, object]]:
    """`section.key=value` strings -> {"model": {...}, "train": {...}, "data": {...}, "scaling": {...}}."""
    return overrides_by_section(items, ("model", "train", "data", "scaling"), flags=("scaling",))


def _train_config(args, overrides: Dict[str, object]) -> CTRTrainConfig:
    cfg = CTRTrainConfig(epochs=args.epochs, max_steps=args.max_steps or 0, threads=args.threads or 0)
    return replace_fields(cfg, overrides, "train")


def run_bench(args) -> int:
    sections = parse_overrides(getattr(args, "overrides", []))
    models = [m.strip() for m in (args.model or "wukong").split(",") if m.strip()]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        raise ValueError(f"--model {','.join(unknown)}: CTR models are {', '.join(MODELS)} (comma-separate several)")
    train_cfg = _train_config(args, sections["train"])
    if train_cfg.threads:
        torch.set_num_threads(train_cfg.threads)
    progress = not args.no_progress
    data = load_ctr_dataset(args.dataset, Path(args.cache), sections["data"], args.input,
                            streaming=train_cfg.streaming, shuffle_buffer=train_cfg.shuffle_buffer)
    info = machine_info()
    print(f"machine: {machine_summary(info)}")
    labels = torch.cat([y for _, _, y in data.train.batches(65536)]) if data.streaming else data.train.labels
    print(f"dataset {data.name}: {len(data.train):,} train / {len(data.valid):,} valid rows"
          f"{' (streamed)' if data.streaming else ''}, {data.num_dense} dense + {len(data.cardinalities)} categorical "
          f"features, positive rate {float(labels.mean()):.3f}")
    if sections["scaling"].get("enabled"):
        return run_scaling(args, data, train_cfg, sections, info)
    out = Path(args.output or f"runs/bench/ctr-{Path(args.dataset).name}-{'-'.join(models)}")
    runs: Dict[str, List[dict]] = {m: [] for m in models}
    for i in range(args.seeds):
        seed = args.seed + i
        for name in models:
            torch.manual_seed(seed)
            model = build_ctr_model(name, data.cardinalities, data.num_dense, _model_overrides(name, sections))
            result = train_ctr(model, data, dataclasses.replace(train_cfg, seed=seed), progress,
                               desc=f"{name} seed {seed}")
            runs[name].append({"seed": seed, **result.metrics, "seconds_per_step": result.seconds_per_step,
                               "parameters": result.parameters, "dense_parameters": result.dense_parameters,
                               "epoch_losses": result.epoch_losses,
                               "train_seconds": result.train_seconds, "steps": len(result.step_times)})
            print(f"{name:7s} seed {seed}: auc {result.metrics['auc']:.4f}  logloss {result.metrics['logloss']:.4f}  "
                  f"ne {result.metrics['ne']:.4f}  {result.seconds_per_step * 1e3:.1f} ms/step  "
                  f"{result.parameters:,} params ({result.dense_parameters:,} outside embeddings)")
            experiment = CTRExperimentConfig(
                name=f"bench-{name}", description=f"merlin-hstu bench --task ctr, seed {seed}",
                model={"type": name, **_model_overrides(name, sections)},
                train=dataclasses.replace(train_cfg, seed=seed))
            run_dir = save_run(out / f"run-{name}-seed{seed}", model, experiment, result, data,
                               data_dir=data.info.get("path"))
            print(f"        model saved as a run directory: {run_dir}")
    record = summarize(runs, data, train_cfg, info, args, sections)
    write_file(out / "ctr_bench.json", json.dumps(record, indent=2, default=str))
    write_file(out / "ctr_bench.md", record["markdown"])
    print()
    print(record["markdown"])
    print(f"\nwrote {out / 'ctr_bench.json'}, {out / 'ctr_bench.md'}")
    return 0


def _model_overrides(name: str, sections) -> Dict[str, object]:
    """model.* keys that this model has (so one --set list can serve `--model wukong,dlrm`)."""
    values = sections["model"]
    if name == "logreg":
        return {}
    if name == "dlrm":
        fields = {f.name for f in dataclasses.fields(DLRMConfig)}
    else:
        fields = {f.name for f in dataclasses.fields(WukongModelConfig)} | {f.name for f in dataclasses.fields(WukongConfig)}
    known = {f.name for f in dataclasses.fields(DLRMConfig)} | {f.name for f in dataclasses.fields(WukongModelConfig)} \
        | {f.name for f in dataclasses.fields(WukongConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown model key(s) {unknown}; WuKong: {sorted(known - {'bottom_mlp'})}, "
                         f"DLRM: {sorted(f.name for f in dataclasses.fields(DLRMConfig))}")
    return {k: v for k, v in values.items() if k in fields}


def _command(args) -> str:
    parts = [f"merlin-hstu bench --task ctr --dataset {args.dataset} --model {args.model or 'wukong'}",
             f"--epochs {args.epochs} --seeds {args.seeds}"]
    if args.seed != 42:
        parts.append(f"--seed {args.seed}")
    if args.max_steps:
        parts.append(f"--max-steps {args.max_steps}")
    if args.threads:
        parts.append(f"--threads {args.threads}")
    parts += [f"--set {o}" for o in getattr(args, "overrides", [])]
    return " ".join(parts)


def summarize(runs: Dict[str, List[dict]], data: CTRData, train_cfg: CTRTrainConfig, info: dict, args,
              sections) -> dict:
    rows, summary = [], {}
    for name, seeds in runs.items():
        s = {k: mean_std(r[k] for r in seeds) for k in ("auc", "logloss", "ne", "seconds_per_step")}
        summary[name] = {**{k: m for k, (m, _) in s.items()}, **{f"{k}_std": sd for k, (_, sd) in s.items()},
                         "parameters": seeds[0]["parameters"], "dense_parameters": seeds[0]["dense_parameters"]}
        rows.append(f"| {name} | {s['auc'][0]:.4f} ± {s['auc'][1]:.4f} | {s['logloss'][0]:.4f} ± {s['logloss'][1]:.4f} "
                    f"| {s['ne'][0]:.4f} | {s['seconds_per_step'][0] * 1e3:.1f} | {seeds[0]['parameters']:,} "
                    f"| {seeds[0]['dense_parameters']:,} |")
    ratio = ""
    if "wukong" in summary and "dlrm" in summary:
        ratio = (f"- WuKong / DLRM step time (same process): "
                 f"{summary['wukong']['seconds_per_step'] / summary['dlrm']['seconds_per_step']:.2f}x; "
                 f"AUC difference {summary['wukong']['auc'] - summary['dlrm']['auc']:+.4f}")
    lines = [
        f"### CTR on {data.name}: {', '.join(runs)}; {train_cfg.epochs} epochs, seeds "
        f"{[r['seed'] for r in next(iter(runs.values()))]}",
        "",
        f"Machine: {machine_summary(info)}; shared with other jobs, so times are noisy. "
        f"Date {datetime.now(timezone.utc):%Y-%m-%d}.",
        f"Data: {len(data.train):,} train / {len(data.valid):,} valid rows, {data.num_dense} dense + "
        f"{len(data.cardinalities)} categorical features; batch {train_cfg.batch_size}, Adam lr {train_cfg.learning_rate}.",
        "",
        "| model | valid AUC (mean ± std) | valid logloss (mean ± std) | NE | ms / step | parameters "
        "| of which outside embeddings |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
    ]
    lines += _ceiling_lines(data)
    if ratio:
        lines.append(ratio)
    lines.append(f"- command: `{_command(args)}`")
    return {"task": "ctr", "dataset": data.name, "data_info": data.info, "train": dataclasses.asdict(train_cfg),
            "model_overrides": sections["model"], "machine": info, "runs": runs, "summary": summary,
            "markdown": "\n".join(lines), "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}


# ---------------------------------------------------------------------------------------------------------
# scaling curve
# ---------------------------------------------------------------------------------------------------------
def run_scaling(args, data: CTRData, train_cfg: CTRTrainConfig, sections, info: dict) -> int:
    """Train WuKong over layers x widths (one seed) and record quality against parameters."""
    layers = [int(v) for v in sections["scaling"].get("layers", DEFAULT_SCALING_LAYERS)]
    widths = [int(v) for v in sections["scaling"].get("widths", DEFAULT_SCALING_WIDTHS)]
    out = Path(args.output or f"runs/bench/ctr-{Path(args.dataset).name}-wukong-scaling")
    base = _model_overrides("wukong", sections)
    points = []
    baselines = {}
    for name in ("logreg", "dlrm"):
        torch.manual_seed(args.seed)
        result = train_ctr(build_ctr_model(name, data.cardinalities, data.num_dense,
                                           _model_overrides(name, sections)),
                           data, dataclasses.replace(train_cfg, seed=args.seed), not args.no_progress, desc=name)
        baselines[name] = {**result.metrics, "parameters": result.parameters,
                           "dense_parameters": result.dense_parameters,
                           "seconds_per_step": result.seconds_per_step}
        print(f"{name}: auc {result.metrics['auc']:.4f} logloss {result.metrics['logloss']:.4f}")
    for num_layers in layers:
        for width in widths:
            overrides = {**base, "num_layers": num_layers, "lcb_feature_num": width, "fmb_feature_num": width,
                         "compressed_feature_num": width}
            torch.manual_seed(args.seed)
            model = build_ctr_model("wukong", data.cardinalities, data.num_dense, overrides)
            result = train_ctr(model, data, dataclasses.replace(train_cfg, seed=args.seed), not args.no_progress,
                               desc=f"wukong L={num_layers} w={width}")
            points.append({"layers": num_layers, "width": width, **result.metrics, "parameters": result.parameters,
                           "dense_parameters": result.dense_parameters,
                           "seconds_per_step": result.seconds_per_step})
            print(f"wukong layers {num_layers} width {width}: auc {result.metrics['auc']:.4f} "
                  f"logloss {result.metrics['logloss']:.4f} params {result.parameters:,} "
                  f"({result.dense_parameters:,} outside embeddings) "
                  f"{result.seconds_per_step * 1e3:.1f} ms/step")
    ceilings = data.info.get("ceiling_auc")
    table = ["| model | layers | width (n_F = n_L = k) | valid AUC | valid logloss | parameters outside embeddings "
             "| ms / step |", "|---|---|---|---|---|---|---|"]
    table += [f"| wukong | {p['layers']} | {p['width']} | {p['auc']:.4f} | {p['logloss']:.4f} "
              f"| {p['dense_parameters']:,} | {p['seconds_per_step'] * 1e3:.1f} |" for p in points]
    table += [f"| {name} | - | - | {b['auc']:.4f} | {b['logloss']:.4f} | {b['dense_parameters']:,} "
              f"| {b['seconds_per_step'] * 1e3:.1f} |" for name, b in baselines.items()]
    lines = [f"### WuKong scaling on {data.name}: layers {layers} x widths {widths}, {train_cfg.epochs} epochs, "
             f"seed {args.seed}", "",
             f"Machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']}, GPU {info['gpu'] or 'none'}; "
             f"shared, times noisy. Date {datetime.now(timezone.utc):%Y-%m-%d}.", "", *table, ""]
    lines += _ceiling_lines(data)
    lines.append(f"- command: `{_command(args)}`")
    record = {"task": "ctr-scaling", "dataset": data.name, "data_info": data.info, "machine": info,
              "train": dataclasses.asdict(train_cfg), "points": points, "baselines": baselines,
              "markdown": "\n".join(lines), "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    files = {"scaling.json": json.dumps(record, indent=2, default=str), "scaling.md": record["markdown"]}
    if pyplot() is None:
        print("matplotlib is not installed: scaling.png skipped")
    else:
        files["scaling.png"] = lambda path: plot_scaling(points, baselines, ceilings, path)
    for name, content in files.items():
        write_file(out / name, content)
    print()
    print(record["markdown"])
    print(f"\nwrote {', '.join(str(out / f) for f in files)}")
    return 0


def _ceiling_lines(data: CTRData) -> List[str]:
    ceilings = data.info.get("ceiling_auc")
    if not ceilings:
        return []
    return ["- ceiling: AUC of the planted logit on the validation rows, keeping orders "
            + ", ".join(f"{k.replace('order', '')}: {v:.4f}" for k, v in ceilings.items())
            + " (a model that captures exactly those orders could reach it)"]


def plot_scaling(points: List[dict], baselines: Dict[str, dict], ceilings: Optional[Dict[str, float]],
                 path: Path) -> None:
    """AUC and log loss against the parameters outside the embedding tables, one line per depth.  The y range
    fits WuKong, DLRM and the full ceiling; a baseline outside it is named in the legend with its value."""
    fig, axes = pyplot().subplots(1, 2, figsize=(11, 4.2))
    for metric, ax in zip(("auc", "logloss"), axes):
        shown = [p[metric] for p in points]
        for num_layers in sorted({p["layers"] for p in points}):
            row = sorted((p for p in points if p["layers"] == num_layers), key=lambda p: p["dense_parameters"])
            ax.plot([p["dense_parameters"] for p in row], [p[metric] for p in row], marker="o",
                    label=f"WuKong, {num_layers} layer{'s' if num_layers > 1 else ''}")
            for p in row:
                ax.annotate(f"w{p['width']}", (p["dense_parameters"], p[metric]), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
        if "dlrm" in baselines:
            shown.append(baselines["dlrm"][metric])
        if metric == "auc" and ceilings and "order<=3" in ceilings:
            shown.append(ceilings["order<=3"])
            ax.axhline(ceilings["order<=3"], linestyle="-.", color="black", linewidth=0.8,
                       label=f"ceiling: planted logit ({ceilings['order<=3']:.3f})")
        low, high = min(shown), max(shown)
        pad = max(high - low, 1e-3) * 0.15
        for (name, b), style in zip(baselines.items(), ("--", ":", "-")):
            inside = low - pad <= b[metric] <= high + pad
            ax.axhline(b[metric], linestyle=style, color="gray",
                       label=f"{name}: {b[metric]:.3f}" + ("" if inside else " (off scale)"))
        ax.set_ylim(low - pad, high + pad)
        ax.set_xscale("log")
        ax.set_xlabel("parameters outside the embedding tables")
        ax.set_ylabel(f"validation {metric}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("WuKong scaling on synthetic Criteo-layout data (width w: n_F = n_L = k = w)")
    save_figure(fig, path, dpi=120)
