"""`merlin-hstu bench stream`: peak memory of retrieval, ranking or CTR training on a dataset and on one 10x larger,
streaming (train.streaming) against in memory (docs/scaling.md, "Streaming data"; tests/test_streaming.py asserts
the bound).

Each measurement is its own process (peak RSS = the kernel's VmHWM of that process): it opens the data as
`merlin-hstu train` does (`retrieval.train.training_table`; ranking: `RankingDataConfig.load`; CTR:
`ctr.data.load_ctr_dataset`), trains `--steps`
optimizer steps and reports. The datasets are written row group by row group (never the dataset in memory), in
Parquet row groups of `--row-group` rows: `write_sequences` (retrieval: random sequences of the catalogue of a
preprocessed template), `write_ranking_rows` (`--task ranking`: random users within the catalogue, actions and
contextual tables of a preprocess-ranking template) and `write_criteo_rows` (`--task ctr`: random rows within the
tables of a Criteo-workflow template, its valid split kept).
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence

import numpy as np

from merlin_hstu.common.atomic_dir import publish_dir, write_file

CHILD = r"""
import sys, torch
torch.set_num_threads(1)
from merlin_hstu.retrieval.config import load_config
from merlin_hstu.retrieval.train import train_retrieval, training_table
cfg = load_config("demo", sys.argv[3:])
result = train_retrieval(training_table(sys.argv[1], cfg), cfg, progress=False, stop_after_steps=int(sys.argv[2]))
assert len(result.step_times) == int(sys.argv[2]), result.step_times
peak = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))
print("PEAK_KB", peak)
"""

CHILD_CTR = r"""
import sys, torch
from pathlib import Path
torch.set_num_threads(1)
from merlin_hstu.ctr.config import load_config
from merlin_hstu.ctr.data import load_ctr_dataset
from merlin_hstu.ctr.train import train_ctr
cfg = load_config("dlrm", sys.argv[3:])
data = load_ctr_dataset(sys.argv[1], Path(sys.argv[1]), {}, streaming=cfg.train.streaming,
                        shuffle_buffer=cfg.train.shuffle_buffer)
torch.manual_seed(cfg.train.seed)
result = train_ctr(cfg.build_model(data.cardinalities, data.num_dense), data, cfg.train,
                   stop_after_steps=int(sys.argv[2]))
assert len(result.step_times) == int(sys.argv[2]), result.step_times
peak = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))
print("PEAK_KB", peak)
"""
CTR_MODEL = ["model.embedding_dim=8", "train.batch_size=256"]

CHILD_RANKING = r"""
import sys, torch
torch.set_num_threads(1)
from merlin_hstu.ranking.config import load_config
from merlin_hstu.ranking.train import train_ranking
cfg = load_config("dlrm-hstu", sys.argv[3:])
data = cfg.data.load(sys.argv[1], cfg.train)
torch.manual_seed(cfg.train.seed)
result = train_ranking(cfg.build_model(data), data, cfg.train, progress=False, stop_after_steps=int(sys.argv[2]))
assert len(result.step_times) == int(sys.argv[2]), result.step_times
peak = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))
print("PEAK_KB", peak)
"""
RANKING_MODEL = ["model.embedding_dim=16", "model.num_blocks=1", "model.num_heads=1", "model.attention_dim=8",
                 "model.linear_dim=8", "model.multitask_hidden=16", "train.batch_size=32"]
CHILDREN = {"retrieval": CHILD, "ranking": CHILD_RANKING, "ctr": CHILD_CTR}

MODEL = ["data.max_history=200", "model.max_seq_len=205", "model.embedding_dim=16", "model.attention_dim=8",
         "model.linear_dim=8", "train.batch_size=32", "train.num_negatives=16"]


def _new_dataset_dir(output: Path, template: Optional[Path] = None) -> Path:
    """A staging directory for `output` (`common.atomic_dir.staging_dir`; published by `publish_dir` once written),
    holding a copy of `template` without its Parquet data and footers when one is given. `output` must not exist."""
    from merlin_hstu.common.atomic_dir import staging_dir

    if output.exists():
        raise FileExistsError(f"{output} exists; pass a new directory")
    staging = staging_dir(output)
    if template is not None:
        shutil.copytree(template, staging, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("*.parquet", "_metadata*", "_file_list.txt"))
    return staging


def _write_row_groups(path: Path, schema, rows: int, row_group_size: int,
                      columns: Callable[[int, int], dict]) -> None:
    """`rows` rows of `schema` written to `path` one row group of `row_group_size` at a time: `columns(start, n)` gives
    the values of rows start..start+n-1 by column name (never the whole dataset in memory)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    def arrow(values, type_):  # numpy columns are cast (float64 -> float32 ...); lists of arrays typed directly
        return pa.array(values).cast(type_) if isinstance(values, np.ndarray) else pa.array(values, type=type_)

    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, rows, row_group_size):
            values = columns(start, min(row_group_size, rows - start))
            writer.write_table(pa.table({f.name: arrow(values[f.name], f.type) for f in schema}, schema=schema))


