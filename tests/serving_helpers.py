"""Helpers of the tests that start a real tritonserver through the CLI: ports and the readiness probe."""
from __future__ import annotations

import contextlib
import http.client as http_client
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest


def free_port(used=()) -> int:
    while True:
        port = random.randint(18000, 32000)  # below the ephemeral range (server.free_port says why)
        if port in used:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port


def http_ready(http: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://{http}/v2/health/ready", timeout=2) as reply:
            return reply.status == 200
    except (OSError, http_client.HTTPException):
        return False


@contextlib.contextmanager
def cli_server(serve_args, log_path: Path):
    """`merlin-hstu serve SERVE_ARGS` as a subprocess on free ports; yields {"proc", "http", "grpc", "log",
    "triton_pid"} once /v2/health/ready answers; stops it by PID (SIGTERM, then SIGKILL of tritonserver's group)."""
    http = free_port()
    grpc = free_port({http})
    out = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-m", "merlin_hstu.cli.main", "serve", *map(str, serve_args),
                             "--http-port", str(http), "--grpc-port", str(grpc)],
                            stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    handle = {"proc": proc, "http": f"127.0.0.1:{http}", "grpc": f"grpc://127.0.0.1:{grpc}", "log": log_path}
    try:
        deadline = time.monotonic() + 240
        while not http_ready(handle["http"]):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"merlin-hstu serve did not become ready:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        handle["triton_pid"] = int(log_path.read_text().split("tritonserver pid ")[1].split(";")[0])
        yield handle
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        try:  # never leave a tritonserver behind, even if the CLI died
            os.killpg(handle.get("triton_pid", -1), signal.SIGKILL)
        except (ProcessLookupError, PermissionError, OSError):
            pass
        out.close()
