"""Retrieval metrics under the reference evaluation protocol (reference-hstu.md §2).

Protocol, per user b with target item y_b and history window h_b (the <= 200 ids the model was shown):

* every catalogue item is scored (``scores[b, :]``);
* ids in the history window are removed from the ranking, except the target itself, which is always ranked
  (a user may re-consume an item); ids listed in ``invalid_ids`` (padding / null / OOV rows) are never ranked;
* ``rank_b = 1 + #{ j ranked : scores[b, j] > scores[b, y_b] }``, then capped: if rank_b > rank_cap the target
  is "not in the top-``rank_cap`` list" and rank_b = rank_cap + 1 (the reference takes a top-2500 list);
* HR@K = [rank <= K],  NDCG@K = [rank <= K] / log2(rank + 1)  (one relevant item, so IDCG = 1),
  MRR = 1 / rank  (a missing target still adds 1 / (rank_cap + 1)), each averaged over users.

Tie rule: ties are broken by item id, as a stable sort by (-score, id) would order them: an item is ahead of the
target when its score is higher, or equal with a smaller id.  The reference's ``torch.topk`` leaves the order of
equal scores unspecified, so the two agree whenever scores are distinct.  Breaking ties by id (rather than in the
target's favour) keeps a degenerate model honest: constant scores do not give everyone rank 1.  It is also the
order ``MostPopular.recommend`` uses, so count ties rank the same way in metrics and in recommendations.
"""
from __future__ import annotations

import math
from typing import Iterable, Mapping, Optional, Sequence

import torch
from torch import Tensor

__all__ = [
    "DEFAULT_KS",
    "DEFAULT_RANK_CAP",
    "target_ranks",
    "retrieval_metrics",
    "metric_names",
    "RetrievalMetricAccumulator",
    "format_metrics_table",
]

DEFAULT_KS: tuple[int, ...] = (10, 50, 200)
DEFAULT_RANK_CAP = 2500


def target_ranks(
    scores: Tensor,
    targets: Tensor,
    history: Optional[Tensor] = None,
    invalid_ids: Sequence[int] = (0,),
    rank_cap: Optional[int] = DEFAULT_RANK_CAP,
) -> Tensor:
    """1-based rank of each target among the rankable items, capped at ``rank_cap + 1``.

    Args:
        scores: [B, V] float scores for every id 0..V-1 (row j of the item embedding table = id j).
        targets: [B] long target ids.
        history: [B, H] long history-window ids, 0 = padding (padding is harmless: 0 is normally invalid anyway).
            None means no history filtering.
        invalid_ids: ids that are never ranked (e.g. padding 0, Categorify's null / OOV rows).
        rank_cap: length of the top list; None disables the cap.
    Returns:
        [B] long ranks in 1..rank_cap+1.
    """
    if scores.dim() != 2:
        raise ValueError(f"target_ranks: scores must be [batch, num_items], got shape {tuple(scores.shape)}")
    if not scores.is_floating_point():
        raise TypeError(f"target_ranks: scores must be a float tensor, got {scores.dtype}")
    batch, num_items = scores.shape
    if targets.dim() != 1 or targets.shape[0] != batch:
        raise ValueError(f"target_ranks: targets must be [batch={batch}], got shape {tuple(targets.shape)}")
    _require_integer(targets, "targets")
    targets = targets.to(device=scores.device, dtype=torch.long)
    if batch and (targets.min() < 0 or targets.max() >= num_items):
        raise ValueError(f"target_ranks: targets must be ids in [0, {num_items}) (scores has {num_items} columns); "
                         f"got range [{int(targets.min())}, {int(targets.max())}]")
    if rank_cap is not None and rank_cap < 1:
        raise ValueError(f"target_ranks: rank_cap must be >= 1 or None, got {rank_cap}")
    if torch.isnan(scores).any():
        raise ValueError("target_ranks: scores contain NaN; NaN cannot be ranked (check the model output)")

    excluded = torch.zeros((batch, num_items), dtype=torch.bool, device=scores.device)
    invalid = torch.as_tensor(list(invalid_ids), dtype=torch.long, device=scores.device)
    if invalid.numel():
        if invalid.min() < 0 or invalid.max() >= num_items:
            raise ValueError(f"target_ranks: invalid_ids {list(invalid_ids)} must lie in [0, {num_items})")
        excluded[:, invalid] = True
        bad = excluded.gather(1, targets[:, None]).squeeze(1)
        if bad.any():
            raise ValueError(f"target_ranks: targets contain invalid ids {sorted(set(targets[bad].tolist()))} "
                             f"(invalid_ids={list(invalid_ids)}); drop those samples before evaluation")
    if history is not None:
        if history.dim() != 2 or history.shape[0] != batch:
            raise ValueError(f"target_ranks: history must be [batch={batch}, H], got shape {tuple(history.shape)}")
        _require_integer(history, "history")
        history = history.to(device=scores.device, dtype=torch.long)
        if history.numel() and (history.min() < 0 or history.max() >= num_items):
            raise ValueError(f"target_ranks: history ids must lie in [0, {num_items}), got range "
                             f"[{int(history.min())}, {int(history.max())}]")
        excluded.scatter_(1, history, True)
        # No need to un-exclude the target when it is in its own history: the count below only looks at items
        # ordered strictly ahead of the target, which never includes the target itself, so it is always ranked.

    target_scores = scores.gather(1, targets[:, None])
    ids = torch.arange(num_items, device=scores.device).unsqueeze(0)
    ahead = (scores > target_scores) | ((scores == target_scores) & (ids < targets[:, None]))
    ranks = (ahead & ~excluded).sum(dim=1) + 1
    if rank_cap is not None:
        ranks = ranks.clamp(max=rank_cap + 1)
    return ranks.long()