def write_sequences(template: Path, output: Path, users: int, events: int, row_group_size: int, seed: int) -> Path:
    """A processed dataset of `users` random sequences of `events` catalogue items, with the schema and catalogue of
    the preprocessed `template` (`merlin-hstu preprocess` output), in row groups of `row_group_size` rows."""
    import pyarrow.parquet as pq

    from merlin_hstu.common import schema as roles

    template = Path(template)
    part = next((template / "processed").glob("*.parquet"), None)
    if part is None or not (template / "candidates.parquet").is_file():
        raise FileNotFoundError(f"{template} is not a `merlin-hstu preprocess` output (processed/*.parquet and "
                                "candidates.parquet)")
    schema = pq.read_schema(part).remove_metadata()
    wanted = {roles.LOG_USER_ID, roles.ITEM_LIST, roles.ACTION_LIST, roles.TIMESTAMP_LIST, roles.LENGTH}
    if set(schema.names) != wanted:
        raise ValueError(f"{part}: columns {schema.names}; write_sequences writes {sorted(wanted)} (preprocess a log "
                         "with user, item, action and timestamp columns as the template)")
    tmp = _new_dataset_dir(output)
    (tmp / "processed").mkdir()
    shutil.copy(template / "processed" / "schema.pbtxt", tmp / "processed" / "schema.pbtxt")
    shutil.copy(template / "candidates.parquet", tmp / "candidates.parquet")
    catalogue = pq.read_table(template / "candidates.parquet").column(0).to_numpy()
    rng = np.random.default_rng(seed)

    def columns(start: int, n: int) -> dict:
        times = np.cumsum(rng.integers(1, 100, size=(n, events)), axis=1) + 1_600_000_000
        return {roles.LOG_USER_ID: np.arange(start, start + n) + 1,
                roles.ITEM_LIST: list(rng.choice(catalogue, size=(n, events))),
                roles.ACTION_LIST: list(rng.integers(3, 5, size=(n, events))),
                roles.TIMESTAMP_LIST: list(times), roles.LENGTH: np.full(n, events)}

    _write_row_groups(tmp / "processed" / "part_0.parquet", schema, users, row_group_size, columns)
    publish_dir(tmp, output)
    return output


def write_criteo_rows(template: Path, output: Path, rows: int, row_group_size: int, seed: int) -> Path:
    """A Criteo-workflow directory of `rows` random train rows (dense N(0, 1), every categorical id uniform in its
    table, labels Bernoulli(0.25)) with the schema, workflow and valid split of the `preprocess_criteo` output
    `template`, in row groups of `row_group_size` rows."""
    import pyarrow.parquet as pq

    from merlin_hstu.ctr.data import criteo_columns
    from merlin_hstu.workflows.criteo_workflow import load_criteo_dataset

    template = Path(template)
    dataset = load_criteo_dataset(template)
    columns = criteo_columns(dataset, template)
    schema = pq.read_schema(dataset.parquet_files("train")[0]).remove_metadata()
    tmp = _new_dataset_dir(output, template)
    shutil.copytree(template / "processed" / "valid", tmp / "processed" / "valid", dirs_exist_ok=True)  # kept whole
    cards = dict(zip(columns.sparse, columns.cardinalities))
    rng = np.random.default_rng(seed)

    def values(start: int, n: int) -> dict:
        out = {}
        for field in schema:
            if field.name in cards:
                out[field.name] = rng.integers(0, cards[field.name], n)
            elif field.name == columns.label:
                out[field.name] = (rng.random(n) < 0.25).astype(np.int64)
            else:
                out[field.name] = rng.standard_normal(n)
        return out

    _write_row_groups(tmp / "processed" / "train" / "part_0.parquet", schema, rows, row_group_size, values)
    publish_dir(tmp, output)
    return output


