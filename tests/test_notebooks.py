"""Every notebook in notebooks/ runs top to bottom (its own asserts check its numbers)."""
from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
# what each notebook must print (its own asserts check the numbers behind these lines)
EXPECTED = {"01-quickstart.ipynb": ("HR@10 is", "top-10"),
            "02-ranking.ipynb": ("click AUC is", "largest difference to the full model", "reloaded:"),
            "03-ctr-wukong.ipynb": ("WuKong AUC is", "reloaded predictions identical: True"),
            "04-serving.ipynb": ("served top-10 == offline top-10 for 3 users: True", "client-side check:",
                                 "server reply:", "stopped: True"),
            "05-hllm.ipynb": ("HLLM hybrid: HR@10 is", "cold start: HLLM HR@10 is", "new item scored"),
            "06-semantic-ids.ipynb": ("unique tuples", "SID-HSTU Recall@10", "KV cache == full recompute: True")}


def test_there_are_notebooks():
    assert NOTEBOOKS, "notebooks/ should hold at least the quickstart"
    assert {p.name for p in NOTEBOOKS} == set(EXPECTED), "a new notebook needs its expected output in EXPECTED"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_executes(path, tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the notebook's scratch files land in pytest's tmp dir
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors
    text = "".join(o.get("text", "") for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", []))
    for phrase in EXPECTED[path.name]:
        assert phrase in text
