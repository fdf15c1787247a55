"""Request contracts: what a served model takes and answers, checked by the same code in the client and the server.

Every exported repository carries one contract: in `serving.json` and in its Triton models' config parameter
`merlin_hstu_contract`, from which a client reads it, so a client needs no local files.  There is one contract
class per task, and all three are declared the same way (a dataclass subclass of `ServingContract`):

    inputs(batched)          the wire tensors, `TensorSpec(name, Triton dtype, dims, optional)`
    outputs()                the response tensors
    request_arrays(request)  a typed request -> {tensor name: array}           (the client side)
    validate(arrays)         {tensor name: array} -> a validated request, or `BadRequest` naming the tensor and
                             the fix (the client before sending, the server before serving: the same checks)
    wire(valid, batched)     a validated request -> the tensors to send
    table(valids)            several validated requests stacked into what the serving Ensemble transforms
    split(out, valids)       the Ensemble's output -> per request, its output arrays in `outputs()` order
    result(outputs, valid)   the response tensors -> the typed answer

    task        contract                                  typed request            answer
    retrieval   RequestContract (this module)             RetrievalRequest         Recommendations
    ranking     ranking_contract.RankingContract          [RankingRequest, ...]    RankingScores
    ctr         ctr_contract.CTRContract                  CTRRequest (raw rows)    probabilities [B]

`contract_from_dict` rebuilds any of them from its JSON (`to_dict`).  Pure numpy (pandas only inside the
client-side builders) on purpose: the Triton entry model imports this module and must stay light.

The retrieval request carries B users (Merlin's ragged convention, `max_batch_size: 0`):

    <id_column>                  [B]     INT64 or BYTES   user/session id (echo only: results follow row order)
    <item_column>__values        [N]     INT64 or BYTES   raw item ids of all users, concatenated
    <item_column>__offsets       [B+1]   INT32            user b's events are values[offsets[b]:offsets[b+1]]
    <action_column>__values/__offsets                     same layout (when the run has actions)
    <timestamp_column>__values/__offsets  INT64 unix s    same layout (when the run has timestamps)
    query_timestamp              [B]     INT64  optional  when the recommendation is made (default: last event;
                                                          refused when the contract's query_time is false)
    top_k                        [1]     INT32  optional  1 <= K <= max_k (default: the export's K)
    exclude_history              [1]     BOOL   optional  drop the user's history window from the results
                                                          (default: the export's setting, on for retrieval)

and gets back `item_ids` [B, K] (raw ids, best first) and `scores` [B, K] FP32 (cosine similarity).

The batched endpoint (`<model>_batched`, what `ServingClient` uses) takes the same tensors with a leading request
dimension of 1 on each (`user_id` [1, B], `item_id__values` [1, N], `top_k` [1, 1], ...), all of them required
(`query_timestamp` -1: the last event's time).  That dimension lets Triton's dynamic batcher hand several
concurrent requests to one model execution.

The action lists are optional when the export's `reads_actions` is false (a retrieval model without action
inputs reads item ids and timestamps only, so the export drops the workflow's action branch); when sent they are
still checked.  A model with action inputs (`inputs.actions` concat | interleave) reads them: they are required.

Documented behaviour instead of errors: unknown item ids (and actions) map to Categorify's out-of-vocabulary id;
events are ordered by timestamp (stable) before use; a history longer than the model's window keeps its most
recent `max_history` events.  A run trained on raw item ids (`item_encoding` "raw", no Categorify: MovieLens)
has no out-of-vocabulary row, so an id outside [1, max_item_id] is a `BadRequest`.  Everything else that is wrong
is a `BadRequest` whose message names the tensor.
"""
from __future__ import annotations

import importlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from merlin_hstu.common import schema as roles  # light: no Merlin import

QUERY_TIMESTAMP = "query_timestamp"
TOP_K = "top_k"
EXCLUDE_HISTORY = "exclude_history"
OUT_ITEM_IDS = "item_ids"
OUT_SCORES = "scores"
DEFAULT_QUERY_TIME = -1  # internal sentinel: "the last event's time"
CONTRACT_PARAMETER = "merlin_hstu_contract"  # key of the contract JSON in the models' config parameters
ITEM_ENCODINGS = ("categorify", "raw")


