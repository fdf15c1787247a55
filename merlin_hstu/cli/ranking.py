"""`merlin-hstu preprocess-ranking`: event logs with actions -> ranking samples (NVTabular), for
`merlin-hstu bench --task ranking` and `merlin_hstu.ranking.data.RankingDataset`.

Registered through `merlin_hstu.cli.main.EXTENSION_MODULES`; argparse only here, heavy imports inside the command.
"""
from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

from merlin_hstu.common import schema as roles  # light: no Merlin import

FORMATS = ("ml-1m", "kuairand", "events")
# kept in sync with merlin_hstu.workflows.ranking_workflow.RANKING_DATASETS (tested); importing it would load
# NVTabular just to build --help
RANKING_DATASET_NAMES = ("ml-1m-prefix-ranking", "ml-1m-ranking", "kuairand-1k", "kuairand-27k", "kuairand-pure")


def _names(text: str) -> tuple:
    return tuple(x.strip() for x in text.split(",") if x.strip()) if text else ()


def _movielens_name(input_dir: Path) -> str:
    """ml-1m when ratings.dat is there, ml-1m-prefix for the staged ratings.prefix-487650.dat."""
    from merlin_hstu.workflows.datasets import COMPRESSIONS

    for name, file in (("ml-1m", "ratings.dat"), ("ml-1m-prefix", "ratings.prefix-487650.dat")):
        if any((input_dir / f"{file}{suffix}").is_file() for suffix in COMPRESSIONS):
            return name
    raise ValueError(f"--format ml-1m: {input_dir} holds neither ratings.dat nor ratings.prefix-487650.dat "
                     "(each may end in .xz/.gz/.bz2); pass the MovieLens-1M directory as --input")


def cmd_preprocess_ranking(args) -> int:
    from merlin_hstu.workflows import ranking_workflow as rw

    if bool(args.format) == bool(args.dataset):
        raise ValueError("pass exactly one of --format (with --input) or --dataset")
    t0 = time.perf_counter()
    sizes = dict(num_candidates=args.num_candidates, max_uih_len=args.max_uih_len)
    if args.dataset:
        source = rw.ranking_dataset_source(args.dataset, args.input, **sizes)
    elif not args.input:
        raise ValueError(f"--format {args.format} needs --input")
    elif args.format == "ml-1m":
        source = rw.movielens_ranking_source(_movielens_name(Path(args.input)), args.input,
                                             rating_task=args.rating_task, **sizes)
    elif args.format == "kuairand":
        source = rw.kuairand_ranking_source(args.input, args.size, **sizes)
    else:
        source = _events_source(args, rw)
    if args.min_uih_len != source.config.min_uih_len:
        source.config = dataclasses.replace(source.config, min_uih_len=args.min_uih_len)
    result = rw.preprocess_source(source, args.output, test_fraction=args.test_fraction, split_seed=args.split_seed,
                                  overwrite=args.overwrite)
    meta = result.meta
    print(f"preprocessed {source.name}: {result.num_rows:,} users, {meta['num_candidates_total']:,} candidates "
          f"(K={meta['num_candidates']}, UIH <= {meta['max_uih_len']}), tasks "
          f"{[t['name'] for t in meta['tasks']]}, contextual {list(meta['contextual_cardinalities'])} in "
          f"{time.perf_counter() - t0:.1f} s -> {args.output}")
    return 0


def _events_source(args, rw):
    from merlin_hstu.ranking.batch import RankingTask

    config = rw.RankingWorkflowConfig(
        user_column=args.user_column, item_column=args.item_column, timestamp_column=args.timestamp_column,
        action_column=args.action_column, action_names=_names(args.action_names),
        watch_time_column=args.watch_time_column, contextual_columns=_names(args.contextual),
        num_candidates=args.num_candidates, max_uih_len=args.max_uih_len, item_encoding=args.item_encoding)
    users = None
    if args.user_features:
        users = rw.read_ranking_log(args.user_features, config)
    tasks = config.default_tasks()
    if args.tasks:
        by_name = {t.name: t for t in tasks}
        wanted = _names(args.tasks)
        unknown = [n for n in wanted if n not in by_name]
        if unknown:
            raise ValueError(f"--tasks {unknown} are not among the action names {list(by_name)}")
        tasks = tuple(by_name[n] for n in wanted)
    if args.watch_time_task:
        tasks += (RankingTask(args.watch_time_task, "regression"),)
    if not tasks:
        raise ValueError("--format events needs tasks: name the action bits with --action-names")
    events = rw.read_ranking_log(args.input, config)
    from merlin_hstu.workflows.session_workflow import NOTES_ATTR

    for note in events.attrs.get(NOTES_ATTR, []):  # e.g. ids beyond int64, read as strings
        print(f"note: {note}")
    return rw.RankingSource(name=Path(args.input).name, events=events, config=config, tasks=tasks,
                            user_features=users, description=f"event log {args.input}")


