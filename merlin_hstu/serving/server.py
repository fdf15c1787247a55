"""Launch the `tritonserver` binary bundled in the nvidia-pytriton wheel on a model repository.

Three things make the bundled binary serve python-backend models from this virtualenv
(merlin-integration.md §1, all verified):

* a backend directory whose `python/` holds `libtriton_python.so` *and* the stub built for this Python
  (`python_backend_stubs/3.11/triton_python_backend_stub`).  The wheel ships them apart; instead of copying
  into site-packages we symlink both into a temporary directory owned by this server;
* `LD_LIBRARY_PATH = <this Python's LIBDIR>:<site-packages>/nvidia_pytriton.libs`, or the stub binds the system
  libpython and fails with `undefined symbol` errors;
* this interpreter's `bin/` first on `PATH`: the stub resolves the environment (site-packages, merlin_hstu)
  from the `python3` it finds there.

`TritonServer` binds to 127.0.0.1 by default, waits for /v2/health/ready, forwards the server's log lines to
a callback, and stops with SIGTERM (graceful unload: ~5-25 s with these models), then SIGKILL on the whole
process group it created (its own process plus the python stubs), never anything else.  A watchdog process
(`watchdog.py`) does the same, and removes the temporary backend folder, if the launching process dies without
stopping the server (even by SIGKILL).  When the server cannot
start, `ServerStartError` says why in one paragraph (missing binary or stub, a port in use and which process holds
it, a model that failed to
load with its error lines and a hint).
"""
from __future__ import annotations

import collections
import http.client
import os
import random
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Deque, List, Optional

DEFAULT_HTTP_PORT = 8000
DEFAULT_GRPC_PORT = 8001
STOP_TIMEOUT_S = 50.0


class ServerStartError(RuntimeError):
    """tritonserver did not become ready; the message explains what is wrong and how to fix it."""


