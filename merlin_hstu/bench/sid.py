"""Semantic-ID and Amazon benchmarks: `merlin-hstu bench amazon`, `bench sid` and `bench sid-decode`.

One protocol for every row (the Amazon 2014 S3-Rec files Beauty / Sports / Toys, `--dataset amazon-s3rec-*`):
leave-one-out, the last item of every user is the test target and the second-to-last the validation target
(`train.validation_fraction: 1.0`: neither is ever a training target), every catalogue item ranked (no sampled
candidates), history items filtered, Recall@K (= HR@K for one held-out item) and NDCG@K at 5 and 10, early stopping
on validation NDCG@10, each model over `--seeds` seeds (mean and std).  Published results on the same files and
protocol are printed beside ours (`PUBLISHED`).

    bench amazon      the ID presets sasrec-amazon, hstu-amazon, hstu-large-amazon on each dataset
    bench sid         semantic-ID HSTU (preset sid-hstu-amazon): an ID HSTU is trained first (its item table gives
                      the collaborative embeddings, and it is the ID row of the table), the tokenizer is fitted and
                      its codebook usage / collision table printed, the decoder trained and beam-searched; rows for
                      users whose target is a tail item (outside the most popular `--head-fraction` of the catalogue
                      by training count) show where each model wins or loses
    bench sid-decode  decoding cost: users/s of constrained beam search (beam 10 and 50, KV cache) beside ID-HSTU's
                      brute-force top-K over the whole catalogue, same users, same threads

Small settings check that each runs (the published comparisons need the presets' full epochs):
`--epochs 1 --id-epochs 1 --max-steps 5 --users 200`.  Outputs bench.json and bench.md in --output (atomic).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Dict, List, Optional

from merlin_hstu.common.atomic_dir import write_file
from merlin_hstu.common.plots import pyplot, save_figure
from merlin_hstu.train.run_dir import resumable_run, run_dir_name

DATASETS = ("amazon-s3rec-beauty", "amazon-s3rec-sports", "amazon-s3rec-toys")
ID_PRESETS = ("sasrec-amazon", "hstu-amazon", "hstu-large-amazon")
TABLE_KEYS = ("recall@5", "ndcg@5", "recall@10", "ndcg@10")
# Published results on the S3-Rec Amazon 2014 files, leave-one-out, full ranking (Recall@K, NDCG@K).
PUBLISHED: Dict[str, Dict[str, dict]] = {
    "amazon-s3rec-beauty": {
        "TIGER (published)": {"recall@5": 0.0454, "ndcg@5": 0.0321, "recall@10": 0.0648, "ndcg@10": 0.0384},
        "HSTU, independent re-run (published)": {"recall@10": 0.0788, "ndcg@10": 0.0439},
        "eSASRec (published)": {"recall@10": 0.0928, "ndcg@10": 0.0523},
    },
    "amazon-s3rec-sports": {"TIGER (published)": {"recall@10": 0.0400, "ndcg@10": 0.0225}},
    "amazon-s3rec-toys": {"TIGER (published)": {"recall@10": 0.0712, "ndcg@10": 0.0432}},
}


def as_recall(metrics: dict) -> dict:
    """Our hr@K is Recall@K under leave-one-out (one held-out item): the published papers' name."""
    return {(f"recall@{k[3:]}" if k.startswith("hr@") else k): v for k, v in metrics.items()}


def _seeds(args) -> List[int]:
    if args.seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {args.seeds}")
    return [args.seed + i for i in range(args.seeds)]


def _no_time(cfg, table) -> None:
    """The S3-Rec files have no timestamps: the time bias is switched off (said once)."""
    model = cfg.model
    if table.timestamps is None and getattr(model, "time_bias", False):
        print(f"note: the data has no timestamps: {cfg.name}'s time bias is switched off (model.time_bias=false)")
        model.time_bias = False


def first_users(table, users: int):
    """The first `users` sequences of a table (0: all) - for quick checks."""
    import dataclasses

    if not users or users >= len(table.items):
        return table
    cut = slice(0, users)
    return dataclasses.replace(table, items=table.items[cut], keys=table.keys[cut],
                               timestamps=None if table.timestamps is None else table.timestamps[cut],
                               actions=None if table.actions is None else table.actions[cut])


def load_table(dataset: str, input_dir: Optional[str], cache: str, max_history: int, users: int = 0):
    from merlin_hstu.bench.retrieval import resolve_dataset
    from merlin_hstu.retrieval.data import load_processed

    data_dir, name = resolve_dataset(dataset, input_dir, Path(cache), max_history)
    return first_users(load_processed(data_dir), users), data_dir, name


