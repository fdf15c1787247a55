"""`merlin-hstu` command line: preprocess, train, evaluate, demo.

Every subcommand has real --help.  Heavy imports (torch, NVTabular) happen inside the commands so that
`merlin-hstu --help` answers at once.
"""
from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

DEFAULT_RUN_ROOT = Path("runs")


def _add_config_args(p: argparse.ArgumentParser, default: Optional[str]) -> None:
    shown = default or "the task's: demo | dlrm-hstu | wukong"
    p.add_argument("--config", default=default,
                   help=f"preset name or path to a YAML file (default: {shown}); "
                        "presets: see `merlin-hstu presets`")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value, e.g. --set train.epochs=3 (repeatable)")


def _add_column_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("raw event-log columns (override the config's data section)")
    g.add_argument("--id-column", help="user or session id column")
    g.add_argument("--id-kind", choices=["user", "session"], help="tag the id column as USER_ID or SESSION_ID")
    g.add_argument("--item-column", help="item id column")
    g.add_argument("--action-column", help="action / event-type column ('none' if the log has none)")
    g.add_argument("--timestamp-column", help="unix-seconds timestamp column ('none' if the log has none)")


def _column_overrides(args) -> list:
    out = []
    for flag in ("id_column", "id_kind", "item_column", "action_column", "timestamp_column"):
        value = getattr(args, flag, None)
        if value is not None:
            out.append(f"data.{flag}={'null' if value.lower() == 'none' else value}")
    return out


def _load_cfg(args, extra: Sequence[str] = ()):
    from merlin_hstu.retrieval.config import load_config

    cfg = load_config(args.config or "demo", [*_column_overrides(args), *extra, *args.overrides])
    if cfg.data.timestamp_column is None and getattr(cfg.model, "time_bias", False):
        print("note: the data has no timestamps, so the relative time bias is switched off (model.time_bias=false)")
        cfg.model.time_bias = False
    return cfg


def _workflow_config(cfg):
    from merlin_hstu.workflows.session_workflow import SessionWorkflowConfig

    d = cfg.data
    return SessionWorkflowConfig(id_column=d.id_column, id_kind=d.id_kind, item_column=d.item_column,
                                 action_column=d.action_column, timestamp_column=d.timestamp_column,
                                 max_length=d.max_history + 2, min_length=d.min_length,
                                 interleave_actions=cfg.inputs.actions == "interleave")


def _preprocess(source, output: Path, cfg, overwrite: bool):
    from merlin_hstu.workflows.session_workflow import preprocess

    t0 = time.perf_counter()
    result = preprocess(source, output, _workflow_config(cfg), overwrite=overwrite)
    print(f"preprocessed {result.num_rows:,} sequences with NVTabular in {time.perf_counter() - t0:.1f} s -> {output}")
    return result


# --- subcommands ----------------------------------------------------------------------------------
def cmd_presets(args) -> int:
    from merlin_hstu.common.presets import TASKS, preset_names, read_preset

    for task in TASKS:
        if args.task and task != args.task:
            continue
        print(f"{task}:")
        for name in preset_names(task):
            print(f"  {name:22s} {' '.join(str(read_preset(task, name).get('description', '')).split())}")
    return 0


def cmd_preprocess(args) -> int:
    cfg = _load_cfg(args)
    if args.dataset:
        from merlin_hstu.workflows.datasets import default_input_dir, preprocess_dataset

        source = args.input or default_input_dir(args.dataset)
        if source is None:
            raise ValueError(f"dataset {args.dataset!r} is not staged here: pass --input DIR with its raw files")
        t0 = time.perf_counter()
        result = preprocess_dataset(args.dataset, source, args.output, max_length=cfg.data.max_history + 2,
                                    overwrite=args.overwrite)
        print(f"preprocessed {args.dataset}: {result.num_rows:,} sequences in {time.perf_counter() - t0:.1f} s "
              f"-> {args.output}")
        return 0
    if not args.input:
        raise ValueError("pass --input LOG (a raw event log) or --dataset NAME")
    _preprocess(args.input, Path(args.output), cfg, overwrite=args.overwrite)
    return 0


