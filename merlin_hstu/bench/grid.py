"""`merlin-hstu bench grid`: the Merlin session grid, SASRec and HSTU x full and sampled softmax x with and without
event-type inputs, plus the GPT-like SASRec (GELU feed-forward), on one processed session dataset; one table and a
figure, the best row marked by NDCG@10.

Every configuration shares the data, the history window, the model width / depth / heads, the optimiser, the
epochs and the seeds; only the encoder, the loss and the event-type input change:

    encoder   sasrec (the reference's SASRec block) | hstu (the STU stack) | sasrec-gpt (SASRec, GELU FFN)
    loss      full softmax over the catalogue | sampled softmax (uniform negatives, `--negatives`)
    actions   none | concat (item ++ action embedding, `inputs.actions=concat`)

Metrics: the leave-one-out protocol of `merlin-hstu bench` (last item per user, every catalogue item ranked,
the history window removed): HR and NDCG at 5 / 10 / 50, MRR; and the eval loss, one number comparable across
losses: the full-catalogue cross-entropy of the held-out item, -log softmax(s / tau)[target] with the model's
similarity s and the config's temperature tau, averaged over eval users (history items stay in the softmax).

A dataset with the Merlin train / valid / test files (DATA/splits/, `preprocess --split-layout merlin`) is run
with their protocol instead (`--split auto`, the default; train.split=sessions, docs/training.md): trained on the
train sessions, every metric and the eval loss on the test sessions' last items (the loop also evaluates the valid
sessions after every epoch; nothing stops early unless --set asks for it). `--split leave_one_out` keeps
leave-one-out on processed/.

A dataset without an action column runs the action-free rows only (the others print "n/a").
"""
from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Dict, List, Optional

from merlin_hstu.common.atomic_dir import write_file
from merlin_hstu.common.plots import pyplot, save_figure

METRIC_KEYS = ["ndcg@5", "ndcg@10", "ndcg@50", "hr@5", "hr@10", "hr@50", "mrr", "eval_loss"]


@dataclass(frozen=True)
class GridConfig:
    name: str
    encoder: str  # hstu | sasrec | sasrec-gpt
    loss: str  # full_softmax | sampled_softmax
    actions: str  # none | concat


def grid_configs() -> List[GridConfig]:
    rows = []
    for encoder in ("sasrec", "hstu"):
        for loss in ("full_softmax", "sampled_softmax"):
            for actions in ("none", "concat"):
                short = "full" if loss == "full_softmax" else "sampled"
                name = f"{encoder}-{short}" + ("+actions" if actions == "concat" else "")
                rows.append(GridConfig(name, encoder, loss, actions))
    rows.append(GridConfig("sasrec-gpt-sampled", "sasrec-gpt", "sampled_softmax", "none"))
    return rows


def experiment_config(row: GridConfig, args, num_items_hint: int = 0):
    """The ExperimentConfig of one grid row: a shared base, then the row's encoder / loss / actions."""
    from merlin_hstu.retrieval.config import load_config

    h = args.max_history
    common = [f"data.max_history={h}", f"train.epochs={args.epochs}", "train.eval_every=0",
              f"train.batch_size={args.batch_size}", f"train.num_negatives={args.num_negatives}",
              "train.ks=[5, 10, 50]", f"train.threads={args.threads}" if args.threads else None,
              f"model.embedding_dim={args.dim}", f"model.num_blocks={args.blocks}", f"model.num_heads={args.heads}",
              f"model.max_seq_len={h + 1}", f"train.loss={row.loss}"]
    if row.encoder == "hstu":
        model = [f"model.attention_dim={args.dim // args.heads}", f"model.linear_dim={args.dim // args.heads}"]
        base = "demo"
    else:
        model = [f"model.ffn_hidden_dim={args.dim}"]
        if row.encoder == "sasrec-gpt":
            model.append("model.activation=gelu")
        base = "sasrec-ml1m"
    actions = []
    if row.actions == "concat":
        actions = ["inputs.actions=concat", f"inputs.action_embedding_dim={max(args.dim // 8, 1)}"]
    split = [f"train.split={args.split}"] if getattr(args, "split", None) else []  # run() resolves --split auto
    cfg = load_config(base, [o for o in common + split + model + actions + list(args.overrides) if o])
    cfg.name = row.name
    return cfg


def eval_loss(model, split, cfg) -> float:
    """Mean full-catalogue cross-entropy of the held-out item (module docstring)."""
    import torch

    from merlin_hstu.retrieval.topk import rankable_from_invalid
    from merlin_hstu.train.loop import module_device, move_to

    model.eval()
    device = module_device(model)
    rankable = rankable_from_invalid(split.table.num_items, split.table.non_candidate_ids).to(device)
    total, count = 0.0, 0
    with torch.no_grad():
        topk = model.topk(rankable)
        for batch in split.batches(split.eval, cfg.train.eval_batch_size):
            batch = move_to(batch, device)
            query = model.last_user_vector(batch["ids"], batch["lengths"], batch.get("timestamps"),
                                           batch.get("actions"))
            scores = topk.scores(query) / cfg.train.temperature
            scores = scores.masked_fill(~rankable.unsqueeze(0), float("-inf"))
            logp = torch.log_softmax(scores.double(), dim=1)
            total += float(-logp.gather(1, batch["targets"].view(-1, 1)).sum())
            count += int(batch["targets"].numel())
    return total / max(count, 1)


