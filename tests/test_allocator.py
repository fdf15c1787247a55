"""The console script restarts under tuned glibc malloc settings unless told not to (merlin_hstu/common/allocator.py)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from merlin_hstu.common import allocator
from merlin_hstu.common.allocator import TUNABLES, describe, tuned_environment

GLIBC_OK = allocator._glibc_version() is not None and allocator._glibc_version() >= (2, 35)


@pytest.mark.skipif(not GLIBC_OK, reason="needs glibc >= 2.35")
def test_tuned_environment_adds_the_malloc_tunables_and_keeps_the_rest():
    env = tuned_environment({"PATH": "/bin"})
    assert env == {"PATH": "/bin", "GLIBC_TUNABLES": TUNABLES}
    env = tuned_environment({"GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX512F"})
    assert env["GLIBC_TUNABLES"] == "glibc.cpu.hwcaps=-AVX512F:" + TUNABLES
    assert describe(env) == "glibc tunables hugetlb=1, mmap_threshold=16777216"


def test_user_choices_are_respected():
    assert tuned_environment({"MERLIN_HSTU_MALLOC": "default"}) is None
    assert tuned_environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}) is None  # the user's malloc settings
    assert describe({}) == "glibc defaults"


@pytest.mark.skipif(not GLIBC_OK, reason="needs glibc >= 2.35")
@pytest.mark.parametrize("switch, expected", [(None, TUNABLES), ("default", "unset")])
def test_reexec_starts_the_module_under_the_tuned_environment(tmp_path, switch, expected):
    (tmp_path / "show_env.py").write_text(
        "import os, sys\nprint(os.environ.get('GLIBC_TUNABLES', 'unset'), sys.argv[1:])\n")
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "MERLIN_HSTU_MALLOC")}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env.get("PYTHONPATH", "")])
    if switch:
        env["MERLIN_HSTU_MALLOC"] = switch
    code = ("import sys; sys.argv = ['merlin-hstu', 'a', 'b']\n"
            "from merlin_hstu.common.allocator import reexec_tuned\nreexec_tuned('show_env')\nprint('not replaced')")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    if switch == "default":
        assert out.strip() == "not replaced"
    else:
        assert out.strip() == f"{expected} ['a', 'b']"
