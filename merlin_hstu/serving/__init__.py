"""Serving: export a trained run of any task as a Triton model repository, serve it with the bundled tritonserver,
query it with one client.

    from merlin_hstu.serving import export_run, TritonServer, ServerConfig, ServingClient, RetrievalRequest
    repo = export_run("runs/demo/run", "runs/demo/triton_repo")        # retrieval, ranking or CTR: read from the run
    with TritonServer(ServerConfig([repo])) as server, ServingClient(server.http_url) as client:
        recs = client.predict(RetrievalRequest(events))                 # RankingRequest(s) / CTRRequest likewise

A model trained with transformers4rec's `tr.Trainer` exports with `export_t4r_model(model, data_dir, REPO,
mode="merlin-hstu" | "stock")` (merlin_hstu.serving.t4r_export).

Names are loaded lazily, so `import merlin_hstu.serving` stays cheap (the Triton entry model imports only
`merlin_hstu.serving.contract`).  See docs/serving.md.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "ExportConfig": "repository",
    "export_run": "repository",
    "write_repository": "repository",
    "read_serving_record": "repository",
    "open_repository": "repository",
    "export_repository": "export",
    "export_ranking_ensemble": "ranking",
    "export_ctr_ensemble": "ctr",
    "export_t4r_model": "t4r_export",
    "ServerConfig": "server",
    "TritonServer": "server",
    "ServerStartError": "server",
    "ServingClient": "client",
    "HSTUClient": "client",
    "ServingError": "client",
    "request_from_events": "contract",
    "Recommendations": "contract",
    "RetrievalRequest": "contract",
    "RequestContract": "contract",
    "ServingContract": "contract",
    "contract_from_dict": "contract",
    "BadRequest": "contract",
    "RankingContract": "ranking_contract",
    "RankingRequest": "ranking_contract",
    "RankingScores": "ranking_contract",
    "CTRContract": "ctr_contract",
    "CTRRequest": "ctr_contract",
    "ServingEnsemble": "core",
    "demo_serving": "demo",
    "bench_serve": "bench",
    "BenchConfig": "bench",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"merlin_hstu.serving.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'merlin_hstu.serving' has no attribute {name!r}")
