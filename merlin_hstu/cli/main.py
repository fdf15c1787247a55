"""`merlin-hstu` command line: preprocess, train, evaluate, demo.

Every subcommand has real --help.  Heavy imports (torch, NVTabular) happen inside the commands so that
`merlin-hstu --help` answers at once.

A user's own event log (`preprocess --input`, `demo --data`) is sized from the data: the max history is the 95th
percentile of the history lengths rounded up to a multiple of 8, capped by a memory budget (`history_cap`), unless
--max-history, --set data.max_history or an explicit --config says otherwise; `preprocess` prints the data report
and saves it as OUTPUT/data_report.json, and `train` refuses a model whose max history differs from it.
"""
from __future__ import annotations

import argparse
import importlib
import math
import sys
import time
from pathlib import Path
from typing import Optional, Sequence, Tuple

DEFAULT_RUN_ROOT = Path("runs")
DEFAULT_PRESET = "demo"
#: the memory budget of the data-derived max history: the attention activations of one training step
#: (`attention_bytes`) stay within it. 2 GiB fits a laptop or a small GPU beside the model and the data.
MEMORY_BUDGET_BYTES = 2 * 1024**3
#: training on a user's own data without --config: at most this many epochs, stopped early when validation NDCG@10
#: (every user's second-to-last event, `train.validation_fraction=1.0`) has not improved for this many epochs; the
#: weights of the best validation epoch are kept. The synthetic demo keeps its preset's epochs.
USER_DATA_MAX_EPOCHS = 50
USER_DATA_PATIENCE = 3
#: fp32 values per (query, key) pair of one step: per head and layer the scores, their SiLU, the masked and scaled
#: attention and a gradient buffer (4), plus 2 per layer shared by the heads (the relative position + time bias).
#: Calibrated on CPU with the demo preset on ml-latest-small: peak RSS grew by 2.6 GB from N=75 to N=507, i.e.
#: 79 bytes per pair per batch row; this estimate says 80.
_PAIR_VALUES_PER_HEAD, _PAIR_VALUES_PER_LAYER = 4, 2
INPUT_FORMAT_CHOICES = ("auto", "events", "sessions", "sequences")


def _add_config_args(p: argparse.ArgumentParser, default: Optional[str], shown: Optional[str] = None) -> None:
    shown = shown or default or "the task's: demo | dlrm-hstu | wukong"
    p.add_argument("--config", default=default,
                   help=f"preset name or path to a YAML file (default: {shown}); "
                        "presets: see `merlin-hstu presets`")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value, e.g. --set train.epochs=3 (repeatable)")


def add_cluster_args(p: argparse.ArgumentParser) -> None:
    """--workers / --scheduler: run the NVTabular workflow on Dask (merlin_hstu/workflows/cluster.py)."""
    g = p.add_argument_group("Dask (the same rows as one process)")
    g.add_argument("--workers", type=int, default=0, metavar="N",
                   help="start a local Dask cluster of N worker processes for the workflow (default 0: one process)")
    g.add_argument("--scheduler", metavar="ADDRESS",
                   help="join an existing Dask cluster, e.g. tcp://10.0.0.5:8786, instead of starting one")


