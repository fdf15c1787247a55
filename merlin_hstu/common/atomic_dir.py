"""Files and directories that appear complete or not at all: build beside the target, then rename.

Every writer of a multi-file output (preprocess outputs, run directories, model repositories) uses
`staging_dir` + `publish_dir`, so an interrupted write never leaves a half-written directory under the final
name, and a replaced output is swapped in one rename (the old one is restored if that rename fails). Every
single-file writer (bench records, plots, checkpoints, cache entries) uses `write_file`: a temporary name in the
same folder, fsync, one rename. `exclusive(target)`
lets one process build a cached output while the others (the ranks of `--nproc`, two commands sharing a cache)
wait for it and then read it.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

FileContent = Union[str, bytes, Callable[[Path], object]]


def staging_dir(target: Path) -> Path:
    """A fresh, empty directory beside `target` (same filesystem, so `publish_dir` is a rename), with the
    permissions of an ordinary directory: mkdtemp makes it private (0700), the finished output should not be."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)
    return staging


def publish_dir(staging: Path, target: Path) -> None:
    """Rename `staging` to `target`, replacing an existing `target` (moved aside first, deleted after)."""
    staging, target = Path(staging), Path(target)
    if not target.exists():
        os.rename(staging, target)
        return
    trash = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
    os.rename(target, trash)
    try:
        os.rename(staging, target)
    except BaseException:
        os.rename(trash, target)
        raise
    shutil.rmtree(trash, ignore_errors=True)


def write_file(path: Path, content: FileContent) -> Optional[Path]:
    """Write `path` so that a reader sees the old file or the whole new one, never part of it.

    `content` is text, bytes, or a writer called with a temporary path in the same folder (`path`'s suffix kept,
    so `savefig` / `to_parquet` pick the format by name). The temporary file is fsynced, then renamed over
    `path`; on any error it is removed and `path` is left as it was. A writer that creates no file (a plot
    without matplotlib) publishes nothing: the return value is then None, else `path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}{path.suffix}"
    try:
        if isinstance(content, str):
            tmp.write_text(content)
        elif isinstance(content, (bytes, bytearray)):
            tmp.write_bytes(content)
        else:
            content(tmp)
            if not tmp.exists():
                return None
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


@contextlib.contextmanager
def exclusive(target: Path) -> Iterator[None]:
    """Hold an exclusive lock on `target`'s lock file (`.<name>.lock` beside it; fcntl.flock, released when the
    holder exits or dies) for the block: build-if-missing inside it, so one process builds and the rest find the
    finished output when they get the lock."""
    import fcntl

    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