def tail_items(split, head_fraction: float):
    """Catalogue items outside the `head_fraction` most popular by training count (ties: smaller id first)."""
    import numpy as np

    from merlin_hstu.retrieval.data import train_sequences

    catalogue = split.table.candidate_ids.numpy()
    counts = np.bincount(np.concatenate(train_sequences(split.train)), minlength=split.table.num_items)[catalogue]
    order = np.lexsort((catalogue, -counts))
    head = int(np.ceil(head_fraction * len(catalogue)))
    return np.sort(catalogue[order[head:]])


def tail_samples(split, tail):
    """The evaluation samples whose target is a tail item (the layout of `split.eval`)."""
    import dataclasses

    import numpy as np

    samples = split.eval
    keep = np.isin(samples.ids[np.arange(len(samples.lengths)), samples.lengths], tail)
    if not keep.any():
        raise ValueError("no test user's target is a tail item; use more users or a smaller --head-fraction")
    return dataclasses.replace(samples, **{f.name: None if getattr(samples, f.name) is None
                                           else getattr(samples, f.name)[keep] for f in dataclasses.fields(samples)})


def id_model_config(table, preset: str, overrides: List[str], seed: int, args):
    """The config of one ID model (a retrieval preset) under the Amazon protocol, with the bench's options."""
    from merlin_hstu.retrieval.config import load_config

    extra = [f"train.seed={seed}"]
    if args.id_epochs:
        extra.append(f"train.epochs={args.id_epochs}")
    if args.max_steps:
        extra.append(f"train.max_steps={args.max_steps}")
    if args.threads:
        extra.append(f"train.threads={args.threads}")
    cfg = load_config(preset, [*extra, *overrides])
    _no_time(cfg, table)
    return cfg


def summary_rows(runs: Dict[str, List[dict]], published: Dict[str, dict]) -> Dict[str, dict]:
    """{row name: metrics}: the mean (and std over seeds) of every model, then the published rows."""
    rows = {}
    for name, seeds in runs.items():
        keys = list(seeds[0])
        rows[f"{name} (mean of {len(seeds)})"] = {k: statistics.fmean(s[k] for s in seeds) for k in keys}
        if len(seeds) > 1:
            rows[f"{name} (std)"] = {k: statistics.stdev(s[k] for s in seeds) for k in keys}
    rows.update(published)
    return rows


def command_line(kind: str, args) -> str:
    """The command that reproduces a run: every argument of the subcommand (`args._parser`, set at registration)
    that is not its default. Options of the parent `bench` parser (its --epochs, ...) are not the subcommand's."""
    parser = getattr(args, "_parser", None)
    own = {a.dest: a.default for a in parser._actions} if parser is not None else None
    parts = [f"merlin-hstu bench {kind}"]
    for key, value in vars(args).items():
        if key in ("func", "command", "bench_command", "task") or value in (None, False, 0, [], "") \
                or key.startswith("_") or (own is not None and (key not in own or own[key] == value)):
            continue
        flag = {"overrides": "--set", "id_overrides": "--id-set"}.get(key, "--" + key.replace("_", "-"))
        if isinstance(value, list):
            parts += [f"{flag} {v}" for v in value]
        else:
            parts.append(flag if value is True else f"{flag} {value}")
    return " ".join(parts)


def _record(args, kind: str, sections: dict, text: str, info: dict) -> dict:
    return {"benchmark": kind, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": info,
            "arguments": {k: v for k, v in vars(args).items() if k != "func" and not k.startswith("_")},
            "sections": sections,
            "markdown": text}


def selection_record(seed: int, fit) -> dict:
    """What hyperparameters are chosen on: the validation metrics of the epoch early stopping kept (never test),
    and the validation curve it was chosen from ([epoch, recall@10, ndcg@10] per evaluated epoch)."""
    validation = dict(fit.validation_metrics).get(fit.best_epoch, {})
    curve = [[epoch, as_recall(m).get("recall@10"), m.get("ndcg@10")] for epoch, m in fit.validation_metrics]
    return {"seed": seed, "epochs": len(fit.epoch_losses), "best_epoch": fit.best_epoch,
            "train_seconds": fit.train_seconds, "resumed_from": fit.resumed_from,
            **{f"validation_{k}": v for k, v in as_recall(validation).items() if k in ("recall@10", "ndcg@10")},
            "validation_curve": curve}


