"""YAML presets shipped in `merlin_hstu/configs/<task>/`, read the same way for every task.

    raw = read_preset("ranking", "dlrm-hstu", ["train.epochs=3"])   # a preset name of that task
    raw = read_preset("ranking", "my.yaml")                         # or a YAML file
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import List, Sequence

import yaml

from merlin_hstu.common.overrides import apply_overrides

TASKS = ("retrieval", "ranking", "ctr", "sid")


def _folder(task: str):
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; use one of {list(TASKS)}")
    return resources.files("merlin_hstu.configs").joinpath(task)


def preset_names(task: str) -> List[str]:
    return sorted(p.name[:-5] for p in _folder(task).iterdir() if p.name.endswith(".yaml"))


def read_preset(task: str, name_or_path: str | Path, overrides: Sequence[str] = ()) -> dict:
    """The preset (or YAML file) as a dict with the dotted `overrides` applied."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        try:
            raw = yaml.safe_load(path.read_text())
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f", line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
            problem = getattr(error, "problem", None) or str(error).splitlines()[0]
            raise ValueError(f"config file {path}{where}: not valid YAML ({problem}). Fix: correct the file, or "
                             "pass a preset name to --config") from None
        if raw is not None and not isinstance(raw, dict):
            raise ValueError(f"config file {path}: the top level must be a mapping of sections (data:, model:, "
                             f"train:, ...), found a {type(raw).__name__}. Fix: correct the file")
    else:
        name = str(name_or_path)
        if name not in preset_names(task):
            raise ValueError(f"unknown preset {name!r} of task {task!r}; presets: {preset_names(task)} (or pass a .yaml path)")
        raw = yaml.safe_load(_folder(task).joinpath(f"{name}.yaml").read_text())
    return apply_overrides(raw or {}, overrides)
