"""M-FALCON (HSTU paper §3.4): rank many candidates for one user with the history encoded once (KV cache).

A `DlrmHSTU` sequence is [contextual | history | candidates] under the target-aware mask: history tokens never
see candidates, and candidates see the history and themselves only.  So, layer by layer, the history tokens'
states do not depend on the candidates, and neither do their keys and values:

    prefill:  encode [contextual | history] once; keep every layer's K, V of those S tokens    (the KV cache)
    score:    for each micro-batch of m candidates, run only the m candidate tokens through the layers; in
              layer l, the candidates' queries attend to [K_l(cache) ; K_l(candidates)] with the same mask
              rows the full model uses (candidate i: every cached token and itself), so each candidate's
              output equals the full model's output for that candidate, alone or in any company
    update:   new events are encoded the same way (their queries against the cache + themselves, causal) and
              their K, V appended: the cache equals a prefill over the longer history

The cost of one micro-batch is O(m (S + m)) attention pairs plus m tokens of pointwise work, against
O((S + m)^2) and S + m tokens for the full model, which is where the speed-up comes from.  The layer pass is the
STU stack's `cached_forward` (merlin_hstu.encoders.stu, through `DlrmHSTU.encode_cached`), so the cached path runs
the same layers, bias rule and attention dispatch as the full model, with the model's `kernel` setting.

This exactness rests on the model's design (merlin_hstu/ranking/model.py): relative position/time bias with each
history token's query time its own event time, candidates' query time their own timestamps, no absolute positions
counted from the end.
With `contextual_full_attention=True` the contextual tokens see the whole history, so appended events change
them: `update` then re-encodes the whole history (still exact, no longer incremental); scoring stays cached.

    scorer = MFalconScorer(model.eval())
    scorer.set_history(UserHistory(item_ids, actions, timestamps, {"age": 3}))
    scores = scorer.score(candidate_ids, candidate_timestamps, micro_batch=64)   # [M, T]
    scorer.update(new_ids, new_actions, new_timestamps)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
from torch import Tensor

from merlin_hstu.encoders.stu import LayerKVCache, TokenMeta
from merlin_hstu.ranking.batch import RankingBatch
from merlin_hstu.ranking.model import DlrmHSTU


@dataclass
class UserHistory:
    """One user's events (oldest first) and contextual feature values."""

    item_ids: Tensor  # [n] encoded item ids
    actions: Tensor  # [n] action bitmasks
    timestamps: Tensor  # [n] unix seconds
    contextual: Dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.item_ids = torch.as_tensor(self.item_ids).reshape(-1).long()
        self.actions = torch.as_tensor(self.actions).reshape(-1).long()
        self.timestamps = torch.as_tensor(self.timestamps).reshape(-1).long()
        n = self.item_ids.numel()
        if self.actions.numel() != n or self.timestamps.numel() != n:
            raise ValueError(f"UserHistory: item_ids ({n}), actions ({self.actions.numel()}) and timestamps "
                             f"({self.timestamps.numel()}) must have one length")


@dataclass
class KVCache:
    """Keys and values of the user's S cached tokens in every layer (`LayerKVCache`, head-major buffers of
    max_seq_len slots, so appending and a micro-batch's temporary tokens copy nothing), and the tokens' metadata."""

    layers: List[LayerKVCache]
    meta: TokenMeta  # [S]
    num_events: int
    history: UserHistory
    contextual_values: Tensor  # [1, c]

    @property
    def num_tokens(self) -> int:
        return int(self.meta.position.numel())

    @property
    def key_buffers(self) -> List[Tensor]:
        """Per layer [H, N, dqk]."""
        return [layer.keys for layer in self.layers]

    @property
    def value_buffers(self) -> List[Tensor]:
        """Per layer [H, N, dv]."""
        return [layer.values for layer in self.layers]

    @property
    def keys(self) -> List[Tensor]:
        """Per layer [S, H, dqk] (views)."""
        return [layer.keys[:, :layer.length].transpose(0, 1) for layer in self.layers]

    @property
    def values(self) -> List[Tensor]:
        """Per layer [S, H, dv] (views)."""
        return [layer.values[:, :layer.length].transpose(0, 1) for layer in self.layers]