class BadRequest(ValueError):
    """The request cannot be served as sent; the message names the field (tensor, column or request) and the fix."""


# ---------------------------------------------------------------------------------------------------------------
# The shared base: declaration and the checks every contract runs the same way
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorSpec:
    """One wire tensor: its name, Triton config dtype (TYPE_INT64, TYPE_STRING, ...), dims, and whether a request
    may leave it out."""

    name: str
    dtype: str
    dims: Tuple[int, ...] = (-1,)
    optional: bool = False


# Triton dtype -> what `check_kind` accepts
_KINDS = {"TYPE_INT64": "int64", "TYPE_INT32": "int64", "TYPE_STRING": "string", "TYPE_FP64": "number",
          "TYPE_FP32": "number", "TYPE_BOOL": "bool"}


class ServingContract:
    """Base of the per-task contracts (see the module docstring for the methods each one provides)."""

    task: ClassVar[str] = ""
    model_name: str  # the public Triton model: every subclass has this field
    batched_model_name: Optional[str] = None  # a second model behind Triton's dynamic batcher (retrieval only)

    def inputs(self, batched: bool = False) -> List[TensorSpec]:
        raise NotImplementedError

    def outputs(self) -> List[TensorSpec]:
        raise NotImplementedError

    # --- the shared checks ----------------------------------------------------------------------------
    def check_names(self, arrays: Mapping[str, Any], specs: Sequence[TensorSpec]) -> None:
        """No tensor the model does not take; every required one present."""
        known = {s.name for s in specs}
        unknown = sorted(set(arrays) - known)
        if unknown:
            raise BadRequest(f"unexpected input tensor(s) {unknown}; this model takes {sorted(known)}")
        required = [s.name for s in specs if not s.optional]
        missing = [name for name in required if name not in arrays]
        if missing:
            raise BadRequest(f"missing input tensor(s) {missing}; every request needs {', '.join(required)}")

    def check_tensors(self, arrays: Mapping[str, Any], specs: Sequence[TensorSpec]) -> Dict[str, np.ndarray]:
        """`check_names`, then every sent tensor 1-D and of its spec's kind; -> {name: np.ndarray}."""
        self.check_names(arrays, specs)
        out = {}
        for spec in specs:
            if spec.name in arrays:
                out[spec.name] = check_kind(vector(arrays[spec.name], spec.name), spec.name, _KINDS[spec.dtype])
        return out

    # --- persistence -----------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"task": self.task, **asdict(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    # --- defaults for contracts without a batched endpoint ---------------------------------------------
    def wire(self, valid, batched: bool = False) -> Dict[str, np.ndarray]:
        """The tensors to send for a validated request."""
        if batched:
            raise ValueError(f"the {self.task} export has no batched endpoint")
        return dict(valid.arrays)


CONTRACTS = {"retrieval": ("merlin_hstu.serving.contract", "RequestContract"),
             "ranking": ("merlin_hstu.serving.ranking_contract", "RankingContract"),
             "ctr": ("merlin_hstu.serving.ctr_contract", "CTRContract")}


def contract_class(task: str) -> type:
    if task not in CONTRACTS:
        raise ValueError(f"unknown serving task {task!r}; known: {sorted(CONTRACTS)}")
    module, name = CONTRACTS[task]
    return getattr(importlib.import_module(module), name)


def contract_from_dict(d: Mapping) -> ServingContract:
    """Any task's contract from `to_dict()` output.  Without "task" it is a retrieval contract (what repositories
    exported before ranking and CTR shared this format wrote)."""
    d = dict(d)
    return contract_class(d.pop("task", "retrieval"))(**d)


def contract_from_config(config: Mapping) -> ServingContract:
    """The contract stored in a Triton model config (the dict `args["model_config"]` or get_model_config gives)."""
    return contract_from_dict(json.loads(config["parameters"][CONTRACT_PARAMETER]["string_value"]))


