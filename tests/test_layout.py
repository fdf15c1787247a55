"""The package layout's rules, checked on the source (ast, nothing imported): one package per seam, no import
cycle between packages, no private name imported across packages, the flat modules that remain are the
documented ones."""
from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# merlin_hstu.<package> -> its source folder (workflows/ and kernels/ are installed into the package)
SOURCES = {"workflows": ROOT / "workflows", "kernels": ROOT / "kernels"}
FLAT_MODULES = {"__init__.py", "ctr_export.py", "ranking_export.py"}  # the package, and two pickle aliases
ALIASES = {"ctr_export", "ranking_export"}


def _package_files():
    for path in sorted((ROOT / "merlin_hstu").rglob("*.py")):
        rel = path.relative_to(ROOT / "merlin_hstu").parts
        yield (rel[0] if len(rel) > 1 else rel[0][:-3]), path
    for package, folder in SOURCES.items():
        for path in sorted(folder.glob("*.py")):
            yield package, path


def _imports(path: Path):
    """(module imported, names imported) for every `import` / `from ... import` of merlin_hstu modules."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("merlin_hstu"):
            yield node.module, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("merlin_hstu"):
                    yield alias.name, []


def _target_package(module: str, names):
    parts = module.split(".")
    if len(parts) >= 2:
        return parts[1]
    return names[0] if names else None  # `from merlin_hstu import common`


def _graph():
    edges = defaultdict(set)
    private = []
    for package, path in _package_files():
        for module, names in _imports(path):
            target = _target_package(module, names)
            if target is None or target == package or package in ALIASES:
                continue
            edges[package].add(target)
            private += [f"{path.relative_to(ROOT)}: {module}.{n}" for n in names
                        if n.startswith("_") and n != "__all__"]
    return edges, private


def test_only_documented_modules_sit_flat_in_the_package():
    flat = {p.name for p in (ROOT / "merlin_hstu").glob("*.py")}
    assert flat == FLAT_MODULES, "new code goes into the package of its seam (README, Layout)"


def test_no_private_name_is_imported_across_packages():
    _, private = _graph()
    assert private == []


def test_no_import_cycle_between_packages():
    edges, _ = _graph()
    edges.pop("__init__", None)  # the package root lazily forwards to t4r; nothing imports it back
    for deps in edges.values():
        deps.discard("__init__")
    state, stack = {}, []

    def visit(node):
        state[node] = "active"
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "active":
                raise AssertionError("import cycle between packages: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node)
    # the seams' direction: task packages never import the layers that use them
    for task in ("retrieval", "ranking", "ctr", "encoders", "common", "train"):
        assert not edges.get(task, set()) & {"cli", "bench", "serving", "t4r"}, (task, edges.get(task))
    assert not edges.get("common", set()) - {"common"}, "common imports nothing of the package"


def test_every_module_path_named_in_the_docs_exists():
    """README, docs/ and notebooks name modules and attributes (`merlin_hstu.train.loop.fit`) and files
    (`merlin_hstu/encoders/hstu.py`); each must exist, so a move that forgets a doc fails here."""
    import importlib
    import re

    missing = []
    texts = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "notebooks").glob("*.ipynb"))]
    for path in texts:
        text = path.read_text()
        for ref in sorted(set(re.findall(r"merlin_hstu(?:\.[A-Za-z_]\w*)+", text))):
            parts = ref.split(".")
            for i in range(len(parts), 0, -1):
                module = ".".join(parts[:i])
                source = ROOT / (module.replace(".", "/") + ".py")
                if source.is_file() and source.name.startswith("triton_"):
                    break  # Triton python-backend entry modules import triton_python_backend_utils: exist is enough
                try:
                    obj = importlib.import_module(module)
                except ImportError:
                    continue
                try:
                    for attr in parts[i:]:
                        obj = getattr(obj, attr)
                except AttributeError:
                    missing.append(f"{path.name}: {ref}")
                break
            else:
                missing.append(f"{path.name}: {ref}")
        for file_ref in sorted(set(re.findall(r"merlin_hstu/[\w/]+\.py", text))):
            if not (ROOT / file_ref).is_file():
                missing.append(f"{path.name}: {file_ref}")
    assert missing == []