class MFalconScorer:
    """Cached candidate scoring for one user at a time with a `DlrmHSTU` model in eval mode."""

    def __init__(self, model: DlrmHSTU):
        if not isinstance(model, DlrmHSTU):
            raise ValueError(f"MFalconScorer needs a merlin_hstu.ranking.model.DlrmHSTU model, got {type(model).__name__}")
        self.model = model
        self.cache: Optional[KVCache] = None

    def _check_eval(self) -> None:
        if self.model.training:
            raise ValueError("MFalconScorer: the model is in training mode (dropout, stochastic length); "
                             "call model.eval() first")

    # --- the cached layer pass -----------------------------------------------------------------------------
    def _run(self, x: Tensor, meta: TokenMeta, num_targets: int, keep: bool) -> Tensor:
        """Encode R new tokens x [R, D] against the cache.  keep=True appends their K, V to the cache."""
        cache = self.cache
        out = self.model.encode_cached(x, meta, cache.meta, cache.layers, num_targets=num_targets, append=keep)
        if keep:
            cache.meta = cache.meta.cat(meta)
        return out

    def _history_meta(self, history_timestamps: Tensor, first_event: int) -> TokenMeta:
        per = self.model.tokens_per_event
        n = history_timestamps.numel()
        device = history_timestamps.device
        position = (torch.arange(n, device=device) + first_event).repeat_interleave(per)
        return TokenMeta(position, history_timestamps.repeat_interleave(per),
                         torch.zeros(n * per, dtype=torch.bool, device=device))

    # --- public API ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def set_history(self, history: UserHistory) -> KVCache:
        """Prefill: encode the contextual and history tokens once and cache every layer's K, V."""
        self._check_eval()
        model = self.model
        device = model.item_embedding.weight.device
        contextual = {k: torch.as_tensor(v).reshape(1) for k, v in history.contextual.items()}
        ctx_values = model.contextual_values(contextual, 1)
        c = model.num_contextual
        self.cache = KVCache(layers=model.new_kv_cache(),
                             meta=TokenMeta(torch.zeros(0, dtype=torch.long, device=device),
                                            torch.zeros(0, dtype=torch.long, device=device),
                                            torch.zeros(0, dtype=torch.bool, device=device)),
                             num_events=0, history=history, contextual_values=ctx_values)
        item_ids, actions, times = (t.to(device) for t in (history.item_ids, history.actions, history.timestamps))
        model._check_item_ids(item_ids, "UserHistory.item_ids")
        x = torch.cat([model.contextual_tokens(ctx_values)[0], model.history_tokens(item_ids, actions)])
        zeros = torch.zeros(c, dtype=torch.long, device=device)
        meta = TokenMeta(zeros, zeros, torch.ones(c, dtype=torch.bool, device=device)).cat(self._history_meta(times, 0))
        self._run(x, meta, num_targets=0, keep=True)
        self.cache.num_events = item_ids.numel()
        return self.cache

    @torch.no_grad()
    def update(self, item_ids, actions, timestamps) -> KVCache:
        """Append new events: only their tokens are encoded, against the cache (exact, see the module docstring)."""
        self._check_eval()
        if self.cache is None:
            raise ValueError("MFalconScorer.update: no history yet; call set_history first")
        new = UserHistory(item_ids, actions, timestamps)
        old = self.cache.history
        merged = UserHistory(torch.cat([old.item_ids, new.item_ids]), torch.cat([old.actions, new.actions]),
                             torch.cat([old.timestamps, new.timestamps]), old.contextual)
        if self.model.config.contextual_full_attention:
            return self.set_history(merged)  # contextual tokens see every event: their K, V change
        model = self.model
        device = model.item_embedding.weight.device
        ids, acts, times = (t.to(device) for t in (new.item_ids, new.actions, new.timestamps))
        model._check_item_ids(ids, "update item_ids")
        self._run(model.history_tokens(ids, acts), self._history_meta(times, self.cache.num_events),
                  num_targets=0, keep=True)
        self.cache.num_events += ids.numel()
        self.cache.history = merged
        return self.cache

    @torch.no_grad()
    def score(self, candidate_item_ids, candidate_timestamps=None, micro_batch: int = 64,
              history: Optional[UserHistory] = None) -> Tensor:
        """[M] candidates -> [M, T] predictions (logits / regression values), m candidates per encoder pass.

        candidate_timestamps [M] (or one int): the query times; default the last history event's time (the
        reference's max of the history timestamps).  `history` given: set_history(history) first."""
        self._check_eval()
        if history is not None:
            self.set_history(history)
        if self.cache is None:
            raise ValueError("MFalconScorer.score: no history; pass history= or call set_history first")
        if isinstance(micro_batch, bool) or not isinstance(micro_batch, int) or micro_batch < 1:
            raise ValueError(f"micro_batch must be a positive int, got {micro_batch!r}")
        model, cache = self.model, self.cache
        device = model.item_embedding.weight.device
        ids = torch.as_tensor(candidate_item_ids).reshape(-1).long().to(device)
        model._check_item_ids(ids, "candidate_item_ids")
        times = _candidate_times(candidate_timestamps, ids.numel(), cache.history).to(device)
        ctx = model.contextual_vectors(cache.contextual_values)  # [1, c, D]
        out = []
        for start in range(0, ids.numel(), micro_batch):
            chunk, chunk_times = ids[start:start + micro_batch], times[start:start + micro_batch]
            m = chunk.numel()
            meta = TokenMeta(torch.full((m,), cache.num_events, dtype=torch.long, device=device), chunk_times,
                             torch.zeros(m, dtype=torch.bool, device=device))
            user = self._run(model.candidate_tokens(chunk), meta, num_targets=m, keep=False)
            out.append(model.head(user, chunk, ctx.expand(m, -1, -1)))
        if not out:
            return torch.zeros(0, len(model.tasks), device=device)
        return torch.cat(out)