def _add_column_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("raw event-log columns (override the config's data section)")
    g.add_argument("--id-column", help="user or session id column")
    g.add_argument("--id-kind", choices=["user", "session"], help="tag the id column as USER_ID or SESSION_ID")
    g.add_argument("--item-column", help="item id column")
    g.add_argument("--action-column", help="action / event-type column ('none' if the log has none)")
    g.add_argument("--timestamp-column", help="unix-seconds timestamp column ('none' if the log has none)")
    g = p.add_argument_group("reading the input")
    g.add_argument("--input-format", choices=INPUT_FORMAT_CHOICES, default="auto",
                   help="events: CSV/Parquet, one row per event; sessions: Merlin session Parquet (item_id_list_seq, "
                        "...); sequences: text, one sequence per line (`user item item ...` or `item item ...`, "
                        "S3-Rec style); auto (default): sequences for a text file of space-separated integers, "
                        "sessions for Parquet with item_id_list_seq, else events")
    g.add_argument("--session-time-column", metavar="NAME",
                   help="sessions: the per-event timestamp list aligned with item_id_list_seq (default: the one "
                        "integer list column named like *timestamp*, e.g. timestamp-list; without one every event "
                        "gets timestamp_first, with a warning); a per-session column such as timestamp_first is "
                        "repeated for every event")
    g.add_argument("--separator", metavar="SEP", help="CSV field separator, e.g. ';' or tab (default: sniffed from "
                                                      "the header line among , ; TAB |)")
    g.add_argument("--sequence-user-ids", choices=["auto", "yes", "no"], default="auto",
                   help="sequences: is the first token of a line its user id? (auto: yes when every line has 2+ "
                        "tokens and the first ones are distinct; no: the line number is the id)")
    g.add_argument("--drop-nulls", action="store_true",
                   help="drop events with an empty id / item / action / timestamp field (counted in the data "
                        "report) instead of stopping with an error")
    g = p.add_argument_group("the Merlin train / valid / test layout (preprocess)")
    g.add_argument("--split-layout", choices=["none", "merlin"], default="none",
                   help="merlin: also write OUTPUT/splits/{train,valid,test}.parquet (+ schema.pbtxt), sequences "
                        "split by start time (an --input folder with train/valid/test.parquet, or per-day folders "
                        "1/train.parquet ..., keeps its own split without this flag)")
    g.add_argument("--valid-fraction", type=float, default=0.1, metavar="F",
                   help="--split-layout merlin: the share of sequences in valid.parquet (default 0.1)")
    g.add_argument("--test-fraction", type=float, default=0.1, metavar="F",
                   help="--split-layout merlin: the latest share of sequences in test.parquet (default 0.1)")
    g.add_argument("--prefix-expansion", action="store_true",
                   help="every train sequence of n events also becomes its prefixes of 2..n events (train.parquet "
                        "only; needs the split layout)")
    g = p.add_argument_group("sequence sizing (default: from the data, see the data report)")
    g.add_argument("--max-history", type=int, metavar="N",
                   help="history window H: keep the last H + 2 events per user (H history + train and eval "
                        "targets) and size the model for H. Default for a user's log: p95 of the history lengths "
                        "rounded up to a multiple of 8, capped by a 2 GiB attention-memory budget; with an "
                        "explicit --config: its data.max_history")
    g.add_argument("--min-length", type=int, metavar="N",
                   help="drop users/sessions with fewer than N events (default: the config's data.min_length, 3)")


def _column_overrides(args) -> list:
    out = []
    for flag in ("id_column", "id_kind", "item_column", "action_column", "timestamp_column"):
        value = getattr(args, flag, None)
        if value is not None:
            out.append(f"data.{flag}={'null' if value.lower() == 'none' else value}")
    if getattr(args, "min_length", None) is not None:
        if args.min_length < 1:
            raise ValueError(f"--min-length must be an integer >= 1, got {args.min_length}")
        out.append(f"data.min_length={args.min_length}")
    return out


def _set_overrides(args, key: str) -> list:
    """The values of `--set key=...` among args.overrides (the last one wins)."""
    from merlin_hstu.common.overrides import parse_override

    return [value for keys, value in map(parse_override, getattr(args, "overrides", []) or [])
            if ".".join(keys) == key]


def explicit_history(args) -> Optional[Tuple[int, str]]:
    """(H, how) when the user set the max history (--max-history or --set data.max_history), else None."""
    flag = getattr(args, "max_history", None)
    values = _set_overrides(args, "data.max_history")
    if flag is not None and values:
        raise ValueError("pass the max history once: --max-history N or --set data.max_history=N, not both")
    if flag is not None:
        if flag < 1:
            raise ValueError(f"--max-history must be an integer >= 1, got {flag}")
        return int(flag), f"--max-history {flag}"
    if values:
        return values[-1], f"--set data.max_history={values[-1]}"
    return None