def run_row(row: GridConfig, data_dir: Path, args, progress: bool) -> Dict:
    from merlin_hstu.retrieval.train import train_retrieval, training_table

    runs = []
    for i in range(args.seeds):
        cfg = experiment_config(row, args)
        cfg.train.seed = args.seed + i
        table = training_table(data_dir, cfg)  # processed/, or with train.split=sessions the three split files
        timestamps = table.has_timestamps if cfg.train.split == "sessions" else table.timestamps is not None
        if not timestamps and getattr(cfg.model, "time_bias", False):
            cfg.model.time_bias = False
        result = train_retrieval(table, cfg, progress=progress, model_name=row.name)
        metrics = dict(result.metrics[row.name])
        metrics["eval_loss"] = eval_loss(result.model, result.split, cfg)
        steady = result.step_times[1:] or result.step_times
        runs.append({"seed": cfg.train.seed, "metrics": metrics, "most_popular": result.metrics["most-popular"],
                     "seconds_per_step": statistics.median(steady) if steady else None,
                     "train_seconds": result.train_seconds})
    mean = {k: statistics.fmean(r["metrics"][k] for r in runs) for k in METRIC_KEYS}
    std = {k: statistics.pstdev([r["metrics"][k] for r in runs]) if len(runs) > 1 else 0.0 for k in METRIC_KEYS}
    return {"config": row.__dict__, "runs": runs, "mean": mean, "std": std,
            "most_popular": runs[0]["most_popular"], "seconds_per_step": statistics.fmean(
                r["seconds_per_step"] for r in runs if r["seconds_per_step"] is not None)}


def markdown_table(results: Dict[str, Optional[Dict]], most_popular: Optional[Dict]) -> str:
    scored = {n: r for n, r in results.items() if r is not None}
    best = max(scored, key=lambda n: scored[n]["mean"]["ndcg@10"]) if scored else None
    head = "| config | " + " | ".join(k.upper() if k == "mrr" else k for k in METRIC_KEYS) + " | s/step |"
    lines = [head, "|" + "---|" * (len(METRIC_KEYS) + 2)]
    for name, r in results.items():
        if r is None:
            lines.append(f"| {name} | " + " | ".join("n/a" for _ in METRIC_KEYS) + " | |")
            continue
        cells = []
        for k in METRIC_KEYS:
            cell = f"{r['mean'][k]:.4f}"
            if len(r["runs"]) > 1:
                cell += f" ± {r['std'][k]:.4f}"
            cells.append(f"**{cell}**" if name == best and k == "ndcg@10" else cell)
        label = f"**{name}** (best NDCG@10)" if name == best else name
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {r['seconds_per_step']:.3f} |")
    if most_popular:
        lines.append("| most-popular | " + " | ".join(
            f"{most_popular[k]:.4f}" if k in most_popular else "–" for k in METRIC_KEYS) + " | |")
    return "\n".join(lines)


def plot(results: Dict[str, Optional[Dict]], path: Path, title: str) -> Optional[Path]:
    plt = pyplot()
    if plt is None:
        return None
    names = [n for n, r in results.items() if r is not None]
    if not names:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for ax, key in zip(axes, ("ndcg@10", "hr@10")):
        values = [results[n]["mean"][key] for n in names]
        errors = [results[n]["std"][key] for n in names]
        colors = ["tab:orange" if n.startswith("hstu") else "tab:blue" for n in names]
        ax.barh(names, values, xerr=errors, color=colors)
        ax.invert_yaxis()
        ax.set(title=key.upper(), xlabel=key)
    fig.suptitle(title, fontsize=10)
    write_file(path, lambda tmp: save_figure(fig, tmp))
    return path


PROTOCOLS = {"leave_one_out": "leave-one-out (last item per user)",
             "sessions": "Merlin session splits (train on splits/train, metrics on the last item of each "
                         "splits/test session)"}


def resolve_split(split: str, data_dir: Path) -> str:
    """--split auto -> sessions when `data_dir` has the split files, else leave_one_out (an explicit mode as is)."""
    from merlin_hstu.retrieval.data import session_split_files

    if split != "auto":
        return split
    return "sessions" if session_split_files(data_dir) is not None else "leave_one_out"