@dataclass
class ServerConfig:
    """How to run tritonserver.  Ports 0 pick free ports."""

    repositories: List[Path]
    host: str = "127.0.0.1"
    http_port: int = DEFAULT_HTTP_PORT
    grpc_port: int = DEFAULT_GRPC_PORT
    allow_metrics: bool = False
    exit_timeout_s: int = 30  # how long tritonserver waits for requests and model unloads when stopping
    startup_timeout_s: float = 240.0
    log_verbose: int = 0
    extra_args: List[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        repos = [self.repositories] if isinstance(self.repositories, (str, Path)) else self.repositories
        self.repositories = [Path(r).resolve() for r in repos]
        if not self.repositories:
            raise ValueError("ServerConfig.repositories: give at least one model repository")
        for port_name in ("http_port", "grpc_port"):
            port = getattr(self, port_name)
            if not 0 <= int(port) <= 65535:
                raise ValueError(f"ServerConfig.{port_name} must be a TCP port (0 = pick a free one), got {port}")


@dataclass(frozen=True)
class TritonInstallation:
    """Where the pytriton wheel keeps the pieces, for this interpreter."""

    root: Path  # .../site-packages/pytriton/tritonserver
    binary: Path
    python_backend: Path  # directory holding libtriton_python.so
    stub: Path
    libs: Path  # .../site-packages/nvidia_pytriton.libs

    @classmethod
    def find(cls) -> "TritonInstallation":
        try:
            import pytriton  # noqa: F401  (only its location is needed)
        except ImportError as exc:
            raise ServerStartError(
                "the nvidia-pytriton package is not installed, and it carries the tritonserver binary. "
                "Install the serving extra: pip install 'merlin-hstu[serving]' (nvidia-pytriton==0.7.0).") from exc
        import pytriton

        root = Path(pytriton.__file__).resolve().parent / "tritonserver"
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        found = cls(root=root, binary=root / "bin" / "tritonserver", python_backend=root / "backends" / "python",
                    stub=root / "python_backend_stubs" / version / "triton_python_backend_stub",
                    libs=root.parent.parent / "nvidia_pytriton.libs")
        if not found.binary.is_file() or not os.access(found.binary, os.X_OK):
            raise ServerStartError(f"the tritonserver binary is missing or not executable at {found.binary}; "
                                   "reinstall it: pip install --force-reinstall nvidia-pytriton==0.7.0")
        if not (found.python_backend / "libtriton_python.so").is_file():
            raise ServerStartError(f"the Triton python backend is missing at {found.python_backend}/libtriton_python.so; "
                                   "reinstall nvidia-pytriton==0.7.0")
        if not found.stub.is_file():
            stubs = root / "python_backend_stubs"
            have = sorted(p.name for p in stubs.glob("*")) if stubs.is_dir() else []
            raise ServerStartError(f"no Triton python-backend stub for Python {version} at {found.stub} "
                                   f"(the wheel has stubs for {have}); run merlin-hstu with one of those Python versions")
        return found


def _ephemeral_range_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def free_port(host: str = "127.0.0.1") -> int:
    """A free TCP port below the kernel's ephemeral range.  A port from that range (what binding port 0 gives)
    can be picked as the source port of our own readiness probe while the server is still starting, and the
    probe then connects to itself (TCP simultaneous open), reads its own request back and holds the port."""
    low, high = 20000, _ephemeral_range_start()
    if high - low >= 100:
        rng = random.Random()
        for _ in range(200):
            port = rng.randrange(low, high)
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                try:
                    s.bind((host, port))
                except OSError:
                    continue
                return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:  # no room below the range: any free port
        s.bind((host, 0))
        return s.getsockname()[1]


def _port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def port_holder(port: int) -> Optional[str]:
    """"pid N (command line)" of the local process listening on TCP `port`, or None if it cannot be told (Linux
    /proc only; processes of other users are not visible)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            # local_address is HEXIP:HEXPORT; state 0A = LISTEN; field 9 is the socket's inode
            if len(fields) > 9 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(f"socket:[{fields[9]}]")
    if not inodes:
        return None
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if any(os.readlink(fd) in inodes for fd in (proc / "fd").iterdir()):
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
                return f"pid {proc.name} ({cmdline[:160]})"
        except OSError:  # the process ended, or it is not ours
            continue
    return None


def _hint(line: str) -> Optional[str]:
    hints = [
        ("No module named 'merlin_hstu'", "the python-backend stub cannot import merlin_hstu: start the server with "
                                          "the Python of the environment merlin-hstu is installed in"),
        ("No module named", "the python-backend stub misses a module: start the server from the virtualenv that has "
                            "merlin-hstu[serving] installed (its bin/ must come first on PATH)"),
        ("undefined symbol", "the stub loaded a different libpython than this interpreter's: LD_LIBRARY_PATH must "
                             "start with this Python's LIBDIR (merlin-hstu serve sets it; do not override it)"),
        ("unable to find backend library", "a model asks for a backend this server does not have (only 'python' "
                                           "ships in the pytriton wheel); re-export it with merlin-hstu export"),
        ("failed to stat file", "a model directory lacks its files; re-export the repository"),
        ("Address already in use", "a port is taken: pick others with --http-port / --grpc-port"),
    ]
    for needle, text in hints:
        if needle in line:
            return text
    return None


def explain_failure(lines: List[str]) -> str:
    """Pick the lines of a failed start that say what went wrong, plus a hint for the usual causes."""
    keys = ("failed to load", "UNAVAILABLE", "Error", "error:", "Traceback", "No module named", "undefined symbol",
            "Address already in use", "failed to stat")
    picked = [line for line in lines if any(k in line for k in keys)]
    hints = [h for h in (_hint(line) for line in lines) if h]
    text = "\n".join(picked[-15:]) if picked else "\n".join(lines[-15:])
    if hints:
        text += "\nhint: " + hints[0]
    return text


class TritonServer:
    """A running tritonserver process (use as a context manager, or call start()/stop())."""

    def __init__(self, config: ServerConfig, on_log: Optional[Callable[[str], None]] = None, keep_lines: int = 2000):
        self.config = config
        self.on_log = on_log
        self.lines: Deque[str] = collections.deque(maxlen=keep_lines)
        self.process: Optional[subprocess.Popen] = None
        self._backend_dir: Optional[tempfile.TemporaryDirectory] = None
        self._watch_fd: Optional[int] = None  # write end of the watchdog's pipe (closing it releases the watchdog)
        self._watchdog: Optional[subprocess.Popen] = None
        self._reader: Optional[threading.Thread] = None

    # --- endpoints ----------------------------------------------------------------------------------
    @property
    def http_url(self) -> str:
        return f"{self.config.host}:{self.config.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"grpc://{self.config.host}:{self.config.grpc_port}"

    @property
    def pid(self) -> Optional[int]:
        return self.process.pid if self.process else None

    # --- lifecycle ----------------------------------------------------------------------------------
    def command(self, install: TritonInstallation, backend_dir: Path) -> List[str]:
        c = self.config
        cmd = [str(install.binary)]
        cmd += [f"--model-repository={r}" for r in c.repositories]
        cmd += [f"--backend-directory={backend_dir}",
                f"--http-address={c.host}", f"--http-port={c.http_port}",
                f"--grpc-address={c.host}", f"--grpc-port={c.grpc_port}",
                f"--allow-metrics={'true' if c.allow_metrics else 'false'}",
                "--exit-on-error=true", f"--exit-timeout-secs={c.exit_timeout_s}", f"--log-verbose={c.log_verbose}"]
        return cmd + list(c.extra_args)

    def environment(self, install: TritonInstallation) -> dict:
        env = dict(os.environ)
        libdir = sysconfig.get_config_var("LIBDIR") or ""
        paths = (libdir, str(install.libs), env.get("LD_LIBRARY_PATH", ""))
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in paths if p)
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        env.setdefault("PYTHONUNBUFFERED", "1")
        return env

    def _check_repositories(self) -> None:
        for repo in self.config.repositories:
            if not repo.is_dir():
                raise ServerStartError(f"model repository {repo} does not exist; create it with "
                                       "`merlin-hstu export --model RUN_DIR --output REPO`")
            if not any((p / "config.pbtxt").is_file() for p in repo.iterdir() if p.is_dir()):
                raise ServerStartError(f"{repo} holds no model (no */config.pbtxt); is it the --output of "
                                       "`merlin-hstu export`?")

    def start(self, wait: bool = True) -> "TritonServer":
        if self.process is not None:
            raise RuntimeError("this TritonServer was already started")
        install = TritonInstallation.find()
        self._check_repositories()
        c = self.config
        if c.http_port == 0:
            c.http_port = free_port(c.host)
        if c.grpc_port == 0:
            c.grpc_port = free_port(c.host)
        for flag, port in (("--http-port", c.http_port), ("--grpc-port", c.grpc_port)):
            if _port_in_use(c.host, port):
                holder = port_holder(port)
                held = f"held by {holder}" if holder else "held by a process this user cannot see"
                raise ServerStartError(f"port {port} on {c.host} is already in use ({flag}), {held}; stop it "
                                       f"(kill <pid>) or pick another port with {flag}")
        self._backend_dir = tempfile.TemporaryDirectory(prefix="merlin-hstu-triton-backends-")
        python_dir = Path(self._backend_dir.name) / "python"
        python_dir.mkdir()
        for item in install.python_backend.iterdir():
            if item.is_file():
                (python_dir / item.name).symlink_to(item)
        (python_dir / "triton_python_backend_stub").symlink_to(install.stub)
        self.process = subprocess.Popen(
            self.command(install, Path(self._backend_dir.name)), env=self.environment(install),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True, bufsize=1,
            start_new_session=True,  # its own process group: stopping it reaches the stubs, Ctrl-C does not
        )
        self._start_watchdog()
        self._reader = threading.Thread(target=self._read_log, name="tritonserver-log", daemon=True)
        self._reader.start()
        if wait:
            try:
                self.wait_ready()
            except BaseException:
                self.stop()
                raise
        return self

    def _start_watchdog(self) -> None:
        """A separate process that stops the server's group and removes its temp folder once this process is gone,
        even after SIGKILL (merlin_hstu/serving/watchdog.py says how)."""
        read_fd, self._watch_fd = os.pipe()  # both close-on-exec: tritonserver never holds the write end
        try:
            self._watchdog = subprocess.Popen(
                [sys.executable, str(Path(__file__).with_name("watchdog.py")), str(read_fd), str(self.process.pid),
                 self._backend_dir.name], pass_fds=(read_fd,), start_new_session=True,
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        finally:
            os.close(read_fd)

    def _stop_watchdog(self) -> None:
        if self._watch_fd is not None:
            os.close(self._watch_fd)  # end of file for the watchdog: it finds the group gone and exits
            self._watch_fd = None
        if self._watchdog is not None:
            try:
                self._watchdog.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
            self._watchdog = None

    def _read_log(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        for line in self.process.stdout:
            line = line.rstrip("\n")
            self.lines.append(line)
            if self.on_log is not None:
                self.on_log(line)

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as reply:
                return reply.status == 200
        except (urllib.error.URLError, http.client.HTTPException, OSError):
            # not listening yet, or a garbled answer (e.g. a probe connected to itself): not ready
            return False

    def wait_ready(self, timeout_s: Optional[float] = None, stop: Optional[threading.Event] = None) -> bool:
        """Block until /v2/health/ready answers 200 (True) or `stop` is set (False); raise ServerStartError
        if the process exits or the timeout passes."""
        deadline = time.monotonic() + (timeout_s or self.config.startup_timeout_s)
        while time.monotonic() < deadline:
            if stop is not None and stop.is_set():
                return False
            if self.process.poll() is not None:
                if self._reader is not None:
                    self._reader.join(timeout=5)
                raise ServerStartError(
                    f"tritonserver exited with code {self.process.returncode} before it was ready "
                    f"(repositories {[str(r) for r in self.config.repositories]}):\n{explain_failure(list(self.lines))}")
            if self.is_ready():
                return True
            time.sleep(0.25)
        raise ServerStartError(f"tritonserver was not ready after {timeout_s or self.config.startup_timeout_s:.0f} s; "
                               f"last log lines:\n{explain_failure(list(self.lines))}")

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> Optional[int]:
        """SIGTERM (graceful: in-flight requests finish, models unload), then SIGKILL to its process group."""
        process = self.process
        if process is None:
            return None
        if process.poll() is None:
            try:
                process.send_signal(signal.SIGTERM)
                process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                pass
        try:  # the stubs are in the server's process group; after an unclean exit they may linger
            os.killpg(process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        if self._reader is not None:
            self._reader.join(timeout=5)
        if self._backend_dir is not None:
            self._backend_dir.cleanup()
            self._backend_dir = None
        self._stop_watchdog()
        return process.returncode

    def __enter__(self) -> "TritonServer":
        if self.process is None:
            self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
