"""Watchdog that stops tritonserver when the process that launched it dies, however it dies (SIGKILL included).

`TritonServer.start` runs this file by path (not `-m`: nothing of merlin_hstu, torch or Merlin is imported, so it
starts in milliseconds) in a session of its own, with the read end of a pipe whose write end only the launcher
holds (close-on-exec keeps it out of tritonserver).  The read returns end-of-file exactly when the launcher's last
copy of the write end closes: at a normal stop, or when the kernel closes a killed launcher's descriptors.  Then
the watchdog sends SIGTERM to tritonserver's process group (the server and its python-backend stubs), SIGKILL after
a grace period, and removes the server's temporary backend folder.

    python watchdog.py READ_FD SERVER_PGID TEMP_DIR [GRACE_S]

Why not PR_SET_PDEATHSIG alone: it fires when the launcher *thread* exits, it reaches only tritonserver and not
the stubs it spawned, and it cannot remove the temporary folder.
"""
import os
import shutil
import signal
import sys
import time


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def stop_group(pgid: int, grace_s: float) -> None:
    """SIGTERM to the group, then SIGKILL to whatever is left after `grace_s` seconds."""
    try:
        os.killpg(pgid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and _group_alive(pgid):
        time.sleep(0.2)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def main(argv) -> int:
    read_fd, pgid, temp_dir = int(argv[0]), int(argv[1]), argv[2]
    grace_s = float(argv[3]) if len(argv) > 3 else 20.0
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C meant for the launcher must not end the watch
    while True:
        try:
            if not os.read(read_fd, 1):  # b"": every write end is closed, the launcher is gone (or stopped us)
                break
        except InterruptedError:
            continue
        except OSError:
            break
    if _group_alive(pgid):
        stop_group(pgid, grace_s)
    shutil.rmtree(temp_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