def triton_dtype(kind: str) -> str:
    return {"int64": "TYPE_INT64", "string": "TYPE_STRING"}[kind]


def vector(array, name: str) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim != 1:
        raise BadRequest(f"{name!r} must be 1-D, got shape {array.shape}")
    return array


def check_kind(array: np.ndarray, name: str, kind: str) -> np.ndarray:
    """`array` holds `kind` ("int64" | "string" | "number" | "bool") values, or BadRequest naming `name`."""
    if kind == "string":
        if array.dtype != object and array.dtype.kind not in "SU":
            raise BadRequest(f"{name!r} must hold strings (BYTES), got dtype {array.dtype}")
    elif kind == "int64":
        if array.dtype.kind not in "iu":
            raise BadRequest(f"{name!r} must hold integers (INT64), got dtype {array.dtype}")
    elif kind == "number":
        if array.dtype.kind not in "iuf":
            raise BadRequest(f"{name!r} must hold numbers (FP64; NaN = missing), got dtype {array.dtype}")
    elif array.dtype != np.bool_:
        raise BadRequest(f"{name!r} must hold BOOL values, got dtype {array.dtype}")
    return array


def ragged_offsets(array, column: str, batch: int, num_values: int, row: str = "user row") -> np.ndarray:
    """`<column>__offsets` as int64, checked against B rows and len(<column>__values)."""
    name = f"{column}__offsets"
    offsets = vector(array, name)
    if offsets.dtype.kind not in "iu":
        raise BadRequest(f"{name!r} must hold integers (INT32), got dtype {offsets.dtype}")
    offsets = offsets.astype(np.int64)
    if len(offsets) != batch + 1:
        raise BadRequest(f"{name!r} has {len(offsets)} entries for {batch} {row}(s); it needs B + 1 = {batch + 1} "
                         f"(offsets[b]..offsets[b+1] delimit {row} b's values)")
    if offsets[0] != 0 or offsets[-1] != num_values:
        raise BadRequest(f"{name!r} must start at 0 and end at len({column}__values) = {num_values}, "
                         f"got {int(offsets[0])} .. {int(offsets[-1])}")
    if np.any(np.diff(offsets) < 0):
        raise BadRequest(f"{name!r} must be non-decreasing (it holds cumulative list lengths)")
    return offsets


def check_raw_ids(values: np.ndarray, name: str, max_item_id: int) -> None:
    """Raw item ids (no Categorify) index the embedding table directly: 1 <= id <= max_item_id."""
    bad = (values < 1) | (values > max_item_id)
    if bad.any():
        raise BadRequest(f"{name!r} holds item id {int(values[np.argmax(bad)])}, outside [1, {max_item_id}]: this "
                         "model was trained on raw item ids (no Categorify), so there is no out-of-vocabulary row; "
                         "send catalogue ids only")


def wire_array(array: np.ndarray) -> np.ndarray:
    """An output as Triton sends it: text as utf-8 BYTES, numbers contiguous."""
    array = np.asarray(array)
    if array.dtype == object or array.dtype.kind in "SU":
        return np.vectorize(lambda v: v if isinstance(v, bytes) else str(v).encode("utf-8"), otypes=[object])(array)
    return np.ascontiguousarray(array)


def text(array: np.ndarray) -> np.ndarray:
    """BYTES results back to str (string ids travel as utf-8 bytes)."""
    if array.dtype == object:
        return np.vectorize(lambda v: v.decode("utf-8") if isinstance(v, bytes) else v, otypes=[object])(array)
    return array


def encode_values(values: Sequence, kind: str, name: str) -> np.ndarray:
    """Client side: a column of raw values as the wire dtype `kind` ("int64" | "string")."""
    if kind == "int64":
        array = np.asarray(values)
        if array.dtype.kind not in "iu":
            raise BadRequest(f"column {name!r} must hold integer ids for this model, got dtype {array.dtype}")
        return array.astype(np.int64)
    return np.array([str(v).encode("utf-8") for v in values], dtype=object)


