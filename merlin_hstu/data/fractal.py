"""Fractal expansion of an interaction log: more users, more items, the same shape (Belletti et al., "Scalable
Realistic Recommendation Datasets through Fractal Expansions", arXiv 1901.08910; the method behind the HSTU
reference's MovieLens-3B).

The log is the m x n incidence matrix R (users x items).  A small k x l matrix P of keep-probabilities, derived from
R itself, is Kronecker-multiplied with it, and the product is sampled:

    expanded user (a, u) = a * m + u + 1    a < k  (user factor), u < m the source user's index
    expanded item (b, v) = b * n + v + 1    b < l  (item factor), v < n the source item's index
                                            (ids start at 1: 0 stays free for padding; source ids by index in
                                            source_users.parquet / source_items.parquet)
    event (a, u, b, v, t) exists            with probability P[a, b], for every event (u, v, t) of R

so an expanded user is a copy of a source user whose events on each of the l item copies are kept with that block's
probability, at the source timestamps (sequences keep their order and their time gaps).  Consequences the tests
check numerically:

* user lengths scale by s_a = sum_b P[a, b] per user block: the length distribution keeps its shape (a mixture of
  k scaled copies of the source's);
* item popularity scales by c_b = sum_a P[a, b] per item block: the popularity curve keeps its fat tail;
* the expected number of events is nnz(R) * sum(P).

P (the "reduced matrix"): R coarse-grained to k x l.  Users are ordered by their coordinate on R's leading left
singular vector and cut into k groups of equal size, items likewise with the leading right singular vector and l
groups; P[a, b] is the density of block (a, b) of R, divided by the largest block density.  Blocks that R's
own structure makes dense are kept densely, so the Kronecker product carries R's coarse structure into the
expansion; the singular values of the product are the products of the two factors' singular values.  With
`density` below 1, P is scaled down further (fewer events per expanded user than per source user).

Streaming and determinism: the output is written one user block at a time (`part_{a:05d}.parquet`, users
a*m+1 .. a*m+m, sorted by user then time), each from its own seeded generator (`seed`, a, b), so a block's
content does not depend on the others, a killed run resumes by skipping the blocks already written (files are
written to a temp name and renamed), and memory holds one block (about nnz(R) * s_a rows), never the expansion.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, Optional

import numpy as np
import pandas as pd

from merlin_hstu.common import schema as roles
from merlin_hstu.common.atomic_dir import write_file

MANIFEST = "fractal.json"


@dataclass
class FractalConfig:
    user_factor: int = 2  # k: expanded users = k * source users
    item_factor: int = 2  # l: expanded items = l * source items
    density: float = 1.0  # scale of the keep-probabilities (1: the densest block is copied whole)
    contrast: float = 0.25  # P = (block density / max) ** contrast: 1 the coarse-grained R as is, 0 uniform
    seed: int = 0
    user_column: str = roles.LOG_USER_ID
    item_column: str = roles.LOG_ITEM_ID
    timestamp_column: str = roles.LOG_TIMESTAMP

    def __post_init__(self) -> None:
        for name in ("user_factor", "item_factor"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"FractalConfig.{name} must be an int >= 1 (--{name.replace('_', '-')}), got {value!r}")
        if not 0.0 <= float(self.contrast) <= 1.0:
            raise ValueError(f"FractalConfig.contrast must be in [0, 1] (--contrast), got {self.contrast!r}")
        if not 0.0 < float(self.density) <= 1.0:
            raise ValueError(f"FractalConfig.density must be in (0, 1] (--density), got {self.density!r}")


@dataclass
class SourceMatrix:
    """The source log as dense codes: user and item indices 0..m-1 / 0..n-1, and the original ids."""

    users: np.ndarray  # [nnz] user index per event
    items: np.ndarray  # [nnz] item index per event
    frame: pd.DataFrame  # the events (all columns), in the order of users/items
    user_ids: np.ndarray  # [m] original user id per index
    item_ids: np.ndarray  # [n] original item id per index

    @property
    def shape(self):
        return len(self.user_ids), len(self.item_ids)


def source_matrix(events: pd.DataFrame, config: FractalConfig) -> SourceMatrix:
    for column in (config.user_column, config.item_column):
        if column not in events.columns:
            raise ValueError(f"the event log has no column {column!r} (columns: {list(events.columns)}); name the "
                             f"column with --{'user' if column == config.user_column else 'item'}-column")
        if events[column].isna().any():
            row = int(np.flatnonzero(events[column].isna().to_numpy())[0])
            raise ValueError(f"column {column!r} is null at row {row + 1}; drop or fill the nulls first")
    user_index, user_ids = pd.factorize(events[config.user_column], sort=True)
    item_index, item_ids = pd.factorize(events[config.item_column], sort=True)
    return SourceMatrix(user_index.astype(np.int64), item_index.astype(np.int64), events.reset_index(drop=True),
                        np.asarray(user_ids), np.asarray(item_ids))


def _leading_vectors(src: SourceMatrix, iterations: int = 30):
    """The leading left / right singular vectors of the binary incidence matrix (power iteration on R^T R;
    deterministic: fixed start, no randomness)."""
    m, n = src.shape
    # binary incidence: repeated (user, item) pairs count once
    pairs = np.unique(src.users * n + src.items)
    rows, cols = pairs // n, pairs % n
    v = np.ones(n) / np.sqrt(n)
    for _ in range(iterations):
        u = np.bincount(rows, weights=v[cols], minlength=m)
        v = np.bincount(cols, weights=u[rows], minlength=n)
        v /= max(np.linalg.norm(v), 1e-300)
    u = np.bincount(rows, weights=v[cols], minlength=m)
    return u, v, rows, cols


def reduced_matrix(src: SourceMatrix, config: FractalConfig) -> np.ndarray:
    """P [k, l]: R coarse-grained along its leading singular vectors, block densities / the largest (module
    docstring), times `density`."""
    k, l = config.user_factor, config.item_factor
    m, n = src.shape
    u, v, rows, cols = _leading_vectors(src)
    # ties broken by index (stable sort), so the grouping is deterministic
    user_group = np.empty(m, dtype=np.int64)
    user_group[np.argsort(-u, kind="stable")] = np.arange(m) * k // m
    item_group = np.empty(n, dtype=np.int64)
    item_group[np.argsort(-v, kind="stable")] = np.arange(n) * l // n
    counts = np.zeros((k, l))
    np.add.at(counts, (user_group[rows], item_group[cols]), 1.0)
    sizes = np.bincount(user_group, minlength=k)[:, None] * np.bincount(item_group, minlength=l)[None, :]
    density = counts / np.maximum(sizes, 1)
    if density.max() <= 0:
        raise ValueError("the event log has no interactions to expand")
    return (density / density.max()) ** float(config.contrast) * float(config.density)


def expand_block(src: SourceMatrix, probabilities: np.ndarray, a: int, config: FractalConfig) -> pd.DataFrame:
    """The events of user block `a`: for each item block b, every source event kept with probability P[a, b]
    (generator seeded by (seed, a, b)), users and items renumbered (module docstring), sorted by user and time."""
    m, n = src.shape
    parts = []
    for b in range(probabilities.shape[1]):
        rng = np.random.default_rng([int(config.seed), int(a), int(b)])
        keep = rng.random(len(src.users)) < probabilities[a, b]
        if not keep.any():
            continue
        block = src.frame.loc[keep].copy()
        block[config.user_column] = a * m + src.users[keep] + 1
        block[config.item_column] = b * n + src.items[keep] + 1
        parts.append(block)
    if not parts:
        return src.frame.iloc[:0].assign(**{config.user_column: np.int64(0), config.item_column: np.int64(0)})
    out = pd.concat(parts, ignore_index=True)
    order = [config.user_column] + ([config.timestamp_column] if config.timestamp_column in out.columns else [])
    return out.sort_values(order, kind="stable").reset_index(drop=True)


def expand(events: pd.DataFrame, output: str | Path, config: Optional[FractalConfig] = None,
           on_block: Optional[Callable[[int, int, int], None]] = None) -> Dict:
    """Write the fractal expansion of `events` as `output/part_*.parquet` (one file per user block) and
    `output/fractal.json` (config, P, sizes, source id maps).  Resumes: blocks already written (and a manifest of
    the same config) are kept.  `on_block(a, k, rows)` reports progress.  Returns the manifest."""
    config = config or FractalConfig()
    output = Path(output)
    src = source_matrix(events, config)
    probabilities = reduced_matrix(src, config)
    m, n = src.shape
    manifest = {"config": asdict(config), "source_users": m, "source_items": n, "source_events": len(src.users),
                "users": m * config.user_factor, "items": n * config.item_factor,
                "expected_events": float(len(src.users) * probabilities.sum()),
                "reduced_matrix": probabilities.round(6).tolist(), "parts": []}
    output.mkdir(parents=True, exist_ok=True)
    previous = output / MANIFEST
    if previous.is_file():
        old = json.loads(previous.read_text())
        if old.get("config") != manifest["config"] or old.get("source_events") != manifest["source_events"]:
            raise FileExistsError(f"{output} holds an expansion with another config or source; choose another "
                                  "--output or remove it")
    for name, ids in (("source_users.parquet", src.user_ids), ("source_items.parquet", src.item_ids)):
        if not (output / name).is_file():
            frame = pd.DataFrame({"index": np.arange(len(ids)), "source_id": ids})
            write_file(output / name, lambda tmp: frame.to_parquet(tmp, index=False))
    total = 0
    for a in range(config.user_factor):
        path = output / f"part_{a:05d}.parquet"
        if path.is_file():  # written by an earlier, interrupted run: same seed, same content
            rows = pd.read_parquet(path, columns=[config.user_column]).shape[0]
        else:
            block = expand_block(src, probabilities, a, config)
            rows = len(block)
            write_file(path, lambda tmp: block.to_parquet(tmp, index=False))
        manifest["parts"].append({"file": path.name, "users": [a * m + 1, a * m + m], "events": int(rows)})
        total += rows
        if on_block is not None:
            on_block(a, config.user_factor, rows)
    manifest["events"] = int(total)
    write_file(output / MANIFEST, json.dumps(manifest, indent=2, default=str))
    return manifest


def shape_statistics(events: pd.DataFrame, user_column: str = roles.LOG_USER_ID,
                     item_column: str = roles.LOG_ITEM_ID) -> Dict:
    """Scale-free shape of a log: user-length quantiles / mean, and the item popularity curve (share of events
    held by the top q of items; the Gini coefficient)."""
    lengths = events.groupby(user_column, sort=False).size().to_numpy(dtype=np.float64)
    popularity = np.sort(events.groupby(item_column, sort=False).size().to_numpy(dtype=np.float64))[::-1]
    qs = [0.1, 0.25, 0.5, 0.75, 0.9, 0.99]
    share = np.cumsum(popularity) / popularity.sum()
    n = len(popularity)
    ascending = popularity[::-1]
    gini = float((2 * np.arange(1, n + 1) - n - 1).dot(ascending) / (n * ascending.sum()))
    return {"users": int(len(lengths)), "items": int(n), "events": int(lengths.sum()),
            "popularity_slope": _loglog_slope(np.arange(1, n + 1), popularity, 0.01, 0.5),
            "length_tail_slope": _ccdf_tail_slope(lengths),
            "length_quantiles_over_mean": {str(q): float(np.quantile(lengths, q) / lengths.mean()) for q in qs},
            "top_item_share": {str(q): float(share[max(int(np.ceil(q * n)) - 1, 0)]) for q in (0.01, 0.1, 0.2, 0.5)},
            "item_gini": gini}


def _loglog_slope(x: np.ndarray, y: np.ndarray, lo: float, hi: float) -> float:
    """Least-squares slope of log y against log x over the fraction [lo, hi] of the points (a power law's
    exponent; invariant to scaling x or y)."""
    n = len(x)
    sel = slice(int(lo * n), max(int(hi * n), int(lo * n) + 2))
    xs, ys = np.log(x[sel].astype(np.float64)), np.log(np.maximum(y[sel].astype(np.float64), 1e-12))
    return float(np.polyfit(xs, ys, 1)[0])


def _ccdf_tail_slope(lengths: np.ndarray) -> float:
    """Slope of log P(L >= x) against log x for x above the median length: the tail exponent of the user
    engagement distribution (scale-free)."""
    values = np.sort(lengths)
    ccdf = 1.0 - np.arange(len(values)) / len(values)
    keep = values >= np.median(values)
    return _loglog_slope(values[keep], ccdf[keep], 0.0, 0.98)
