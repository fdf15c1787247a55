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


def test_write_file_text_bytes_and_writer_keep_the_suffix_and_leave_no_temp(tmp_path):
    from merlin_hstu.common.atomic_dir import write_file

    assert write_file(tmp_path / "sub" / "a.json", '{"x": 1}') == tmp_path / "sub" / "a.json"
    assert (tmp_path / "sub" / "a.json").read_text() == '{"x": 1}'
    write_file(tmp_path / "b.bin", b"\x00\x01")
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    seen = []

    def writer(tmp):
        seen.append(tmp)
        tmp.write_text("from the writer")

    write_file(tmp_path / "c.png", writer)
    assert seen[0].suffix == ".png" and seen[0].parent == tmp_path  # savefig picks its format by the suffix
    assert (tmp_path / "c.png").read_text() == "from the writer"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.bin", "c.png", "sub"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((tmp_path / "c.png").stat().st_mode) == 0o666 & ~umask  # an ordinary file, not 0600


def test_write_file_failure_keeps_the_old_file_and_a_writer_that_writes_nothing_publishes_nothing(tmp_path):
    from merlin_hstu.common.atomic_dir import write_file

    target = tmp_path / "bench.json"
    target.write_text("old")

    def half_then_crash(tmp):
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError, match="killed mid-write"):
        write_file(target, half_then_crash)
    assert target.read_text() == "old"
    assert write_file(tmp_path / "plot.png", lambda tmp: None) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench.json"]