def _candidate_times(candidate_timestamps, count: int, history: UserHistory) -> Tensor:
    if candidate_timestamps is None:
        last = int(history.timestamps.max()) if history.timestamps.numel() else 0
        return torch.full((count,), last, dtype=torch.long)
    times = torch.as_tensor(candidate_timestamps).reshape(-1).long()
    if times.numel() == 1:
        return times.expand(count).clone()
    if times.numel() != count:
        raise ValueError(f"candidate_timestamps has {times.numel()} values for {count} candidates; give one per "
                         "candidate or a single query time")
    return times


@torch.no_grad()
def score_without_cache(model: DlrmHSTU, history: UserHistory, candidate_item_ids, candidate_timestamps=None,
                        micro_batch: int = 1) -> Tensor:
    """The full model on [history | m candidates] per micro-batch (the history re-encoded every time).

    micro_batch=1 is "one by one with the full model", the reference M-FALCON is checked against."""
    if model.training:
        raise ValueError("score_without_cache: call model.eval() first")
    ids = torch.as_tensor(candidate_item_ids).reshape(-1).long()
    times = _candidate_times(candidate_timestamps, ids.numel(), history)
    n = history.item_ids.numel()
    contextual = {k: torch.as_tensor(v).reshape(1).long() for k, v in history.contextual.items()}
    out = []
    for start in range(0, ids.numel(), micro_batch):
        chunk = ids[start:start + micro_batch]
        m = chunk.numel()
        batch = RankingBatch(
            history_item_ids=history.item_ids, history_actions=history.actions,
            history_timestamps=history.timestamps, history_offsets=torch.tensor([0, n]),
            candidate_item_ids=chunk, candidate_timestamps=times[start:start + micro_batch],
            candidate_offsets=torch.tensor([0, m]), labels=torch.zeros(m, len(model.tasks)), tasks=model.tasks,
            contextual=contextual)
        out.append(model(batch))
    return torch.cat(out) if out else torch.zeros(0, len(model.tasks))
