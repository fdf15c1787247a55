"""`merlin-hstu bench hllm`: where text beats IDs - HLLM against ID-HSTU and most-popular, warm and cold start.

For each dataset (default ml-1m-prefix; also ml-latest-small) and protocol, every model trains the same number of
epochs with the same batch size, history window and seed, and is evaluated with the retrieval protocol
(merlin_hstu.retrieval.train.evaluate_model: all catalogue items ranked, history filtered, HR/NDCG@K, MRR):

    warm   leave-one-out as `merlin-hstu bench` (reference protocol): last item held out per user
    cold   a seeded 15% of the items never appear in training (merlin_hstu.hllm.data.cold_start_split: histories
           and targets of training are warm, negatives come from warm items); evaluated on the users whose held-out
           last item is cold, ranking over ALL items

Models: most-popular (training counts), ID-HSTU (the `hstu-ml1m` preset's model and loss through
merlin_hstu.retrieval, with the same epochs / batch / window), HLLM frozen, HLLM finetune (top k LM layers),
HLLM hybrid (ID + text).  Also printed: item-encoding throughput (items/s, the catalogue through the item LM on
this CPU, nothing cached) and the cost per training step of each model (median seconds, first step excluded).

Small settings for a quick check: `--users 300 --epochs 1 --throughput-items 200`.  Outputs bench.json and
bench.md in --output (written atomically).  `--datasets` also takes preprocessed dataset directories with an item
table (merlin_hstu.workflows.item_text).  A killed bench continues with `--resume` (same arguments): each trained
run keeps its checkpoints and, when it ends, its result.json in OUTPUT.incomplete/<dataset>/<protocol>-<model>-s<seed>/;
finished runs are reused, the interrupted one continues from its newest checkpoint.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

from merlin_hstu.common.atomic_dir import write_file
from merlin_hstu.train.run_dir import resumable_run, run_dir_name

DATASETS = ("ml-1m-prefix", "ml-latest-small")
MODELS = ("most-popular", "id-hstu", "hllm-frozen", "hllm-finetune", "hllm-hybrid")
PROTOCOLS = ("warm", "cold")
TABLE_KEYS = ("hr@10", "ndcg@10", "hr@50", "ndcg@50", "mrr")


def _names(value: str, allowed, what: str) -> list:
    names = [v.strip() for v in value.split(",") if v.strip()]
    bad = [n for n in names if n not in allowed]
    if bad or not names:
        raise ValueError(f"--{what}: unknown {bad or value!r}; choose from {', '.join(allowed)}")
    return names


def _datasets(value: str) -> list:
    """--datasets: recipe names, or preprocessed dataset directories that hold item texts (item_text/)."""
    names = [v.strip() for v in value.split(",") if v.strip()]
    recipes = [n for n in names if not Path(n).is_dir()]
    if recipes or not names:
        _names(",".join(recipes) or value, list(_recipes()), "datasets")  # an error naming the unknown ones
    return names


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--datasets", default=DATASETS[0],
                   help=f"comma-separated: {', '.join(DATASETS)} (or other ITEM_TEXT_RECIPES names), or preprocessed "
                        f"dataset directories with an item table (item_text/); default {DATASETS[0]}")
    p.add_argument("--input", help="input directory of the (single) dataset, when it is not staged under shared/data")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {', '.join(MODELS)}")
    p.add_argument("--protocols", default=",".join(PROTOCOLS), help="warm, cold or both (default both)")
    p.add_argument("--users", type=int, default=0, help="use the first N users only (0: all)")
    p.add_argument("--epochs", type=int, default=3, help="epochs for every trained model (default 3)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds (default 0; the target asks for 3)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-history", type=int, default=200, help="history window H (default 200)")
    p.add_argument("--cold-fraction", type=float, default=0.15)
    p.add_argument("--cold-seed", type=int, default=0, help="seed of the cold item draw")
    p.add_argument("--finetune-layers", type=int, default=2, help="top LM layers the finetune mode trains")
    p.add_argument("--finetune-live-items", type=int, default=512,
                   help="finetune: at most this many of a step's distinct items run through the LM with gradients "
                        "(item_encoder.live_items_per_step; 0: all - slow on a CPU)")
    p.add_argument("--pooling", default="item_token", choices=("item_token", "mean", "first"))
    p.add_argument("--user-dim", type=int, default=64, help="HLLM user model width D")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--throughput-items", type=int, default=0,
                   help="items encoded for the throughput figure (0: the whole catalogue)")
    p.add_argument("--cache", default="runs/bench/cache", help="where preprocessed datasets are cached")
    p.add_argument("--embedding-cache", help="item-embedding cache directory (default: the HLLM default)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="HLLM config overrides for every HLLM model (merlin_hstu.hllm.config), repeatable")
    p.add_argument("--output", help="output directory (default runs/bench/hllm)")
    p.add_argument("--resume", action="store_true",
                   help="continue a killed bench: runs that finished are reused, the interrupted one continues from "
                        "its newest checkpoint (in OUTPUT.incomplete/); without it that folder is discarded")
    p.add_argument("--no-progress", action="store_true")


def _hllm_config(args, mode: str, seed: int):
    from merlin_hstu.hllm.config import HLLMConfig

    base = [f"train.mode={mode}", f"train.epochs={args.epochs}", f"train.batch_size={args.batch_size}",
            f"train.seed={seed}", f"train.threads={args.threads}", f"data.max_history={args.max_history}",
            f"item_encoder.pooling={args.pooling}", f"item_encoder.trainable_layers={args.finetune_layers}",
            f"item_encoder.live_items_per_step={args.finetune_live_items}",
            f"user.embedding_dim={args.user_dim}"]
    cfg = HLLMConfig().with_overrides(base + list(args.overrides))
    if args.embedding_cache:
        cfg.data.cache_dir = args.embedding_cache
    return cfg


def _id_config(args, seed: int, has_time: bool):
    from merlin_hstu.retrieval.config import load_config

    overrides = [f"train.epochs={args.epochs}", f"train.batch_size={args.batch_size}", f"train.seed={seed}",
                 f"train.threads={args.threads}", f"data.max_history={args.max_history}",
                 f"model.max_seq_len={args.max_history + 11}", "train.eval_every=0"]
    if not has_time:
        overrides.append("model.time_bias=false")
    return load_config("hstu-ml1m", overrides)


def _steady(step_times: list) -> float:
    steady = step_times[1:] or step_times
    return statistics.median(steady) if steady else float("nan")


def run_id_hstu(table, split, samples, pool, args, seed: int, checkpoint_dir: Optional[Path] = None,
                fingerprint: str = "") -> dict:
    """ID-HSTU through the retrieval package (its model, loss and task), negatives from `pool`, evaluated on
    `samples` (all of them ranked over the whole catalogue). Resumable from `checkpoint_dir` under --resume."""
    import torch

    from merlin_hstu.retrieval.train import (RetrievalTrainingTask, build_model, evaluate_model,
                                             make_retrieval_optimizer)
    from merlin_hstu.train.config import resolve_device
    from merlin_hstu.train.loop import fit

    cfg = _id_config(args, seed, table.timestamps is not None)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    torch.manual_seed(seed)
    model = build_model(table, cfg)
    device = resolve_device(cfg.train.device)
    task = RetrievalTrainingTask(split, cfg, device)
    task.pool = torch.as_tensor(pool, dtype=torch.long, device=device)  # cold start: warm negatives only
    task.evaluate = lambda m, which, progress=False: evaluate_model(m, split, cfg, samples=samples)
    fitted = fit(task, model, make_retrieval_optimizer(cfg), cfg.train, epochs=cfg.train.epochs,
                 progress=not args.no_progress, desc="train ID-HSTU", checkpoint_dir=checkpoint_dir,
                 resume=args.resume, fingerprint=fingerprint)
    return {"metrics": fitted.metrics, "seconds_per_step": _steady(fitted.step_times), "steps": fitted.steps,
            "train_seconds": fitted.train_seconds, "epoch_losses": fitted.epoch_losses,
            "resumed_from": fitted.resumed_from}


def run_hllm(data, split, samples, pool, args, mode: str, seed: int, base_encoder, cache,
             checkpoint_dir: Optional[Path] = None) -> dict:
    from merlin_hstu.hllm.item_encoder import ItemTextEncoder
    from merlin_hstu.hllm.train import train_hllm

    cfg = _hllm_config(args, mode, seed)
    encoder = base_encoder
    if mode == "finetune":  # it trains: a fresh copy of the pretrained weights for every run
        encoder = ItemTextEncoder(cfg.item_encoder, base_encoder.tokenizer, copy.deepcopy(base_encoder.backbone))
    elif cfg.item_encoder != base_encoder.config:
        encoder = ItemTextEncoder(cfg.item_encoder, base_encoder.tokenizer, base_encoder.backbone)
    result = train_hllm(data, cfg, split=split, pool=pool, eval_samples=samples, encoder=encoder, cache=cache,
                        progress=not args.no_progress, checkpoint_dir=checkpoint_dir, resume=args.resume)
    return {"metrics": result.metrics, "seconds_per_step": _steady(result.step_times), "steps": result.fit.steps,
            "train_seconds": result.fit.train_seconds, "epoch_losses": result.fit.epoch_losses,
            "encode_seconds": result.encode_seconds, "refresh_seconds": result.refresh_seconds,
            "logit_scale": float(result.model.logit_scale().detach()), "resumed_from": result.fit.resumed_from}


# the arguments a run's result depends on (not which runs, threads, paths or progress bars)
RUN_SETTINGS = ("users", "epochs", "batch_size", "max_history", "cold_fraction", "cold_seed", "finetune_layers",
                "finetune_live_items", "pooling", "user_dim", "overrides")


def trained_run(name: str, protocol: str, model: str, seed: int, args, work: Path, train) -> dict:
    """`train(checkpoint_dir, fingerprint)` of one trained model and seed, or, under --resume, its result.json from
    before the interruption (the interrupted one continues from its newest checkpoint; `resumable_run`)."""
    from merlin_hstu.train.loop import run_fingerprint

    fingerprint = run_fingerprint({k: getattr(args, k) for k in RUN_SETTINGS}, dataset=name, input=args.input,
                                  protocol=protocol, model=model, seed=seed)
    return resumable_run(work / run_dir_name(name, f"{protocol}-{model}", seed), fingerprint, args.resume,
                         f"{model}, {protocol}, seed {seed}", lambda checkpoints: train(checkpoints, fingerprint))


def run_protocol(name: str, protocol: str, data, args, models: list, seeds: list, encoder, cache,
                 work: Path) -> dict:
    import copy as _copy

    from merlin_hstu.hllm.data import HLLMData, cold_eval_samples, cold_start_split
    from merlin_hstu.retrieval.data import LeaveOneOut
    from merlin_hstu.retrieval.train import evaluate_most_popular

    table = data.table
    if protocol == "cold":
        cold = cold_start_split(table, args.cold_fraction, args.cold_seed)
        table, pool = cold.table, cold.warm_pool
    else:
        cold, pool = None, table.candidate_ids.numpy()
    split = LeaveOneOut(table, max_history=args.max_history)
    samples = cold_eval_samples(split, cold.cold_items) if cold is not None else None
    view = HLLMData(table, data.texts, data.path)
    evaluated = len(samples.lengths) if samples is not None else len(split.eval.lengths)
    print(f"\n=== {name}, {protocol}: {len(table.items):,} users, {evaluated:,} evaluated, "
          f"{len(table.candidate_ids):,} items ranked" +
          (f", {len(cold.cold_items):,} cold items" if cold is not None else "") + " ===")
    runs: dict = {m: [] for m in models}
    for seed in seeds:
        for model in models:
            start = time.perf_counter()
            if model == "most-popular":
                popular_split = _copy.copy(split)
                if samples is not None:
                    popular_split.eval = samples
                out = {"metrics": evaluate_most_popular(popular_split, _id_config(args, seed, True))}
            elif model == "id-hstu":
                out = trained_run(name, protocol, model, seed, args, work, lambda checkpoints, fingerprint: {
                    **run_id_hstu(table, split, samples, pool, args, seed, checkpoints, fingerprint),
                    "seed": seed, "wall_seconds": time.perf_counter() - start})
            else:
                out = trained_run(name, protocol, model, seed, args, work, lambda checkpoints, fingerprint: {
                    **run_hllm(view, split, samples, pool, args, model.split("-", 1)[1], seed, encoder, cache,
                               checkpoints), "seed": seed, "wall_seconds": time.perf_counter() - start})
            out["seed"] = seed
            out.setdefault("wall_seconds", time.perf_counter() - start)
            runs[model].append(out)
            m = out["metrics"]
            print(f"seed {seed}  {model:14s} " + "  ".join(f"{k} {m[k]:.4f}" for k in TABLE_KEYS) +
                  (f"  {out['seconds_per_step']:.3f} s/step" if "seconds_per_step" in out else ""), flush=True)
    mean = {m: {k: statistics.fmean(r["metrics"][k] for r in rs) for k in rs[0]["metrics"]}
            for m, rs in runs.items()}
    return {"dataset": name, "protocol": protocol, "users": len(table.items), "evaluated_users": evaluated,
            "ranked_items": int(len(table.candidate_ids)),
            "cold_items": int(len(cold.cold_items)) if cold is not None else 0, "runs": runs, "mean": mean}


def markdown(record: dict) -> str:
    from merlin_hstu.bench.retrieval import machine_summary

    lines = [f"### HLLM vs IDs, {record['epochs']} epochs, seeds {record['seeds']}", "",
             f"Machine: {machine_summary(record['machine'])}. Date {record['date']}.", "",
             f"Item LM: {record['item_encoder']['model']} ({record['item_encoder']['pooling']} pooling), "
             f"encoding throughput {record['throughput']['items_per_second']:.1f} items/s "
             f"({record['throughput']['items']} items, {record['throughput']['seconds']:.1f} s, nothing cached).", ""]
    for section in record["sections"]:
        head = ["model", *TABLE_KEYS, "s/step", "train s"]
        lines += [f"#### {section['dataset']}, {section['protocol']} ({section['evaluated_users']} users evaluated, "
                  f"{section['ranked_items']} items ranked" +
                  (f", {section['cold_items']} cold" if section["cold_items"] else "") + ")", "",
                  "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for model, metrics in section["mean"].items():
            runs = section["runs"][model]
            sps = [r["seconds_per_step"] for r in runs if "seconds_per_step" in r]
            train = [r["train_seconds"] for r in runs if "train_seconds" in r]
            lines.append("| " + " | ".join([model, *(f"{metrics[k]:.4f}" for k in TABLE_KEYS),
                                             f"{statistics.fmean(sps):.3f}" if sps else "–",
                                             f"{statistics.fmean(train):.1f}" if train else "–"]) + " |")
        popular = section["mean"].get("most-popular", {}).get("hr@10")
        if popular is not None:
            for model in section["mean"]:
                if model.startswith("hllm"):
                    hr = section["mean"][model]["hr@10"]
                    lines.append(f"- {model} HR@10 / most-popular HR@10 = {hr / popular:.2f}" if popular > 0 else
                                 f"- {model} HR@10 = {hr:.4f}; most-popular's is 0 (no ratio)")
        lines.append("")
    return "\n".join(lines)


def run(args) -> int:
    import shutil

    import torch

    from merlin_hstu.bench.retrieval import machine_info, machine_summary
    from merlin_hstu.hllm.cache import EmbeddingCache
    from merlin_hstu.hllm.data import first_users, load_hllm_data, prepare_dataset, HLLMData
    from merlin_hstu.hllm.item_encoder import ItemTextEncoder
    from merlin_hstu.hllm.train import catalogue_texts
    from merlin_hstu.train.run_dir import open_work_dir, work_dir

    datasets = _datasets(args.datasets)
    models = _names(args.models, MODELS, "models")
    protocols = _names(args.protocols, PROTOCOLS, "protocols")
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    if args.epochs < 1 or args.batch_size < 1 or args.max_history < 1:
        raise ValueError("--epochs, --batch-size and --max-history must be >= 1")
    if args.input and len(datasets) > 1:
        raise ValueError("--input names the directory of one dataset; pass one --datasets name with it")
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.output or "runs/bench/hllm")
    out.mkdir(parents=True, exist_ok=True)
    work = open_work_dir(work_dir(out), args.resume, "bench")  # finished runs and checkpoints until bench.json
    info = machine_info()
    print(f"machine: {machine_summary(info)}")
    base_cfg = _hllm_config(args, "frozen", seeds[0])
    encoder = ItemTextEncoder(base_cfg.item_encoder)
    cache = EmbeddingCache(base_cfg.data.cache_dir)
    sections, throughput = [], None
    for name in datasets:
        data = load_hllm_data(name if Path(name).is_dir() else
                              prepare_dataset(name, args.cache, args.max_history, args.input))
        data = HLLMData(first_users(data.table, args.users), data.texts, data.path)
        print(f"dataset {name}: {len(data.table.items):,} users, {len(data.table.candidate_ids):,} catalogue items")
        if throughput is None:
            _, texts = catalogue_texts(data.texts)
            texts = texts[:args.throughput_items] if args.throughput_items else texts
            encoder.encode(texts[:8])  # warm-up: the first forward pays one-time setup
            throughput = encoder.throughput(texts)
            print(f"item encoding: {throughput['items_per_second']:.1f} items/s ({throughput['items']} items in "
                  f"{throughput['seconds']:.1f} s, {torch.get_num_threads()} threads, nothing cached)")
        for protocol in protocols:
            sections.append(run_protocol(name, protocol, data, args, models, seeds, encoder, cache, work))
    record = {"benchmark": "hllm", "date": f"{datetime.now(timezone.utc):%Y-%m-%d}", "machine": info,
              "epochs": args.epochs, "seeds": seeds, "batch_size": args.batch_size,
              "max_history": args.max_history, "users": args.users, "cold_fraction": args.cold_fraction,
              "item_encoder": encoder.describe(), "throughput": throughput,
              "hllm_config": base_cfg.to_dict(), "sections": sections,
              "command": "merlin-hstu bench hllm " + " ".join(_argv(args))}
    text = markdown(record)
    write_file(out / "bench.json", json.dumps(record, indent=2, default=str))
    write_file(out / "bench.md", text + "\n")
    shutil.rmtree(work, ignore_errors=True)
    print()
    print(text)
    print(f"wrote {out / 'bench.json'}, {out / 'bench.md'}")
    return 0


def _recipes():
    from merlin_hstu.hllm.data import ITEM_TEXT_RECIPES

    return ITEM_TEXT_RECIPES


def _argv(args) -> list:
    out = []
    for key in ("datasets", "models", "protocols", "users", "epochs", "seeds", "batch_size", "max_history",
                "cold_fraction", "finetune_layers", "finetune_live_items", "pooling", "user_dim", "threads", "throughput_items"):
        out += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    for item in args.overrides:
        out += ["--set", item]
    return out


def register_subcommands(subparsers, bench_subparsers) -> None:
    """Hook for merlin_hstu.cli.main.EXTENSION_MODULES: adds `bench hllm`."""
    p = bench_subparsers.add_parser("hllm", help="HLLM (text items) vs ID-HSTU and most-popular, warm and cold start",
                                    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run)
