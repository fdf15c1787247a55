"""The ranking request contract (DLRM-HSTU, and any ranking model scoring a user's candidates): what a client sends,
what comes back, and the checks the client and the server both run.  Pure numpy, like `contract`.

A request holds B users (Merlin's ragged convention: list inputs travel as `<name>__values` + INT32 `<name>__offsets`
with B + 1 entries):

    history_item_id     ragged [B]   raw item ids (the log's dtype: INT64 or BYTES), any order
    history_action      ragged [B]   INT64 action bitmasks >= 0 (bit b = action b), aligned with the items
    history_timestamp   ragged [B]   INT64 unix seconds >= 0, aligned with the items
    candidate_item_id   ragged [B]   raw item ids to score, >= 1 per user
    query_timestamp     [B] INT64    optional: the candidates' query time; < 0 or absent: the latest history time
    <feature>           [B]          one raw value per contextual feature, the log's dtype ("" / missing: null)

Response: per task `<task>__values` FP32 [Lc] (sigmoid(logit) for a binary task, the predicted value for a
regression task; candidates of all users in request order) and `<task>__offsets` INT64 [B+1].

A user's model sequence is `contextual + tokens_per_event * min(history, max_uih_len) + candidates` tokens; more than
the model's `max_seq_len` is a `BadRequest` that says how many candidates that user can take.  Unseen raw ids map to
Categorify's OOV id (raw-id exports: ids outside [1, max_item_id] are a `BadRequest`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Dict, List, Mapping, Optional, Sequence

import numpy as np

from merlin_hstu.serving.contract import (
    BadRequest,
    ServingContract,
    TensorSpec,
    check_raw_ids,
    ragged_offsets,
    triton_dtype,
)

HISTORY_ITEMS = "history_item_id"
HISTORY_ACTIONS = "history_action"
HISTORY_TIMES = "history_timestamp"
CANDIDATE_ITEMS = "candidate_item_id"
QUERY_TIMESTAMP = "query_timestamp"
LIST_INPUTS = (HISTORY_ITEMS, HISTORY_ACTIONS, HISTORY_TIMES, CANDIDATE_ITEMS)
HISTORY_LISTS = (HISTORY_ITEMS, HISTORY_ACTIONS, HISTORY_TIMES)


@dataclass
class RankingRequest:
    """One user's raw request: history events (any order; equal times keep this order), candidates, context."""

    history_item_ids: Sequence
    history_actions: Sequence[int]
    history_timestamps: Sequence[int]
    candidate_item_ids: Sequence
    contextual: Mapping[str, object] = field(default_factory=dict)
    query_timestamp: Optional[int] = None  # None: the latest history time


@dataclass
class RankingScores:
    """Per task [Lc] scores (probabilities for binary tasks), candidates of all requests in request order."""

    scores: Dict[str, np.ndarray]
    offsets: np.ndarray  # [B+1]: request b's candidates are [offsets[b], offsets[b+1])

    def user(self, b: int) -> Dict[str, np.ndarray]:
        return {k: v[self.offsets[b]:self.offsets[b + 1]] for k, v in self.scores.items()}


@dataclass
class ValidRankingRequest:
    """A validated ranking request: the wire arrays (offsets int64, query time filled in with -1)."""

    arrays: Dict[str, np.ndarray]
    batch_size: int

    @property
    def candidate_offsets(self) -> np.ndarray:
        return self.arrays[f"{CANDIDATE_ITEMS}__offsets"]


def check_sequence_lengths(history_counts: np.ndarray, num_candidates: np.ndarray, max_uih_len: int,
                           num_contextual: int, tokens_per_event: int, max_seq_len: Optional[int]) -> None:
    """Every user's model sequence fits the model (the traced model has no check of its own)."""
    if not max_seq_len:
        return
    kept = np.minimum(history_counts, max_uih_len)
    tokens = num_contextual + tokens_per_event * kept + num_candidates
    if (tokens > max_seq_len).any():
        b = int(np.argmax(tokens > max_seq_len))
        raise BadRequest(
            f"{CANDIDATE_ITEMS}: request row {b} has {num_candidates[b]} candidates; with {kept[b]} history events "
            f"and {num_contextual} contextual tokens its sequence has {tokens[b]} tokens > the model's "
            f"max_seq_len={max_seq_len}; send at most {max_seq_len - tokens[b] + num_candidates[b]} "
            "candidates for this user per request")