def _history_overrides(args, history: int) -> list:
    """data.max_history=H and model.max_seq_len=H + the preset's output slots (its max_seq_len - max_history)."""
    from merlin_hstu.common.overrides import apply_overrides
    from merlin_hstu.common.presets import read_preset
    from merlin_hstu.retrieval.config import DataConfig
    from merlin_hstu.encoders.stu import HSTUEncoderConfig

    raw = apply_overrides(read_preset("retrieval", args.config or DEFAULT_PRESET),
                          [o for o in args.overrides if not o.strip().startswith("data.max_history=")])
    data, model = raw.get("data") or {}, raw.get("model") or {}
    slots = int(model.get("max_seq_len", HSTUEncoderConfig.max_seq_len)) - int(data.get("max_history",
                                                                                        DataConfig.max_history))
    return [f"data.max_history={history}", f"model.max_seq_len={history + max(slots, 1)}"]


def stopping_overrides(args, sessions: bool = False) -> list:
    """Epochs for a user's own data come from the data: early stopping on a validation holdout (every user's
    second-to-last event; `sessions` (train.split=sessions): the valid sessions) instead of the demo preset's fixed
    epochs. Nothing changes when the user chose: an explicit --config, or --set train.epochs /
    train.early_stopping_patience / train.validation_fraction."""
    from merlin_hstu.common.overrides import parse_override

    if getattr(args, "config", None):
        return []
    chosen = {".".join(keys) for keys, _ in map(parse_override, getattr(args, "overrides", []) or [])}
    if chosen & {"train.epochs", "train.early_stopping_patience", "train.validation_fraction"}:
        return []
    held = "the valid sessions' last items" if sessions else "every user's second-to-last event held out"
    print(f"epochs from the data: up to {USER_DATA_MAX_EPOCHS}, stopping when validation NDCG@10 ({held}) has not "
          f"improved for {USER_DATA_PATIENCE} epochs; the best epoch's weights are kept (set --set train.epochs=N to "
          "train a fixed number of epochs instead)")
    return [f"train.epochs={USER_DATA_MAX_EPOCHS}", *([] if sessions else ["train.validation_fraction=1.0"]),
            f"train.early_stopping_patience={USER_DATA_PATIENCE}", "train.early_stopping_metric=ndcg@10"]


def _load_cfg(args, extra: Sequence[str] = (), history: Optional[int] = None, quiet: bool = False):
    """The retrieval config: preset (--config, default demo) + column flags + `extra` + the history window (if
    given: data.max_history and model.max_seq_len) + the user's --set overrides, which come last and win."""
    from merlin_hstu.retrieval.config import load_config

    sized = _history_overrides(args, history) if history is not None else []
    cfg = load_config(args.config or DEFAULT_PRESET, [*_column_overrides(args), *extra, *sized, *args.overrides])
    if cfg.data.timestamp_column is None and getattr(cfg.model, "time_bias", False):
        if not quiet:
            print("note: the data has no timestamps, so the relative time bias is switched off (model.time_bias=false)")
        cfg.model.time_bias = False
    return cfg


def attention_bytes(cfg, seq_len: int) -> int:
    """Estimated attention activations of one training step at sequence length `seq_len` (see MEMORY_BUDGET_BYTES)."""
    m = cfg.model
    per_pair = 4 * m.num_blocks * (_PAIR_VALUES_PER_HEAD * m.num_heads + _PAIR_VALUES_PER_LAYER)
    return int(cfg.train.batch_size) * per_pair * int(seq_len) ** 2


