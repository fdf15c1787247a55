"""Shared pytest fixtures (keep this file minimal: every test module sees it)."""
from __future__ import annotations

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The staged real datasets (/work/shared/data next to the repository); skips the test if absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared datasets not found at {SHARED_DATA}; they live next to the repository in shared/data")
    return SHARED_DATA


@pytest.fixture()
def one_thread():
    """One torch intra-op thread for tests of tiny models: on a shared 2-core CPU, OpenMP barrier waits make
    small ops up to 10x slower with two threads.  Restores the previous setting."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
