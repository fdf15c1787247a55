"""Argument checks shared by typed configs: each error names the owner, the field and what it must be."""
from __future__ import annotations

from typing import Tuple


def positive_int(owner: str, name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{owner}.{name} must be a positive int, got {value!r}")
    return value


def layer_widths(owner: str, name: str, value) -> Tuple[int, ...]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value,)
    message = f"{owner}.{name} must be a list of positive ints (hidden widths), got {value!r}"
    if isinstance(value, (str, bytes)):
        raise ValueError(message)
    try:
        widths = tuple(value)
    except TypeError:
        raise ValueError(message) from None
    if any(isinstance(w, bool) or not isinstance(w, int) or w <= 0 for w in widths):
        raise ValueError(message)
    return widths
