"""`merlin-hstu bench compare A/bench.json B/bench.json ...`: several `bench` records side by side.

Prints one markdown table (final metrics of each record's first seed or the seed mean, seconds per step, epoch
time, peak RSS) and draws one PNG with three panels per epoch: training loss, HR@10 and NDCG@10, one line per
record.  This is how docs/benchmarks.md's full-length SASRec / HSTU / HSTU-large figure is made.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import List, Optional

from merlin_hstu.common.atomic_dir import write_file
from merlin_hstu.common.plots import pyplot, save_figure

TABLE_METRICS = ("hr@10", "ndcg@10", "hr@50", "ndcg@50", "hr@200", "mrr")


def load_record(path: str | Path) -> dict:
    """A `bench.json` written by `merlin-hstu bench` (a directory holding one is accepted too)."""
    path = Path(path)
    if path.is_dir():
        path = path / "bench.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such bench record; pass the bench.json (or its directory) that "
                                "`merlin-hstu bench --output DIR` wrote")
    record = json.loads(path.read_text())
    missing = [key for key in ("model", "dataset", "runs", "mean", "timing") if key not in record]
    if missing or not record.get("runs"):
        raise ValueError(f"{path} is not a retrieval bench record (missing {missing or ['runs']}); "
                         "compare the bench.json files of `merlin-hstu bench --task retrieval` runs")
    record["_path"] = str(path)
    return record


def markdown_table(records: List[dict]) -> str:
    head = ["model", "dataset", "epochs", "seeds", *TABLE_METRICS, "s/step", "epoch s", "peak RSS GB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in records:
        timing = r["timing"]
        epochs = len(r["runs"][0]["epoch_losses"])
        cells = [r["model"], r["dataset"], str(epochs), str(len(r["runs"]))]
        cells += [f"{r['mean'][k]:.4f}" if k in r["mean"] else "–" for k in TABLE_METRICS]
        cells += [f"{timing['seconds_per_step']:.3f}",
                  f"{timing['epoch_seconds_median']:.1f}" if timing.get("epoch_seconds_median") else "–",
                  f"{timing['peak_rss_gb']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(records: List[dict], path: Path, title: Optional[str] = None) -> Optional[Path]:
    """Loss, HR@10 and NDCG@10 per epoch (first seed of each record); None when matplotlib is missing."""
    plt = pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for r in records:
        run = r["runs"][0]
        losses = run["epoch_losses"]
        axes[0].plot(range(1, len(losses) + 1), losses, label=r["model"])
        evaluated = run.get("epoch_metrics") or []
        for ax, key in ((axes[1], "hr@10"), (axes[2], "ndcg@10")):
            if evaluated:
                ax.plot([m["epoch"] for m in evaluated], [m[key] for m in evaluated], marker="o", label=r["model"])
    popular = records[0]["runs"][0].get("most_popular", {})
    for ax, key in ((axes[1], "hr@10"), (axes[2], "ndcg@10")):
        if key in popular:
            ax.axhline(popular[key], color="gray", linestyle="--", label="most-popular")
        ax.set(title=key, xlabel="epoch")
        ax.legend(fontsize=8)
    axes[0].set(title="training loss", xlabel="epoch")
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    write_file(path, lambda tmp: save_figure(fig, tmp))
    return path


def run(args) -> int:
    records = [load_record(p) for p in args.records]
    table = markdown_table(records)
    print(table)
    if args.markdown:
        out = Path(args.markdown)
        write_file(out, table + "\n")
        print(f"wrote {out}")
    if args.output:
        written = plot(records, Path(args.output), args.title)
        print(f"wrote {written}" if written else "matplotlib is not installed: no plot written")
    return 0


def register_subcommands(subparsers, bench_subparsers) -> None:
    """Hook for merlin_hstu.cli.main.EXTENSION_MODULES: adds `bench compare`."""
    p = bench_subparsers.add_parser("compare", help="several bench.json records side by side (table + PNG)",
                                    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("records", nargs="+", help="bench.json files (or the directories holding them)")
    p.add_argument("--output", help="PNG to draw (loss, HR@10, NDCG@10 per epoch)")
    p.add_argument("--markdown", help="also write the table to this file")
    p.add_argument("--title", help="figure title")
    p.set_defaults(func=run)