def plot_validation_curves(sections: Dict[str, dict], path: Path, title: str) -> Optional[Path]:
    """Validation NDCG@10 per epoch of every preset and seed, one panel per dataset, the kept epoch marked: how
    early stopping chose. None when matplotlib is missing or no run recorded a curve."""
    curves = {name: {preset: [r for r in records if r.get("validation_curve")]
                     for preset, records in section["selection"].items()} for name, section in sections.items()}
    if not any(r for presets in curves.values() for r in presets.values()):
        return None
    plt = pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(1, len(curves), figsize=(5.5 * len(curves), 3.8), squeeze=False)
    for ax, (name, presets) in zip(axes[0], curves.items()):
        for color, (preset, records) in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"], presets.items()):
            for i, r in enumerate(records):
                epochs, ndcg = [c[0] for c in r["validation_curve"]], [c[2] for c in r["validation_curve"]]
                ax.plot(epochs, ndcg, color=color, alpha=0.85, linewidth=1.2,
                        label=preset if i == 0 else None)
                best = dict(zip(epochs, ndcg)).get(r["best_epoch"])
                if best is not None:
                    ax.plot([r["best_epoch"]], [best], marker="*", markersize=10, color=color)
        ax.set(title=f"{name}: validation NDCG@10 (* kept epoch)", xlabel="epoch", ylabel="NDCG@10")
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    write_file(path, lambda tmp: save_figure(fig, tmp))
    return path


def selection_table(selection: Dict[str, List[dict]]) -> str:
    header = f"{'model':<24} {'seed':>5} {'epochs (best)':>14} {'val R@10':>9} {'val N@10':>9} {'train min':>10}"
    lines = [header, "-" * len(header)]
    resumed = False
    for preset, records in selection.items():
        for r in records:
            minutes = f"{r['train_seconds'] / 60:.1f}" + ("*" if r.get("resumed_from") is not None else "")
            resumed = resumed or r.get("resumed_from") is not None
            lines.append(f"{preset:<24} {r['seed']:>5} {str(r['epochs']) + ' (' + str(r['best_epoch']) + ')':>14} "
                         f"{r.get('validation_recall@10', float('nan')):>9.4f} "
                         f"{r.get('validation_ndcg@10', float('nan')):>9.4f} {minutes:>10}")
    if resumed:
        lines.append("* resumed after a kill: the training minutes of the process that finished the run only")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------------
# bench amazon
# ------------------------------------------------------------------------------------------------------------
def amazon_run(table, data_dir: Path, preset: str, seed: int, args, work: Path, name: str) -> dict:
    """Train (or, under --resume, continue or reuse) one preset and seed -> its result.json record: test metrics,
    the selection figures and the epoch count. Checkpoints go to `<work>/<dataset>/<preset>-s<seed>/checkpoints`
    (every epoch end, or `--set train.checkpoint_every=N` steps); result.json is written when the run ends and
    the checkpoints are then removed."""
    from merlin_hstu.retrieval.train import train_retrieval
    from merlin_hstu.train.loop import run_fingerprint

    cfg = id_model_config(table, preset, args.overrides, seed, args)
    fingerprint = run_fingerprint(cfg.to_dict(), data=str(Path(data_dir).resolve()), users=args.users)

    def train(checkpoints: Path) -> dict:
        result = train_retrieval(table, cfg, progress=not args.no_progress, model_name=cfg.name,
                                 checkpoint_dir=checkpoints, resume=args.resume, fingerprint=fingerprint)
        fit = result.fit
        return {"dataset": name, "preset": preset, "seed": seed, "test": as_recall(result.metrics[cfg.name]),
                "selection": selection_record(seed, fit), "stopped_early": fit.stopped_early,
                "resumed_from": fit.resumed_from}

    return resumable_run(work / run_dir_name(name, preset, seed), fingerprint, args.resume, f"{preset}, seed {seed}",
                         train)


def _machine(args) -> dict:
    """`machine_info()` after `--threads` is applied, so the recorded thread count is the one the runs train with
    (training sets it again from train.threads, to the same value)."""
    import torch

    from merlin_hstu.bench.retrieval import machine_info

    if args.threads:
        torch.set_num_threads(args.threads)
    return machine_info()


