"""The one `--set SECTION.KEY=VALUE` parser: every command that takes overrides (train, bench for each task)
reads them here, so the spelling, the YAML value syntax (`3`, `true`, `[64, 32]`, `null`) and the error messages
are the same everywhere.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Iterable, List, Sequence, Tuple

import yaml


def parse_override(text: str) -> Tuple[List[str], Any]:
    """'train.epochs=3' -> (['train', 'epochs'], 3); the value is read as YAML (lists become lists)."""
    if "=" not in text:
        raise ValueError(f"override {text!r} must look like section.key=value (e.g. train.epochs=3)")
    key, raw = text.split("=", 1)
    keys = [k for k in key.strip().split(".")]
    if not all(keys):
        raise ValueError(f"override {text!r}: empty key part; write section.key=value (e.g. train.epochs=3)")
    return keys, yaml.safe_load(raw)


def apply_overrides(raw: dict, overrides: Iterable[str]) -> dict:
    """Set each dotted key of `overrides` inside the nested dict `raw` (a loaded YAML preset); returns `raw`."""
    for text in overrides:
        keys, value = parse_override(text)
        node: Any = raw
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {text!r}: {k!r} is a value, not a section")
        if isinstance(node.get(keys[-1]), dict) and not isinstance(value, dict):
            raise ValueError(f"override {text!r}: {keys[-1]!r} is a section, not a value; set one of its keys, "
                             f"e.g. --set {'.'.join(keys)}.<key>=VALUE")
        node[keys[-1]] = value
    return raw


def overrides_by_section(items: Iterable[str], sections: Sequence[str], flags: Sequence[str] = ()
                         ) -> Dict[str, Dict[str, Any]]:
    """['model.dim=8', 'train.lr=1e-3'] -> {"model": {"dim": 8}, "train": {"lr": 0.001}, ...} for the given
    sections (each present, maybe empty); `flags` are bare keys (`scaling=true`) kept under their own name.
    YAML lists become tuples (typed configs hold tuples)."""
    out: Dict[str, Dict[str, Any]] = {s: {} for s in sections}
    for text in items or ():
        keys, value = parse_override(text)
        if len(keys) == 1 and keys[0] in flags:
            out.setdefault(keys[0], {})["enabled"] = bool(value)
            continue
        if len(keys) != 2 or keys[0] not in out:
            allowed = [f"{s}.<key>" for s in sections] + [f"{f}=..." for f in flags]
            raise ValueError(f"--set {text!r}: unknown section or key; the sections are {', '.join(allowed)}")
        out[keys[0]][keys[1]] = tuple(value) if isinstance(value, list) else value
    return out


def replace_fields(config, values: Dict[str, Any], where: str):
    """dataclasses.replace with unknown keys reported by name (and the valid ones listed)."""
    names = {f.name for f in dataclasses.fields(config)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"unknown {where} key(s) {unknown}; valid: {sorted(names)}")
    return dataclasses.replace(config, **values)