@dataclass
class RankingContract(ServingContract):
    """Ranking: the item id dtype, the contextual features, the tasks and the model's sequence limits."""

    task: ClassVar[str] = "ranking"

    item_dtype: str  # "int64" | "string"
    contextual: Dict[str, str]  # feature -> "int64" | "string", in the model's order
    tasks: List[List[str]]  # [name, "binary" | "regression"]
    max_uih_len: int  # the history keeps its most recent max_uih_len events (ranking.json)
    max_seq_len: Optional[int] = None  # None: the model has no sequence limit (dlrm-baseline)
    tokens_per_event: int = 1
    item_encoding: str = "categorify"
    max_item_id: Optional[int] = None  # raw ids only
    model_name: str = "hstu_ranking"

    @property
    def task_names(self) -> List[str]:
        return [name for name, _ in self.tasks]

    def inputs(self, batched: bool = False) -> List[TensorSpec]:
        if batched:
            raise ValueError("the ranking export has no batched endpoint")
        item = triton_dtype(self.item_dtype)
        specs = []
        for name, dtype in ((HISTORY_ITEMS, item), (HISTORY_ACTIONS, "TYPE_INT64"), (HISTORY_TIMES, "TYPE_INT64"),
                            (CANDIDATE_ITEMS, item)):
            specs += [TensorSpec(f"{name}__values", dtype), TensorSpec(f"{name}__offsets", "TYPE_INT32")]
        specs.append(TensorSpec(QUERY_TIMESTAMP, "TYPE_INT64", optional=True))
        return specs + [TensorSpec(f, triton_dtype(kind)) for f, kind in self.contextual.items()]

    def outputs(self) -> List[TensorSpec]:
        out = []
        for name in self.task_names:
            out += [TensorSpec(f"{name}__values", "TYPE_FP32"), TensorSpec(f"{name}__offsets", "TYPE_INT64")]
        return out

    # --- client side ------------------------------------------------------------------------------
    def request_arrays(self, requests) -> Dict[str, np.ndarray]:
        """RankingRequest(s) -> wire arrays; the per-user checks name the request and the field."""
        requests = [requests] if isinstance(requests, RankingRequest) else list(requests)
        if not requests:
            raise BadRequest("a ranking request needs at least one RankingRequest (one per user)")
        lists: Dict[str, List[np.ndarray]] = {name: [] for name in LIST_INPUTS}
        for b, r in enumerate(requests):
            n = len(r.history_item_ids)
            for name, values in (("history_actions", r.history_actions), ("history_timestamps", r.history_timestamps)):
                if len(values) != n:
                    raise BadRequest(f"request {b}: {name} has {len(values)} values but history_item_ids has {n}; "
                                     "send one action bitmask and one timestamp per history event")
            missing = [f for f in self.contextual if f not in r.contextual]
            if missing:
                raise BadRequest(f"request {b}: contextual lacks {missing}; the model was trained with contextual "
                                 f"features {list(self.contextual)} (None = missing value)")
            unknown = sorted(set(r.contextual) - set(self.contextual))
            if unknown:
                raise BadRequest(f"request {b}: contextual feature(s) {unknown} are not inputs of this model; it "
                                 f"takes {list(self.contextual)}")
            lists[HISTORY_ITEMS].append(_values(r.history_item_ids, self.item_dtype, f"request {b}: history_item_ids"))
            lists[HISTORY_ACTIONS].append(_values(r.history_actions, "int64", f"request {b}: history_actions"))
            lists[HISTORY_TIMES].append(_values(r.history_timestamps, "int64", f"request {b}: history_timestamps"))
            lists[CANDIDATE_ITEMS].append(_values(r.candidate_item_ids, self.item_dtype,
                                                  f"request {b}: candidate_item_ids"))
        arrays = {}
        for name, parts in lists.items():
            arrays[f"{name}__values"] = np.concatenate(parts) if parts else np.zeros(0, np.int64)
            arrays[f"{name}__offsets"] = np.concatenate([[0], np.cumsum([len(p) for p in parts])]).astype(np.int32)
        arrays[QUERY_TIMESTAMP] = np.array([-1 if r.query_timestamp is None else int(r.query_timestamp)
                                            for r in requests], dtype=np.int64)
        for f, kind in self.contextual.items():
            arrays[f] = _values([r.contextual[f] for r in requests], kind, f"contextual {f!r}", missing_ok=True)
        return arrays

    def result(self, outputs: Mapping[str, np.ndarray], valid: ValidRankingRequest) -> RankingScores:
        return RankingScores({t: np.asarray(outputs[f"{t}__values"]).reshape(-1) for t in self.task_names},
                             valid.candidate_offsets.copy())

    # --- validation -------------------------------------------------------------------------------
    def validate(self, arrays: Mapping[str, np.ndarray], batched: bool = False) -> ValidRankingRequest:
        if batched:
            raise BadRequest("the ranking export has no batched endpoint; send B users in one plain request")
        a = self.check_tensors(arrays, self.inputs())
        offsets = {}
        batch = len(a[f"{HISTORY_ITEMS}__offsets"]) - 1
        if batch < 1:
            raise BadRequest(f"'{HISTORY_ITEMS}__offsets' must have B + 1 >= 2 entries: a request needs >= 1 user")
        for name in LIST_INPUTS:
            offsets[name] = ragged_offsets(a[f"{name}__offsets"], name, batch, len(a[f"{name}__values"]),
                                           row="request row")
        counts = np.diff(offsets[HISTORY_ITEMS])
        for name in (HISTORY_ACTIONS, HISTORY_TIMES):
            if not np.array_equal(offsets[name], offsets[HISTORY_ITEMS]):
                b = int(np.argmax(np.diff(offsets[name]) != counts))
                raise BadRequest(f"ragged lists differ in length: request row {b} has {int(counts[b])} "
                                 f"{HISTORY_ITEMS} value(s) but {int(np.diff(offsets[name])[b])} {name} value(s); "
                                 "send one action bitmask and one timestamp per history event")
        num_cands = np.diff(offsets[CANDIDATE_ITEMS])
        for name, n in ((HISTORY_ITEMS, counts), (CANDIDATE_ITEMS, num_cands)):
            empty = np.flatnonzero(n == 0)
            if len(empty):
                raise BadRequest(f"{name}: request row(s) {empty[:10].tolist()} have none; every user needs >= 1 "
                                 "history event and >= 1 candidate")
        for name in (HISTORY_ACTIONS, HISTORY_TIMES):
            values = a[f"{name}__values"]
            if len(values) and values.min() < 0:
                raise BadRequest(f"'{name}__values' has a negative value ({int(values.min())}); "
                                 + ("actions are bitmasks >= 0" if name == HISTORY_ACTIONS else
                                    "timestamps are unix seconds >= 0"))
        if self.item_encoding == "raw":
            for name in (HISTORY_ITEMS, CANDIDATE_ITEMS):
                check_raw_ids(a[f"{name}__values"], f"{name}__values", int(self.max_item_id))
        for f in self.contextual:
            if len(a[f]) != batch:
                raise BadRequest(f"contextual feature {f!r} has {len(a[f])} value(s) for {batch} request row(s); "
                                 "send one value per user (\"\" or a missing value: the null id)")
        query = a.get(QUERY_TIMESTAMP, np.full(batch, -1, dtype=np.int64))
        if len(query) != batch:
            raise BadRequest(f"{QUERY_TIMESTAMP!r} has {len(query)} value(s) for {batch} request row(s); send one per "
                             "user (< 0: the latest history time), or omit it")
        check_sequence_lengths(counts, num_cands, self.max_uih_len, len(self.contextual), self.tokens_per_event,
                               self.max_seq_len)
        out = dict(a)
        for name in LIST_INPUTS:
            out[f"{name}__offsets"] = offsets[name]
        out[QUERY_TIMESTAMP] = query.astype(np.int64)
        return ValidRankingRequest(out, batch)

    def wire(self, valid: ValidRankingRequest, batched: bool = False) -> Dict[str, np.ndarray]:
        if batched:
            raise ValueError("the ranking export has no batched endpoint")
        return {k: v.astype(np.int32) if k.endswith("__offsets") else v for k, v in valid.arrays.items()}

    # --- the serving graph's side -----------------------------------------------------------------
    def table(self, requests: Sequence[ValidRankingRequest]):
        """Several validated requests as one TensorTable (ragged offsets shifted, per-user columns stacked)."""
        from merlin.table import TensorTable

        columns = {}
        for name in LIST_INPUTS:
            parts = [r.arrays for r in requests]
            shifts = np.cumsum([0] + [int(p[f"{name}__offsets"][-1]) for p in parts[:-1]])
            columns[f"{name}__values"] = np.concatenate([p[f"{name}__values"] for p in parts])
            columns[f"{name}__offsets"] = np.concatenate(
                [parts[0][f"{name}__offsets"][:1]] + [p[f"{name}__offsets"][1:] + s for p, s in zip(parts, shifts)])
        for name in [QUERY_TIMESTAMP, *self.contextual]:
            columns[name] = np.concatenate([r.arrays[name] for r in requests])
        return TensorTable(columns)

    def split(self, out, requests: Sequence[ValidRankingRequest]) -> List[tuple]:
        """Per request: (<task>__values [Lc_i], <task>__offsets [B_i + 1]) for each task, in `outputs()` order."""
        results, cand = [], 0
        values = {t: np.asarray(out[t].values, dtype=np.float32).reshape(-1) for t in self.task_names}
        for r in requests:
            offsets = r.candidate_offsets
            result = []
            for t in self.task_names:
                result += [values[t][cand:cand + int(offsets[-1])], offsets.astype(np.int64)]
            results.append(tuple(result))
            cand += int(offsets[-1])
        return results


def _values(values: Sequence, kind: str, name: str, missing_ok: bool = False) -> np.ndarray:
    """Client side: raw values as the wire dtype; missing values (None) become "" for text when `missing_ok`."""
    if kind == "int64":
        if any(v is None for v in values):
            raise BadRequest(f"{name} holds None; this model takes integers there")
        try:
            return np.asarray(list(values), dtype=np.int64)
        except (TypeError, ValueError):
            raise BadRequest(f"{name} must hold integers for this model, got {list(values)[:5]}...") from None
    if not missing_ok and any(v is None for v in values):
        raise BadRequest(f"{name} holds None; send an id for every entry")
    return np.array([b"" if v is None else str(v).encode("utf-8") for v in values], dtype=object)