def write_ranking_rows(template: Path, output: Path, users: int, events: int, row_group_size: int,
                       seed: int) -> Path:
    """A preprocess-ranking directory of `users` random users (`events` history events and K candidates each, items
    and actions within the catalogue and action bits of the `template`, contextual ids within its tables), with the
    template's ranking.json (row count updated) and schema, in row groups of `row_group_size` users."""
    import pyarrow.parquet as pq

    from merlin_hstu.common import schema as roles
    from merlin_hstu.ranking.data import (CANDIDATE_ACTION_LIST, CANDIDATE_ITEM_LIST, CONTEXT_PREFIX, META_FILE,
                                          NUM_CANDIDATES, QUERY_TIME, read_meta)

    template = Path(template)
    meta = read_meta(template)
    part = next((template / "processed").glob("*.parquet"))
    schema = pq.read_schema(part).remove_metadata()
    k, bits = int(meta["num_candidates"]), max(len(meta.get("action_names") or []), 1)
    known = {meta["user_column"], roles.ITEM_LIST, roles.ACTION_LIST, roles.TIMESTAMP_LIST, CANDIDATE_ITEM_LIST,
             CANDIDATE_ACTION_LIST, QUERY_TIME, roles.LENGTH, NUM_CANDIDATES,
             *(CONTEXT_PREFIX + f for f in meta["contextual_cardinalities"])}
    if set(schema.names) - known or meta.get("has_watch_time"):
        raise ValueError(f"{part}: columns {sorted(set(schema.names) - known)} (or watch time) that "
                         "write_ranking_rows does not write; use a template without them")
    tmp = _new_dataset_dir(output, template)
    (tmp / META_FILE).write_text(json.dumps({**meta, "num_rows": users}, indent=2))
    rng = np.random.default_rng(seed)

    def columns(start: int, n: int) -> dict:
        times = np.cumsum(rng.integers(1, 100, size=(n, events)), axis=1) + 1_600_000_000
        out = {meta["user_column"]: np.arange(start, start + n), roles.LENGTH: np.full(n, events),
               roles.ITEM_LIST: list(rng.integers(1, meta["num_items"], size=(n, events))),
               roles.ACTION_LIST: list(rng.integers(0, 2 ** bits, size=(n, events))),
               roles.TIMESTAMP_LIST: list(times), QUERY_TIME: times[:, -1],
               CANDIDATE_ITEM_LIST: list(rng.integers(1, meta["num_items"], size=(n, k))),
               CANDIDATE_ACTION_LIST: list(rng.integers(0, 2 ** bits, size=(n, k))),
               NUM_CANDIDATES: np.full(n, k)}
        for f, card in meta["contextual_cardinalities"].items():
            out[CONTEXT_PREFIX + f] = rng.integers(0, card, n)
        return out

    _write_row_groups(tmp / "processed" / part.name, schema, users, row_group_size, columns)
    publish_dir(tmp, output)
    return output