def history_cap(cfg, budget_bytes: int = MEMORY_BUDGET_BYTES) -> int:
    """The largest max history (a multiple of 8, at least 8) whose `attention_bytes` fit the budget."""
    from merlin_hstu.workflows.session_workflow import HISTORY_MULTIPLE

    slots = cfg.model.max_seq_len - cfg.data.max_history
    n = math.isqrt(budget_bytes // max(attention_bytes(cfg, 1), 1))
    return max(HISTORY_MULTIPLE, (n - slots) // HISTORY_MULTIPLE * HISTORY_MULTIPLE)


def choose_history(args, cfg, histories) -> Tuple[int, str]:
    """The max history for a user's data and how it was chosen: explicit (--max-history / --set
    data.max_history), an explicit --config's, else from the data (`suggest_max_history` under `history_cap`)."""
    from merlin_hstu.workflows.session_workflow import suggest_max_history

    explicit = explicit_history(args)
    if explicit is not None:
        return explicit
    if args.config:
        return cfg.data.max_history, f"data.max_history of --config {args.config}"
    cap = history_cap(cfg)
    value, how = suggest_max_history(histories, cap)
    budget = f"{MEMORY_BUDGET_BYTES / 1024**3:g} GiB"
    return value, (f"from the data: {how}; the memory budget (attention activations of one training step of config "
                   f"{cfg.name} <= {budget}) allows at most {cap}; override with --max-history")


def _workflow_config(cfg, args=None, input_flag: str = "--input"):
    from merlin_hstu.workflows.session_workflow import SessionWorkflowConfig

    d = cfg.data
    separator = getattr(args, "separator", None)
    if separator is not None and separator.lower() in ("tab", "\\t"):
        separator = "\t"
    user_ids = {"auto": None, "yes": True, "no": False}[getattr(args, "sequence_user_ids", None) or "auto"]
    return SessionWorkflowConfig(id_column=d.id_column, id_kind=d.id_kind, item_column=d.item_column,
                                 action_column=d.action_column, timestamp_column=d.timestamp_column,
                                 max_length=d.max_history + 2, min_length=d.min_length,
                                 csv_separator=separator, drop_nulls=bool(getattr(args, "drop_nulls", False)),
                                 input_format=getattr(args, "input_format", None) or "auto",
                                 sequence_user_ids=user_ids, cli_flags={"input": input_flag},
                                 session_time_column=getattr(args, "session_time_column", None),
                                 split_layout=getattr(args, "split_layout", None) or "none",
                                 valid_fraction=getattr(args, "valid_fraction", None) or 0.1,
                                 test_fraction=getattr(args, "test_fraction", None) or 0.1,
                                 prefix_expansion=bool(getattr(args, "prefix_expansion", False)),
                                 interleave_actions=cfg.inputs.actions == "interleave")


def _format_overrides(args, source) -> list:
    """A sequence-per-line file has no actions or timestamps: turn both columns off unless the user named them."""
    from merlin_hstu.workflows.session_workflow import SessionWorkflowConfig, detect_input_format

    fmt = getattr(args, "input_format", None) or "auto"
    if detect_input_format(source, SessionWorkflowConfig(input_format=fmt)) != "sequences":
        return []
    out = []
    for flag in ("action_column", "timestamp_column"):
        if getattr(args, flag, None) is None:
            out.append(f"data.{flag}=null")
    if out:
        print(f"note: {source} is a sequence-per-line file (no actions, no timestamps): "
              + ", ".join(o.split("=")[0] for o in out) + " switched off")
    return out


def preprocess_user_log(args, source, output: Path, overwrite: bool, input_flag: str = "--input",
                        training: bool = False):
    """A user's event log -> OUTPUT (preprocess), with the max history from the data unless set; prints the data
    report. Returns (config with the chosen history, the PreparedLog, the ProcessedDataset). `training`: the config
    also takes its epochs from the data (`stopping_overrides`)."""
    from merlin_hstu.workflows.session_workflow import history_lengths, load_event_log, preprocess

    if output.exists() and not overwrite:  # before reading the whole log
        raise FileExistsError(f"{output.resolve()} already exists. Fix: --overwrite to replace it, or another "
                              "--output")
    extra = _format_overrides(args, source)
    base = _load_cfg(args, extra)
    t0 = time.perf_counter()
    prepared = load_event_log(source, _workflow_config(base, args, input_flag))
    histories = history_lengths(prepared.sequence_lengths(), base.data.min_length)
    history, chosen_by = choose_history(args, base, histories)
    if training:
        extra = [*extra, *stopping_overrides(args)]
    cfg = _load_cfg(args, extra, history=history, quiet=True) if training or history != base.data.max_history \
        else base
    result = preprocess(prepared, output, _workflow_config(cfg, args, input_flag), overwrite=overwrite,
                        max_history_chosen_by=chosen_by)
    print(f"preprocessed {result.num_rows:,} sequences with NVTabular in {time.perf_counter() - t0:.1f} s -> {output}")
    _print_report(result)
    return cfg, prepared, result


def _print_report(result) -> None:
    from merlin_hstu.workflows.session_workflow import DATA_REPORT_FILE, format_data_report

    print(f"data report (also in {result.path.parent / DATA_REPORT_FILE}):")
    print(format_data_report(result.report))


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
    if args.dataset:
        from merlin_hstu.workflows.datasets import USER, default_input_dir, load_dataset, preprocess_loaded
        from merlin_hstu.workflows.session_workflow import history_lengths

        cfg = _load_cfg(args, quiet=True)
        source = args.input or default_input_dir(args.dataset)
        if source is None:
            raise ValueError(f"dataset {args.dataset!r} is not staged here: pass --input DIR with its raw files")
        if Path(args.output).exists() and not args.overwrite:
            raise FileExistsError(f"{Path(args.output).resolve()} already exists. Fix: --overwrite to replace it, "
                                  "or another --output")
        t0 = time.perf_counter()
        loaded = load_dataset(args.dataset, source)
        lengths = loaded.events.groupby(USER, sort=False).size().to_numpy()
        history, chosen_by = choose_history(args, cfg, history_lengths(lengths, loaded.min_length))
        result = preprocess_loaded(loaded, args.output, history + 2, overwrite=args.overwrite,
                                   max_history_chosen_by=chosen_by)
        print(f"preprocessed {args.dataset}: {result.num_rows:,} sequences in {time.perf_counter() - t0:.1f} s "
              f"-> {args.output}")
        _print_report(result)
        return 0
    if not args.input:
        raise ValueError("pass --input LOG (a raw event log) or --dataset NAME")
    preprocess_user_log(args, args.input, Path(args.output), overwrite=args.overwrite)
    return 0


def cmd_preprocess_criteo(args) -> int:
    from merlin_hstu.workflows.criteo_workflow import CriteoWorkflowConfig, preprocess_criteo

    if not 0.0 <= args.valid_fraction < 1.0:
        raise ValueError(f"--valid-fraction must be in [0, 1), got {args.valid_fraction}")
    if args.freq_threshold < 0:
        raise ValueError(f"--freq-threshold must be >= 0, got {args.freq_threshold}")
    t0 = time.perf_counter()
    config = CriteoWorkflowConfig(freq_threshold=args.freq_threshold, valid_fraction=args.valid_fraction)
    result = preprocess_criteo(args.input, args.output, config, overwrite=args.overwrite)
    rows = ", ".join(f"{n:,} {split}" for split, n in result.num_rows.items())
    print(f"preprocessed {args.input}: {rows} rows in {time.perf_counter() - t0:.1f} s -> {args.output} "
          f"(train a CTR model with `merlin-hstu train --task ctr --data {args.output}`)")
    return 0


def train_and_report(data_dir: Path, run_dir: Path, cfg, progress: bool, checkpoint_dir=None, resume: bool = False,
                     fingerprint: str = ""):
    """Retrieval: train on a preprocessed directory through the one loop, save the run, print the metrics table."""
    from merlin_hstu.retrieval.metrics import format_metrics_table
    from merlin_hstu.retrieval.train import save_run, train_retrieval, training_table

    table = training_table(data_dir, cfg)  # in memory, or its row groups with train.streaming
    sequences = (f"{table.num_rows:,} sequences streamed" if cfg.train.streaming else table.summary()
                 if cfg.train.split == "sessions" else f"{len(table.items):,} sequences")
    print(f"{sequences}, {len(table.candidate_ids):,} candidate items; "
          f"config {cfg.name}: {cfg.model.num_blocks} {type(cfg.model).__name__[:-13]} blocks, "
          f"D={cfg.model.embedding_dim}, "
          f"{cfg.train.epochs} epochs")
    result = train_retrieval(table, cfg, progress=progress, checkpoint_dir=checkpoint_dir, resume=resume,
                             fingerprint=fingerprint)
    print(f"trained in {result.train_seconds:.1f} s on {result.fit.device} ({result.fit.precision}); "
          f"final epoch loss {result.epoch_losses[-1]:.4f}")
    if cfg.train.early_stopping_patience:
        how = "stopped early" if result.fit.stopped_early else "did not stop early"
        print(f"early stopping: {how} after {len(result.epoch_losses)} epochs; kept the weights of epoch "
              f"{result.fit.best_epoch}, the best by validation {cfg.train.early_stopping_metric or 'NDCG'}")
    workflow = data_dir / "workflow"
    save_run(run_dir, result, cfg, extra={"data": str(data_dir.resolve()),
                                          "workflow": str(workflow.resolve()) if workflow.is_dir() else None})
    print()
    print(format_metrics_table(result.metrics))
    print()
    return table, result


def cmd_demo(args) -> int:
    import shutil

    out = Path(args.output)
    created = not out.exists()
    state = {"trained": False}
    try:
        return _demo(args, out, state)
    except Exception:
        if created and not state["trained"]:  # bad input (or a failed preprocess) leaves no output directory
            shutil.rmtree(out, ignore_errors=True)
        raise


def _demo(args, out: Path, state: dict) -> int:
    import torch

    from merlin_hstu.workflows.session_workflow import load_event_log, load_item_id_mapping, preprocess

    t_start = time.perf_counter()
    if args.data:
        print(f"[1/6] using the event log {args.data}")
        print("[2/6] NVTabular: sessionize, Categorify, truncate, tag")
        cfg, prepared, processed = preprocess_user_log(args, args.data, out / "dataset", overwrite=True,
                                                       input_flag="--data", training=True)
    else:
        from merlin_hstu.data.synthetic import SyntheticConfig, generate_event_log

        cfg = _load_cfg(args)
        synth = SyntheticConfig(seed=cfg.train.seed, **({"num_users": args.synthetic_users} if args.synthetic_users else {}))
        events = generate_event_log(synth)
        source = out / "events.parquet"
        source.parent.mkdir(parents=True, exist_ok=True)
        events.to_parquet(source)
        print(f"[1/6] generated the embedded synthetic event log: {len(events):,} events, "
              f"{events[cfg.data.id_column].nunique():,} users, {events[cfg.data.item_column].nunique():,} items "
              f"-> {source}")
        print("[2/6] NVTabular: sessionize, Categorify, truncate, tag")
        t0 = time.perf_counter()
        prepared = load_event_log(source, _workflow_config(cfg, args))
        processed = preprocess(prepared, out / "dataset", _workflow_config(cfg, args), overwrite=True,
                               max_history_chosen_by=f"data.max_history of the {cfg.name} preset (the synthetic log "
                                                     "it is sized for)")
        print(f"preprocessed {processed.num_rows:,} sequences with NVTabular in {time.perf_counter() - t0:.1f} s "
              f"-> {out / 'dataset'}")
        _print_report(processed)
    print("[3/6] training HSTU (sampled softmax) and the most-popular baseline")
    state["trained"] = True
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

        print("[6/6] export to a Triton model repository, serve with tritonserver, query the same users")
        events = prepared.events  # the log as the workflow read it (role columns, normalized)
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

    p = sub.add_parser("preprocess", help="raw event log (CSV/Parquet/sequence text) -> NVTabular-processed "
                                          "sequences + workflow + data report",
                       description="Sessionize a raw event log with an NVTabular workflow: one row per user/session "
                                   "with chronological item / action / timestamp lists, Merlin schema tags in "
                                   "schema.pbtxt, and the fitted workflow saved for serving. Prints the data report "
                                   "(read / dropped per reason / truncated / kept, history-length percentiles, "
                                   "catalogue size, the chosen max history) and saves it as OUTPUT/data_report.json.")
    p.add_argument("--input", help="event log (.csv/.parquet file, a parquet directory or a sequence-per-line .txt), "
                                  "or with --dataset the directory of that dataset's raw files (default: the staged "
                                  "copy, if any)")
    p.add_argument("--dataset", choices=_dataset_names(), metavar="NAME",
                   help="a public dataset with the reference's protocol: " + ", ".join(_dataset_names()))
    p.add_argument("--output", required=True,
                   help="output directory (gets processed/, workflow/, candidates.parquet and data_report.json)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    _add_config_args(p, None, shown="demo; its data.max_history is used only when --config is given")
    _add_column_args(p)
    add_cluster_args(p)
    p.set_defaults(func=cmd_preprocess)

    p = sub.add_parser("preprocess-criteo", help="Criteo-layout click log (TSV) -> NVTabular train/valid splits "
                                                 "for train --task ctr",
                       description="Read a click log in the Criteo layout (tab-separated, no header: label, I1..I13, "
                                   "C1..C26; optionally .gz/.xz/.bz2), check every line, split off the last lines as "
                                   "validation (time order), fit the NVTabular Criteo workflow on the training lines "
                                   "and write OUTPUT/processed/{train,valid} and OUTPUT/workflow.")
    p.add_argument("--input", required=True, help="the Criteo-layout TSV file")
    p.add_argument("--output", required=True, help="output directory")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--freq-threshold", type=int, default=0,
                   help="categorical values seen fewer times in train become out-of-vocabulary (default 0: none)")
    p.add_argument("--valid-fraction", type=float, default=0.1,
                   help="the last lines that form the validation split (default 0.1)")
    add_cluster_args(p)
    p.set_defaults(func=cmd_preprocess_criteo)

    p = sub.add_parser("demo", help="end to end: generate -> NVTabular -> train -> metrics -> save -> recommend",
                       description="The end-to-end main job on the embedded synthetic event log "
                                   "(or --data PATH, a real event log).")
    p.add_argument("--data", help="a raw event log to use instead of the synthetic one (CSV / Parquet / Merlin "
                                 "session Parquet / sequence-per-line text; sized from the data, see --max-history)")
    p.add_argument("--synthetic-users", type=int, help="size of the synthetic log (default: 2000 users)")
    p.add_argument("--no-serve", action="store_true", help="skip the export / tritonserver / query step")
    p.add_argument("--output", default=str(DEFAULT_RUN_ROOT / "demo"), help="where to write (default: runs/demo)")
    _add_config_args(p, None, shown="demo; with --data its data.max_history is used only when --config is given")
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
                          "merlin_hstu.cli.help_speed", "merlin_hstu.bench.t4r_vs_native", "merlin_hstu.cli.scale",
                          "merlin_hstu.bench.grid", "merlin_hstu.bench.hllm", "merlin_hstu.bench.ab",
                          "merlin_hstu.bench.sid", "merlin_hstu.bench.scale", "merlin_hstu.bench.stream"]


def _quiet_known_warnings() -> None:
    """Upstream warnings that every CPU run prints and that say nothing actionable."""
    import warnings

    warnings.filterwarnings("ignore", message=".*Tensorflow dtype mappings did not load.*")
    warnings.filterwarnings("ignore", message=".*Initializing an NVTabular Dataset in CPU mode.*")


def main(argv: Optional[Sequence[str]] = None) -> int:
    _quiet_known_warnings()
    parser = build_parser()
    args = parser.parse_args(sid_bench_argv(list(sys.argv[1:] if argv is None else argv)))
    try:
        if getattr(args, "workers", None) or getattr(args, "scheduler", None):
            from merlin_hstu.workflows.cluster import dask_cluster

            with dask_cluster(workers=args.workers or 0, scheduler=args.scheduler) as cluster:
                print(f"NVTabular on Dask: {cluster.workers} worker(s) at {cluster.address}"
                      + (" (a local cluster, stopped at the end)" if cluster.started_here else ""), flush=True)
                return args.func(args)
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
            PermissionError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        # a torchrun process leaves its process group before exiting: left to interpreter teardown, the gloo
        # threads can abort the process ("terminate called without an active exception") after a finished run
        context = sys.modules.get("merlin_hstu.distributed.context")
        if context is not None:
            context.shutdown()


def sid_bench_argv(argv: list) -> list:
    """`bench --model sid-hstu-... [options]` (the plain bench naming a semantic-ID preset) -> `bench sid --model
    sid-hstu-... [options]`: the semantic-ID bench runs it, with its own options. Anything else is unchanged."""
    if len(argv) < 2 or argv[0] != "bench" or not argv[1].startswith("-"):
        return argv
    values = {}
    for i, token in enumerate(argv[1:], 1):
        for name in ("--model", "--task"):
            if token == name and i + 1 < len(argv):
                values[name] = argv[i + 1]
            elif token.startswith(name + "="):
                values[name] = token.split("=", 1)[1]
    if values.get("--task", "retrieval") != "retrieval" or "--model" not in values:
        return argv
    from merlin_hstu.sid.config import preset_names

    return ["bench", "sid", *argv[1:]] if values["--model"] in preset_names() else argv


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