def run_amazon(args) -> int:
    import shutil

    from merlin_hstu.bench.retrieval import machine_summary
    from merlin_hstu.retrieval.config import load_config
    from merlin_hstu.retrieval.metrics import format_metrics_table
    from merlin_hstu.train.run_dir import open_work_dir, work_dir

    out = Path(args.output or "runs/bench/amazon")
    work = open_work_dir(work_dir(out), args.resume, "bench")  # per-run checkpoints and results until bench.json
    datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    info = _machine(args)
    print(f"machine: {machine_summary(info)}")
    sections, lines = {}, [f"## Amazon benchmark ({', '.join(models)}), seeds {_seeds(args)}", "",
                           f"Machine: {machine_summary(info)}. Command: `{command_line('amazon', args)}`.", ""]
    for dataset in datasets:
        history = max(load_config(m).data.max_history for m in models)
        table, data_dir, name = load_table(dataset, args.input, args.cache, history, args.users)
        print(f"\n=== {name}: {len(table.items):,} users, {len(table.candidate_ids):,} items ===")
        runs, selection = {}, {}
        for preset in models:
            for seed in _seeds(args):
                print(f"--- {preset}, seed {seed} ---")
                done = amazon_run(table, data_dir, preset, seed, args, work, name)
                chosen = done["selection"]
                print(f"{preset}: {chosen['epochs']} epochs (best {chosen['best_epoch']}, stopped early: "
                      f"{done['stopped_early']}), test {done['test']}")
                runs.setdefault(preset, []).append(done["test"])
                selection.setdefault(preset, []).append(chosen)
        rows = summary_rows(runs, PUBLISHED.get(name, {}))
        text = format_metrics_table(rows, keys=TABLE_KEYS)
        chosen = selection_table(selection)
        print(f"\n{name}:\n{text}\n\nselection (validation item only):\n{chosen}")
        sections[name] = {"runs": runs, "rows": rows, "selection": selection}
        lines += [f"### {name}", "", "```", text, "```", "",
                  "Selection figures (the validation item of every user, at the epoch early stopping kept):", "",
                  "```", chosen, "```", ""]
    markdown = "\n".join(lines)
    write_file(out / "bench.json", json.dumps(_record(args, "amazon", sections, markdown, info), indent=2,
                                              default=str))
    write_file(out / "bench.md", markdown + "\n")
    plotted = plot_validation_curves(sections, out / "bench.png", f"bench amazon, seeds {_seeds(args)}")
    shutil.rmtree(work, ignore_errors=True)
    print(f"\nwrote {out / 'bench.json'}, {out / 'bench.md'}" + (f", {plotted}" if plotted else ""))
    return 0


# ------------------------------------------------------------------------------------------------------------
# bench sid
# ------------------------------------------------------------------------------------------------------------
def item_embeddings(cfg, args, table, data_dir: Path, id_model):
    """The tokenizer's input rows for the catalogue (cfg.data.embeddings) and their description."""
    from merlin_hstu.sid.embeddings import file_embeddings, model_item_embeddings, text_embeddings

    catalogue = table.candidate_ids.numpy()
    kind = cfg.data.embeddings
    if kind == "collaborative":
        return catalogue, model_item_embeddings(id_model, catalogue), {"kind": "collaborative",
                                                                       "model": cfg.data.id_model}
    if kind == "text":  # the HLLM item encoder (all-MiniLM-L6-v2 by default), vectors cached on disk
        from merlin_hstu.hllm.cache import EmbeddingCache
        from merlin_hstu.hllm.config import ItemEncoderConfig
        from merlin_hstu.hllm.item_encoder import ItemTextEncoder

        vectors, source = text_embeddings(cfg.data.embeddings_path or data_dir, catalogue,
                                          ItemTextEncoder(ItemEncoderConfig()), EmbeddingCache())
        return catalogue, vectors, source
    vectors, source = file_embeddings(cfg.data.embeddings_path, catalogue)
    return catalogue, vectors, source


