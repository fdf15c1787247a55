"""Serving: export a trained run as a Triton model repository and serve it with the bundled tritonserver.

    from merlin_hstu.serving import export_repository, TritonServer, ServerConfig, HSTUClient
    repo = export_repository("runs/demo/run", "runs/demo/triton_repo")
    with TritonServer(ServerConfig([repo])) as server:
        recs = HSTUClient(server.http_url).recommend(events)

Names are loaded lazily, so `import merlin_hstu.serving` stays cheap (the Triton entry model imports only
`merlin_hstu.serving.contract`).  See docs/serving.md.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "ExportConfig": "export",
    "export_repository": "export",
    "ServerConfig": "server",
    "TritonServer": "server",
    "ServerStartError": "server",
    "HSTUClient": "client",
    "Recommendations": "client",
    "ServingError": "client",
    "request_from_events": "client",
    "RequestContract": "contract",
    "BadRequest": "contract",
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
