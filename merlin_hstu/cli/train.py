"""`merlin-hstu train` and `merlin-hstu evaluate` for every task (retrieval | ranking | ctr).

    merlin-hstu train --task ranking --data runs/ml1m-ranking --config dlrm-hstu --output runs/rank \
        --device auto --precision bf16 --set train.checkpoint_every=200
    merlin-hstu train --task ranking ... --resume        # continue a killed run from its newest checkpoint
    merlin-hstu evaluate --run runs/rank

Each task trains through the one loop (`merlin_hstu.train.loop.fit`) and writes the one run-directory format
(`merlin_hstu.train.run_dir`). Heavy imports happen inside the commands, so `--help` answers at once.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

from merlin_hstu.common import schema as roles  # light: no Merlin import

TASKS = ("retrieval", "ranking", "ctr")
DEFAULT_PRESETS = {"retrieval": "demo", "ranking": "dlrm-hstu", "ctr": "wukong"}


def add_loop_arguments(p) -> None:
    """Flags every training command shares; each is a shorthand for a `--set` override."""
    g = p.add_argument_group("training loop (shorthands for --set train.* / model.kernel)")
    g.add_argument("--device", help="cpu | cuda | cuda:N | auto (default: the config's, cpu)")
    g.add_argument("--precision", choices=["fp32", "bf16"], help="autocast precision (bf16 runs on CPU too)")
    g.add_argument("--kernel", choices=["pytorch", "triton", "auto"],
                   help="HSTU attention kernel (models with STU layers only)")
    g.add_argument("--checkpoint-every", type=int, metavar="STEPS",
                   help="write a resumable checkpoint every STEPS optimizer steps (and at every epoch end)")
    g.add_argument("--resume", action="store_true",
                   help="continue from the newest checkpoint in OUTPUT.incomplete/ (fresh start if there is none)")


def loop_overrides(args) -> list:
    out = []
    if getattr(args, "device", None):
        out.append(f"train.device={args.device}")
    if getattr(args, "precision", None):
        out.append(f"train.precision={args.precision}")
    if getattr(args, "checkpoint_every", None) is not None:
        out.append(f"train.checkpoint_every={args.checkpoint_every}")
    if getattr(args, "kernel", None):
        out.append(f"model.kernel={args.kernel}")
    return out


def fingerprint_of(cfg_dict: dict, data: str) -> str:
    from merlin_hstu.train.loop import run_fingerprint

    return run_fingerprint(cfg_dict, data=str(Path(data).resolve()))


KERNEL_MODELS = ("dlrm-hstu",)  # ranking / CTR model types with STU layers (a `kernel` field)


def _check_kernel(cfg, args) -> None:
    if getattr(args, "kernel", None) is not None and cfg.model_type not in KERNEL_MODELS:
        raise ValueError(f"--kernel: the {args.task} model {cfg.model_type!r} (config {cfg.name!r}) has no HSTU "
                         "attention; drop --kernel")


# ---------------------------------------------------------------------------------------------------------------
# train
# ---------------------------------------------------------------------------------------------------------------
def cmd_train(args) -> int:
    from merlin_hstu.distributed import launch
    from merlin_hstu.train.run_dir import checkpoint_dir, open_work_dir, work_dir

    if launch.wants_launch(args):  # --nproc / --nnodes: this command again, under torchrun (docs/scaling.md)
        return launch.relaunch(args, args.train_parser)
    if launch.quiet_unless_rank0():
        args.no_progress = True

    if args.task != "retrieval" and (args.max_history is not None or args.allow_history_mismatch):
        raise ValueError(f"--max-history and --allow-history-mismatch apply to --task retrieval only (this is "
                         f"--task {args.task}); drop them")
    run_dir = Path(args.output)
    if run_dir.exists() and not args.overwrite:
        raise FileExistsError(f"--output {run_dir} already holds a run; pass --overwrite to replace it, or choose "
                              "another --output (an unfinished run is continued with --resume)")
    checkpoints = checkpoint_dir(run_dir)
    if launch.is_rank0():  # rank 0 alone keeps or discards the unfinished folder of an earlier run
        open_work_dir(work_dir(run_dir), args.resume, "run")
    common = dict(checkpoint_dir=checkpoints, resume=args.resume, progress=not args.no_progress)
    if args.task == "retrieval":
        return _train_retrieval(args, run_dir, common)
    if args.task == "ranking":
        return _train_ranking(args, run_dir, common)
    return _train_ctr(args, run_dir, common)


def _train_retrieval(args, run_dir: Path, common: dict) -> int:
    from merlin_hstu.cli.main import _load_cfg, stopping_overrides, train_and_report

    data_dir = Path(args.data)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"--data {data_dir} is not a directory. Fix: pass the --output directory of "
                                "`merlin-hstu preprocess`")
    from merlin_hstu.workflows.session_workflow import read_data_report

    report = read_data_report(data_dir)
    extra = [*loop_overrides(args), *_absent_columns(report), *data_split(args, data_dir)]
    chosen = _load_cfg(args, extra, quiet=True)
    history = data_history(args, data_dir, chosen, report)
    cfg = _load_cfg(args, [*extra, *stopping_overrides(args, sessions=chosen.train.split == "sessions")],
                    history=history)
    if args.kernel and getattr(cfg.model, "kernel", None) is None:
        raise ValueError(f"--kernel: the encoder of config {cfg.name!r} ({type(cfg.model).__name__}) has no HSTU "
                         "attention; drop --kernel")
    train_and_report(data_dir, run_dir, cfg, fingerprint=fingerprint_of(cfg.to_dict(), str(data_dir)), **common)
    print(f"run saved to {run_dir}")
    return 0


def data_split(args, data_dir: Path) -> list:
    """train.split=sessions when DATA/splits/ holds the Merlin train / valid / test files (preprocess
    --split-layout merlin, or an --input in that layout), unless --config or --set chose train.split; with a note."""
    from merlin_hstu.common import presets
    from merlin_hstu.retrieval.data import session_split_files

    files = session_split_files(data_dir)
    if files is None:
        return []
    chosen = presets.read_preset("retrieval", args.config or DEFAULT_PRESETS["retrieval"], args.overrides)
    if "split" in (chosen.get("train") or {}):
        return []
    print(f"note: {files['train'].parent} holds the Merlin train / valid / test files, so training uses them "
          "(train.split=sessions): it trains on the train sessions, early-stops on the valid sessions and reports "
          "the test sessions, each evaluated session scored on its last item; --set train.split=leave_one_out "
          "trains on processed/ with leave-one-out instead")
    return ["train.split=sessions"]


def _absent_columns(report: Optional[dict]) -> list:
    """data.action_column / data.timestamp_column = null when the data has none (e.g. a sequence-per-line log):
    the config follows the data, and a time bias is switched off (with the note `_load_cfg` prints)."""
    columns = (report or {}).get("columns") or {}
    return [f"data.{role}_column=null" for role in (roles.ROLE_ACTION, roles.ROLE_TIMESTAMP)
            if role in columns and columns[role] is None]


def data_history(args, data_dir: Path, cfg, report: Optional[dict]) -> Optional[int]:
    """The retrieval model's max history against the data's (DATA/data_report.json, written by preprocess).

    Without --max-history, --set data.max_history or --config, the model takes the data's window. A model whose
    window differs from the data's is refused unless --allow-history-mismatch. Returns the history to apply to
    the config (None: the config's own)."""
    from merlin_hstu.cli.main import explicit_history
    from merlin_hstu.workflows.session_workflow import DATA_REPORT_FILE

    data = report["max_history"]["value"] if report else None
    explicit = explicit_history(args)
    if explicit is not None:
        model, how = explicit
    elif args.config:
        model, how = cfg.data.max_history, f"data.max_history of --config {args.config}"
    elif data is not None:
        print(f"max history {data}: the data's ({data_dir / DATA_REPORT_FILE}); pass --max-history to change it")
        return data
    else:
        print(f"note: {data_dir} has no {DATA_REPORT_FILE} (written by preprocess since it sizes the data), so the "
              f"model's max history {cfg.data.max_history} is not checked against it")
        return None
    if data is not None and model != data:
        if not args.allow_history_mismatch:
            raise ValueError(
                f"the model's max history is {model} ({how}), but --data {data_dir} was preprocessed for a max "
                f"history of {data} ({data_dir / DATA_REPORT_FILE}): "
                + (f"its sequences hold at most {data} history events, fewer than the model is sized for"
                   if model > data else f"the model would ignore the oldest {data - model} history events it kept")
                + f". Fix: --max-history {data} to train with the data's window, or re-run "
                f"`merlin-hstu preprocess ... --max-history {model}` for this model, or --allow-history-mismatch to "
                "train anyway"
            )
        print(f"note: the model's max history {model} differs from the data's {data} (--allow-history-mismatch)")
    return model if explicit is not None and explicit[1].startswith("--max-history") else None


def _train_ranking(args, run_dir: Path, common: dict) -> int:
    import torch

    from merlin_hstu.ranking.config import load_config
    from merlin_hstu.ranking.train import format_task_metrics, save_run, train_ranking

    cfg = load_config(args.config or DEFAULT_PRESETS["ranking"], [*loop_overrides(args), *args.overrides])
    _check_kernel(cfg, args)
    dataset = cfg.data.load(args.data, cfg.train)
    print(dataset.summary())
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    torch.manual_seed(cfg.train.seed)
    model = cfg.build_model(dataset)
    t0 = time.perf_counter()
    result = train_ranking(model, dataset, cfg.train, name=cfg.model_type,
                           fingerprint=fingerprint_of(cfg.to_dict(), args.data), **common)
    print(f"trained in {time.perf_counter() - t0:.1f} s on {result.fit.device} ({result.fit.precision}); "
          f"test: {format_task_metrics(result.metrics)}")
    save_run(run_dir, model, cfg, result, dataset)
    print(f"run saved to {run_dir}")
    return 0


def _train_ctr(args, run_dir: Path, common: dict) -> int:
    import torch

    from merlin_hstu.ctr.data import load_ctr_dataset
    from merlin_hstu.ctr.config import load_config
    from merlin_hstu.ctr.train import save_run, train_ctr

    cfg = load_config(args.config or DEFAULT_PRESETS["ctr"], [*loop_overrides(args), *args.overrides])
    _check_kernel(cfg, args)
    data = load_ctr_dataset(args.data, Path(args.cache), {}, streaming=cfg.train.streaming,
                            shuffle_buffer=cfg.train.shuffle_buffer)
    rows = f"{len(data.train):,} train rows streamed (this process's row groups)" if data.streaming else \
        f"{len(data.train):,} train / {len(data.valid):,} valid rows"
    print(f"{data.name}: {rows}, {data.num_dense} dense + {len(data.cardinalities)} categorical features")
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    torch.manual_seed(cfg.train.seed)
    model = cfg.build_model(data.cardinalities, data.num_dense)
    result = train_ctr(model, data, cfg.train, progress=common["progress"], desc=f"train {cfg.model_type}",
                       checkpoint_dir=common["checkpoint_dir"], resume=common["resume"],
                       fingerprint=fingerprint_of(cfg.to_dict(), args.data))
    m = result.metrics
    print(f"trained in {result.train_seconds:.1f} s on {result.fit.device} ({result.fit.precision}); valid: "
          f"auc {m['auc']:.4f} logloss {m['logloss']:.4f} ne {m['ne']:.4f}")
    save_run(run_dir, model, cfg, result, data, data_dir=data.info.get("path"))
    print(f"run saved to {run_dir}")
    return 0


# ---------------------------------------------------------------------------------------------------------------
# evaluate
# ---------------------------------------------------------------------------------------------------------------
def cmd_evaluate(args) -> int:
    from merlin_hstu.train.config import resolve_device
    from merlin_hstu.train.run_dir import load_run

    run = load_run(args.run, expected_task=args.task)
    data = args.data or run.record.get("data")
    if not data:
        raise ValueError("--data is required (the run does not record its dataset)")
    model = run.model.to(resolve_device(args.device or "cpu"))
    if run.task == "retrieval":
        from merlin_hstu.retrieval.data import LeaveOneOut, load_processed
        from merlin_hstu.retrieval.metrics import format_metrics_table
        from merlin_hstu.retrieval.train import evaluate_model, evaluate_most_popular

        cfg = run.config
        if cfg.train.split == "sessions":  # the run's protocol: the test sessions of DATA/splits/
            from merlin_hstu.retrieval.data import SessionSplits, load_session_splits

            split = SessionSplits(load_session_splits(data, actions=cfg.inputs.actions),
                                  max_history=cfg.data.max_history)
        elif cfg.train.streaming:  # read as the run trained: row group by row group
            from merlin_hstu.retrieval.data import StreamingLeaveOneOut, open_streaming

            split = StreamingLeaveOneOut(open_streaming(data, actions=cfg.inputs.actions),
                                         max_history=cfg.data.max_history, shuffle_buffer=cfg.train.shuffle_buffer)
        else:
            split = LeaveOneOut(load_processed(data, actions=cfg.inputs.actions), max_history=cfg.data.max_history)
        metrics = {"HSTU": evaluate_model(model, split, cfg, progress=not args.no_progress),
                   "most-popular": evaluate_most_popular(split, cfg)}
        print(format_metrics_table(metrics))
    elif run.task == "ranking":
        from merlin_hstu.ranking.train import evaluate_ranking, format_task_metrics

        cfg = run.config
        dataset = cfg.data.load(data, cfg.train)  # streamed when the run was (train.streaming)
        split = cfg.train.eval_split
        metrics = evaluate_ranking(model, dataset.batches(split, cfg.train.eval_batch_size),
                                   progress=not args.no_progress,
                                   total=dataset.num_batches(split, cfg.train.eval_batch_size))
        print(f"{split}: {format_task_metrics(metrics)}")
    else:
        from merlin_hstu.ctr.data import load_ctr_dataset
        from merlin_hstu.ctr.train import evaluate_ctr

        train = run.config.train  # streamed when the run was (train.streaming)
        valid = load_ctr_dataset(data, Path(args.cache), {}, streaming=train.streaming,
                                 shuffle_buffer=train.shuffle_buffer).valid
        metrics = evaluate_ctr(model, valid, train.eval_batch_size)
        print("valid: " + " ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    if args.json:
        print(json.dumps(metrics, indent=2))
    return 0


def register_subcommands(subparsers, bench_subparsers) -> None:
    from merlin_hstu.cli.main import DEFAULT_RUN_ROOT, _add_config_args

    p = subparsers.add_parser(
        "train", help="train a retrieval, ranking or CTR model; evaluate; save a run directory",
        description="Train through the one training loop (device, precision, LR schedule, checkpoints, --resume), "
                    "evaluate with the task's protocol, and save config/model/metrics as a run directory. "
                    "--data: retrieval, the output of `preprocess`; ranking, of `preprocess-ranking`; ctr, a "
                    "Criteo-workflow directory or synthetic-criteo | ml-1m-prefix-ctr.")
    p.add_argument("--task", choices=TASKS, default="retrieval", help="what to train (default: retrieval)")
    p.add_argument("--data", required=True, help="the task's preprocessed data (see above)")
    p.add_argument("--output", default=str(DEFAULT_RUN_ROOT / "train"), help="run directory to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory at --output")
    _add_config_args(p, None)
    g = p.add_argument_group("retrieval: history window")
    g.add_argument("--max-history", type=int, metavar="N",
                   help="the model's history window (default: the data's, from DATA/data_report.json, unless "
                        "--config or --set data.max_history sets one)")
    g.add_argument("--allow-history-mismatch", action="store_true",
                   help="train even though the model's max history differs from the one the data was "
                        "preprocessed for")
    add_loop_arguments(p)
    p.add_argument("--cache", default=str(DEFAULT_RUN_ROOT / "cache"),
                   help="ctr: where generated datasets are cached (default: runs/cache)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    from merlin_hstu.distributed.launch import add_launch_arguments

    add_launch_arguments(p)
    p.set_defaults(func=cmd_train, train_parser=p)

    p = subparsers.add_parser("evaluate", help="evaluate a saved run of any task on its (or another) dataset")
    p.add_argument("--run", required=True, help="run directory written by `train` or `demo`")
    p.add_argument("--task", choices=TASKS, help="check that the run is of this task")
    p.add_argument("--data", help="the dataset to evaluate on (default: the one the run was trained on)")
    p.add_argument("--device", help="cpu | cuda | cuda:N | auto (default: cpu)")
    p.add_argument("--cache", default=str(DEFAULT_RUN_ROOT / "cache"), help="ctr: generated-dataset cache")
    p.add_argument("--json", action="store_true", help="also print the metrics as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_evaluate)
