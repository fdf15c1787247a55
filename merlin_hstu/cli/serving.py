"""Subcommands `export`, `serve`, `query` and `bench serve` (registered through merlin_hstu.cli.main.EXTENSION_MODULES),
for runs of every task (retrieval, ranking, CTR):

    merlin-hstu export --run runs/rank --output runs/rank_repo       # the task is read from the run
    merlin-hstu serve --repo runs/rank_repo                           # any number of repositories, any tasks
    merlin-hstu query --request requests.json                         # the task is read from the served model

Only argparse here at import time; everything heavy is imported inside the command functions.
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from pathlib import Path

from merlin_hstu.sid import SID_TASK  # light: merlin_hstu.sid loads its modules lazily

TASKS = ("retrieval", "ranking", "ctr")
RETRIEVAL_EXPORT_FLAGS = {"top_k": "--top-k", "keep_history": "--keep-history",
                          "keep_unused_inputs": "--keep-unused-inputs", "entry_instances": "--entry-instances"}
RETRIEVAL_QUERY_FLAGS = {"top_k": "--top-k", "query_timestamp": "--query-timestamp",
                         "include_history": "--include-history", "users": "--users"}


def register_subcommands(subparsers, bench_subparsers) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    p = subparsers.add_parser(
        "export", help="write a Triton model repository for a trained run of any task (retrieval, ranking, ctr)",
        formatter_class=fmt,
        description="Export a run directory (written by `merlin-hstu train`) as a Triton model repository: the\n"
                    "fitted NVTabular workflow of its dataset and the model as TorchScript, behind python-backend\n"
                    "models that validate every request against the export's request contract. The task is read\n"
                    "from the run. Serve the repository with `merlin-hstu serve --repo REPO`, query it with\n"
                    "`merlin-hstu query`.",
        epilog="what each task's repository serves:\n"
               "  retrieval  raw events per user -> top-K raw item ids + scores; models <name> (Merlin ragged) and\n"
               "             <name>_batched (behind Triton's dynamic batcher; what `query` uses). Default name hstu_topk.\n"
               "  ranking    per user: history items/actions/timestamps, candidate items, contextual values ->\n"
               "             one score per candidate and task. Default name hstu_ranking.\n"
               "  ctr        rows of raw Criteo columns (I1..I13, C1..C26) -> click probability per row. Default name ctr.\n"
               "  sid        (semantic-ID runs, `bench sid`) a retrieval repository: raw events per user -> the decoder's\n"
               "             trie-constrained beam search -> top-K raw item ids + scores (served like retrieval; `query`\n"
               "             as for retrieval). Default name sid_topk. Not --format onnx, not --keep-unused-inputs.\n"
               "Runs on raw item ids (no Categorify, e.g. `preprocess --dataset ml-1m-prefix`) export too: their requests\n"
               "carry the raw ids, which are the model's ids.")
    p.add_argument("--run", "--model", dest="run", required=True, metavar="RUN",
                   help="run directory written by `train` or `demo` (--model: the old spelling)")
    p.add_argument("--output", required=True, metavar="REPO", help="model repository to write")
    p.add_argument("--task", choices=(*TASKS, SID_TASK),
                   help="check that the run is of this task (default: whatever it is)")
    p.add_argument("--data", metavar="DIR",
                   help="the dataset directory the run was trained on, when the run does not record it or it moved "
                        "(its fitted workflow/ is exported)")
    p.add_argument("--name", help="public Triton model name (default: hstu_topk | hstu_ranking | ctr)")
    p.add_argument("--instances", type=int, default=2,
                   help="instances of the model that runs the graph (retrieval: the batched model; default: 2)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing repository")
    p.add_argument("--format", choices=["triton", "onnx"], default="triton",
                   help="triton (default): a Triton model repository (workflow + TorchScript, what `serve` loads); "
                        "onnx: the model graphs as .onnx files checked with onnxruntime, plus the fitted workflow "
                        "and onnx.json (docs/onnx.md)")
    g = p.add_argument_group("retrieval runs only")
    g.add_argument("--top-k", type=int, help="default K of a request (default: 10)")
    g.add_argument("--keep-history", action="store_true",
                   help="by default the user's own history window is excluded from the results (as in "
                        "evaluation); with this flag it is not (a request can still choose)")
    g.add_argument("--entry-instances", type=int, help="instances of the plain ragged model (default: 8)")
    g.add_argument("--keep-unused-inputs", action="store_true",
                   help="run the whole workflow, also branches the model never reads (the action lists)")
    g = p.add_argument_group("semantic-ID runs only (they also take the retrieval options but --keep-unused-inputs)")
    g.add_argument("--beam-width", type=int, metavar="W",
                   help="beams kept per level by the served search (default: max(the run's decode.beam_width, "
                        "top-K + history window)); a request may ask for up to W - history window items")
    p.set_defaults(func=cmd_export)

    p = subparsers.add_parser(
        "serve", help="serve model repositories (any tasks) with the tritonserver bundled in nvidia-pytriton",
        description="Start tritonserver on the repositories (bound to 127.0.0.1 unless --host), wait until it is "
                    "ready, print the endpoints and forward its log. Ctrl-C / SIGTERM stops it cleanly. One server "
                    "may hold repositories of several tasks; `query --model-name` then picks one.")
    p.add_argument("repository", nargs="*", metavar="REPO", help="model repository (output of `export`)")
    p.add_argument("--repo", action="append", default=[], metavar="REPO",
                   help="model repository (output of `export`); repeat for several (same as the positional REPO)")
    p.add_argument("--http-port", type=int, default=8000, help="HTTP port (default: 8000; 0 = any free port)")
    p.add_argument("--grpc-port", type=int, default=8001, help="gRPC port (default: 8001; 0 = any free port)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, local only)")
    p.add_argument("--allow-metrics", action="store_true", help="also serve Prometheus metrics (off by default)")
    p.add_argument("--quiet", action="store_true", help="do not forward the server's log lines")
    p.add_argument("--startup-timeout", type=float, default=240.0, help="seconds to wait for readiness (default 240)")
    p.set_defaults(func=cmd_serve)

    p = subparsers.add_parser(
        "query", help="send a request file to a running server; print what it answers (any task)",
        formatter_class=fmt,
        description="Read a request file, check it against the served model's request contract, send it and\n"
                    "print the answer. The task and the contract are read from the server.",
        epilog="request files:\n"
               "  retrieval  an event log (.csv / .parquet), one row per event with the run's raw columns;\n"
               "             prints each user's top-K raw item ids and scores\n"
               "  ranking    .json (a list of objects, or {\"requests\": [...]}), .jsonl, or .parquet (one row per\n"
               "             user), each with history_item_ids, history_actions, history_timestamps,\n"
               "             candidate_item_ids, optional query_timestamp, and the contextual features (as\n"
               "             \"contextual\": {...} or as fields of their own); prints one score per candidate and task\n"
               "  ctr        .json (a list of row objects, or {column: [values]}), .jsonl or .parquet with the raw\n"
               "             columns I1..I13 (empty / null = missing) and C1..C26; prints one probability per row")
    p.add_argument("--url", default="127.0.0.1:8000", help="server address, host:port (HTTP) or grpc://host:port")
    p.add_argument("--request", "--events", dest="request", required=True, metavar="FILE",
                   help="the request file (see below; --events: the old spelling, for retrieval event logs)")
    p.add_argument("--model-name", help="model to query (default: the one merlin-hstu model on the server)")
    p.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    g = p.add_argument_group("retrieval models only")
    g.add_argument("--top-k", type=int, help="K (default: the export's)")
    g.add_argument("--query-timestamp", type=int, metavar="UNIX_S",
                   help="when the recommendation is made, for every user (default: each user's last event)")
    g.add_argument("--include-history", action="store_true", help="allow items from the user's history window")
    g.add_argument("--users", help="comma-separated user ids to send (default: all users in the file)")
    g.add_argument("--endpoint", choices=["batched", "ragged"], default="batched",
                   help="which of the two served models to call (default: batched)")
    p.set_defaults(func=cmd_query)

    p = bench_subparsers.add_parser(
        "serve", help="load test: merlin-hstu serving vs the stock merlin-systems path, side by side (retrieval)",
        description="Export the retrieval run twice (merlin-hstu repository and the stock merlin-systems ensemble), "
                    "serve both from one tritonserver, and drive each with the same requests in alternating rounds; "
                    "prints p50/p99 latency, QPS, errors and the p50 ratio.  With --t4r, models trained with "
                    "transformers4rec's tr.Trainer (--task: retrieval = the demo preset's HSTU, ranking = "
                    "DLRM-HSTU, ctr = WuKong, or all) are exported by export_t4r_model as the stock merlin-systems "
                    "ensemble and as our endpoint, served by one tritonserver and timed with the same raw-id "
                    "requests: one table task x path with p50/p95/p99, QPS and ours/stock.  The defaults "
                    "(synthetic data, 1 epoch, 2000 requests per path) take a few minutes per task on 2 cores; "
                    "--task all about 5-10 minutes.")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", "--model", dest="run", metavar="RUN", help="retrieval run to export")
    source.add_argument("--t4r", action="store_true",
                        help="train a retrieval model with tr.Trainer (demo preset's HSTU) and export it both ways")
    g = p.add_argument_group("--t4r only")
    g.add_argument("--data", metavar="DIR",
                   help="session-workflow output to train on (merlin-hstu preprocess; default: a synthetic log)")
    g.add_argument("--epochs", type=int, default=1, help="tr.Trainer epochs (default: 1)")
    g.add_argument("--task", choices=["retrieval", "ranking", "ctr", "all"], default="retrieval",
                   help="which task's T4R model to train, export both ways and time (default: retrieval)")
    g.add_argument("--users", type=int, default=2000,
                   help="users of the synthetic logs (retrieval without --data, ranking; default: 2000)")
    g.add_argument("--ctr-rows", type=int, default=4000, help="synthetic Criteo lines for ctr (default: 4000)")
    p.add_argument("--requests", type=int, default=2000, help="requests per path (default: 2000)")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight (default: 8)")
    p.add_argument("--rounds", type=int, default=4, help="alternations between the paths (default: 4)")
    p.add_argument("--warmup", type=int, default=40, help="untimed requests per path first (default: 40)")
    p.add_argument("--instances", type=int, default=2, help="executor instances of the batched model (default: 2)")
    p.add_argument("--keep-unused-inputs", action="store_true",
                   help="merlin-hstu also runs the workflow's action branch (as the stock path does)")
    p.add_argument("--json", metavar="FILE", help="also write the summary as JSON")
    p.set_defaults(func=cmd_bench_serve)


# --- export -----------------------------------------------------------------------------------------
def cmd_export(args) -> int:
    from merlin_hstu.serving.repository import ExportConfig, export_run, read_serving_record
    from merlin_hstu.sid.train import is_sid_run
    from merlin_hstu.train.run_dir import run_task

    task = SID_TASK if is_sid_run(args.run) else run_task(args.run)
    if args.task and args.task != task:
        raise ValueError(f"{args.run} is a {task} run, not a {args.task} run; drop --task or pass a {args.task} run")
    if task == SID_TASK:
        return _export_sid(args)
    if args.beam_width is not None:
        raise ValueError(f"--beam-width applies to semantic-ID runs only; {args.run} is a {task} run")
    if task != "retrieval":
        given = [flag for dest, flag in RETRIEVAL_EXPORT_FLAGS.items() if getattr(args, dest) not in (None, False)]
        if given:
            raise ValueError(f"{', '.join(given)} apply to retrieval runs only; {args.run} is a {task} run")
    if args.format == "onnx":
        return _export_onnx(args, task)
    retrieval = {k: v for k, v in (("top_k", args.top_k), ("entry_instances", args.entry_instances)) if v is not None}
    config = ExportConfig(model_name=args.name, instances=args.instances, exclude_history=not args.keep_history,
                          prune_unused_inputs=not args.keep_unused_inputs, **retrieval)
    repo = export_run(args.run, args.output, config, task=task, data=args.data, overwrite=args.overwrite)
    record = read_serving_record(repo)
    contract = record["contract"]
    print(f"exported the {task} run {args.run} -> {repo}")
    print(f"  models: {', '.join(record['models'])}")
    if task == "retrieval":
        lists = [c for c in (contract["item_column"], contract["action_column"], contract["timestamp_column"]) if c]
        optional = ["query_timestamp", "top_k", "exclude_history"]
        if contract["action_column"] and not contract["reads_actions"]:
            lists.remove(contract["action_column"])
            optional.insert(0, f"{contract['action_column']} (checked, not read by the model)")
        print(f"  request: {contract['id_column']} + lists {lists}; optional: {', '.join(optional)}")
        print(f"  top-K: default {contract['default_k']}, at most {contract['max_k']}; "
              f"history window {contract['max_history']} events; exclude history: {contract['exclude_history']}")
        if contract.get("item_encoding") == "raw":
            print(f"  item ids: raw (no Categorify): requests carry the model's ids, 1..{contract['max_item_id']}")
    elif task == "ranking":
        print(f"  request per user: history_item_id / history_action / history_timestamp lists, candidate_item_id "
              f"list, optional query_timestamp, contextual {list(contract['contextual'])}")
        print(f"  scores per candidate: {[name for name, _ in contract['tasks']]}; history window "
              f"{contract['max_uih_len']} events, sequence limit {contract['max_seq_len']} tokens")
    else:
        print(f"  request per row: {len(contract['integer_columns'])} integer columns "
              f"({contract['integer_columns'][0]}..), {len(contract['categorical_columns'])} categorical "
              f"({contract['categorical_columns'][0]}..); answer: {contract['output']}")
    print(f"serve it with: merlin-hstu serve --repo {repo}")
    return 0


def _export_sid(args) -> int:
    """A semantic-ID run: a retrieval repository around its beam search (merlin_hstu.serving.sid)."""
    from merlin_hstu.serving.repository import ExportConfig, export_run, read_serving_record

    if args.format == "onnx":
        raise ValueError(f"--format onnx: {args.run} is a semantic-ID run, whose served program is a trie-constrained "
                         "beam search (a loop over codebook levels that re-runs the decoder on a data-dependent beam "
                         "list); only its TorchScript export is built: drop --format onnx")
    retrieval = {k: v for k, v in (("top_k", args.top_k), ("entry_instances", args.entry_instances)) if v is not None}
    config = ExportConfig(model_name=args.name, instances=args.instances, exclude_history=not args.keep_history,
                          prune_unused_inputs=not args.keep_unused_inputs, **retrieval)
    repo = export_run(args.run, args.output, config, task=SID_TASK, data=args.data, overwrite=args.overwrite,
                      beam_width=args.beam_width)
    record = read_serving_record(repo)
    contract = record["contract"]
    print(f"exported the semantic-ID run {args.run} -> {repo}")
    print(f"  models: {', '.join(record['models'])}")
    lists = [c for c in (contract["item_column"], contract["timestamp_column"]) if c]
    print(f"  request: {contract['id_column']} + lists {lists}; optional: query_timestamp, top_k, exclude_history")
    print(f"  beam width {record['beam_width']}: top-K default {contract['default_k']}, at most {contract['max_k']}; "
          f"history window {contract['max_history']} items; exclude history: {contract['exclude_history']}")
    print(f"serve it with: merlin-hstu serve --repo {repo}")
    return 0


def _export_onnx(args, task: str) -> int:
    from merlin_hstu.serving.onnx_export import export_onnx_run

    triton_only = {"--top-k": args.top_k, "--keep-history": args.keep_history,
                   "--keep-unused-inputs": args.keep_unused_inputs, "--entry-instances": args.entry_instances,
                   "--name": args.name}
    given = [flag for flag, value in triton_only.items() if value not in (None, False)]
    if given:
        raise ValueError(f"{', '.join(given)} configure a Triton repository; drop them with --format onnx")
    out = export_onnx_run(args.run, args.output, data=args.data, overwrite=args.overwrite)
    manifest = json.loads((out / "onnx.json").read_text())
    print(f"exported the {task} run {args.run} as ONNX -> {out}")
    for name, graph in manifest["graphs"].items():
        inputs = ", ".join(f"{i['name']} {i['dtype']}{i['shape']}" for i in graph["inputs"])
        outputs = ", ".join(f"{o['name']} {o['dtype']}{o['shape']}" for o in graph["outputs"])
        print(f"  {graph['file']}: {inputs} -> {outputs}; onnxruntime == PyTorch to "
              f"{graph['max_abs_diff_vs_pytorch']:.1e}")
    if manifest.get("workflow"):
        print("  workflow/: the fitted NVTabular workflow (raw rows -> the graphs' encoded inputs)")
    return 0


# --- serve ------------------------------------------------------------------------------------------
def cmd_serve(args) -> int:
    from merlin_hstu.serving.server import ServerConfig, ServerStartError, TritonServer

    repos = [*args.repository, *args.repo]
    if not repos:
        raise ValueError("name at least one model repository: merlin-hstu serve --repo REPO")
    config = ServerConfig([Path(r) for r in repos], host=args.host, http_port=args.http_port,
                          grpc_port=args.grpc_port, allow_metrics=args.allow_metrics,
                          startup_timeout_s=args.startup_timeout)
    forward = None if args.quiet else (lambda line: print(f"[tritonserver] {line}", file=sys.stderr, flush=True))
    server = TritonServer(config, on_log=forward)
    stop = threading.Event()

    def on_signal(signum, _frame) -> None:
        print(f"received {signal.Signals(signum).name}: stopping tritonserver (models unload, up to ~30 s)",
              flush=True)
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            server.start(wait=False)
            print(f"tritonserver pid {server.pid}; loading {', '.join(str(r) for r in config.repositories)}",
                  flush=True)
            if not server.wait_ready(stop=stop):
                return 0
        except ServerStartError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(f"ready: HTTP http://{server.http_url}  gRPC {server.grpc_url}  (pid {server.pid})", flush=True)
        print(f"query it with: merlin-hstu query --url {server.http_url} --request FILE", flush=True)
        while not stop.is_set():
            if server.process.poll() is not None:
                print(f"error: tritonserver exited unexpectedly with code {server.process.returncode}",
                      file=sys.stderr)
                return 1
            stop.wait(0.5)
        return 0
    finally:
        code = server.stop()
        if code is not None:
            print(f"stopped (tritonserver exit code {code})", flush=True)
        if code and any("Exit timeout expired" in line for line in server.lines):
            print("note: tritonserver's exit timeout expired: it waits for clients to close their HTTP "
                  "connections and for models to unload; close clients before stopping the server", flush=True)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# --- query ------------------------------------------------------------------------------------------
def cmd_query(args) -> int:
    from merlin_hstu.serving.client import ServingClient, ServingError
    from merlin_hstu.serving.contract import BadRequest

    if not Path(args.request).exists():
        raise FileNotFoundError(f"request file {args.request} does not exist")
    try:
        client = ServingClient(args.url, model_name=args.model_name, endpoint=args.endpoint)
    except ServingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    with client:
        if client.task != "retrieval":
            given = [flag for dest, flag in RETRIEVAL_QUERY_FLAGS.items() if getattr(args, dest) not in (None, False)]
            if given:
                raise ValueError(f"{', '.join(given)} apply to retrieval models only; {client.model_name!r} is a "
                                 f"{client.task} model")
        try:
            if client.task == "retrieval":
                _query_retrieval(client, args)
            elif client.task == "ranking":
                _query_ranking(client, args)
            else:
                _query_ctr(client, args)
        except BadRequest as exc:
            print(f"error: bad request: {exc}", file=sys.stderr)
            return 2
        except ServingError as exc:
            print(f"error: the server rejected the request: {exc}", file=sys.stderr)
            return 2
    return 0


def _query_retrieval(client, args) -> None:
    import pandas as pd

    from merlin_hstu.common import schema as roles
    from merlin_hstu.workflows.session_workflow import read_event_log

    events = read_event_log(args.request)
    id_column = client.contract.id_column
    if id_column not in events.columns:
        raise ValueError(f"events have no {id_column!r} column (columns: {list(events.columns)})")
    if args.users:
        wanted = [u.strip() for u in args.users.split(",") if u.strip()]
        if pd.api.types.is_integer_dtype(events[id_column]):
            wanted = [int(u) for u in wanted]
        missing = [u for u in wanted if u not in set(events[id_column])]
        if missing:
            raise ValueError(f"--users {missing} have no events in {args.request}")
        events = events[events[id_column].isin(wanted)]
    users = pd.unique(events[id_column])
    query = {u: args.query_timestamp for u in users} if args.query_timestamp is not None else None
    recs = client.recommend(events, query_timestamps=query, top_k=args.top_k,
                            exclude_history=False if args.include_history else None)
    frame = recs.to_frame(id_column)
    for user, group in frame.groupby(id_column, sort=False):
        items = group[roles.RECOMMENDED_ITEM_ID]
        if args.json:
            print(json.dumps({id_column: _plain(user), "item_ids": [_plain(v) for v in items],
                              "scores": [round(float(v), 6) for v in group["score"]]}))
        else:
            items = ", ".join(f"{_plain(i)} ({s:.3f})" for i, s in zip(items, group["score"]))
            print(f"{id_column} {_plain(user)}: {items}")


def _query_ranking(client, args) -> None:
    requests = read_ranking_requests(args.request, list(client.contract.contextual))
    scores = client.predict(requests)
    tasks = client.contract.task_names
    for b, request in enumerate(requests):
        mine = scores.user(b)
        if args.json:
            print(json.dumps({"request": b, "candidate_item_ids": [_plain(v) for v in request.candidate_item_ids],
                              "scores": {t: [float(v) for v in mine[t]] for t in tasks}}))
            continue
        print(f"request {b}: {len(request.candidate_item_ids)} candidate(s)")
        for c, item in enumerate(request.candidate_item_ids):
            print(f"  {_plain(item)!s:>12}  " + "  ".join(f"{t} {float(mine[t][c]):.6f}" for t in tasks))


def _query_ctr(client, args) -> None:
    from merlin_hstu.serving.ctr_contract import CTRRequest

    probabilities = client.predict(CTRRequest(read_table(args.request)))
    output = client.contract.output
    for row, p in enumerate(probabilities):
        print(json.dumps({"row": row, output: float(p)}) if args.json else f"row {row}: {output} {float(p):.6f}")


# --- request files ----------------------------------------------------------------------------------
def read_table(path: str | Path):
    """A .json (list of row objects, {column: [values]}, or {"requests"/"rows": [...]}), .jsonl or .parquet file
    as a DataFrame."""
    import pandas as pd

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return pd.read_parquet(path)
    if suffix == ".jsonl":
        return pd.DataFrame([json.loads(line) for line in path.read_text().splitlines() if line.strip()])
    if suffix == ".json":
        data = json.loads(path.read_text())
        if isinstance(data, dict) and len(data) == 1 and next(iter(data)) in ("requests", "rows"):
            data = next(iter(data.values()))
        return pd.DataFrame(data)
    raise ValueError(f"{path}: request files are .json, .jsonl or .parquet, got {suffix or 'no suffix'!r}")


RANKING_FIELDS = ("history_item_ids", "history_actions", "history_timestamps", "candidate_item_ids")


def read_ranking_requests(path: str | Path, contextual: list) -> list:
    """One RankingRequest per row of a request file (see `merlin-hstu query --help`)."""
    import numpy as np

    from merlin_hstu.serving.contract import BadRequest
    from merlin_hstu.serving.ranking_contract import RankingRequest

    frame = read_table(path)
    missing = [f for f in RANKING_FIELDS if f not in frame.columns]
    if missing:
        raise BadRequest(f"{path}: ranking requests need the field(s) {missing} (one row / object per user)")
    known = {*RANKING_FIELDS, "query_timestamp", "contextual", *contextual}
    unknown = sorted(set(frame.columns) - known)
    if unknown:
        raise BadRequest(f"{path}: unknown field(s) {unknown}; a ranking request has {list(RANKING_FIELDS)}, "
                         f"query_timestamp and the contextual features {contextual}")

    def plain(value):
        if value is None or (isinstance(value, float) and value != value):
            return None
        return value.item() if isinstance(value, np.generic) else value

    requests = []
    for row in frame.to_dict("records"):
        context = dict(row.get("contextual") or {}) if isinstance(row.get("contextual"), dict) else {}
        for f in contextual:  # a field of its own wins, unless this row lacks it (pandas fills it with NaN)
            if f in row and not (plain(row[f]) is None and f in context):
                context[f] = plain(row[f])
        query = plain(row.get("query_timestamp"))
        requests.append(RankingRequest(*[[plain(v) for v in row[f]] for f in RANKING_FIELDS],
                                       contextual={k: plain(v) for k, v in context.items()},
                                       query_timestamp=None if query is None else int(query)))
    return requests


def _plain(value):
    return value.item() if hasattr(value, "item") else value


# --- bench serve ------------------------------------------------------------------------------------
def cmd_bench_serve(args) -> int:
    from merlin_hstu.bench.serving import BenchConfig, bench_serve, format_summary

    config = BenchConfig(requests=args.requests, concurrency=args.concurrency, rounds=args.rounds, warmup=args.warmup,
                         instances=args.instances, prune_unused_inputs=not args.keep_unused_inputs)
    if args.t4r:
        from merlin_hstu.bench.serving import TASKS, T4RTaskData, bench_t4r_tasks, format_task_table

        tasks = list(TASKS) if args.task == "all" else [args.task]
        if args.data and "retrieval" not in tasks:
            print(f"error: --data is the retrieval task's session-workflow output; --task {args.task} trains on "
                  "synthetic data (drop --data or use --task retrieval / all)", file=sys.stderr)
            return 2
        spec = T4RTaskData(data=args.data, users=args.users, ctr_rows=args.ctr_rows, epochs=args.epochs)
        result = bench_t4r_tasks(tasks, config, spec)
        print(format_task_table(result))
        if args.json:
            staged = Path(args.json).with_name(Path(args.json).name + ".partial")
            staged.write_text(json.dumps({"config": vars(config), "data": vars(spec), **result}, indent=2))
            staged.replace(args.json)
        return 1 if any(s["errors"] for paths in result["tasks"].values() for s in paths.values()) else 0
    else:
        if args.data:
            print("error: --data goes with --t4r (a run records the data it was trained on)", file=sys.stderr)
            return 2
        if args.task != "retrieval":
            print("error: --task goes with --t4r (a run is of one task: bench serve --run times retrieval runs)",
                  file=sys.stderr)
            return 2
        summary = bench_serve(args.run, config)
    print(format_summary(summary))
    if args.json:
        Path(args.json).write_text(json.dumps({"config": vars(config), "summary": summary}, indent=2))
    failed = sum(summary[name]["errors"] for name in ("merlin-hstu", "merlin-hstu ragged", "stock"))
    return 1 if failed else 0
