"""Run a command and SIGKILL it at a chosen moment (the kill-and-resume tests)."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from typing import Callable


def sigkill_when(command: list, ready: Callable[[], bool], env: dict, timeout: float = 300.0) -> None:
    """Start `command`, poll `ready()` every 5 ms and SIGKILL the process as soon as it is true (no handler runs).
    Fails when the process ends first or `ready` stays false for `timeout` seconds."""
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + timeout
        while not ready() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.005)
        assert proc.poll() is None, "the process ended before it could be killed: " + proc.stderr.read().decode()[-2000:]
        assert ready(), f"not ready after {timeout} s"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
