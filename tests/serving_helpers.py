"""Helpers of the tests that start a real tritonserver through the CLI: ports and the readiness probe."""
from __future__ import annotations

import http.client as http_client
import random
import socket
import urllib.request


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
