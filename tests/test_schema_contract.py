"""The schema is the contract: column names live in merlin_hstu/common/schema.py only.

Every string constant of the package sources (docstrings excluded) that IS a column name - a raw event-log
default (`user_id`, `item_id`, `action`, `timestamp`, ...), a Merlin session layout name or a `<name>-list`
column - must be a constant of `merlin_hstu.common.schema`, imported from there. Files that other work still
has to migrate are listed in PENDING with the number of literals they hold today: the count may only go down
(lower it when you migrate one), and any literal in another file fails."""
from __future__ import annotations

import ast
import re
from collections import Counter
from pathlib import Path

from merlin_hstu.common import schema as roles

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted([*(ROOT / "merlin_hstu").rglob("*.py"), *(ROOT / "workflows").glob("*.py")])
HOME = ROOT / "merlin_hstu" / "common" / "schema.py"

NAMES = {roles.LOG_USER_ID, roles.LOG_SESSION_ID, roles.LOG_ITEM_ID, roles.LOG_ACTION, roles.LOG_TIMESTAMP,
         roles.LOG_WATCH_TIME, roles.MERLIN_SESSION_ID, roles.MERLIN_SESSION_ITEMS, roles.MERLIN_SESSION_EVENTS,
         roles.MERLIN_SESSION_TIME}
LIST_NAME = re.compile(r"^[a-z_]+" + re.escape(roles.LIST_SUFFIX) + "$")

#: files not yet migrated (owned by other work) -> literals they hold now; may only shrink
PENDING = {
    "merlin_hstu/cli/ranking.py": 3,
    "merlin_hstu/cli/scale.py": 3,
    "merlin_hstu/cli/serving.py": 2,
    "merlin_hstu/cli/train.py": 2,
    "merlin_hstu/data/fractal.py": 5,
    "merlin_hstu/data/synthetic.py": 8,
    "merlin_hstu/hllm/data.py": 1,
    "merlin_hstu/hllm/serving.py": 3,
    "merlin_hstu/retrieval/config.py": 4,
    "merlin_hstu/retrieval/data.py": 1,
    "merlin_hstu/retrieval/model.py": 3,
    "merlin_hstu/serving/contract.py": 2,
    "merlin_hstu/serving/export.py": 2,
    "merlin_hstu/serving/ranking.py": 1,
    "merlin_hstu/serving/t4r_export.py": 6,
    "merlin_hstu/sid/embeddings.py": 6,
    "merlin_hstu/sid/tokenizer.py": 3,
    "merlin_hstu/t4r/ranking.py": 4,
}


def _docstrings(tree: ast.AST) -> set:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                ids.add(id(first.value))
    return ids


def column_literals(path: Path) -> list:
    """(line, value) of every string constant in `path` that is a column name (docstrings excluded)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    skip = _docstrings(tree)
    return [(node.lineno, node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip
            and (node.value in NAMES or LIST_NAME.match(node.value))]


def test_column_names_come_from_the_schema_module():
    found = {str(p.relative_to(ROOT)): column_literals(p) for p in SOURCES if p != HOME}
    found = {k: v for k, v in found.items() if v}
    new = {k: v for k, v in found.items() if k not in PENDING}
    assert not new, ("column-name literals outside merlin_hstu/common/schema.py (use its constants, or read the name "
                     f"from the workflow's schema): {new}")
    grown = {k: (len(found.get(k, [])), n) for k, n in PENDING.items() if len(found.get(k, [])) > n}
    assert not grown, f"files in PENDING gained column-name literals (now, allowed): {grown}"
    done = sorted(k for k, n in PENDING.items() if len(found.get(k, [])) < n)
    assert not done, f"migrated files: lower (or drop) their PENDING counts: " + ", ".join(
        f"{k} -> {len(found.get(k, []))}" for k in done)


def test_the_checker_sees_literals_and_skips_docstrings(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text('"""item_id-list in a docstring is prose"""\nA = "item_id-list"\n'
                      'def f(c="timestamp"):\n    """user_id"""\n    return {"action": c, "x": "item_idx"}\n')
    assert Counter(v for _, v in column_literals(sample)) == Counter({"item_id-list": 1, "timestamp": 1,
                                                                      "action": 1})


def test_schema_constants_are_the_workflow_names():
    assert roles.ITEM_BASE + roles.LIST_SUFFIX == roles.ITEM_LIST
    assert roles.ACTION_BASE + roles.LIST_SUFFIX == roles.ACTION_LIST
    assert roles.TIME_BASE + roles.LIST_SUFFIX == roles.TIMESTAMP_LIST
    assert roles.WATCH_TIME_BASE + roles.LIST_SUFFIX == roles.WATCH_TIME_LIST
    from merlin_hstu.ranking import data as ranking_data

    assert ranking_data.CANDIDATE_ITEM_LIST is roles.CANDIDATE_ITEM_LIST