def start_peak_rss(data: Path, steps: int, overrides: Sequence[str], task: str = "retrieval") -> subprocess.Popen:
    """A process training `steps` steps on `data` with `overrides`; `finish_peak_rss` gives its peak RSS."""
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        p for p in (str(root), os.environ.get("PYTHONPATH", "")) if p)}
    return subprocess.Popen([sys.executable, "-c", CHILDREN[task], str(data), str(steps), *overrides],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def finish_peak_rss(proc: subprocess.Popen, timeout: float = 1800.0) -> int:
    """Peak RSS (KiB) of a `start_peak_rss` process; its output tail in the error if it failed."""
    out, err = proc.communicate(timeout=timeout)
    if proc.returncode != 0 or "PEAK_KB" not in out:
        raise RuntimeError(f"the measured training failed (exit {proc.returncode}):\n{out[-2000:]}\n{err[-3000:]}")
    return int(out.split("PEAK_KB")[1].split()[0])


def measure(template: Path, work: Path, users: int, events: int, row_group: int, steps: int, shuffle_buffer: int,
            parallel: bool = False, task: str = "retrieval") -> Dict[str, int]:
    """Peak RSS (KiB) of streaming and in-memory training on `users` and 10 x `users` sequences (ranking: users
    with `events` history events; ctr: train rows, `events` unused)."""
    if task == "ctr":
        paths = {"1x": write_criteo_rows(template, work / "x1", users, row_group, seed=1),
                 "10x": write_criteo_rows(template, work / "x10", 10 * users, row_group, seed=2)}
        model = CTR_MODEL
    elif task == "ranking":
        paths = {"1x": write_ranking_rows(template, work / "x1", users, events, row_group, seed=1),
                 "10x": write_ranking_rows(template, work / "x10", 10 * users, events, row_group, seed=2)}
        model = [*RANKING_MODEL, f"model.max_seq_len={events + 16}"]
    else:
        paths = {"1x": write_sequences(template, work / "x1", users, events, row_group, seed=1),
                 "10x": write_sequences(template, work / "x10", 10 * users, events, row_group, seed=2)}
        model = [*MODEL, f"data.max_history={events}", f"model.max_seq_len={events + 5}"]
    kinds = {"streaming": [*model, "train.streaming=true", f"train.shuffle_buffer={shuffle_buffer}"],
             "in-memory": model}
    jobs = [(f"{kind}/{size}", path, overrides) for kind, overrides in kinds.items() for size, path in paths.items()]
    if parallel:  # memory peaks are per process: running them side by side changes no figure, only the wall time
        procs = {name: start_peak_rss(path, steps, overrides, task) for name, path, overrides in jobs}
        return {name: finish_peak_rss(proc) for name, proc in procs.items()}
    return {name: finish_peak_rss(start_peak_rss(path, steps, overrides, task)) for name, path, overrides in jobs}


def _template(work: Path, task: str = "retrieval") -> Path:
    """A small preprocessed synthetic dataset (its schema and catalogue / tables are what the written datasets use):
    a session log through `merlin-hstu preprocess`, or (ctr) Criteo-layout rows through the Criteo workflow."""
    if task == "ranking":
        from merlin_hstu.common import schema as roles
        from merlin_hstu.data.synthetic import SyntheticConfig, generate_event_log
        from merlin_hstu.workflows import ranking_workflow as rw

        synthetic = SyntheticConfig(num_users=200, num_items=500, min_events=6, max_events=40, seed=11)
        log = generate_event_log(synthetic)
        for name in synthetic.action_names:  # bit b <- action_names[b]
            log[name] = (log[roles.LOG_ACTION] == name).astype(np.int64)
        config = rw.RankingWorkflowConfig(action_names=synthetic.action_names, num_candidates=8, max_uih_len=200,
                                          contextual_columns=(roles.LOG_USER_ID,))
        rw.preprocess_ranking(log.drop(columns=[roles.LOG_ACTION]), work / "template", config, overwrite=True)
        return work / "template"
    if task == "ctr":
        from merlin_hstu.ctr.data import SyntheticCriteoConfig, generate_synthetic_criteo, write_criteo_tsv
        from merlin_hstu.workflows.criteo_workflow import CriteoWorkflowConfig, preprocess_criteo

        frame = generate_synthetic_criteo(SyntheticCriteoConfig(num_rows=4000, seed=3, max_cardinality=2000)).frame
        preprocess_criteo(write_criteo_tsv(frame, work / "template.tsv"), work / "template",
                          CriteoWorkflowConfig(valid_fraction=0.25), overwrite=True)
        return work / "template"
    from merlin_hstu.data.synthetic import SyntheticConfig, generate_event_log
    from merlin_hstu.workflows.session_workflow import preprocess

    events = generate_event_log(SyntheticConfig(num_users=150, num_items=500, min_events=4, max_events=20, seed=5))
    preprocess(events, work / "template", overwrite=True)
    return work / "template"


def run_stream(args) -> int:
    work = Path(args.output) if args.output else Path(tempfile.mkdtemp(prefix="bench-stream-"))
    work.mkdir(parents=True, exist_ok=True)
    for name in ("x1", "x10"):
        shutil.rmtree(work / name, ignore_errors=True)
    template = Path(args.data) if args.data else _template(work, args.task)
    peaks = measure(template, work, args.users, args.events, args.row_group, args.steps, args.shuffle_buffer,
                    parallel=args.parallel, task=args.task)
    unit = "train rows" if args.task == "ctr" else f"users x {args.events} events"  # ranking: history events
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python "
          f"{platform.python_version()}; {args.task}: {args.users:,} and {10 * args.users:,} {unit}, row "
          f"groups of {args.row_group}, {args.steps} steps, shuffle buffer {args.shuffle_buffer}")
    print(f"{'path':<10} {'peak RSS 1x':>12} {'peak RSS 10x':>13} {'growth':>8}")
    record = {"task": args.task, "users": args.users, "events": args.events, "row_group": args.row_group,
              "steps": args.steps, "shuffle_buffer": args.shuffle_buffer, "peak_rss_kib": peaks, "growth": {}}
    for kind in ("streaming", "in-memory"):
        one, ten = peaks[f"{kind}/1x"], peaks[f"{kind}/10x"]
        record["growth"][kind] = ten / one - 1
        print(f"{kind:<10} {one / 1024:>9.0f} MiB {ten / 1024:>10.0f} MiB {100 * (ten / one - 1):>7.1f}%")
    out = work / "stream.json"
    write_file(out, json.dumps(record, indent=2))
    print(f"record: {out}")
    return 0