def strip_request_dim(arrays: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """A batched-endpoint request without its leading request dimension of 1."""
    out = {}
    for name, array in arrays.items():
        array = np.asarray(array)
        if array.ndim == 0 or array.shape[0] != 1:
            raise BadRequest(f"{name!r} has shape {array.shape}; the batched endpoint takes one request per call, so "
                             "every tensor needs a leading dimension of 1 (e.g. user_id [1, B], top_k [1, 1])")
        out[name] = array[0]
    return out


# ---------------------------------------------------------------------------------------------------------------
# Retrieval
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class RetrievalRequest:
    """Raw events, one row per event with the run's raw columns (users in first-appearance order, their events in
    row order: the server sorts them by time), plus the per-request options."""

    events: Any  # pandas.DataFrame
    query_timestamps: Optional[Mapping] = None  # user id -> unix seconds (default: each user's last event)
    top_k: Optional[int] = None  # default: the export's K
    exclude_history: Optional[bool] = None  # default: the export's setting


@dataclass
class Recommendations:
    """Per-user results in request order."""

    user_ids: np.ndarray  # [B]
    item_ids: np.ndarray  # [B, K] raw ids, best first
    scores: np.ndarray  # [B, K]

    def to_frame(self, id_column: str = roles.LOG_USER_ID):
        import pandas as pd

        b, k = self.item_ids.shape
        return pd.DataFrame({id_column: np.repeat(self.user_ids, k), "rank": np.tile(np.arange(1, k + 1), b),
                             roles.RECOMMENDED_ITEM_ID: self.item_ids.reshape(-1), "score": self.scores.reshape(-1)})


@dataclass
class RequestContract(ServingContract):
    """Retrieval: column names and dtypes of the raw request, plus the export's limits and defaults."""

    task: ClassVar[str] = "retrieval"

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
    item_encoding: str = "categorify"  # "raw": ids are the embedding rows (no Categorify), 1..max_item_id
    max_item_id: Optional[int] = None  # raw ids only
    extra: dict = field(default_factory=dict)
    query_time: bool = True  # False: the model predicts at the last event's time only (tr.Trainer models)

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

    def _list_inputs(self, columns: List[str], optional: bool = False) -> List[TensorSpec]:
        out = []
        for col in columns:
            out.append(TensorSpec(f"{col}__values", triton_dtype(self.column_dtype(col)), (-1,), optional))
            out.append(TensorSpec(f"{col}__offsets", "TYPE_INT32", (-1,), optional))
        return out

    def inputs(self, batched: bool = False) -> List[TensorSpec]:
        """The plain model's inputs; `batched=True`: the batched endpoint's (after its leading request
        dimension): the served columns plus the options, none optional (see `ValidRequest.to_wire`)."""
        served = [TensorSpec(self.id_column, triton_dtype(self.id_dtype))] + self._list_inputs(self.served_list_columns)
        options = [TensorSpec(QUERY_TIMESTAMP, "TYPE_INT64", (-1,), True), TensorSpec(TOP_K, "TYPE_INT32", (1,), True),
                   TensorSpec(EXCLUDE_HISTORY, "TYPE_BOOL", (1,), True)]
        if batched:
            return served + [TensorSpec(s.name, s.dtype, s.dims) for s in options]
        return served + self._list_inputs(self.optional_list_columns, optional=True) + options

    def outputs(self) -> List[TensorSpec]:
        return [TensorSpec(OUT_ITEM_IDS, triton_dtype(self.item_dtype), (-1, -1)),
                TensorSpec(OUT_SCORES, "TYPE_FP32", (-1, -1))]

    # --- persistence ------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path) -> "RequestContract":
        d = json.loads(Path(path).read_text())
        d.pop("task", None)
        return cls(**d)

    # --- client side ------------------------------------------------------------------------------
    def request_arrays(self, request: RetrievalRequest) -> Dict[str, np.ndarray]:
        return request_from_events(self, request.events, request.query_timestamps, request.top_k,
                                   request.exclude_history)

    def wire(self, valid: "ValidRequest", batched: bool = False) -> Dict[str, np.ndarray]:
        arrays = valid.to_wire(self)
        if not batched and (arrays[QUERY_TIMESTAMP] < 0).all():
            del arrays[QUERY_TIMESTAMP]  # the plain model takes "no query time" as the default
        return arrays

    def result(self, outputs: Mapping[str, np.ndarray], valid: "ValidRequest") -> Recommendations:
        return Recommendations(text(valid.ids), text(outputs[OUT_ITEM_IDS]), outputs[OUT_SCORES])

    # --- validation -------------------------------------------------------------------------------
    def validate(self, arrays: Dict[str, np.ndarray], batched: bool = False) -> "ValidRequest":
        """Check a request given as {tensor name: array}; return it normalised, or raise `BadRequest`.

        `batched=True` checks a request to the batched endpoint instead: every tensor carries a leading
        request dimension of 1, all of `inputs(batched=True)` are required, and query_timestamp -1 means "the
        user's last event time".
        """
        if batched:
            arrays = strip_request_dim(arrays)
        self.check_names(arrays, self.inputs(batched))
        ids = check_kind(vector(arrays[self.id_column], self.id_column), self.id_column, self.id_dtype)
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
            values = check_kind(vector(arrays[f"{col}__values"], f"{col}__values"), f"{col}__values",
                                self.column_dtype(col))
            col_offsets = ragged_offsets(arrays[f"{col}__offsets"], col, batch, len(values))
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
        if self.item_encoding == "raw":
            check_raw_ids(lists[self.item_column], f"{self.item_column}__values", int(self.max_item_id))
        if self.timestamp_column is not None:
            times = lists[self.timestamp_column]
            if len(times) and times.min() < 0:
                raise BadRequest(f"{self.timestamp_column}__values has negative value(s) (first "
                                 f"{int(times[np.argmax(times < 0)])}); timestamps are unix seconds >= 0")
        query = np.full(batch, DEFAULT_QUERY_TIME, dtype=np.int64)
        if QUERY_TIMESTAMP in arrays:
            query = vector(arrays[QUERY_TIMESTAMP], QUERY_TIMESTAMP)
            only_default = batched and query.dtype.kind in "iu" and bool(np.all(query == DEFAULT_QUERY_TIME))
            if self.timestamp_column is None and not only_default:
                raise BadRequest(f"{QUERY_TIMESTAMP!r} was sent, but this model was trained without timestamps; "
                                 "drop the input" + (" (or send -1 for every user)" if batched else ""))
            if not self.query_time and not only_default:
                raise BadRequest(f"{QUERY_TIMESTAMP!r} was sent, but this model (trained with tr.Trainer) always "
                                 "predicts at each user's last event time; drop the input"
                                 + (" (or send -1 for every user)" if batched else ""))
            check_kind(query, QUERY_TIMESTAMP, "int64")
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
            check_kind(k_array, TOP_K, "int64")
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

    # --- the serving graph's side -----------------------------------------------------------------
    def table(self, requests: Sequence["ValidRequest"]):
        """One TensorTable holding every user of `requests`, in order: ragged columns as values + shifted
        offsets, per-user options repeated per row.  Stacking never mixes users: every user is its own row."""
        from merlin.table import TensorTable

        columns = {self.id_column: np.concatenate([r.ids for r in requests])}
        shifts = np.cumsum([0] + [int(r.offsets[-1]) for r in requests[:-1]])
        offsets = np.concatenate([requests[0].offsets[:1]] + [r.offsets[1:] + s for r, s in zip(requests, shifts)])
        for col in self.served_list_columns:
            columns[f"{col}__values"] = np.concatenate([r.lists[col] for r in requests])
            columns[f"{col}__offsets"] = offsets.astype(np.int64)
        columns[QUERY_TIMESTAMP] = np.concatenate([r.query_timestamp for r in requests]).astype(np.int64)
        columns[EXCLUDE_HISTORY] = np.concatenate([np.full(r.batch_size, r.exclude_history) for r in requests])
        columns[TOP_K] = np.concatenate([np.full(r.batch_size, r.top_k, dtype=np.int32) for r in requests])
        return TensorTable(columns)

    def split(self, out, requests: Sequence["ValidRequest"]) -> List[Tuple[np.ndarray, np.ndarray]]:
        """[sum B_i, K_max] results -> per request (raw item ids [B_i, K_i], scores [B_i, K_i] float32)."""
        rows = sum(r.batch_size for r in requests)
        ids, scores = _dense(out[OUT_ITEM_IDS], rows), _dense(out[OUT_SCORES], rows).astype(np.float32)
        results, start = [], 0
        for r in requests:
            stop = start + r.batch_size
            results.append((ids[start:stop, : r.top_k], scores[start:stop, : r.top_k]))
            start = stop
        return results


@dataclass
class ValidRequest:
    """A validated retrieval request: B users, lists sharing one offsets array (int64)."""

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


def _dense(column, rows: int) -> np.ndarray:
    """A [rows, K] result column, whether Merlin kept it 2-D or turned it into values + offsets."""
    values = np.asarray(column.values)
    if values.ndim == 2:
        return values
    return values.reshape(rows, -1)


def request_from_events(contract: RequestContract, events, query_timestamps: Optional[Mapping] = None,
                        top_k: Optional[int] = None, exclude_history: Optional[bool] = None) -> Dict[str, np.ndarray]:
    """Group an event log (a DataFrame, one row per event) by user, in first-appearance order, into the request
    tensors of `contract`."""
    import pandas as pd

    needed = [contract.id_column, *contract.served_list_columns]
    missing = [c for c in needed if c not in events.columns]
    if missing:
        raise BadRequest(f"events are missing column(s) {missing}; this model needs {needed} "
                         f"(columns present: {list(events.columns)})")
    if len(events) == 0:
        raise BadRequest("events is empty: send at least one event per user")
    ids = events[contract.id_column]
    users = pd.unique(ids)
    order = np.argsort(pd.Categorical(ids, categories=users).codes, kind="stable")
    ordered = events.iloc[order]
    counts = ordered.groupby(contract.id_column, sort=False).size().reindex(users).to_numpy()
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    arrays = {contract.id_column: encode_values(users, contract.id_dtype, contract.id_column)}
    for col in contract.list_columns:
        if col not in events.columns:  # only optional columns can be absent here (checked above)
            continue
        arrays[f"{col}__values"] = encode_values(ordered[col].to_numpy(), contract.column_dtype(col), col)
        arrays[f"{col}__offsets"] = offsets
    if query_timestamps is not None:
        lookup = dict(query_timestamps)
        absent = [u for u in users if u not in lookup]
        if absent:
            raise BadRequest(f"query_timestamps has no entry for user(s) {absent[:5]}; give one per user")
        arrays[QUERY_TIMESTAMP] = np.array([int(lookup[u]) for u in users], dtype=np.int64)
    if top_k is not None:
        arrays[TOP_K] = np.array([int(top_k)], dtype=np.int32)
    if exclude_history is not None:
        arrays[EXCLUDE_HISTORY] = np.array([bool(exclude_history)])
    return arrays


def example_request(contract: RequestContract, items: Sequence) -> Dict[str, np.ndarray]:
    """A valid one-user request with the given raw item ids (one event each, a minute apart)."""
    import pandas as pd

    events = {contract.id_column: ["0" if contract.id_dtype == "string" else 0] * len(items),
              contract.item_column: list(items)}
    if contract.action_column:
        events[contract.action_column] = ["0" if contract.action_dtype == "string" else 0] * len(items)
    if contract.timestamp_column:
        events[contract.timestamp_column] = [1_600_000_000 + 60 * i for i in range(len(items))]
    return request_from_events(contract, pd.DataFrame(events))
