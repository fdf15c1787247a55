"""`merlin-hstu expand`: grow an event log by fractal expansion (merlin_hstu.data.fractal), written block by block.

Only argparse here at import time; everything heavy is imported inside the command functions.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from merlin_hstu.common import schema as roles  # light: no Merlin import


def register_subcommands(subparsers, bench_subparsers) -> None:
    p = subparsers.add_parser(
        "expand", help="grow an event log by fractal expansion (more users, more items, the same shape)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Fractal expansion (arXiv 1901.08910, the method behind the HSTU reference's MovieLens-3B): the\n"
                    "log's user x item matrix is Kronecker-multiplied with a small matrix of keep-probabilities\n"
                    "derived from the log, and sampled. Users x --user-factor, items x --item-factor, every source\n"
                    "event copied into each item block with that block's probability, at its own timestamp.\n"
                    "Written one user block at a time (OUTPUT/part_*.parquet + fractal.json), seeded per block:\n"
                    "deterministic, resumable (rerun the same command), never the whole expansion in memory.\n"
                    "The output is an event log: `merlin-hstu preprocess --input OUTPUT` sessionizes it.",
        epilog="example:\n  merlin-hstu expand --dataset ml-1m-prefix --user-factor 10 --item-factor 10 --output "
               "data/ml-1m-prefix-x100\n")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--dataset", metavar="NAME", help="a registered public dataset (e.g. ml-1m-prefix, ml-100k)")
    source.add_argument("--input", metavar="LOG", help="an event log (.csv or .parquet) with user, item and "
                                                      "(optional) timestamp columns")
    p.add_argument("--output", required=True, help="directory for part_*.parquet and fractal.json")
    p.add_argument("--user-factor", type=int, default=2, help="expanded users = factor x source users (default 2)")
    p.add_argument("--item-factor", type=int, default=2, help="expanded items = factor x source items (default 2)")
    p.add_argument("--density", type=float, default=1.0,
                   help="scale of the keep-probabilities in (0, 1] (default 1: the densest block is copied whole)")
    p.add_argument("--contrast", type=float, default=0.25,
                   help="keep-probability = (block density / max) ** contrast; 1: the log's coarse structure as is "
                        "(wider length and popularity spreads), 0: uniform (an exact-shape copy); default 0.25")
    p.add_argument("--seed", type=int, default=0, help="seed of the per-block sampling (default 0)")
    p.add_argument("--user-column", default=roles.LOG_USER_ID,
                   help=f"user column of --input (default {roles.LOG_USER_ID})")
    p.add_argument("--item-column", default=roles.LOG_ITEM_ID,
                   help=f"item column of --input (default {roles.LOG_ITEM_ID})")
    p.add_argument("--timestamp-column", default=roles.LOG_TIMESTAMP,
                   help=f"timestamp column of --input (default {roles.LOG_TIMESTAMP})")
    p.add_argument("--stats", action="store_true",
                   help="also print the shape statistics of the source and of the expansion (reads the expansion "
                        "back: use it on sizes that fit in memory)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_expand)


def cmd_expand(args) -> int:
    from tqdm.auto import tqdm

    from merlin_hstu.data.fractal import FractalConfig, expand, shape_statistics
    from merlin_hstu.workflows.datasets import read_events

    config = FractalConfig(user_factor=args.user_factor, item_factor=args.item_factor, density=args.density,
                           contrast=args.contrast, seed=args.seed, user_column=args.user_column,
                           item_column=args.item_column, timestamp_column=args.timestamp_column)
    events = read_events(args.dataset, args.input)
    start = time.perf_counter()
    bar = tqdm(total=config.user_factor, desc="user blocks", unit="block", disable=args.no_progress, file=sys.stderr)

    def on_block(a: int, k: int, rows: int) -> None:
        bar.update(1)
        bar.set_postfix(events=f"{rows:,}")
        if args.no_progress:
            print(f"block {a + 1}/{k}: {rows:,} events", flush=True)

    manifest = expand(events, args.output, config, on_block=on_block)
    bar.close()
    seconds = time.perf_counter() - start
    print(f"expanded {manifest['source_events']:,} events of {manifest['source_users']:,} users x "
          f"{manifest['source_items']:,} items -> {manifest['events']:,} events (expected "
          f"{manifest['expected_events']:,.0f}) of {manifest['users']:,} users x {manifest['items']:,} items "
          f"in {seconds:.1f} s ({manifest['events'] / max(seconds, 1e-9):,.0f} events/s) -> {args.output}")
    if args.stats:
        import pandas as pd
        from pathlib import Path

        out = pd.concat([pd.read_parquet(Path(args.output) / part["file"], columns=[config.user_column,
                                                                                    config.item_column])
                         for part in manifest["parts"]], ignore_index=True)
        stats = {"source": shape_statistics(events, config.user_column, config.item_column),
                 "expansion": shape_statistics(out, config.user_column, config.item_column)}
        print(json.dumps(stats, indent=2))
    return 0