def train_and_report(data_dir: Path, run_dir: Path, cfg, progress: bool, checkpoint_dir=None, resume: bool = False,
                     fingerprint: str = ""):
    """Retrieval: train on a preprocessed directory through the one loop, save the run, print the metrics table."""
    from merlin_hstu.retrieval.data import load_processed
    from merlin_hstu.retrieval.metrics import format_metrics_table
    from merlin_hstu.retrieval.train import save_run, train_retrieval

    table = load_processed(data_dir, actions=cfg.inputs.actions)
    print(f"{len(table.items):,} sequences, {len(table.candidate_ids):,} candidate items; "
          f"config {cfg.name}: {cfg.model.num_blocks} {type(cfg.model).__name__[:-13]} blocks, "
          f"D={cfg.model.embedding_dim}, "
          f"{cfg.train.epochs} epochs")
    result = train_retrieval(table, cfg, progress=progress, checkpoint_dir=checkpoint_dir, resume=resume,
                             fingerprint=fingerprint)
    print(f"trained in {result.train_seconds:.1f} s on {result.fit.device} ({result.fit.precision}); "
          f"final epoch loss {result.epoch_losses[-1]:.4f}")
    workflow = data_dir / "workflow"
    save_run(run_dir, result, cfg, extra={"data": str(data_dir.resolve()),
                                          "workflow": str(workflow.resolve()) if workflow.is_dir() else None})
    print()
    print(format_metrics_table(result.metrics))
    print()
    return table, result


def cmd_demo(args) -> int:
    import torch

    from merlin_hstu.workflows.session_workflow import load_item_id_mapping

    out = Path(args.output)
    cfg = _load_cfg(args)
    t_start = time.perf_counter()
    if args.data:
        source = args.data
        print(f"[1/6] using the event log {source}")
    else:
        from merlin_hstu.data.synthetic import SyntheticConfig, generate_event_log

        synth = SyntheticConfig(seed=cfg.train.seed, **({"num_users": args.synthetic_users} if args.synthetic_users else {}))
        events = generate_event_log(synth)
        source = out / "events.parquet"
        source.parent.mkdir(parents=True, exist_ok=True)
        events.to_parquet(source)
        print(f"[1/6] generated the embedded synthetic event log: {len(events):,} events, "
              f"{events[cfg.data.id_column].nunique():,} users, {events[cfg.data.item_column].nunique():,} items "
              f"-> {source}")
    print("[2/6] NVTabular: sessionize, Categorify, truncate, tag")
    processed = _preprocess(source, out / "dataset", cfg, overwrite=True)
    print("[3/6] training HSTU (sampled softmax) and the most-popular baseline")
    table, result = train_and_report(out / "dataset", out / "run", cfg, progress=not args.no_progress)
    hstu, pop = result.metrics["HSTU"]["hr@10"], result.metrics["most-popular"]["hr@10"]
    ratio = hstu / pop if pop > 0 else float("inf")
    print(f"HSTU HR@10 / most-popular HR@10 = {ratio:.2f}x")
    print(f"[4/6] saved: workflow -> {processed.workflow_path}, model + metrics + training_curves.png -> {out / 'run'}")
    print("[5/6] top-10 recommendations (raw item ids) for three sample users")
    raw_items = load_item_id_mapping(processed.workflow_path)
    from merlin_hstu.retrieval.model import recommend

    rows = torch.linspace(0, len(table.items) - 1, 3).round().long().tolist()
    recs = recommend(result.model, table, rows, k=10, max_history=cfg.data.max_history)
    for row, items in zip(rows, recs):
        last = [raw_items[i] for i in table.items[row][-3:]]
        print(f"  user {table.keys[row]}: recent {last} -> top-10 {[raw_items[i] for i in items]}")
    if args.no_serve:
        print("[6/6] serving skipped (--no-serve)")
    else:
        from merlin_hstu.serving import demo_serving
        from merlin_hstu.workflows.session_workflow import read_event_log

        print("[6/6] export to a Triton model repository, serve with tritonserver, query the same users")
        events = read_event_log(source, _workflow_config(cfg))
        users = {table.keys[r] for r in rows}
        sample = events[events[cfg.data.id_column].isin(users)]
        demo_serving(out / "run", out, sample, k=10)
    print(f"demo finished in {time.perf_counter() - t_start:.0f} s")
    return 0