def sid_seed(table, data_dir: Path, name: str, cfg, id_preset: str, seed: int, args, stage: Path, out: Path) -> dict:
    """One seed of `bench sid` in two stages, each ending in a record in `stage` (OUTPUT.incomplete/seed-<seed>):

    id.json   the ID model (checkpoints in id-checkpoints/ while it trains): test and tail-target metrics and the
              tail items; the tokenizer fitted on its item embeddings is saved beside it (tokenizer/) first
    sid.json  the decoder trained on that tokenizer (sid-checkpoints/ while it trains), published to
              OUTPUT/seed-<seed>: test and tail-target metrics

    Under --resume a stage with a record is reused and the interrupted one continues from its newest checkpoint; a
    record of other arguments is refused (`resumable_run`). -> {"id": id.json, "sid": sid.json, "sids": tokenizer}."""
    import numpy as np

    from merlin_hstu.retrieval.train import evaluate_model, train_retrieval
    from merlin_hstu.sid.decode import SemanticIdTrie
    from merlin_hstu.sid.tokenizer import SemanticIds, fit_tokenizer, format_statistics
    from merlin_hstu.sid.train import evaluate_sid, save_sid_run, train_sid
    from merlin_hstu.train.loop import run_fingerprint

    cfg.train.seed, cfg.tokenizer.seed = seed, seed
    progress = not args.no_progress
    data = str(Path(data_dir).resolve())
    id_cfg = id_model_config(table, id_preset, args.id_overrides, seed, args)
    id_fingerprint = run_fingerprint(id_cfg.to_dict(), data=data, users=args.users,
                                     tokenizer=cfg.tokenizer.to_dict(), head_fraction=args.head_fraction,
                                     embeddings=[cfg.data.embeddings, cfg.data.embeddings_path])

    def train_id(checkpoints: Path) -> dict:  # the ID model, then the tokenizer fitted on its item table
        result = train_retrieval(table, id_cfg, progress=progress, model_name=id_cfg.name, checkpoint_dir=checkpoints,
                                 resume=args.resume, fingerprint=id_fingerprint)
        tail = tail_items(result.split, args.head_fraction)
        tail_eval = tail_samples(result.split, tail)
        t0 = time.perf_counter()
        catalogue, vectors, source = item_embeddings(cfg, args, table, data_dir, result.model)
        fit_tokenizer(catalogue, vectors, cfg.tokenizer, source).save(stage / "tokenizer")
        return {"name": f"ID-{id_cfg.name}", "test": as_recall(result.metrics[id_cfg.name]),
                "tail": as_recall(evaluate_model(result.model, result.split, id_cfg, samples=tail_eval)),
                "epochs": len(result.epoch_losses), "best_epoch": result.fit.best_epoch,
                "tail_items": [int(i) for i in tail], "tail_eval_users": int(len(tail_eval.lengths)),
                "tokenizer_seconds": time.perf_counter() - t0, "resumed_from": result.fit.resumed_from}

    id_done = resumable_run(stage, id_fingerprint, args.resume, f"ID model, seed {seed}", train_id, "id.json",
                            "id-checkpoints")
    sids = SemanticIds.load(stage / "tokenizer")  # the saved tokenizer, resumed or not: one path
    print(format_statistics(sids.stats) + f"\n(fitted in {id_done['tokenizer_seconds']:.1f} s)")

    sid_fingerprint = run_fingerprint(cfg.to_dict(), data=data, users=args.users, id_stage=id_fingerprint)

    def train_decoder(checkpoints: Path) -> dict:
        result = train_sid(table, sids, cfg, progress=progress, model_name=cfg.name, checkpoint_dir=checkpoints,
                           resume=args.resume, fingerprint=sid_fingerprint)
        model, fit = result.model, result.fit
        device = next(model.parameters()).device
        tail_eval = tail_samples(result.split, np.asarray(id_done["tail_items"], dtype=np.int64))
        tail = evaluate_sid(model, SemanticIdTrie.from_semantic_ids(sids).to(device),
                            sids.token_table(table.num_items).to(device), result.split, tail_eval, cfg)
        run_dir = save_sid_run(out / f"seed-{seed}", result, cfg, extra={"dataset": name, "id_model": id_preset},
                               data_dir=data_dir)
        return {"name": f"SID-{cfg.name}", "test": as_recall(result.metrics[cfg.name]), "tail": as_recall(tail),
                "epochs": len(result.epoch_losses), "best_epoch": fit.best_epoch, "train_seconds": fit.train_seconds,
                "resumed_from": fit.resumed_from, "run": str(run_dir)}

    sid_done = resumable_run(stage, sid_fingerprint, args.resume, f"SID decoder, seed {seed}", train_decoder,
                             "sid.json", "sid-checkpoints")
    return {"id": id_done, "sid": sid_done, "sids": sids}


