"""Deterministic synthetic event log with planted sequential and temporal structure.

Why: tests, the demo and CI need a dataset that is offline, tiny to generate, bit-for-bit reproducible and has a
signal that a next-item model must *learn* (popularity alone cannot explain it), so that "the model trains" is a
checkable claim: a trained sequence model should beat most-popular by a wide margin on HR@10.

Generative story (all randomness from one seed):

Catalogue
    * ``num_items`` items, raw ids ``item_id_offset + k`` (deliberately not 0..n-1, so id mapping is exercised),
      spread evenly over ``num_categories`` categories (raw category ids 1..C; 0 is left free for padding).
    * Zipf popularity ``w_k = (r_k + 1) ** -popularity_exponent`` over a random rank permutation ``r``.
    * Every item has ``num_successors`` distinct preferred successors, drawn uniformly from its own category, or
      with probability ``p_successor_other_category`` from the next category ``(c + 1) mod C`` ("near" it).
User
    * ``L_u ~ U{min_events..max_events}`` events, ``num_favorite_categories`` favourite categories with
      Dirichlet(1) weights, a start time uniform over ``start_spread_days`` after ``start_time``.
Events, for t = 1..L_u - 1 (event 0 is a popularity draw from a favourite category)
    * a new session starts with probability ``p_new_session``; the gap is
      ``session_gap_s + LogNormal(ln(between_session_median_s), between_session_sigma)`` (hours to days),
      otherwise ``LogNormal(ln(within_session_median_s), within_session_sigma)`` clipped to
      ``[1, session_gap_s - 1]`` (seconds to minutes).  So ``gap >= session_gap_s`` <=> a new session.
    * follow probability: ``p_follow`` inside a session, ``p_follow_after_purchase`` if the previous event was a
      purchase (the intent is satisfied), ``p_follow_after_gap`` on a new session.
    * follow: the next item is successor ``s`` of the previous item with ``s ~ successor_weights``.
    * otherwise jump to a popularity-weighted item of a category chosen as: the previous item's category with
      probability ``p_stay_category`` inside a session, else a favourite category (always after a long gap).
    * the action is drawn independently from ``action_probs`` (a realistic view >> click >> cart > purchase skew).

So the next item is mostly a first-order function of the current item, and *time* matters: after a long gap
(visible to a model through the target timestamp) users leave the chain and jump to (often other) categories.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Union

import numpy as np
import pandas as pd

from merlin_hstu.common import schema as roles
from merlin_hstu.common.atomic_dir import write_file

__all__ = [
    "SyntheticConfig",
    "SyntheticCatalogue",
    "build_catalogue",
    "generate_event_log",
    "write_event_log",
    "config_from_dict",
    "EVENT_LOG_COLUMNS",
]

EVENT_LOG_COLUMNS = (roles.LOG_USER_ID, roles.LOG_ITEM_ID, roles.LOG_ACTION, roles.LOG_TIMESTAMP, roles.LOG_CATEGORY)

_DAY_S = 86_400


@dataclass(frozen=True)
class SyntheticConfig:
    """Every knob of the generator.  Identical configs give bit-identical event logs."""

    num_users: int = 2000
    num_items: int = 1000
    num_categories: int = 20
    min_events: int = 20  # per user, inclusive
    max_events: int = 80  # per user, inclusive
    seed: int = 42

    # ids
    item_id_offset: int = 100_000  # raw item id = offset + k
    user_id_offset: int = 1  # raw user id = offset + u

    # catalogue structure
    popularity_exponent: float = 0.8  # Zipf exponent of the jump distribution
    num_successors: int = 3
    successor_weights: tuple[float, ...] = (0.6, 0.25, 0.15)  # P(follow successor s); sums to 1
    p_successor_other_category: float = 0.2  # a successor comes from the next category instead of the own one

    # behaviour
    num_favorite_categories: int = 3
    p_follow: float = 0.8  # inside a session
    p_follow_after_purchase: float = 0.3  # inside a session, previous action was a purchase
    p_follow_after_gap: float = 0.15  # first event of a new session
    p_stay_category: float = 0.6  # on an in-session jump: stay in the current category

    # time
    start_time: int = 1_672_531_200  # 2023-01-01T00:00:00Z
    start_spread_days: float = 60.0
    p_new_session: float = 0.12
    session_gap_s: int = 1800  # gaps >= this start a new session
    within_session_median_s: float = 40.0
    within_session_sigma: float = 1.0
    between_session_median_s: float = 6 * 3600.0  # added on top of session_gap_s
    between_session_sigma: float = 1.3
    max_gap_days: float = 30.0

    # actions
    action_names: tuple[str, ...] = ("view", "click", "cart", "purchase")
    action_probs: tuple[float, ...] = (0.75, 0.17, 0.05, 0.03)
    purchase_action: str = "purchase"

    def __post_init__(self) -> None:
        def fail(name: str, why: str) -> None:
            raise ValueError(f"SyntheticConfig.{name}={getattr(self, name)!r}: {why}")

        for name in ("num_users", "num_items", "num_categories", "min_events", "num_successors",
                     "num_favorite_categories", "session_gap_s"):
            if int(getattr(self, name)) < 1:
                fail(name, "must be >= 1")
        if self.min_events < 2:
            fail("min_events", "must be >= 2 so every user has a history and a held-out last item")
        if self.max_events < self.min_events:
            fail("max_events", f"must be >= min_events ({self.min_events})")
        if self.item_id_offset < 1:
            fail("item_id_offset", "must be >= 1 so no raw item id collides with padding id 0")
        if self.user_id_offset < 0:
            fail("user_id_offset", "must be >= 0")
        per_category = self.num_items // self.num_categories
        if per_category < self.num_successors + 1:
            fail("num_items", f"needs at least num_categories * (num_successors + 1) = "
                 f"{self.num_categories * (self.num_successors + 1)} items so every item has "
                 f"{self.num_successors} distinct successors in its category; raise num_items or lower "
                 f"num_categories / num_successors")
        if self.num_favorite_categories > self.num_categories:
            fail("num_favorite_categories", f"must be <= num_categories ({self.num_categories})")
        for name in ("p_follow", "p_follow_after_purchase", "p_follow_after_gap", "p_stay_category",
                     "p_new_session", "p_successor_other_category"):
            value = float(getattr(self, name))
            if not 0.0 <= value <= 1.0:
                fail(name, "is a probability and must lie in [0, 1]")
        if len(self.successor_weights) != self.num_successors:
            fail("successor_weights", f"needs one weight per successor (num_successors={self.num_successors})")
        _check_distribution(self.successor_weights, "successor_weights")
        if len(self.action_names) != len(self.action_probs):
            fail("action_probs", f"needs one probability per action in action_names ({len(self.action_names)})")
        if len(set(self.action_names)) != len(self.action_names):
            fail("action_names", "must be distinct")
        _check_distribution(self.action_probs, "action_probs")
        if self.purchase_action not in self.action_names:
            fail("purchase_action", f"must be one of action_names {self.action_names}")
        for name in ("popularity_exponent", "start_spread_days", "within_session_sigma", "between_session_sigma"):
            if float(getattr(self, name)) < 0:
                fail(name, "must be >= 0")
        for name in ("within_session_median_s", "between_session_median_s", "max_gap_days"):
            if float(getattr(self, name)) <= 0:
                fail(name, "must be > 0")
        if self.max_gap_days * _DAY_S <= self.session_gap_s:
            fail("max_gap_days", f"must exceed session_gap_s ({self.session_gap_s} s)")


def _check_distribution(values: tuple[float, ...], name: str) -> None:
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0 or np.any(arr < 0) or not np.isclose(arr.sum(), 1.0, atol=1e-9):
        raise ValueError(f"SyntheticConfig.{name}={values!r}: must be non-negative and sum to 1")


@dataclass(frozen=True)
class SyntheticCatalogue:
    """The hidden structure of the generator (what an oracle would know).

    Arrays are indexed by the dense item index k = raw_id - item_id_offset.
    """

    item_ids: np.ndarray  # [n] int64 raw ids
    categories: np.ndarray  # [n] int64 raw category ids in 1..C
    popularity: np.ndarray  # [n] float64 jump probabilities (sum 1)
    successors: np.ndarray  # [n, S] int64 dense indices of the preferred successors


class _CategorySampler:
    """Popularity-weighted sampling of an item *within* a chosen category, vectorised over users.

    Items are laid out category by category; with the cumulative weight ``cum`` over that layout, an item of
    category c is ``searchsorted(cum, lo_c + u * mass_c)`` for u ~ U[0, 1).
    """

    def __init__(self, dense_category: np.ndarray, weights: np.ndarray, num_categories: int) -> None:
        self.order = np.lexsort((np.arange(dense_category.size), dense_category))
        self.cum = np.cumsum(weights[self.order])
        counts = np.bincount(dense_category, minlength=num_categories)
        self.end = np.cumsum(counts)
        self.start = self.end - counts
        cum0 = np.concatenate([[0.0], self.cum])
        self.lo = cum0[self.start]
        self.mass = cum0[self.end] - self.lo

    def sample(self, category: np.ndarray, u: np.ndarray) -> np.ndarray:
        pos = np.searchsorted(self.cum, self.lo[category] + u * self.mass[category], side="right")
        # float round-off can land one past the category's block; clamp into it
        pos = np.clip(pos, self.start[category], self.end[category] - 1)
        return self.order[pos]


def build_catalogue(config: SyntheticConfig = SyntheticConfig()) -> SyntheticCatalogue:
    """Item categories, popularity and successor graph.  Depends only on the seed and the catalogue knobs."""
    rng = np.random.default_rng(np.random.SeedSequence([config.seed, 0]))
    n, num_cat = config.num_items, config.num_categories
    dense_category = rng.permutation(n) % num_cat  # balanced: every category holds n // C or n // C + 1 items
    rank = rng.permutation(n)
    popularity = (rank + 1.0) ** -config.popularity_exponent
    popularity /= popularity.sum()

    members = [np.flatnonzero(dense_category == c) for c in range(num_cat)]
    other = rng.random((n, config.num_successors)) < config.p_successor_other_category
    picks = rng.random((n, config.num_successors))
    successors = np.empty((n, config.num_successors), dtype=np.int64)
    for item in range(n):
        chosen: list[int] = []
        for slot in range(config.num_successors):
            c = dense_category[item]
            pool = members[(c + 1) % num_cat] if other[item, slot] else members[c]
            pool = pool[(pool != item) & ~np.isin(pool, chosen)]
            if pool.size == 0:  # tiny neighbour category exhausted: fall back to the own category
                pool = members[c][(members[c] != item) & ~np.isin(members[c], chosen)]
            chosen.append(int(pool[int(picks[item, slot] * pool.size)]))
        successors[item] = chosen
    return SyntheticCatalogue(
        item_ids=config.item_id_offset + np.arange(n, dtype=np.int64),
        categories=dense_category.astype(np.int64) + 1,
        popularity=popularity,
        successors=successors,
    )


def generate_event_log(config: SyntheticConfig = SyntheticConfig()) -> pd.DataFrame:
    """Generate the event log, one row per event, sorted by (timestamp, user_id).

    Columns: user_id int64, item_id int64 (raw, offset ids), action str, timestamp int64 unix seconds (strictly
    increasing per user), category int64 (1..C).  Identical config -> identical DataFrame, bit for bit.
    """
    catalogue = build_catalogue(config)
    dense_category = catalogue.categories - 1
    sampler = _CategorySampler(dense_category, catalogue.popularity, config.num_categories)
    rng = np.random.default_rng(np.random.SeedSequence([config.seed, 1]))
    num_users, horizon = config.num_users, config.max_events

    lengths = rng.integers(config.min_events, config.max_events + 1, size=num_users)
    favourites = np.argsort(rng.random((num_users, config.num_categories)), axis=1)[:, : config.num_favorite_categories]
    favourite_cum = np.cumsum(rng.dirichlet(np.ones(config.num_favorite_categories), size=num_users), axis=1)
    start = config.start_time + np.floor(rng.random(num_users) * config.start_spread_days * _DAY_S).astype(np.int64)

    # All per-event randomness is drawn up front (fixed shapes), so the stream does not depend on branch outcomes.
    u_session, u_follow, u_slot, u_stay, u_fav, u_item, u_action = rng.random((7, num_users, horizon))
    within = rng.lognormal(np.log(config.within_session_median_s), config.within_session_sigma, (num_users, horizon))
    between = rng.lognormal(np.log(config.between_session_median_s), config.between_session_sigma, (num_users, horizon))

    within_gap = np.clip(np.rint(within), 1, config.session_gap_s - 1).astype(np.int64)
    between_gap = np.minimum(config.session_gap_s + np.rint(between), config.max_gap_days * _DAY_S).astype(np.int64)
    new_session = u_session < config.p_new_session
    new_session[:, 0] = True
    gaps = np.where(new_session, between_gap, within_gap)
    gaps[:, 0] = 0
    timestamps = start[:, None] + np.cumsum(gaps, axis=1)

    actions = np.searchsorted(np.cumsum(config.action_probs), u_action, side="right")
    actions = np.minimum(actions, len(config.action_names) - 1)
    slots = np.minimum(np.searchsorted(np.cumsum(config.successor_weights), u_slot, side="right"),
                       config.num_successors - 1)
    purchase = config.action_names.index(config.purchase_action)
    rows = np.arange(num_users)

    def favourite_category(t: int) -> np.ndarray:
        pick = np.minimum((u_fav[:, t, None] >= favourite_cum).sum(axis=1), config.num_favorite_categories - 1)
        return favourites[rows, pick]

    items = np.empty((num_users, horizon), dtype=np.int64)
    items[:, 0] = sampler.sample(favourite_category(0), u_item[:, 0])
    for t in range(1, horizon):
        prev = items[:, t - 1]
        p_follow = np.where(actions[:, t - 1] == purchase, config.p_follow_after_purchase, config.p_follow)
        p_follow = np.where(new_session[:, t], config.p_follow_after_gap, p_follow)
        follow = u_follow[:, t] < p_follow
        stay = ~new_session[:, t] & (u_stay[:, t] < config.p_stay_category)
        jump_category = np.where(stay, dense_category[prev], favourite_category(t))
        jump_item = sampler.sample(jump_category, u_item[:, t])
        items[:, t] = np.where(follow, catalogue.successors[prev, slots[:, t]], jump_item)

    valid = np.arange(horizon)[None, :] < lengths[:, None]
    user_index = np.broadcast_to(rows[:, None], valid.shape)[valid]
    item_index = items[valid]
    ts = timestamps[valid]
    order = np.lexsort((user_index, ts))  # global time order; per-user times are strictly increasing
    action_table = np.array(config.action_names, dtype=object)
    return pd.DataFrame(
        {
            roles.LOG_USER_ID: (config.user_id_offset + user_index[order]).astype(np.int64),
            roles.LOG_ITEM_ID: catalogue.item_ids[item_index[order]],
            roles.LOG_ACTION: action_table[actions[valid][order]],
            roles.LOG_TIMESTAMP: ts[order].astype(np.int64),
            roles.LOG_CATEGORY: catalogue.categories[item_index[order]],
        },
        columns=list(EVENT_LOG_COLUMNS),
    )


def write_event_log(path: Union[str, os.PathLike], config: SyntheticConfig = SyntheticConfig()) -> Path:
    """Write the event log to ``path`` (``.csv`` or ``.parquet`` by suffix) atomically: temp file + rename.

    A reader therefore never sees a half-written file under the final name.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".parquet"):
        raise ValueError(f"write_event_log: path {str(path)!r} must end in .csv or .parquet (got {suffix!r})")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"write_event_log: directory {str(path.parent)!r} does not exist; create it first")
    events = generate_event_log(config)
    if suffix == ".csv":
        write_file(path, lambda tmp: events.to_csv(tmp, index=False))
    else:
        write_file(path, lambda tmp: events.to_parquet(tmp, index=False))
    return path


def config_from_dict(values: dict) -> SyntheticConfig:
    """Build a config from a plain dict (e.g. YAML), rejecting unknown keys by name instead of ignoring them."""
    known = {f.name for f in fields(SyntheticConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"SyntheticConfig: unknown key(s) {unknown}; valid keys are {sorted(known)}")
    converted = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    return SyntheticConfig(**converted)