def _dataset_names() -> list:
    # Kept in sync with merlin_hstu.workflows.datasets.DATASETS (tested); importing it here would load NVTabular.
    return ["ml-1m", "ml-1m-prefix", "ml-20m", "ml-latest-small", "ml-100k", "amzn-books", "amazon-s3rec",
            "amazon-s3rec-beauty", "amazon-s3rec-sports", "amazon-s3rec-toys"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="merlin-hstu",
        description="Generative recommenders (HSTU) on NVIDIA Merlin: NVTabular preprocessing, training, evaluation.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("presets", help="list the shipped config presets of every task")
    p.add_argument("--task", choices=["retrieval", "ranking", "ctr"], help="only this task's presets")
    p.set_defaults(func=cmd_presets)

    p = sub.add_parser("preprocess", help="raw event log (CSV/Parquet) -> NVTabular-processed sequences + workflow",
                       description="Sessionize a raw event log with an NVTabular workflow: one row per user/session "
                                   "with chronological item / action / timestamp lists, Merlin schema tags in "
                                   "schema.pbtxt, and the fitted workflow saved for serving.")
    p.add_argument("--input", help="event log (.csv/.parquet file or a parquet directory), or with --dataset the "
                                  "directory of that dataset's raw files (default: the staged copy, if any)")
    p.add_argument("--dataset", choices=_dataset_names(), metavar="NAME",
                   help="a public dataset with the reference's protocol: " + ", ".join(_dataset_names()))
    p.add_argument("--output", required=True,
                   help="output directory (gets processed/, workflow/ and candidates.parquet)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    _add_config_args(p, "demo")
    _add_column_args(p)
    p.set_defaults(func=cmd_preprocess)

    p = sub.add_parser("demo", help="end to end: generate -> NVTabular -> train -> metrics -> save -> recommend",
                       description="The end-to-end main job on the embedded synthetic event log "
                                   "(or --data PATH, a real event log).")
    p.add_argument("--data", help="a raw event log to use instead of the synthetic one")
    p.add_argument("--synthetic-users", type=int, help="size of the synthetic log (default: 2000 users)")
    p.add_argument("--no-serve", action="store_true", help="skip the export / tritonserver / query step")
    p.add_argument("--output", default=str(DEFAULT_RUN_ROOT / "demo"), help="where to write (default: runs/demo)")
    _add_config_args(p, "demo")
    _add_column_args(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_demo)

    bench = sub.add_parser(
        "bench", help="benchmarks: training quality/speed (--dataset), kernels, serving",
        description="Benchmarks print the machine, the exact config and their figures. Without a BENCHMARK "
                    "name: train --model on --dataset with the reference protocol over --seeds, print per-epoch "
                    "loss and metrics, the final table beside the paper's numbers, seconds per step, epoch time "
                    "and peak RSS, and write bench.json / bench.md / bench.png.")
    from merlin_hstu.bench.retrieval import add_arguments as add_bench_arguments

    add_bench_arguments(bench)
    bench_sub = bench.add_subparsers(dest="bench_command", metavar="BENCHMARK")

    def cmd_bench(args) -> int:
        if not args.dataset:
            bench.print_help()
            return 2
        from merlin_hstu.bench.retrieval import run_task_bench

        return run_task_bench(args)

    bench.set_defaults(func=cmd_bench)
    for module_name in EXTENSION_MODULES:
        module = importlib.import_module(module_name)
        module.register_subcommands(sub, bench_sub)
    return parser


# Modules that add subcommands: each has `register_subcommands(subparsers, bench_subparsers)`, which must
# stay cheap (argparse only; heavy imports inside the command functions).
EXTENSION_MODULES: list = ["merlin_hstu.cli.train", "merlin_hstu.cli.serving", "merlin_hstu.kernels.bench", "merlin_hstu.cli.ranking",
                          "merlin_hstu.bench.mfalcon", "merlin_hstu.bench.compare", "merlin_hstu.bench.gpu_check",
                          "merlin_hstu.cli.help_speed", "merlin_hstu.bench.t4r_vs_native", "merlin_hstu.cli.scale"]


def _quiet_known_warnings() -> None:
    """Upstream warnings that every CPU run prints and that say nothing actionable."""
    import warnings

    warnings.filterwarnings("ignore", message=".*Tensorflow dtype mappings did not load.*")
    warnings.filterwarnings("ignore", message=".*Initializing an NVTabular Dataset in CPU mode.*")


def main(argv: Optional[Sequence[str]] = None) -> int:
    _quiet_known_warnings()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def entry() -> None:
    """The `merlin-hstu` console script: restart under the tuned glibc malloc settings (merlin_hstu/common/allocator.py;
    `MERLIN_HSTU_MALLOC=default` opts out), then run `main`."""
    from merlin_hstu.common.allocator import reexec_tuned

    reexec_tuned("merlin_hstu.cli.main")
    try:
        code = main()
        sys.stdout.flush()
    except BrokenPipeError:  # `merlin-hstu presets | head`: the reader left; stop quietly, not with a traceback
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit-time flush cannot fail again
        code = 141  # 128 + SIGPIPE, what a shell tool reports
    sys.exit(code)


if __name__ == "__main__":
    entry()
