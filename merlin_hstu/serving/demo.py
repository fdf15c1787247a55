"""The serving part of `make demo`: export, serve, query three users through the server, stop it."""
from __future__ import annotations

import time
from pathlib import Path

import pandas as pd


def demo_serving(run_dir: Path, out_dir: Path, sample_events: pd.DataFrame, k: int = 10) -> None:
    """Export `run_dir` to `out_dir/triton_repo`, start tritonserver on free local ports, send the first three
    users of `sample_events` (raw events, the run's columns) in one request, print their top-k raw item ids,
    and stop the server (also on errors)."""
    from merlin_hstu.serving.client import ServingClient
    from merlin_hstu.serving.export import ExportConfig, export_repository
    from merlin_hstu.serving.server import ServerConfig, TritonServer

    t0 = time.perf_counter()
    repo = export_repository(run_dir, Path(out_dir) / "triton_repo", ExportConfig(top_k=k), overwrite=True)
    print(f"  exported the workflow + HSTU TorchScript + top-{k} as a Triton repository -> {repo} "
          f"({time.perf_counter() - t0:.1f} s)")
    t0 = time.perf_counter()
    with TritonServer(ServerConfig([repo], http_port=0, grpc_port=0)) as server:
        print(f"  tritonserver ready in {time.perf_counter() - t0:.1f} s: HTTP {server.http_url}, "
              f"gRPC {server.grpc_url} (pid {server.pid})")
        with ServingClient(server.http_url) as client:
            id_column = client.contract.id_column
            users = pd.unique(sample_events[id_column])[:3]
            events = sample_events[sample_events[id_column].isin(users)]
            t0 = time.perf_counter()
            recs = client.recommend(events, top_k=k)
            elapsed_ms = (time.perf_counter() - t0) * 1000
            item_column = client.contract.item_column
            for user, items in zip(recs.user_ids, recs.item_ids):
                recent = events.loc[events[id_column] == user, item_column].tolist()[-3:]
                shown = [v if isinstance(v, str) else int(v) for v in items]
                print(f"  served user {user}: recent {recent} -> top-{k} {shown}")
            print(f"  one request for {len(users)} users answered in {elapsed_ms:.0f} ms; stopping the server")
    print("  tritonserver stopped")
