"""The request contract of an exported repository: which tensors a client sends, and what each may hold.

Pure numpy on purpose: the Triton entry model, the client and the tests all validate with this module, and the
entry model must stay light (it imports neither Merlin nor torch).

A request carries B users (Merlin's ragged convention, `max_batch_size: 0`):

    <id_column>                  [B]     INT64 or BYTES   user/session id (echo only: results follow row order)
    <item_column>__values        [N]     INT64 or BYTES   raw item ids of all users, concatenated
    <item_column>__offsets       [B+1]   INT32            user b's events are values[offsets[b]:offsets[b+1]]
    <action_column>__values/__offsets                     same layout (when the run has actions)
    <timestamp_column>__values/__offsets  INT64 unix s    same layout (when the run has timestamps)
    query_timestamp              [B]     INT64  optional  when the recommendation is made (default: last event)
    top_k                        [1]     INT32  optional  1 <= K <= max_k (default: the export's K)
    exclude_history              [1]     BOOL   optional  drop the user's history window from the results
                                                          (default: the export's setting, on for retrieval)

and gets back `item_ids` [B, K] (raw ids, best first) and `scores` [B, K] FP32 (cosine similarity).

The batched endpoint (`<model>_batched`, what `HSTUClient` uses) takes the same tensors with a leading request
dimension of 1 on each (`user_id` [1, B], `item_id__values` [1, N], `top_k` [1, 1], ...), all of them required
(`query_timestamp` -1: the last event's time).  That dimension lets Triton's dynamic batcher hand several
concurrent requests to one model execution.

The action lists are optional when the export's `reads_actions` is false (the HSTU retrieval model reads item
ids and timestamps only, so the export drops the workflow's action branch); when sent they are still checked.

Documented behaviour instead of errors: unknown item ids (and actions) map to Categorify's out-of-vocabulary id;
events are ordered by timestamp (stable) before use; a history longer than the model's window keeps its most
recent `max_history` events.  Everything else that is wrong is a `BadRequest` whose message names the tensor.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

QUERY_TIMESTAMP = "query_timestamp"
TOP_K = "top_k"
EXCLUDE_HISTORY = "exclude_history"
OUT_ITEM_IDS = "item_ids"
OUT_SCORES = "scores"
DEFAULT_QUERY_TIME = -1  # internal sentinel: "the last event's time"
CONTRACT_PARAMETER = "merlin_hstu_contract"  # key of the contract JSON in the models' config parameters


class BadRequest(ValueError):
    """The request cannot be served as sent; the message names the tensor and the fix."""


@dataclass
class RequestContract:
    """Column names and dtypes of the raw request, plus the export's limits and defaults."""

    id_column: str
    id_dtype: str  # "int64" | "string"
    item_column: str
    item_dtype: str  # "int64" | "string"
    action_column: Optional[str] = None
    action_dtype: Optional[str] = None
    timestamp_column: Optional[str] = None
    reads_actions: bool = True  # False: the served workflow drops the action branch (the model never reads it)
    max_history: int = 200
    max_k: int = 10
    default_k: int = 10
    exclude_history: bool = True
    model_name: str = "hstu_topk"
    batched_model_name: str = "hstu_topk_batched"
    extra: dict = field(default_factory=dict)

    # --- layout -----------------------------------------------------------------------------------
    @property
    def list_columns(self) -> List[str]:
        """Raw per-event columns a request may send as lists, item first."""
        return [c for c in (self.item_column, self.action_column, self.timestamp_column) if c is not None]

    @property
    def served_list_columns(self) -> List[str]:
        """The list columns the served workflow consumes (actions only when `reads_actions`)."""
        return [c for c in self.list_columns if c != self.action_column or self.reads_actions]

    @property
    def optional_list_columns(self) -> List[str]:
        """List columns that are accepted and validated but not needed (actions, when not read)."""
        return [c for c in self.list_columns if c not in self.served_list_columns]

    def column_dtype(self, column: str) -> str:
        if column == self.timestamp_column:
            return "int64"
        return {self.id_column: self.id_dtype, self.item_column: self.item_dtype,
                self.action_column: self.action_dtype}[column]

    def required_inputs(self) -> List[Tuple[str, str, List[int]]]:
        """(tensor name, Triton dtype, dims) of every required input."""
        return [(self.id_column, triton_dtype(self.id_dtype), [-1])] + self._list_inputs(self.served_list_columns)

    def _list_inputs(self, columns: List[str]) -> List[Tuple[str, str, List[int]]]:
        out = []
        for col in columns:
            out.append((f"{col}__values", triton_dtype(self.column_dtype(col)), [-1]))
            out.append((f"{col}__offsets", "TYPE_INT32", [-1]))
        return out

    def optional_inputs(self) -> List[Tuple[str, str, List[int]]]:
        options = [(QUERY_TIMESTAMP, "TYPE_INT64", [-1]), (TOP_K, "TYPE_INT32", [1]), (EXCLUDE_HISTORY, "TYPE_BOOL", [1])]
        return self._list_inputs(self.optional_list_columns) + options

    def batched_inputs(self) -> List[Tuple[str, str, List[int]]]:
        """The batched endpoint's inputs (after its leading request dimension): the served columns plus the
        options, none optional (see `ValidRequest.to_wire`)."""
        return self.required_inputs() + self.optional_inputs()[-3:]

    def outputs(self) -> List[Tuple[str, str, List[int]]]:
        return [(OUT_ITEM_IDS, triton_dtype(self.item_dtype), [-1, -1]), (OUT_SCORES, "TYPE_FP32", [-1, -1])]

    # --- persistence ------------------------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def load(cls, path: str | Path) -> "RequestContract":
        return cls(**json.loads(Path(path).read_text()))

    # --- validation -------------------------------------------------------------------------------
    def validate(self, arrays: Dict[str, np.ndarray], batched: bool = False) -> "ValidRequest":
        """Check a request given as {tensor name: array}; return it normalised, or raise `BadRequest`.

        `batched=True` checks a request to the batched endpoint instead: every tensor carries a leading
        request dimension of 1, all of `batched_inputs()` are required, and query_timestamp -1 means "the
        user's last event time".
        """
        if batched:
            arrays = _strip_request_dim(arrays)
            required = self.batched_inputs()
            known = {name for name, _, _ in required}
        else:
            required = self.required_inputs()
            known = {name for name, _, _ in required} | {name for name, _, _ in self.optional_inputs()}
        unknown = sorted(set(arrays) - known)
        if unknown:
            raise BadRequest(f"unexpected input tensor(s) {unknown}; this model takes {sorted(known)}")
        missing = [name for name, _, _ in required if name not in arrays]
        if missing:
            raise BadRequest(f"missing input tensor(s) {missing}; every request needs "
                             f"{', '.join(name for name, _, _ in required)}")
        ids = _vector(arrays[self.id_column], self.id_column)
        _check_kind(ids, self.id_column, self.id_dtype)
        batch = len(ids)
        if batch == 0:
            raise BadRequest(f"{self.id_column!r} is empty: a request needs at least one user")
        lists: Dict[str, np.ndarray] = {}
        offsets: Optional[np.ndarray] = None
        for col in self.list_columns:
            if col in self.optional_list_columns:
                sent = [n for n in (f"{col}__values", f"{col}__offsets") if n in arrays]
                if not sent:
                    continue
                if len(sent) == 1:
                    raise BadRequest(f"{sent[0]!r} was sent without its partner; send both {col}__values and "
                                     f"{col}__offsets, or neither (this model does not read {col!r})")
            values = _vector(arrays[f"{col}__values"], f"{col}__values")
            _check_kind(values, f"{col}__values", self.column_dtype(col))
            col_offsets = _offsets(arrays[f"{col}__offsets"], col, batch, len(values))
            if offsets is None:
                offsets = col_offsets
            elif not np.array_equal(offsets, col_offsets):
                row = int(np.argmax(np.diff(offsets) != np.diff(col_offsets)))
                raise BadRequest(
                    f"ragged lists differ in length: user row {row} has {int(np.diff(offsets)[row])} "
                    f"{self.item_column!r} value(s) but {int(np.diff(col_offsets)[row])} {col!r} value(s); "
                    f"every event needs one value in each of {self.list_columns} (make the offsets equal)")
            lists[col] = values
        counts = np.diff(offsets)
        empty = np.flatnonzero(counts == 0)
        if len(empty):
            raise BadRequest(
                f"user row(s) {empty[:10].tolist()} ({self.id_column}={ids[empty[0]]!r} first) have an empty history; "
                "HSTU needs at least one event per user to recommend (drop those rows or send their events)")
        if self.timestamp_column is not None:
            times = lists[self.timestamp_column]
            if len(times) and times.min() < 0:
                raise BadRequest(f"{self.timestamp_column}__values has negative value(s) (first "
                                 f"{int(times[np.argmax(times < 0)])}); timestamps are unix seconds >= 0")
        query = np.full(batch, DEFAULT_QUERY_TIME, dtype=np.int64)
        if QUERY_TIMESTAMP in arrays:
            query = _vector(arrays[QUERY_TIMESTAMP], QUERY_TIMESTAMP)
            only_default = batched and query.dtype.kind in "iu" and bool(np.all(query == DEFAULT_QUERY_TIME))
            if self.timestamp_column is None and not only_default:
                raise BadRequest(f"{QUERY_TIMESTAMP!r} was sent, but this model was trained without timestamps; "
                                 "drop the input" + (" (or send -1 for every user)" if batched else ""))
            _check_kind(query, QUERY_TIMESTAMP, "int64")
            if len(query) != batch:
                raise BadRequest(f"{QUERY_TIMESTAMP!r} has {len(query)} value(s) for {batch} user row(s); "
                                 "send one query time per user (or omit it to use each user's last event time)")
            if batched and query.min() < DEFAULT_QUERY_TIME:
                raise BadRequest(f"{QUERY_TIMESTAMP!r} has a value below -1; send unix seconds >= 0, or -1 for "
                                 "the user's last event time")
            if not batched and query.min() < 0:
                raise BadRequest(f"{QUERY_TIMESTAMP!r} has a negative value; send unix seconds >= 0, or omit the "
                                 "input to use each user's last event time")
            query = query.astype(np.int64)
        k = self.default_k
        if TOP_K in arrays:
            k_array = np.asarray(arrays[TOP_K]).reshape(-1)
            _check_kind(k_array, TOP_K, "int64")
            if k_array.shape != (1,):
                raise BadRequest(f"{TOP_K!r} must hold exactly one value, got shape {tuple(np.shape(arrays[TOP_K]))}")
            k = int(k_array[0])
            if not 1 <= k <= self.max_k:
                raise BadRequest(f"{TOP_K!r}={k} is out of range; this export serves 1 <= top_k <= {self.max_k}")
        exclude = self.exclude_history
        if EXCLUDE_HISTORY in arrays:
            flag = np.asarray(arrays[EXCLUDE_HISTORY]).reshape(-1)
            if flag.shape != (1,) or flag.dtype != np.bool_:
                raise BadRequest(f"{EXCLUDE_HISTORY!r} must be one BOOL value, got dtype {flag.dtype} shape "
                                 f"{tuple(np.shape(arrays[EXCLUDE_HISTORY]))}")
            exclude = bool(flag[0])
        return ValidRequest(ids=ids, lists=lists, offsets=offsets, query_timestamp=query, top_k=k,
                            exclude_history=exclude)