def run_sid_bench(args) -> int:
    import shutil

    from merlin_hstu.bench.retrieval import machine_summary
    from merlin_hstu.retrieval.config import load_config
    from merlin_hstu.retrieval.metrics import format_metrics_table
    from merlin_hstu.sid.config import load_sid_config
    from merlin_hstu.sid.tokenizer import format_statistics
    from merlin_hstu.train.run_dir import open_work_dir, work_dir

    overrides = list(args.overrides)
    if args.epochs:
        overrides.append(f"train.epochs={args.epochs}")
    if args.max_steps:
        overrides.append(f"train.max_steps={args.max_steps}")
    if args.threads:
        overrides.append(f"train.threads={args.threads}")
    if args.tokenizer:
        overrides.append(f"tokenizer.method={args.tokenizer}")
    if args.embeddings:
        overrides.append(f"data.embeddings={args.embeddings}")
    if args.embeddings_path:
        overrides.append(f"data.embeddings_path={args.embeddings_path}")
    cfg = load_sid_config(args.model, overrides)
    id_preset = args.id_model or cfg.data.id_model
    history = max(cfg.data.max_history, load_config(id_preset).data.max_history)
    table, data_dir, name = load_table(args.dataset, args.input, args.cache, history, args.users)
    if cfg.model.time_bias and table.timestamps is None:
        print("note: the data has no timestamps: the decoder's time bias is switched off (model.time_bias=false)")
        cfg.model.time_bias = False
    info = _machine(args)
    out = Path(args.output or f"runs/bench/sid-{name}-{cfg.name}")
    print(f"machine: {machine_summary(info)}")
    print(f"dataset {name}: {len(table.items):,} users, {len(table.candidate_ids):,} items; SID config {cfg.name} "
          f"({cfg.tokenizer.method} {cfg.tokenizer.levels} x {cfg.tokenizer.codebook_size}, embeddings "
          f"{cfg.data.embeddings}); ID model {id_preset}; seeds {_seeds(args)}")
    work = open_work_dir(work_dir(out), args.resume, "bench")  # per-seed stage records and checkpoints
    runs: Dict[str, List[dict]] = {}
    details = []
    for seed in _seeds(args):
        print(f"\n--- seed {seed} ---")
        done = sid_seed(table, data_dir, name, cfg, id_preset, seed, args, work / f"seed-{seed}", out)
        id_done, sid_done, sids = done["id"], done["sid"], done["sids"]
        id_name, sid_name = id_done["name"], sid_done["name"]
        for row, record in ((id_name, id_done), (sid_name, sid_done)):
            runs.setdefault(row, []).append(record["test"])
            runs.setdefault(f"{row}, tail targets", []).append(record["tail"])
        details.append({"seed": seed, "tokenizer": sids.stats, "sid_epochs": sid_done["epochs"],
                        "sid_best_epoch": sid_done["best_epoch"], "sid_train_seconds": sid_done["train_seconds"],
                        "id_epochs": id_done["epochs"], "id_best_epoch": id_done["best_epoch"],
                        "tail_items": len(id_done["tail_items"]), "tail_eval_users": id_done["tail_eval_users"],
                        "run": sid_done["run"]})
        print(f"{sid_name}: {sid_done['epochs']} epochs (best {sid_done['best_epoch']}), test "
              f"{sid_done['test']}; saved -> {sid_done['run']}")
    if args.nvtabular_step:  # the pipeline's NVTabular step on the last tokenizer, checked against the model's table
        import numpy as np

        from merlin_hstu.common import schema as roles
        from merlin_hstu.workflows.semantic_ids import write_semantic_ids

        rows = write_semantic_ids(data_dir, sids)
        table_np = sids.token_table(table.num_items).numpy()
        for items, tokens in zip(rows[roles.ITEM_LIST], rows[roles.SEMANTIC_ID_LIST]):
            if not np.array_equal(table_np[np.asarray(items)].reshape(-1), np.asarray(tokens)):
                raise AssertionError("the NVTabular semantic-ID step disagrees with the tokenizer's token table")
        print(f"NVTabular step: {len(rows):,} rows of {roles.SEMANTIC_ID_LIST} written to {data_dir / 'semantic_ids'}"
              " (equal to the tokenizer's table)")
    rows = summary_rows(runs, PUBLISHED.get(name, {}))
    text = format_metrics_table(rows, keys=TABLE_KEYS)
    id_mean = rows[f"{id_name} (mean of {len(_seeds(args))})"]
    sid_mean = rows[f"{sid_name} (mean of {len(_seeds(args))})"]
    tail_id = rows[f"{id_name}, tail targets (mean of {len(_seeds(args))})"]
    tail_sid = rows[f"{sid_name}, tail targets (mean of {len(_seeds(args))})"]
    def winner(s: dict, i: dict) -> str:
        return "SID wins" if s["recall@10"] > i["recall@10"] else "ID wins" if s["recall@10"] < i["recall@10"] else "tie"

    verdict = [f"- {what}: SID {s['recall@10']:.4f} vs ID {i['recall@10']:.4f} Recall@10 ({winner(s, i)})"
               for what, s, i in (("all users", sid_mean, id_mean), ("tail-target users", tail_sid, tail_id))]
    markdown = "\n".join([
        f"### semantic-ID HSTU vs ID HSTU on {name}, seeds {_seeds(args)}", "",
        f"Machine: {machine_summary(info)}. Tail: items outside the {args.head_fraction:.0%} most popular by "
        f"training count ({details[0]['tail_items']:,} items; {details[0]['tail_eval_users']:,} test users).", "",
        "```", text, "```", "", *verdict, "",
        f"- tokenizer ({cfg.tokenizer.method}, seed {details[0]['seed']}):", "```",
        format_statistics(details[0]["tokenizer"]), "```",
        f"- command: `{command_line('sid', args)}`"])
    print("\n" + markdown)
    record = _record(args, "sid", {name: {"runs": runs, "rows": rows, "details": details}}, markdown, info)
    write_file(out / "bench.json", json.dumps(record, indent=2, default=str))
    write_file(out / "bench.md", markdown + "\n")
    shutil.rmtree(work, ignore_errors=True)
    print(f"\nwrote {out / 'bench.json'}, {out / 'bench.md'}")
    return 0


