"""Client side: raw events in, top-K raw item ids and scores out.

    client = HSTUClient("127.0.0.1:8000")                     # HTTP; "grpc://127.0.0.1:8001" for gRPC
    recs = client.recommend(events_df, top_k=10)              # Recommendations; .to_frame(): id, rank, item, score
    ids, scores = client.infer(request_arrays)                 # raw ragged tensors to the public model

`events_df` holds one row per event with the exported run's raw columns (e.g. user_id, item_id, action,
timestamp); users are sent in order of first appearance, their events in row order (the server sorts them by
time).  The request contract (column names, dtypes, limits) is read from the served model's config, so the
client needs no local files.
"""
from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Sequence, Tuple

import numpy as np
import pandas as pd

from merlin_hstu.serving.contract import (
    CONTRACT_PARAMETER,
    EXCLUDE_HISTORY,
    OUT_ITEM_IDS,
    OUT_SCORES,
    QUERY_TIMESTAMP,
    TOP_K,
    RequestContract,
    ValidRequest,
)



class ServingError(RuntimeError):
    """The server answered with an error (its message is kept verbatim)."""


def _encode(values: Sequence, kind: str, name: str) -> np.ndarray:
    if kind == "int64":
        array = np.asarray(values)
        if array.dtype.kind not in "iu":
            raise ValueError(f"column {name!r} must hold integer ids for this model, got dtype {array.dtype}")
        return array.astype(np.int64)
    return np.array([str(v).encode("utf-8") for v in values], dtype=object)


def request_from_events(contract: RequestContract, events: pd.DataFrame,
                        query_timestamps: Optional[Mapping] = None, top_k: Optional[int] = None,
                        exclude_history: Optional[bool] = None) -> Dict[str, np.ndarray]:
    """Group an event log by user (first-appearance order) into the request tensors of `contract`."""
    needed = [contract.id_column, *contract.served_list_columns]
    missing = [c for c in needed if c not in events.columns]
    if missing:
        raise ValueError(f"events are missing column(s) {missing}; this model needs {needed} "
                         f"(columns present: {list(events.columns)})")
    if len(events) == 0:
        raise ValueError("events is empty: send at least one event per user")
    ids = events[contract.id_column]
    users = pd.unique(ids)
    order = np.argsort(pd.Categorical(ids, categories=users).codes, kind="stable")
    ordered = events.iloc[order]
    counts = ordered.groupby(contract.id_column, sort=False).size().reindex(users).to_numpy()
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    arrays = {contract.id_column: _encode(users, contract.id_dtype, contract.id_column)}
    for col in contract.list_columns:
        if col not in events.columns:  # only optional columns can be absent here (checked above)
            continue
        arrays[f"{col}__values"] = _encode(ordered[col].to_numpy(), contract.column_dtype(col), col)
        arrays[f"{col}__offsets"] = offsets
    if query_timestamps is not None:
        lookup = dict(query_timestamps)
        absent = [u for u in users if u not in lookup]
        if absent:
            raise ValueError(f"query_timestamps has no entry for user(s) {absent[:5]}; give one per user")
        arrays[QUERY_TIMESTAMP] = np.array([int(lookup[u]) for u in users], dtype=np.int64)
    if top_k is not None:
        arrays[TOP_K] = np.array([int(top_k)], dtype=np.int32)
    if exclude_history is not None:
        arrays[EXCLUDE_HISTORY] = np.array([bool(exclude_history)])
    return arrays


def example_request(contract: RequestContract, items: Sequence) -> Dict[str, np.ndarray]:
    """A valid one-user request with the given raw item ids (one event each, a minute apart)."""
    events = {contract.id_column: ["0" if contract.id_dtype == "string" else 0] * len(items),
              contract.item_column: list(items)}
    if contract.action_column:
        events[contract.action_column] = ["0" if contract.action_dtype == "string" else 0] * len(items)
    if contract.timestamp_column:
        events[contract.timestamp_column] = [1_600_000_000 + 60 * i for i in range(len(items))]
    return request_from_events(contract, pd.DataFrame(events))


@dataclass
class Recommendations:
    """Per-user results in request order."""

    user_ids: np.ndarray  # [B]
    item_ids: np.ndarray  # [B, K] raw ids, best first
    scores: np.ndarray  # [B, K]

    def to_frame(self, id_column: str = "user_id") -> pd.DataFrame:
        b, k = self.item_ids.shape
        return pd.DataFrame({id_column: np.repeat(self.user_ids, k), "rank": np.tile(np.arange(1, k + 1), b),
                             "item_id": self.item_ids.reshape(-1), "score": self.scores.reshape(-1)})