def run(args) -> int:
    from merlin_hstu.bench.retrieval import machine_info, machine_summary
    from merlin_hstu.common import schema as roles

    data_dir = Path(args.dataset)
    if not (data_dir / "processed").is_dir():
        raise ValueError(f"--dataset {data_dir}: not a `merlin-hstu preprocess` output (no processed/); preprocess the "
                         "session Parquet or event log first: merlin-hstu preprocess --input LOG --output DIR")
    from merlin.io import Dataset

    schema = Dataset(str(data_dir / "processed"), engine="parquet").schema
    has_actions = roles.action_list_column(schema) is not None
    args.split = resolve_split(args.split, data_dir)
    rows = grid_configs()
    if args.configs:
        wanted = [c.strip() for c in args.configs.split(",") if c.strip()]
        unknown = sorted(set(wanted) - {r.name for r in rows})
        if unknown:
            raise ValueError(f"--configs: unknown {unknown}; choose from {[r.name for r in rows]}")
        rows = [r for r in rows if r.name in wanted]
    info = machine_info()
    print(f"machine: {machine_summary(info)}")
    print(f"dataset {data_dir}: event types {'present' if has_actions else 'absent (action rows: n/a)'}; "
          f"{len(rows)} configs x {args.seeds} seed(s), {args.epochs} epochs, D={args.dim}, {args.blocks} blocks, "
          f"history {args.max_history}; protocol {PROTOCOLS[args.split]}")
    results: Dict[str, Optional[Dict]] = {}
    most_popular = None
    for row in rows:
        if row.actions != "none" and not has_actions:
            results[row.name] = None
            continue
        print(f"--- {row.name}", flush=True)
        results[row.name] = run_row(row, data_dir, args, progress=not args.no_progress)
        r = results[row.name]
        most_popular = most_popular or r["most_popular"]
        print("    " + "  ".join(f"{k} {r['mean'][k]:.4f}" for k in METRIC_KEYS), flush=True)
    table = markdown_table(results, most_popular)
    out = Path(args.output or f"runs/bench/grid-{data_dir.name}")
    out.mkdir(parents=True, exist_ok=True)
    command = (f"merlin-hstu bench grid --dataset {args.dataset} --epochs {args.epochs} --seeds {args.seeds} "
               f"--dim {args.dim} --blocks {args.blocks} --heads {args.heads} --max-history {args.max_history} "
               f"--split {args.split}"
               + (f" --configs {args.configs}" if args.configs else "")
               + "".join(f" --set {o}" for o in args.overrides))
    markdown = "\n".join([f"Machine: {machine_summary(info)}. Date {datetime.now(timezone.utc):%Y-%m-%d}. "
                          f"Protocol: {PROTOCOLS[args.split]}.", "",
                          table, "", f"Command: `{command}`"])
    record = {"dataset": str(data_dir), "split": args.split, "machine": info, "results": results,
              "most_popular": most_popular,
              "markdown": markdown, "command": command, "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    (out / "grid.json").write_text(json.dumps(record, indent=2, default=str))
    (out / "grid.md").write_text(markdown + "\n")
    figure = plot(results, out / "grid.png", f"Merlin session grid on {data_dir.name}, {args.epochs} epochs")
    print()
    print(markdown)
    print(f"\nwrote {out / 'grid.json'}, {out / 'grid.md'}" + (f", {figure}" if figure else ""))
    return 0


def register_subcommands(subparsers, bench_subparsers) -> None:
    """Hook for merlin_hstu.cli.main.EXTENSION_MODULES: adds `bench grid`."""
    p = bench_subparsers.add_parser("grid", help="SASRec / HSTU x full / sampled softmax x event types, one table",
                                    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True, metavar="DIR", help="a `merlin-hstu preprocess` output")
    p.add_argument("--configs", help="comma-separated subset of: " + ", ".join(c.name for c in grid_configs()))
    p.add_argument("--epochs", type=int, default=10, help="epochs per run (default 10)")
    p.add_argument("--seeds", type=int, default=1, help="seeds per config (default 1)")
    p.add_argument("--seed", type=int, default=42, help="first seed (default 42)")
    p.add_argument("--dim", type=int, default=64, help="model width D of every config (default 64)")
    p.add_argument("--blocks", type=int, default=2, help="encoder blocks (default 2)")
    p.add_argument("--heads", type=int, default=2, help="attention heads (default 2)")
    p.add_argument("--max-history", type=int, default=50, help="history window (default 50)")
    p.add_argument("--split", choices=("auto", "leave_one_out", "sessions"), default="auto",
                   help="evaluation protocol: auto (default) = sessions when DIR/splits/ holds the Merlin train / "
                        "valid / test files, else leave_one_out (see the description)")
    p.add_argument("--batch-size", type=int, default=128, help="training batch (default 128)")
    p.add_argument("--num-negatives", type=int, default=128, help="sampled softmax negatives (default 128)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="extra config override for every row (e.g. train.learning_rate=0.002)")
    p.add_argument("--output", help="directory for grid.json / grid.md / grid.png (default runs/bench/grid-NAME)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)