def register_subcommands(subparsers, bench_subparsers) -> None:
    p = subparsers.add_parser(
        "preprocess-ranking", help="event log with actions -> per-user ranking samples (NVTabular) for bench --task ranking",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Build one ranking sample per user with an NVTabular workflow: the user's interaction history "
                    "(items, action bitmasks, timestamps, optional watch time; its most recent --max-uih-len "
                    "events), its last --num-candidates events as the candidates with their labels per task, "
                    "the query time (the latest history timestamp) and the user's contextual features. "
                    "Writes OUTPUT/processed (parquet + schema.pbtxt), OUTPUT/workflow and OUTPUT/ranking.json.",
        epilog="formats:\n"
               "  ml-1m     MovieLens-1M directory (ratings.dat or the staged ratings.prefix-487650.dat, movies.dat,\n"
               "            users.dat): bits rated / liked (rating>=4) / loved (rating==5); tasks liked, loved\n"
               "            (+ regression 'rating' with --rating-task); contextual user_id, sex, age_group,\n"
               "            occupation, zip_code\n"
               "  kuairand  KuaiRand data/ directory (log_standard_*.csv, user_features_*.csv): the 8 binary\n"
               "            actions is_click..is_profile_enter as bits 0-7 and tasks; watch time play_time_ms/1000\n"
               "  events    any event log (CSV / Parquet): name its columns with the flags below\n"
               "example:\n"
               "  merlin-hstu preprocess-ranking --format ml-1m --input ../shared/data/movielens-1m "
               "--output runs/ml1m-ranking")
    p.add_argument("--format", choices=FORMATS, help="input layout (see below)")
    p.add_argument("--dataset", choices=RANKING_DATASET_NAMES, metavar="NAME",
                   help="instead of --format: a named dataset (" + ", ".join(RANKING_DATASET_NAMES)
                        + "); --input defaults to its staged copy")
    p.add_argument("--input", help="the input file or directory")
    p.add_argument("--output", required=True, help="output directory")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    g = p.add_argument_group("sample layout")
    g.add_argument("--num-candidates", type=int, default=10, help="K: the last K events are the candidates (default 10)")
    g.add_argument("--max-uih-len", type=int, default=200,
                   help="keep the most recent N history events (default 200)")
    g.add_argument("--min-uih-len", type=int, default=1,
                   help="users need this many history events besides >= 1 candidate (default 1)")
    g.add_argument("--test-fraction", type=float, default=0.25,
                   help="default per-user test split recorded in ranking.json (default 0.25)")
    g.add_argument("--split-seed", type=int, default=0, help="seed of that split (default 0)")
    g = p.add_argument_group("--format ml-1m / kuairand")
    g.add_argument("--rating-task", action="store_true", help="ml-1m: add the regression task 'rating'")
    g.add_argument("--size", choices=["1k", "27k", "pure"], help="kuairand: which release's files to read")
    g = p.add_argument_group("--format events: columns of the log")
    g.add_argument("--user-column", default=roles.LOG_USER_ID, help=f"user id column (default {roles.LOG_USER_ID})")
    g.add_argument("--item-column", default=roles.LOG_ITEM_ID, help=f"item id column (default {roles.LOG_ITEM_ID})")
    g.add_argument("--timestamp-column", default=roles.LOG_TIMESTAMP,
                   help=f"unix-seconds column (default {roles.LOG_TIMESTAMP})")
    g.add_argument("--action-column", help="an integer bitmask column (bit b = action b)")
    g.add_argument("--action-names", default="",
                   help="comma list: binary 0/1 columns combined into the bitmask (bit b = name b), or with "
                        "--action-column the names of its bits; each named bit is a binary task")
    g.add_argument("--tasks", default="", help="comma list of action names to use as tasks (default: all)")
    g.add_argument("--watch-time-column", help="a continuous signal per event (e.g. seconds watched)")
    g.add_argument("--watch-time-task", metavar="NAME", help="add a regression task NAME on the watch time")
    g.add_argument("--contextual", default="", help="comma list of per-user feature columns (may include the "
                                                    "user column)")
    g.add_argument("--user-features", help="CSV / Parquet with one row per user holding the contextual columns")
    g.add_argument("--item-encoding", choices=["categorify", "raw"], default="categorify",
                   help="categorify (default) or raw (positive integer ids kept)")
    from merlin_hstu.cli.main import add_cluster_args

    add_cluster_args(p)
    p.set_defaults(func=cmd_preprocess_ranking)