class HSTUClient:
    """Talks to `merlin-hstu serve` (any Triton server holding an exported repository).

    `recommend` validates the request locally (the same `RequestContract` the server uses) and sends it to the
    batched endpoint `<model>_batched`, where concurrent requests share one workflow/model pass;
    `endpoint="ragged"` sends it to `<model>` in Merlin's plain ragged convention instead.  `infer` sends
    tensors exactly as given to `<model>` and is what to use for anything the server should judge.

    Thread-safe: tritonclient's connections are not, so each thread gets its own.
    """

    def __init__(self, url: str = "127.0.0.1:8000", model_name: Optional[str] = None, endpoint: str = "batched",
                 timeout_s: float = 60.0):
        if endpoint not in ("batched", "ragged"):
            raise ValueError(f"endpoint must be 'batched' or 'ragged', got {endpoint!r}")
        self.protocol = "grpc" if url.startswith("grpc://") else "http"
        self.url = url.split("://", 1)[1] if "://" in url else url
        self.endpoint = endpoint
        if self.protocol == "grpc":
            import tritonclient.grpc as tc
        else:
            import tritonclient.http as tc
        self._tc = tc
        self._kwargs = {"network_timeout": timeout_s, "connection_timeout": timeout_s} if self.protocol == "http" else {}
        self._local = threading.local()
        self._opened: list = []
        self._lock = threading.Lock()
        self.model_name = model_name or self._find_model()
        self.contract = self._read_contract()

    def _find_model(self) -> str:
        try:
            index = self._client.get_model_repository_index()
        except Exception as exc:
            raise ServingError(f"cannot reach a Triton server at {self.url}: {exc}") from exc
        names = [m["name"] for m in index] if isinstance(index, list) else [m.name for m in index.models]
        public = [n for n in names if f"{n}_batched" in names]
        if len(public) != 1:
            raise ServingError(f"cannot tell which merlin-hstu model to query at {self.url} (models: {names}); "
                               "pass model_name")
        return public[0]

    def _read_contract(self) -> RequestContract:
        config = self._client.get_model_config(self.model_name)
        if self.protocol == "grpc":
            params = {k: v.string_value for k, v in config.config.parameters.items()}
        else:
            params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        if CONTRACT_PARAMETER not in params:
            raise ServingError(f"model {self.model_name!r} at {self.url} is not a merlin-hstu export "
                               f"(no {CONTRACT_PARAMETER!r} parameter in its config)")
        return RequestContract(**json.loads(params[CONTRACT_PARAMETER]))

    def is_ready(self) -> bool:
        try:
            return bool(self._client.is_server_ready())
        except Exception:  # connection refused etc.: not ready
            return False

    def send(self, model: str, arrays: Mapping[str, np.ndarray]) -> Tuple[np.ndarray, np.ndarray]:
        """Send tensors as given to `model`; -> (item_ids, scores).  Raises ServingError on an error reply."""
        inputs = []
        for name, array in arrays.items():
            array = np.asarray(array)
            tensor = self._tc.InferInput(name, list(array.shape), triton_datatype(array))
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        outputs = [self._tc.InferRequestedOutput(OUT_ITEM_IDS), self._tc.InferRequestedOutput(OUT_SCORES)]
        try:
            result = self._client.infer(model, inputs, outputs=outputs)
        except Exception as exc:  # tritonclient raises InferenceServerException with the server's message
            raise ServingError(str(exc)) from exc
        return result.as_numpy(OUT_ITEM_IDS), result.as_numpy(OUT_SCORES)

    def infer(self, arrays: Mapping[str, np.ndarray]) -> Tuple[np.ndarray, np.ndarray]:
        """Raw ragged request tensors to the public model; -> (item ids [B, K], scores [B, K])."""
        return self.send(self.model_name, arrays)

    def infer_valid(self, request: ValidRequest) -> Tuple[np.ndarray, np.ndarray]:
        """A locally validated request, through the configured endpoint."""
        if self.endpoint == "ragged":
            wire = request.to_wire(self.contract)
            if (wire[QUERY_TIMESTAMP] < 0).all():
                del wire[QUERY_TIMESTAMP]  # the public model takes "no query time" as the default
            ids, scores = self.send(self.model_name, wire)
            return ids, scores
        wire = {name: np.ascontiguousarray(a)[None] for name, a in request.to_wire(self.contract).items()}
        ids, scores = self.send(self.contract.batched_model_name, wire)
        return ids[0], scores[0]

    def recommend(self, events: pd.DataFrame, query_timestamps: Optional[Mapping] = None,
                  top_k: Optional[int] = None, exclude_history: Optional[bool] = None) -> Recommendations:
        """Raw events (one row per event) -> top-K raw item ids and scores per user, in first-appearance order."""
        arrays = request_from_events(self.contract, events, query_timestamps, top_k, exclude_history)
        ids, scores = self.infer_valid(self.contract.validate(arrays))
        return Recommendations(_text(arrays[self.contract.id_column]), _text(ids), scores)

    @property
    def _client(self):
        client = getattr(self._local, "client", None)
        if client is None:
            client = self._tc.InferenceServerClient(self.url, **self._kwargs)
            self._local.client = client
            with self._lock:
                self._opened.append(client)
        return client

    def close(self) -> None:
        with self._lock:
            opened, self._opened = self._opened, []
        for client in opened:
            client.close()
        self._local = threading.local()

    def __enter__(self) -> "HSTUClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _text(array: np.ndarray) -> np.ndarray:
    """BYTES results back to str (string ids travel as utf-8 bytes)."""
    if array.dtype == object:
        return np.vectorize(lambda v: v.decode("utf-8") if isinstance(v, bytes) else v, otypes=[object])(array)
    return array


def triton_datatype(array: np.ndarray) -> str:
    if array.dtype == object or array.dtype.kind in "SU":
        return "BYTES"
    from tritonclient.utils import np_to_triton_dtype

    return np_to_triton_dtype(array.dtype)