def register_subcommands(subparsers, bench_subparsers) -> None:
    p = bench_subparsers.add_parser(
        "stream", help="peak RSS of retrieval or CTR training on N and 10N rows, streaming (train.streaming) vs in "
                       "memory",
        description="Writes two processed datasets (retrieval: N and 10N random sequences of a preprocessed "
                    "template's catalogue; --task ctr: N and 10N random rows of a Criteo-workflow template's tables; "
                    "small Parquet row groups), trains --steps steps on each in a fresh process, once streaming and "
                    "once in memory, and prints each process's peak RSS (VmHWM) and the growth from 1x to 10x. "
                    "Writes OUTPUT/stream.json.")
    p.add_argument("--task", choices=("retrieval", "ranking", "ctr"), default="retrieval",
                   help="retrieval (HSTU, leave-one-out sequences), ranking (DLRM-HSTU, users with histories and "
                        "candidates) or ctr (DLRM on Criteo-workflow rows)")
    p.add_argument("--data", metavar="DIR", help="a `merlin-hstu preprocess` output (--task ctr: a preprocess_criteo "
                                                 "output) whose schema and catalogue the datasets use (default: a "
                                                 "small synthetic one, preprocessed)")
    p.add_argument("--users", type=int, default=4000, help="sequences (--task ctr: train rows) of the 1x dataset "
                                                          "(default 4000)")
    p.add_argument("--events", type=int, default=200, help="events per sequence = the max history (default 200)")
    p.add_argument("--row-group", type=int, default=64, help="rows per Parquet row group (default 64)")
    p.add_argument("--steps", type=int, default=4, help="optimizer steps per measured training (default 4)")
    p.add_argument("--shuffle-buffer", type=int, default=256, help="train.shuffle_buffer of the streaming runs")
    p.add_argument("--parallel", action="store_true", help="run the four measurements side by side")
    p.add_argument("--output", help="work directory (default: a new temporary one)")
    p.set_defaults(func=run_stream)
