"""`merlin-hstu bench t4r-vs-native`: one HSTU retrieval config trained through T4R's `tr.Trainer` and through our
native loop, on the same session-workflow output for the same epochs, with both metric rows printed.

    merlin-hstu bench t4r-vs-native                                    # synthetic log, preset demo, 1 epoch
    merlin-hstu bench t4r-vs-native --dataset ml-1m-prefix --model hstu-ml1m --epochs 3 --output runs/t4r-vs-native

Both sides use the preset's encoder (`model`), head, objective (`train.loss_config()`), learning rate, Adam betas,
weight decay, batch size, epochs, seed, schedule and input dropout. Both see the same samples: the native
`LeaveOneOut` split, written for the Trainer by `merlin_hstu.t4r.data.retrieval_trainer_splits`.

* native: `merlin_hstu.retrieval.train.train_retrieval` (the one loop, `merlin_hstu.train.loop.fit`).
* T4R: `retrieval_model_from_schema(schema, cfg.model, H + 1, GenerativeRetrievalTask.from_configs(...))`
  trained by `tr.Trainer` with `data_loader_engine="merlin"`, torch's AdamW, the same schedule and no gradient
  clipping unless `train.grad_clip` is set.

The input stack is the native one by default (`--input-stack native`: E[id] * sqrt(D) from the native truncated
normal table, `retrieval_model_from_schema(input_stack="native")`); `--input-stack t4r` trains T4R's stock feature
block instead (no scale, T4R's N(0, 0.05) table), which is what made the Trainer score far below the native loop
before issue 14 (docs/t4r.md, "tr.Trainer vs the native loop"). With the same weights and batches the two sides
compute the same losses and updates (tests/test_t4r_parity.py); what remains is seed noise: the two models draw
different initial weights, dropout masks, negatives and batch orders from the same seed. Still different, and
inactive in the presets' defaults: HF's warm-up starts at lr 0 (native at lr / warmup_steps) and HF's AdamW
exempts biases and norm weights from weight decay (native decays every parameter).

Every trained model is scored on the eval samples (last item of each user) under two protocols:

* reference: the protocol of `merlin_hstu.retrieval.metrics` (history items removed from the ranking, ties by
  id). It is what `merlin-hstu train` / `bench` report.
* all items: nothing removed, as T4R's `recall_at_10` / `ndcg_at_10` rank. The T4R row also shows the Trainer's
  own `evaluate()` numbers.

Prints a markdown table of HR@10 / NDCG@10 and the training seconds. `--output DIR` also writes
`t4r_vs_native.json` and `t4r_vs_native.md`.
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Callable, Optional

from merlin_hstu.common.atomic_dir import write_file

KS = (10,)
T4R_KEYS = {"hr@10": "eval_/next-item/recall_at_10", "ndcg@10": "eval_/next-item/ndcg_at_10"}
HF_SCHEDULES = {"constant": "constant", "linear": "linear", "cosine": "cosine"}


def protocol_metrics(score_fn: Callable, split, cfg, history_filtered: bool) -> dict:
    """HR@10 / NDCG@10 of `score_fn(batch) -> [B, num_items] scores` on split.eval, ranked with
    `merlin_hstu.retrieval.metrics.target_ranks`: history window removed or not, the non-catalogue ids never."""
    import torch

    from merlin_hstu.retrieval.data import history_window
    from merlin_hstu.retrieval.metrics import RetrievalMetricAccumulator, target_ranks

    acc = RetrievalMetricAccumulator(ks=KS)
    invalid = split.table.non_candidate_ids
    with torch.no_grad():
        for batch in split.batches(split.eval, cfg.train.eval_batch_size):
            scores = score_fn(batch).float()
            history = history_window(batch) if history_filtered else None
            acc.update(target_ranks(scores, batch["targets"], history, invalid_ids=invalid,
                                    rank_cap=cfg.train.rank_cap))
    return acc.compute()


def t4r_score_fn(model, item_column: str, timestamp_column: Optional[str]) -> Callable:
    """Scores of a T4R next-item model for native eval batches: the model in testing mode on history + target
    (T4R then predicts the last item, with the target's time as the query time, as the native model does)."""
    def scores(batch):
        inputs = {item_column: batch["ids"]}
        if timestamp_column is not None:
            inputs[timestamp_column] = batch["timestamps"]
        out = model(inputs, testing=True)
        if not bool((out["labels"].long() == batch["targets"]).all()):
            raise RuntimeError("the T4R model's eval labels differ from the native targets; the eval rows are "
                               "not aligned (report this)")
        return out["predictions"]

    return scores


def training_arguments(cfg, output_dir: Path, max_sequence_length: int):
    """T4RecTrainingArguments carrying the native config's optimiser, schedule, batch sizes, epochs and seed."""
    from transformers4rec.config.trainer import T4RecTrainingArguments

    from merlin_hstu.train.config import resolve_device

    train = cfg.train
    if train.precision != "fp32":
        raise ValueError(f"t4r-vs-native runs fp32 only (train.precision={train.precision!r}); drop the override")
    schedule = HF_SCHEDULES[train.lr_schedule]
    if train.warmup_steps and schedule == "constant":
        schedule = "constant_with_warmup"
    return T4RecTrainingArguments(
        output_dir=str(output_dir), data_loader_engine="merlin", max_sequence_length=max_sequence_length,
        per_device_train_batch_size=train.batch_size, per_device_eval_batch_size=train.eval_batch_size,
        num_train_epochs=train.epochs, max_steps=train.max_steps or -1, learning_rate=train.learning_rate,
        adam_beta1=train.betas[0], adam_beta2=train.betas[1], weight_decay=train.weight_decay,
        optim="adamw_torch", lr_scheduler_type=schedule, warmup_steps=train.warmup_steps,
        max_grad_norm=train.grad_clip, seed=train.seed, no_cuda=resolve_device(train.device).type != "cuda",
        predict_top_k=0, report_to=[], disable_tqdm=True, save_strategy="no", logging_strategy="epoch")


def synthetic_dataset(root: Path, users: int, max_history: int) -> Path:
    """The embedded synthetic event log, preprocessed by the session workflow (history + 2 events kept)."""
    from merlin_hstu.data.synthetic import SyntheticConfig, generate_event_log
    from merlin_hstu.workflows.session_workflow import SessionWorkflowConfig, preprocess

    out = root / f"synthetic-u{users}-h{max_history}"
    if not (out / "processed").is_dir():
        log = generate_event_log(SyntheticConfig(num_users=users, num_items=max(80, users // 4), min_events=4,
                                                 max_events=30, seed=7))
        preprocess(log, out, SessionWorkflowConfig(max_length=max_history + 2, min_length=3), overwrite=True)
    return out


def _train_t4r(cfg, processed: Path, work: Path, split, input_stack: str = "native") -> tuple:
    """tr.Trainer on the leave-one-out rows of `processed`: (its rows under both protocols and its own
    evaluate(), training seconds, per-epoch training losses)."""
    import torch
    import transformers4rec.torch as tr

    from merlin_hstu.common import schema as roles
    from merlin_hstu.t4r.data import parquet_files, read_schema, retrieval_trainer_splits
    from merlin_hstu.t4r.retrieval import GenerativeRetrievalTask, retrieval_model_from_schema

    splits = retrieval_trainer_splits(processed, work / "splits", max_history=cfg.data.max_history)
    schema = read_schema(processed)
    torch.manual_seed(cfg.train.seed)
    task = GenerativeRetrievalTask.from_configs(cfg.train.loss_config(), cfg.head)
    model = retrieval_model_from_schema(schema, cfg.model, splits.max_sequence_length, task=task,
                                        input_dropout=cfg.train.input_dropout, input_stack=input_stack)
    trainer = tr.Trainer(model=model, args=training_arguments(cfg, work / "trainer", splits.max_sequence_length),
                         schema=splits.schema, compute_metrics=True,
                         train_dataset_or_path=parquet_files(splits.train),
                         eval_dataset_or_path=parquet_files(splits.eval))
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    own = trainer.evaluate()
    model.eval()
    stamps = roles.timestamp_list_column(schema) if cfg.model.time_bias else None
    score = t4r_score_fn(model, roles.item_list_column(schema), stamps)
    rows = {"tr.Trainer, reference protocol": protocol_metrics(score, split, cfg, True),
            "tr.Trainer, all items": protocol_metrics(score, split, cfg, False),
            "tr.Trainer, T4R's own evaluate()": {k: float(own[key]) for k, key in T4R_KEYS.items()}}
    losses = [float(h["loss"]) for h in trainer.state.log_history if "loss" in h]
    return rows, seconds, losses


def run(args) -> int:
    import tempfile

    import torch

    from merlin_hstu.bench.retrieval import machine_info, machine_summary, resolve_dataset
    from merlin_hstu.encoders.hstu import HSTUEncoderConfig
    from merlin_hstu.retrieval.config import load_config
    from merlin_hstu.retrieval.data import load_processed
    from merlin_hstu.retrieval.metrics import format_metrics_table
    from merlin_hstu.retrieval.train import train_retrieval

    overrides = [f"train.epochs={args.epochs}", "train.eval_every=0"]
    overrides += [f"train.threads={args.threads}"] if args.threads else []
    overrides += [f"train.max_steps={args.max_steps}"] if args.max_steps else []
    cfg = load_config(args.model, overrides + list(args.overrides))
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)  # before anything runs (and before the machine line reads it)
    if not isinstance(cfg.model, HSTUEncoderConfig):
        raise ValueError(f"preset {args.model!r} is not an HSTU model (model.type is not hstu); t4r-vs-native "
                         "compares HSTU retrieval: pick an hstu-* preset or demo")
    if args.dataset:
        data_dir, dataset_name = resolve_dataset(args.dataset, args.input, Path(args.cache), cfg.data.max_history)
    else:
        data_dir = synthetic_dataset(Path(args.cache), args.synthetic_users, cfg.data.max_history)
        dataset_name = f"synthetic ({args.synthetic_users} users)"
    processed = Path(data_dir) / "processed" if (Path(data_dir) / "processed").is_dir() else Path(data_dir)
    table = load_processed(processed)
    if table.timestamps is None and cfg.model.time_bias:
        print("note: this dataset has no timestamps: the relative time bias is switched off (model.time_bias=false)")
        cfg.model.time_bias = False
    info = machine_info()
    print(f"machine: {machine_summary(info)}")
    print(f"dataset {dataset_name}: {len(table.items):,} users; preset {cfg.name}; {cfg.train.epochs} epoch(s); "
          f"seed {cfg.train.seed}")

    result = train_retrieval(table, cfg, progress=not args.no_progress, model_name="native")
    split, native = result.split, result.model.eval()

    def native_scores(batch):
        return native.score_all_items(batch["ids"], batch["lengths"], batch.get("timestamps"))

    rows = {"native loop, reference protocol": protocol_metrics(native_scores, split, cfg, True),
            "native loop, all items": protocol_metrics(native_scores, split, cfg, False)}
    work = Path(tempfile.mkdtemp(prefix="t4r-vs-native-"))
    try:
        t4r_rows, t4r_seconds, t4r_losses = _train_t4r(cfg, processed, work, split, args.input_stack)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows.update(t4r_rows)

    timing = {"native_train_seconds": result.train_seconds, "t4r_train_seconds": t4r_seconds}
    losses = {"native_epoch_losses": [float(x) for x in result.epoch_losses], "t4r_epoch_losses": t4r_losses}
    command = (f"merlin-hstu bench t4r-vs-native --model {args.model} --epochs {args.epochs}"
               + (f" --dataset {args.dataset}" if args.dataset else f" --synthetic-users {args.synthetic_users}")
               + (f" --threads {args.threads}" if args.threads else "")
               + (f" --max-steps {args.max_steps}" if args.max_steps else "")
               + (f" --input-stack {args.input_stack}" if args.input_stack != "native" else "")
               + "".join(f" --set {o}" for o in args.overrides))
    markdown = "\n".join([
        f"### HSTU retrieval, tr.Trainer vs the native loop: {cfg.name} on {dataset_name}, {cfg.train.epochs} "
        f"epoch(s), seed {cfg.train.seed}, T4R input stack {args.input_stack}", "",
        f"Machine: {machine_summary(info)}.", "", "```",
        format_metrics_table(rows, keys=["hr@10", "ndcg@10"]), "```", "",
        f"- training seconds: native {result.train_seconds:.1f}, tr.Trainer {t4r_seconds:.1f}",
        f"- epoch losses: native {[round(x, 4) for x in losses['native_epoch_losses']]}, tr.Trainer "
        f"{[round(x, 4) for x in t4r_losses]}", f"- command: `{command}`"])
    print()
    print(markdown)
    if args.output:
        out = Path(args.output)
        out.mkdir(parents=True, exist_ok=True)
        record = {"dataset": dataset_name, "preset": cfg.name, "config": cfg.to_dict(), "machine": info,
                  "input_stack": args.input_stack,
                  "metrics": rows, "timing": timing, **losses, "command": command, "markdown": markdown}
        for name, text in (("t4r_vs_native.json", json.dumps(record, indent=2, default=str)),
                           ("t4r_vs_native.md", markdown + "\n")):
            write_file(out / name, text)
        print(f"\nwrote {out / 't4r_vs_native.json'}, {out / 't4r_vs_native.md'}")
    return 0


def register_subcommands(subparsers, bench_subparsers) -> None:
    """Hook for merlin_hstu.cli.main.EXTENSION_MODULES: adds `bench t4r-vs-native`."""
    p = bench_subparsers.add_parser("t4r-vs-native", help="one HSTU retrieval config: tr.Trainer vs the native loop",
                                    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", help="dataset name or a `merlin-hstu preprocess` output (default: the synthetic log)")
    p.add_argument("--input", help="raw files of a named dataset (default: the staged copy, where there is one)")
    p.add_argument("--synthetic-users", type=int, default=300,
                   help="users of the synthetic log when no --dataset is given (default 300)")
    p.add_argument("--model", default="demo", help="retrieval preset name or YAML, HSTU only (default demo)")
    p.add_argument("--epochs", type=int, default=1, help="epochs on both sides (default 1)")
    p.add_argument("--max-steps", type=int, default=0, help="stop both after this many steps (smoke runs)")
    p.add_argument("--input-stack", choices=("native", "t4r"), default="native",
                   help="the T4R model's input stack: native (E * sqrt(D), the native item init; default) or t4r "
                        "(T4R's stock embeddings)")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value of the preset (repeatable)")
    p.add_argument("--cache", default="runs/datasets", help="where datasets are preprocessed once")
    p.add_argument("--output", help="also write t4r_vs_native.json / .md here")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)
