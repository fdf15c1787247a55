"""Subcommands `export`, `serve`, `query` and `bench serve` (registered through merlin_hstu.cli.main.EXTENSION_MODULES).

Only argparse here at import time; everything heavy is imported inside the command functions.
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from pathlib import Path


def register_subcommands(subparsers, bench_subparsers) -> None:
    p = subparsers.add_parser(
        "export", help="write a Triton model repository for a trained run (raw events in, top-K raw ids out)",
        description="Export a run as a Triton model repository: the fitted NVTabular workflow, the HSTU model as "
                    "TorchScript and top-K, behind a plain ragged model (<name>) and a batched one "
                    "(<name>_batched). Serve it with `merlin-hstu serve`.")
    p.add_argument("--model", required=True, metavar="RUN_DIR", help="run directory written by `train` or `demo`")
    p.add_argument("--output", required=True, metavar="REPO", help="model repository to write")
    p.add_argument("--top-k", type=int, default=10, help="default K of a request (default: 10)")
    p.add_argument("--keep-history", action="store_true",
                   help="by default the user's own history window is excluded from the results (as in "
                        "evaluation); with this flag it is not (a request can still choose)")
    p.add_argument("--name", default="hstu_topk", help="Triton model name (default: hstu_topk)")
    p.add_argument("--instances", type=int, default=2, help="executor instances of the batched model (default: 2)")
    p.add_argument("--keep-unused-inputs", action="store_true",
                   help="run the whole workflow, also branches the model never reads (the action lists)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing repository")
    p.set_defaults(func=cmd_export)

    p = subparsers.add_parser(
        "serve", help="serve model repositories with the tritonserver bundled in nvidia-pytriton",
        description="Start tritonserver on the repositories (bound to 127.0.0.1 unless --host), wait until it is "
                    "ready, print the endpoints and forward its log. Ctrl-C / SIGTERM stops it cleanly.")
    p.add_argument("repository", nargs="+", metavar="REPO", help="model repository (output of `export`)")
    p.add_argument("--http-port", type=int, default=8000, help="HTTP port (default: 8000; 0 = any free port)")
    p.add_argument("--grpc-port", type=int, default=8001, help="gRPC port (default: 8001; 0 = any free port)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, local only)")
    p.add_argument("--allow-metrics", action="store_true", help="also serve Prometheus metrics (off by default)")
    p.add_argument("--quiet", action="store_true", help="do not forward the server's log lines")
    p.add_argument("--startup-timeout", type=float, default=240.0, help="seconds to wait for readiness (default 240)")
    p.set_defaults(func=cmd_serve)

    p = subparsers.add_parser(
        "query", help="send raw events to a running server; print top-K raw item ids per user",
        description="Read an event log (CSV/Parquet with the run's raw columns), send its users to the server "
                    "and print each user's top-K item ids and scores.")
    p.add_argument("--url", default="127.0.0.1:8000", help="server address, host:port (HTTP) or grpc://host:port")
    p.add_argument("--events", required=True, metavar="FILE", help="event log: .csv / .parquet, one row per event")
    p.add_argument("--model-name", help="model to query (default: the one merlin-hstu model on the server)")
    p.add_argument("--top-k", type=int, help="K (default: the export's)")
    p.add_argument("--query-timestamp", type=int, metavar="UNIX_S",
                   help="when the recommendation is made, for every user (default: each user's last event)")
    p.add_argument("--include-history", action="store_true", help="allow items from the user's history window")
    p.add_argument("--users", help="comma-separated user ids to send (default: all users in the file)")
    p.add_argument("--endpoint", choices=["batched", "ragged"], default="batched",
                   help="which of the two served models to call (default: batched)")
    p.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    p.set_defaults(func=cmd_query)

    p = bench_subparsers.add_parser(
        "serve", help="load test: merlin-hstu serving vs the stock merlin-systems path, side by side",
        description="Export the run twice (merlin-hstu repository and the stock merlin-systems ensemble), serve "
                    "both from one tritonserver, and drive each with the same requests in alternating rounds; "
                    "prints p50/p99 latency, QPS, errors and the p50 ratio.")
    p.add_argument("--model", required=True, metavar="RUN_DIR", help="run directory to export")
    p.add_argument("--requests", type=int, default=2000, help="requests per path (default: 2000)")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight (default: 8)")
    p.add_argument("--rounds", type=int, default=4, help="alternations between the paths (default: 4)")
    p.add_argument("--instances", type=int, default=2, help="executor instances of the batched model (default: 2)")
    p.add_argument("--keep-unused-inputs", action="store_true",
                   help="merlin-hstu also runs the workflow's action branch (as the stock path does)")
    p.add_argument("--json", metavar="FILE", help="also write the summary as JSON")
    p.set_defaults(func=cmd_bench_serve)


# --- commands ---------------------------------------------------------------------------------------
def cmd_export(args) -> int:
    from merlin_hstu.serving.export import ExportConfig, export_repository, read_serving_record

    config = ExportConfig(top_k=args.top_k, exclude_history=not args.keep_history, model_name=args.name,
                          batched_instances=args.instances, prune_unused_inputs=not args.keep_unused_inputs)
    repo = export_repository(args.model, args.output, config, overwrite=args.overwrite)
    contract = read_serving_record(repo)["contract"]
    print(f"exported {args.model} -> {repo}")
    print(f"  models: {config.model_name} (ragged requests), {config.batched_name} (batched; used by HSTUClient)")
    lists = [c for c in (contract["item_column"], contract["action_column"], contract["timestamp_column"]) if c]
    optional = ["query_timestamp", "top_k", "exclude_history"]
    if contract["action_column"] and not contract["reads_actions"]:
        lists.remove(contract["action_column"])
        optional.insert(0, f"{contract['action_column']} (checked, not read by the model)")
    print(f"  request: {contract['id_column']} + lists {lists}; optional: {', '.join(optional)}")
    print(f"  top-K: default {contract['default_k']}, at most {contract['max_k']}; "
          f"history window {contract['max_history']} events; exclude history: {contract['exclude_history']}")
    print(f"serve it with: merlin-hstu serve {repo}")
    return 0


def cmd_serve(args) -> int:
    from merlin_hstu.serving.server import ServerConfig, ServerStartError, TritonServer

    config = ServerConfig([Path(r) for r in args.repository], host=args.host, http_port=args.http_port,
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
        print(f"query it with: merlin-hstu query --url {server.http_url} --events EVENTS.csv", flush=True)
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


def cmd_query(args) -> int:
    import pandas as pd

    from merlin_hstu.serving.client import HSTUClient, ServingError
    from merlin_hstu.workflows.session_workflow import read_event_log

    if not Path(args.events).exists():
        raise FileNotFoundError(f"event file {args.events} does not exist")
    events = read_event_log(args.events)
    try:
        client = HSTUClient(args.url, model_name=args.model_name, endpoint=args.endpoint)
    except ServingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    with client:
        id_column = client.contract.id_column
        if id_column not in events.columns:
            raise ValueError(f"events have no {id_column!r} column (columns: {list(events.columns)})")
        if args.users:
            wanted = [u.strip() for u in args.users.split(",") if u.strip()]
            if pd.api.types.is_integer_dtype(events[id_column]):
                wanted = [int(u) for u in wanted]
            missing = [u for u in wanted if u not in set(events[id_column])]
            if missing:
                raise ValueError(f"--users {missing} have no events in {args.events}")
            events = events[events[id_column].isin(wanted)]
        users = pd.unique(events[id_column])
        query = {u: args.query_timestamp for u in users} if args.query_timestamp is not None else None
        try:
            recs = client.recommend(events, query_timestamps=query, top_k=args.top_k,
                                    exclude_history=False if args.include_history else None)
        except ServingError as exc:
            print(f"error: the server rejected the request: {exc}", file=sys.stderr)
            return 2
        frame = recs.to_frame(id_column)
        for user, group in frame.groupby(id_column, sort=False):
            if args.json:
                print(json.dumps({id_column: _plain(user), "item_ids": [_plain(v) for v in group["item_id"]],
                                  "scores": [round(float(v), 6) for v in group["score"]]}))
            else:
                items = ", ".join(f"{_plain(i)} ({s:.3f})" for i, s in zip(group["item_id"], group["score"]))
                print(f"{id_column} {_plain(user)}: {items}")
    return 0


def _plain(value):
    return value.item() if hasattr(value, "item") else value


def cmd_bench_serve(args) -> int:
    from merlin_hstu.serving.bench import BenchConfig, bench_serve, format_summary

    config = BenchConfig(requests=args.requests, concurrency=args.concurrency, rounds=args.rounds,
                         batched_instances=args.instances, prune_unused_inputs=not args.keep_unused_inputs)
    summary = bench_serve(args.model, config)
    print(format_summary(summary))
    if args.json:
        Path(args.json).write_text(json.dumps({"config": vars(config), "summary": summary}, indent=2))
    failed = sum(summary[name]["errors"] for name in ("merlin-hstu", "merlin-hstu ragged", "stock"))
    return 1 if failed else 0
