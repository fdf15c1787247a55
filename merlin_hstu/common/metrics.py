"""Ranking / CTR metrics: AUC, GAUC, log loss, normalized entropy (NE).

- AUC: probability that a random positive scores above a random negative, ties counting one half
  (Mann-Whitney U with average ranks).  Undefined (NaN) when only one class is present.
- GAUC: per-user AUC averaged over the users that have both classes, each user weighted by their number of
  candidates (impressions), the usual definition; users with one class only are skipped and counted.
- Log loss: mean binary cross-entropy of the predicted probabilities.
- NE (normalized entropy, He et al. 2014): log loss divided by the entropy of the base rate p of the labels,
  -(p log p + (1-p) log(1-p)); below 1 means better than always predicting the base rate.
All functions take numpy arrays or tensors; scores may be logits (AUC is rank-based) but log loss and NE need
probabilities (pass `from_logits=True` for logits).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Sequence

import numpy as np
from scipy.stats import rankdata


def _np(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64).reshape(-1)


def auc(labels, scores) -> float:
    y, s = _np(labels), _np(scores)
    if y.shape != s.shape:
        raise ValueError(f"auc: labels {y.shape} and scores {s.shape} differ in shape")
    pos = y > 0.5
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(s)  # average ranks: ties count one half
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


@dataclass
class GroupAUC:
    gauc: float
    users_counted: int
    users_skipped: int  # users whose candidates are all positive or all negative


def gauc(labels, scores, groups) -> GroupAUC:
    y, s = _np(labels), _np(scores)
    g = np.asarray(groups.detach().cpu().numpy() if hasattr(groups, "detach") else groups).reshape(-1)
    if not (y.shape == s.shape == g.shape):
        raise ValueError(f"gauc: labels {y.shape}, scores {s.shape} and groups {g.shape} must have one shape")
    order = np.argsort(g, kind="stable")
    y, s, g = y[order], s[order], g[order]
    starts = np.flatnonzero(np.r_[True, g[1:] != g[:-1]])
    ends = np.r_[starts[1:], len(g)]
    total, weight, skipped = 0.0, 0, 0
    for a, b in zip(starts, ends):
        value = auc(y[a:b], s[a:b])
        if np.isnan(value):
            skipped += 1
            continue
        total += value * (b - a)
        weight += b - a
    return GroupAUC(total / weight if weight else float("nan"), len(starts) - skipped, skipped)


def _probabilities(scores, from_logits: bool) -> np.ndarray:
    s = _np(scores)
    p = 1.0 / (1.0 + np.exp(-s)) if from_logits else s
    if not from_logits and ((p < 0) | (p > 1)).any():
        raise ValueError("log loss / NE need probabilities in [0, 1]; pass from_logits=True for logits")
    return np.clip(p, 1e-12, 1 - 1e-12)


def log_loss(labels, scores, from_logits: bool = False) -> float:
    y, p = _np(labels), _probabilities(scores, from_logits)
    return float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean())


def normalized_entropy(labels, scores, from_logits: bool = False) -> float:
    y = _np(labels)
    base = float(np.clip(y.mean(), 1e-12, 1 - 1e-12))
    entropy = -(base * np.log(base) + (1 - base) * np.log(1 - base))
    return log_loss(y, scores, from_logits) / entropy


def binary_task_metrics(labels, logits, groups: Optional[Sequence] = None) -> Dict[str, float]:
    """AUC, log loss and NE (and GAUC when `groups`, e.g. user ids, is given) of one binary task from logits."""
    out = {"auc": auc(labels, logits), "logloss": log_loss(labels, logits, from_logits=True),
           "ne": normalized_entropy(labels, logits, from_logits=True)}
    if groups is not None:
        g = gauc(labels, logits, groups)
        out["gauc"] = g.gauc
    return out