def _require_integer(t: Tensor, name: str) -> None:
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"target_ranks: {name} must be an integer (long) tensor of ids, got {t.dtype}")


def metric_names(ks: Sequence[int] = DEFAULT_KS) -> list[str]:
    """Keys in output order: hr@k, ndcg@k for each k, then mrr."""
    return [name for k in ks for name in (f"hr@{k}", f"ndcg@{k}")] + ["mrr"]


def _per_user_metrics(ranks: Tensor, ks: Sequence[int]) -> dict[str, Tensor]:
    if ranks.dim() != 1:
        raise ValueError(f"retrieval metrics: ranks must be a 1-D tensor, got shape {tuple(ranks.shape)}")
    if ranks.is_floating_point() or ranks.dtype == torch.bool:
        raise TypeError(f"retrieval metrics: ranks must be integer (from target_ranks), got {ranks.dtype}")
    if ranks.numel() and ranks.min() < 1:
        raise ValueError(f"retrieval metrics: ranks are 1-based, got a minimum of {int(ranks.min())}")
    for k in ks:
        if int(k) < 1:
            raise ValueError(f"retrieval metrics: every k in ks must be >= 1, got {list(ks)}")
    r = ranks.to(torch.float64)
    out: dict[str, Tensor] = {}
    for k in ks:
        hit = (r <= k).to(torch.float64)
        out[f"hr@{k}"] = hit
        out[f"ndcg@{k}"] = hit / torch.log2(r + 1.0)
    out["mrr"] = 1.0 / r
    return out


def retrieval_metrics(ranks: Tensor, ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """Mean HR@K, NDCG@K and MRR over users from target ranks (see module docstring)."""
    if ranks.numel() == 0:
        raise ValueError("retrieval_metrics: ranks is empty; there is no user to average over")
    per_user = _per_user_metrics(ranks, ks)
    return {name: float(per_user[name].mean()) for name in metric_names(ks)}


class RetrievalMetricAccumulator:
    """Streaming version of :func:`retrieval_metrics`: sums per-user metrics in float64 over batches.

    Needed because the full eval set (all users x all items scores) does not fit in one batch.
    """

    def __init__(self, ks: Sequence[int] = DEFAULT_KS) -> None:
        self.ks = tuple(int(k) for k in ks)
        self.reset()

    def reset(self) -> None:
        self._sums = {name: 0.0 for name in metric_names(self.ks)}
        self._count = 0

    @property
    def count(self) -> int:
        """Number of users accumulated so far."""
        return self._count

    def update(self, ranks: Tensor) -> None:
        per_user = _per_user_metrics(ranks, self.ks)
        for name, values in per_user.items():
            self._sums[name] += float(values.sum())
        self._count += int(ranks.numel())

    def compute(self) -> dict[str, float]:
        if self._count == 0:
            raise ValueError("RetrievalMetricAccumulator.compute: no ranks were added (call update first)")
        return {name: total / self._count for name, total in self._sums.items()}


def format_metrics_table(
    rows: Mapping[str, Mapping[str, float]],
    keys: Optional[Iterable[str]] = None,
    precision: int = 4,
) -> str:
    """Fixed-width text table: one row per model, one column per metric (missing values print as '-').

    ``keys`` defaults to the union of the rows' metric names in first-seen order.
    """
    if keys is None:
        seen: dict[str, None] = {}
        for metrics in rows.values():
            for key in metrics:
                seen.setdefault(key, None)
        keys = list(seen)
    else:
        keys = list(keys)

    def cell(value: Optional[float]) -> str:
        if value is None:
            return "-"
        if isinstance(value, float) and math.isnan(value):
            return "nan"
        return f"{float(value):.{precision}f}"

    header = ["model"] + keys
    body = [[str(name)] + [cell(metrics.get(key)) for key in keys] for name, metrics in rows.items()]
    widths = [max(len(row[i]) for row in [header] + body) for i in range(len(header))]

    def line(row: list[str]) -> str:
        first = row[0].ljust(widths[0])
        rest = [value.rjust(width) for value, width in zip(row[1:], widths[1:])]
        return "  ".join([first] + rest).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule] + [line(row) for row in body])
