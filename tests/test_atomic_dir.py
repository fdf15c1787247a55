"""Outputs appear complete or not at all: staging beside the target, one rename to publish."""
from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from merlin_hstu.common import atomic_dir
from merlin_hstu.common.atomic_dir import publish_dir, staging_dir


def test_staging_is_a_public_sibling_and_publish_creates_the_target(tmp_path):
    target = tmp_path / "deep" / "out"
    staging = staging_dir(target)
    assert staging.parent == target.parent and staging.name.startswith(".out.partial-")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(staging.stat().st_mode) == 0o777 & ~umask  # not mkdtemp's private 0700
    (staging / "a.txt").write_text("new")
    publish_dir(staging, target)
    assert (target / "a.txt").read_text() == "new" and not staging.exists()
    assert sorted(p.name for p in target.parent.iterdir()) == ["out"]


def test_publish_replaces_an_existing_target_and_leaves_no_trash(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    staging = staging_dir(target)
    (staging / "new.txt").write_text("new")
    publish_dir(staging, target)
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_failed_swap_restores_the_old_target(tmp_path, monkeypatch):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    staging = staging_dir(target)
    real_rename = os.rename

    def rename(src, dst):
        if os.fspath(src) == os.fspath(staging):
            raise OSError("disk gone")
        return real_rename(src, dst)

    monkeypatch.setattr(atomic_dir.os, "rename", rename)
    with pytest.raises(OSError, match="disk gone"):
        publish_dir(staging, target)
    assert (target / "old.txt").read_text() == "old"
    assert not list(tmp_path.glob(".out.old-*"))


def _build_once(target: str, log: str) -> None:
    import time

    from merlin_hstu.common.atomic_dir import exclusive

    with exclusive(Path(target)):
        if not Path(target).exists():
            with open(log, "a") as handle:
                handle.write("built\n")
            time.sleep(0.5)  # a slow build: without the lock every process would start one
            Path(target).mkdir()
    assert Path(target).is_dir()


def test_exclusive_lets_one_of_several_processes_build_a_cached_output(tmp_path):
    """Three processes build-if-missing the same cache entry at once (the ranks of --nproc on a cold cache): one
    builds, the others wait for the lock and find it built."""
    import multiprocessing

    target, log = tmp_path / "cache" / "entry", tmp_path / "log"
    context = multiprocessing.get_context("fork")
    procs = [context.Process(target=_build_once, args=(str(target), str(log))) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert log.read_text() == "built\n"