@dataclass
class ValidRequest:
    """A validated request: B users, lists sharing one offsets array (int64)."""

    ids: np.ndarray
    lists: Dict[str, np.ndarray]
    offsets: np.ndarray
    query_timestamp: np.ndarray
    top_k: int
    exclude_history: bool

    @property
    def batch_size(self) -> int:
        return len(self.ids)

    def to_wire(self, contract: RequestContract) -> Dict[str, np.ndarray]:
        """Every tensor the batched endpoint takes, without the leading request dimension (defaults filled in;
        query time -1 = the last event's time)."""
        arrays = {contract.id_column: self.ids}
        for col in contract.served_list_columns:
            arrays[f"{col}__values"] = self.lists[col]
            arrays[f"{col}__offsets"] = self.offsets.astype(np.int32)
        arrays[QUERY_TIMESTAMP] = self.query_timestamp.astype(np.int64)
        arrays[TOP_K] = np.array([self.top_k], dtype=np.int32)
        arrays[EXCLUDE_HISTORY] = np.array([self.exclude_history], dtype=bool)
        return arrays


def triton_dtype(kind: str) -> str:
    return {"int64": "TYPE_INT64", "string": "TYPE_STRING"}[kind]


def _strip_request_dim(arrays: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    out = {}
    for name, array in arrays.items():
        array = np.asarray(array)
        if array.ndim == 0 or array.shape[0] != 1:
            raise BadRequest(f"{name!r} has shape {array.shape}; the batched endpoint takes one request per call, so "
                             "every tensor needs a leading dimension of 1 (e.g. user_id [1, B], top_k [1, 1])")
        out[name] = array[0]
    return out


def _vector(array, name: str) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim != 1:
        raise BadRequest(f"{name!r} must be 1-D, got shape {array.shape}")
    return array


def _check_kind(array: np.ndarray, name: str, kind: str) -> None:
    if kind == "string":
        if array.dtype != object and array.dtype.kind not in "SU":
            raise BadRequest(f"{name!r} must hold strings (BYTES), got dtype {array.dtype}")
        return
    if array.dtype.kind not in "iu":
        raise BadRequest(f"{name!r} must hold integers (INT64), got dtype {array.dtype}")


def _offsets(array, column: str, batch: int, num_values: int) -> np.ndarray:
    name = f"{column}__offsets"
    offsets = _vector(array, name)
    if offsets.dtype.kind not in "iu":
        raise BadRequest(f"{name!r} must hold integers (INT32), got dtype {offsets.dtype}")
    offsets = offsets.astype(np.int64)
    if len(offsets) != batch + 1:
        raise BadRequest(f"{name!r} has {len(offsets)} entries for {batch} user row(s); it needs B + 1 = {batch + 1} "
                         f"(offsets[b]..offsets[b+1] delimit user b's events)")
    if offsets[0] != 0 or offsets[-1] != num_values:
        raise BadRequest(f"{name!r} must start at 0 and end at len({column}__values) = {num_values}, "
                         f"got {int(offsets[0])} .. {int(offsets[-1])}")
    if np.any(np.diff(offsets) < 0):
        raise BadRequest(f"{name!r} must be non-decreasing (it holds cumulative list lengths)")
    return offsets
