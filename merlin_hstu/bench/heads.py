"""Side-by-side cost of retrieval heads and losses: `python -m merlin_hstu.bench.heads --dataset ml-1m-prefix`.

`merlin-hstu bench` runs one configuration at a time, so on a shared machine its seconds per step drift with the
load between runs.  This command builds one model per head / loss variant of the same preset and seed, and times
one training step (forward, backward, AdamW) of each in turn, round after round, on the same batches; the ratio
to the first variant is what to read.  It prints the machine, a markdown table (median s/step, ratio, peak RSS of
the process) and writes `<output>/heads.json`.

Variants (`--variants`, comma separated): dot-sampled (the preset's objective), dot-in_batch-logq, dot-full (every
catalogue item a negative), dot-full-unseen (the full softmax without each position's seen items:
`train.history_negatives=false`), dot-bce, mol-sampled (the preset with `head.similarity=mol`, RAILS MoL shape,
layer-norm query, raw items, temperature 1, mi loss 0.001 - what the `*-mol-*` presets set).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from merlin_hstu.common.atomic_dir import write_file

VARIANTS = {
    "dot-sampled": [],
    "dot-in_batch-logq": ["train.negatives=in_batch", "train.logq_correction=true"],
    "dot-full": ["train.loss=full_softmax", "train.history_negatives=true"],
    "dot-full-unseen": ["train.loss=full_softmax", "train.history_negatives=false"],
    "dot-bce": ["train.loss=bce", "train.num_negatives=1", "train.temperature=1.0", "train.history_negatives=true"],
    "mol-sampled": ["head.similarity=mol", "head.query_norm=layer_norm", "head.item_norm=none",
                    "train.temperature=1.0", "train.mi_loss_weight=0.001"],
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m merlin_hstu.bench.heads", description=__doc__.split("\n\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True, help="dataset name (as for `merlin-hstu bench`) or a processed dir")
    p.add_argument("--model", default="hstu-ml1m", help="preset every variant starts from (default hstu-ml1m)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma separated, from {list(VARIANTS)}")
    p.add_argument("--rounds", type=int, default=3, help="timed steps per variant, one per round (default 3)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--cache", default="runs/datasets", help="where named datasets are preprocessed once")
    p.add_argument("--output", default="runs/bench/retrieval-heads", help="where heads.json goes")
    args = p.parse_args(argv)

    import torch
    from tqdm.auto import tqdm

    from merlin_hstu.bench.retrieval import machine_info, machine_summary, peak_rss_gb, resolve_dataset
    from merlin_hstu.retrieval.config import load_config
    from merlin_hstu.retrieval.data import LeaveOneOut, load_processed
    from merlin_hstu.retrieval.model import next_item_training_loss
    from merlin_hstu.retrieval.train import build_model

    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown or not names:
        raise SystemExit(f"error: unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    base = load_config(args.model)
    data_dir, dataset_name = resolve_dataset(args.dataset, None, Path(args.cache), base.data.max_history)
    table = load_processed(data_dir)
    split = LeaveOneOut(table, base.data.max_history)
    batches = list(split.batches(split.train, base.train.batch_size, shuffle=True,
                                 generator=torch.Generator().manual_seed(args.seed)))[: args.rounds + 1]
    runs = {}
    for name in names:
        cfg = load_config(args.model, VARIANTS[name])
        if table.timestamps is None:
            cfg.model.time_bias = False
        torch.manual_seed(args.seed)
        model = build_model(table, cfg).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.learning_rate, betas=tuple(cfg.train.betas),
                                      weight_decay=cfg.train.weight_decay)
        runs[name] = {"model": model, "optimizer": optimizer, "loss": cfg.train.loss_config(), "times": [],
                      "generator": torch.Generator().manual_seed(args.seed + 1)}
    info = machine_info()
    print(f"machine: {machine_summary(info)}")
    print(f"{dataset_name}, preset {args.model}, batch {base.train.batch_size}; one warm-up step, then "
          f"{args.rounds} rounds of one step per variant")
    pool = table.candidate_ids
    bar = tqdm(total=(args.rounds + 1) * len(names), desc="steps", unit="step")
    for round_ in range(args.rounds + 1):  # round 0 is the warm-up
        batch = batches[round_ % len(batches)]
        for name in names:
            run = runs[name]
            t0 = time.perf_counter()
            loss = next_item_training_loss(run["model"], batch, pool, run["loss"], run["generator"])
            run["optimizer"].zero_grad(set_to_none=True)
            loss.backward()
            run["optimizer"].step()
            if round_:
                run["times"].append(time.perf_counter() - t0)
            bar.update(1)
    bar.close()
    first = statistics.median(runs[names[0]]["times"])
    rows = [{"variant": n, "seconds_per_step": statistics.median(runs[n]["times"]),
             "ratio": statistics.median(runs[n]["times"]) / first, "times": runs[n]["times"]} for n in names]
    lines = ["| variant | s/step (median) | ratio to " + names[0] + " |", "|---|---|---|"]
    lines += [f"| {r['variant']} | {r['seconds_per_step']:.2f} | {r['ratio']:.2f}x |" for r in rows]
    print("\n".join(lines))
    print(f"peak RSS of the process (all variants together): {peak_rss_gb():.2f} GB")
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    write_file(out / "heads.json", json.dumps({"dataset": dataset_name, "preset": args.model, "machine": info,
                                               "rows": rows, "peak_rss_gb": peak_rss_gb()}, indent=2))
    print(f"wrote {out / 'heads.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