# ------------------------------------------------------------------------------------------------------------
# bench sid-decode
# ------------------------------------------------------------------------------------------------------------
def _timed(fn, repeats: int) -> float:
    """The median wall time of `repeats` calls (after one warm-up call)."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run_decode_bench(args) -> int:
    import torch

    from merlin_hstu.bench.retrieval import machine_info, machine_summary
    from merlin_hstu.retrieval.config import load_config
    from merlin_hstu.retrieval.data import LeaveOneOut, history_window
    from merlin_hstu.retrieval.topk import rankable_from_invalid
    from merlin_hstu.retrieval.train import build_model as build_id_model, load_run
    from merlin_hstu.sid.config import load_sid_config
    from merlin_hstu.sid.decode import SemanticIdTrie, beam_search
    from merlin_hstu.sid.embeddings import model_item_embeddings
    from merlin_hstu.sid.tokenizer import fit_tokenizer
    from merlin_hstu.sid.train import build_model as build_sid_model, history_tokens, load_sid_run

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    beams = [int(b) for b in args.beams.split(",") if b.strip()]
    if args.run:
        sid_model, sids, cfg, _ = load_sid_run(args.run)
        sid_what = f"trained run {args.run}"
    else:
        cfg = load_sid_config(args.model, args.overrides)
        cfg.model.time_bias = False
    if args.id_run:
        id_model, id_cfg, _ = load_run(args.id_run)
        id_what = f"trained run {args.id_run}"
    else:
        id_cfg = load_config(args.id_model or cfg.data.id_model, args.id_overrides)
    history = max(cfg.data.max_history, id_cfg.data.max_history)
    table, _, name = load_table(args.dataset, args.input, args.cache, history)
    if not args.id_run:
        _no_time(id_cfg, table)
        id_model = build_id_model(table, id_cfg)
        id_what = f"untrained {id_cfg.name} (decoding cost does not depend on the weights)"
    if not args.run:
        catalogue = table.candidate_ids.numpy()
        sids = fit_tokenizer(catalogue, model_item_embeddings(id_model, catalogue), cfg.tokenizer,
                             {"kind": "collaborative", "model": id_cfg.name, "trained": bool(args.id_run)})
        sid_model = build_sid_model(sids, cfg)
        sid_what = f"untrained {cfg.name} decoder, tokenizer fitted on the ID model's item table"
    id_model.eval()
    sid_model.eval()
    trie = SemanticIdTrie.from_semantic_ids(sids)
    token_table = sids.token_table(table.num_items)
    id_split = LeaveOneOut(table, max_history=id_cfg.data.max_history)
    sid_split = LeaveOneOut(table, max_history=cfg.data.max_history)
    users = min(args.users, len(id_split.eval.lengths))
    id_batch = next(id_split.batches(id_split.eval, users))
    sid_batch = next(sid_split.batches(sid_split.eval, users))
    info = machine_info()
    print(f"machine: {machine_summary(info)}")
    print(f"dataset {name}: {users} users, {len(table.candidate_ids):,} items; ID: {id_what}; SID: {sid_what}; "
          f"{sids.num_levels} tokens per item, trie nodes per level {trie.level_sizes()}")
    rows = {}
    rankable = rankable_from_invalid(table.num_items, table.non_candidate_ids)

    def id_topk():
        with torch.no_grad():
            topk = id_model.topk(rankable)
            for start in range(0, users, args.batch_size):
                part = {k: v[start:start + args.batch_size] for k, v in id_batch.items()}
                query = id_model.last_user_vector(part["ids"], part["lengths"], part.get("timestamps"))
                topk(query, args.k, exclude=history_window(part))

    seconds = _timed(id_topk, args.repeats)
    rows[f"ID {id_cfg.name}: brute-force top-{args.k} over {len(table.candidate_ids):,} items"] = {
        "users/s": users / seconds, "ms/user": 1e3 * seconds / users}
    for engine in [e.strip() for e in args.engines.split(",") if e.strip()]:
        for width in beams:
            def decode():
                for start in range(0, users, args.batch_size):
                    part = {k: v[start:start + args.batch_size] for k, v in sid_batch.items()}
                    histories, _, _ = history_tokens(token_table, part, False)
                    beam_search(sid_model, trie, histories, width, engine)

            seconds = _timed(decode, args.repeats)
            rows[f"SID {cfg.name}: beam {width} ({engine})"] = {"users/s": users / seconds,
                                                                "ms/user": 1e3 * seconds / users}
    lines = [f"### decoding cost on {name}: {users} users, batches of {args.batch_size}, "
             f"{torch.get_num_threads()} threads", "",
             f"Machine: {machine_summary(info)}. Command: `{command_line('sid-decode', args)}`.", "",
             "| method | users/s | ms per user |", "|---|---:|---:|"]
    lines += [f"| {k} | {v['users/s']:.1f} | {v['ms/user']:.2f} |" for k, v in rows.items()]
    markdown = "\n".join(lines)
    print("\n" + markdown)
    out = Path(args.output or f"runs/bench/sid-decode-{name}")
    record = _record(args, "sid-decode", {name: rows}, markdown, info)
    write_file(out / "bench.json", json.dumps(record, indent=2, default=str))
    write_file(out / "bench.md", markdown + "\n")
    print(f"\nwrote {out / 'bench.json'}, {out / 'bench.md'}")
    return 0


# ------------------------------------------------------------------------------------------------------------
# the command line
# ------------------------------------------------------------------------------------------------------------
def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", help="raw files of a named dataset (default: the staged copy)")
    p.add_argument("--cache", default="runs/datasets", help="where named datasets are preprocessed once")
    p.add_argument("--output", help="where bench.json / bench.md go")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=42, help="first seed (default 42)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _training(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seeds", type=int, default=3, help="seeds, run one after another (default 3)")
    p.add_argument("--users", type=int, default=0, help="the first N users only (0: all; quick checks)")
    p.add_argument("--max-steps", type=int, default=0, help="stop every training after this many steps (smoke runs)")
    p.add_argument("--id-epochs", type=int, default=0, help="epochs of the ID models (default: the preset's, with "
                                                            "early stopping)")
    p.add_argument("--resume", action="store_true",
                   help="continue a killed bench: runs (and stages) that finished are reused, the interrupted one "
                        "continues from its newest checkpoint (in OUTPUT.incomplete/); without it that folder is "
                        "discarded")


def register_subcommands(subparsers, bench_subparsers) -> None:
    """Hook for merlin_hstu.cli.main.EXTENSION_MODULES: adds `bench amazon`, `bench sid`, `bench sid-decode`."""
    p = bench_subparsers.add_parser("amazon", help="ID SASRec / HSTU / HSTU-large on Amazon Beauty, Sports, Toys "
                                                   "beside published results", description=__doc__,
                                    formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", default=",".join(DATASETS), help=f"comma-separated (default: {', '.join(DATASETS)})")
    p.add_argument("--models", default=",".join(ID_PRESETS), help=f"retrieval presets (default: {', '.join(ID_PRESETS)})")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a value of every model's config (repeatable)")
    _common(p)
    _training(p)
    p.set_defaults(func=run_amazon, _parser=p)

    p = bench_subparsers.add_parser("sid", help="semantic-ID HSTU vs ID HSTU (tokenizer stats, tail items, "
                                                "published TIGER)", description=__doc__,
                                    formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default=DATASETS[0], help=f"dataset name or preprocessed directory (default "
                                                          f"{DATASETS[0]})")
    p.add_argument("--model", default="sid-hstu-amazon", help="SID preset or YAML (default sid-hstu-amazon)")
    p.add_argument("--id-model", help="the ID retrieval preset (default: the SID config's data.id_model)")
    p.add_argument("--tokenizer", choices=["rq-kmeans", "rq-vae"], help="= --set tokenizer.method=...")
    p.add_argument("--embeddings", choices=["collaborative", "text", "file"], help="= --set data.embeddings=...")
    p.add_argument("--embeddings-path", help="= --set data.embeddings_path=... (a .npy/.parquet matrix, or the "
                                             "dataset directory with item_text/)")
    p.add_argument("--epochs", type=int, default=0, help="epochs of the SID decoder (default: the preset's)")
    p.add_argument("--head-fraction", type=float, default=0.2,
                   help="the most popular fraction of the catalogue; the rest are tail items (default 0.2)")
    p.add_argument("--nvtabular-step", action="store_true",
                   help="also write <dataset>/semantic_ids/ with the NVTabular step and check it against the model")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a value of the SID config (repeatable)")
    p.add_argument("--id-set", dest="id_overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a value of the ID model's config (repeatable)")
    _common(p)
    _training(p)
    p.set_defaults(func=run_sid_bench, _parser=p)

    p = bench_subparsers.add_parser("sid-decode", help="users/s of semantic-ID beam search (beam 10, 50) vs ID "
                                                       "brute-force top-K", description=__doc__,
                                    formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default=DATASETS[0], help=f"dataset (default {DATASETS[0]})")
    p.add_argument("--run", help="a trained SID run directory (default: an untrained decoder of --model's size)")
    p.add_argument("--id-run", help="a trained retrieval run (default: an untrained model of --id-model's size)")
    p.add_argument("--model", default="sid-hstu-amazon", help="SID preset for an untrained decoder")
    p.add_argument("--id-model", help="retrieval preset for an untrained ID model (default: the SID config's)")
    p.add_argument("--beams", default="10,50", help="comma-separated beam widths (default 10,50)")
    p.add_argument("--engines", default="cached", help="cached, full or both (comma-separated; default cached)")
    p.add_argument("--users", type=int, default=512, help="users decoded (default 512)")
    p.add_argument("--batch-size", type=int, default=128, help="users per batch (default 128)")
    p.add_argument("--k", type=int, default=10, help="K of the ID top-K (default 10)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats after a warm-up (median; default 3)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--id-set", dest="id_overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    _common(p)
    p.set_defaults(func=run_decode_bench, _parser=p)
