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

import pytest

from merlin_hstu.common import schema as roles

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted([*(ROOT / "merlin_hstu").rglob("*.py"), *(ROOT / "workflows").glob("*.py")])
HOME = ROOT / "merlin_hstu" / "common" / "schema.py"

NAMES = {roles.LOG_USER_ID, roles.LOG_SESSION_ID, roles.LOG_ITEM_ID, roles.LOG_ACTION, roles.LOG_TIMESTAMP,
         roles.LOG_WATCH_TIME, roles.MERLIN_SESSION_ID, roles.MERLIN_SESSION_ITEMS, roles.MERLIN_SESSION_EVENTS,
         roles.MERLIN_SESSION_TIME}
LIST_NAME = re.compile(r"^[a-z_]+" + re.escape(roles.LIST_SUFFIX) + "$")

#: files not yet migrated (another engineer edits them now) -> literals they hold now; may only shrink
PENDING: dict = {}


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


def test_the_schema_module_imports_light():
    """The command line formats its help from the schema constants and the Triton entry model's contract module
    reads them: importing the schema module must not load Merlin, torch or pandas (seconds each)."""
    import subprocess
    import sys

    heavy = ("merlin.schema", "torch", "pandas", "nvtabular")
    probe = ("import sys; import merlin_hstu.common.schema as s; "
             f"print(','.join(m for m in {heavy!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == ""


def test_role_tags_and_role_lookup():
    from merlin.schema import ColumnSchema, Schema, Tags

    assert roles.ROLE_TAGS[roles.ROLE_ITEM] == (Tags.ITEM, Tags.ID, Tags.LIST, Tags.CATEGORICAL)
    assert set(roles.ROLE_TAGS) >= {roles.ROLE_ITEM, roles.ROLE_ACTION, roles.ROLE_TIMESTAMP}
    tagged = roles.with_role(ColumnSchema("clicks", is_list=True, is_ragged=True), roles.ROLE_ACTION)
    assert set(tagged.tags) == {Tags.LIST, Tags.CATEGORICAL}
    schema = Schema([tagged, ColumnSchema("other")])
    assert roles.role_column(schema, roles.ROLE_ACTION) == "clicks"
    assert roles.role_column(schema, roles.ROLE_TIMESTAMP) is None
    twice = Schema([tagged, roles.with_role(ColumnSchema("views", is_list=True, is_ragged=True), roles.ROLE_ACTION)])
    with pytest.raises(roles.SchemaRoleError, match="ambiguous action column"):
        roles.role_column(twice, roles.ROLE_ACTION)


def test_cli_column_defaults_are_the_schema_constants():
    from merlin_hstu.cli.main import build_parser

    parser = build_parser()
    expand = parser.parse_args(["expand", "--dataset", "ml-100k", "--output", "out"])
    assert (expand.user_column, expand.item_column, expand.timestamp_column) == (
        roles.LOG_USER_ID, roles.LOG_ITEM_ID, roles.LOG_TIMESTAMP)
    ranking = parser.parse_args(["preprocess-ranking", "--format", "events", "--input", "x", "--output", "out"])
    assert (ranking.user_column, ranking.item_column, ranking.timestamp_column) == (
        roles.LOG_USER_ID, roles.LOG_ITEM_ID, roles.LOG_TIMESTAMP)


def test_t4r_ranking_reads_its_history_lists_by_role():
    from merlin.schema import ColumnSchema, Schema

    from merlin_hstu.t4r.ranking import HISTORY_COLUMNS, history_columns

    def ragged(name, role):
        return roles.with_role(ColumnSchema(name, is_list=True, is_ragged=True), role)

    schema = Schema([ragged("hist_items", roles.ROLE_ITEM), ragged("hist_actions", roles.ROLE_ACTION)])
    assert history_columns(schema) == {roles.ROLE_ITEM: "hist_items", roles.ROLE_ACTION: "hist_actions",
                                       roles.ROLE_TIMESTAMP: HISTORY_COLUMNS[roles.ROLE_TIMESTAMP]}
