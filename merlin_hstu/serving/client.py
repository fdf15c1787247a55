"""One client for every exported repository (retrieval, ranking, CTR): typed requests in, typed answers out.

    with ServingClient("127.0.0.1:8000") as client:          # HTTP; "grpc://127.0.0.1:8001" for gRPC
        client.task                                           # "retrieval" | "ranking" | "ctr", from the server
        client.predict(RetrievalRequest(events, top_k=10))    # -> Recommendations (.to_frame(): id, rank, item, score)
        client.predict([RankingRequest(...), ...])            # -> RankingScores (per task, per candidate)
        client.predict(CTRRequest(rows))                      # -> click probabilities [B]
        client.recommend(events, top_k=10)                    # retrieval shorthand
        client.send(model, arrays)                            # tensors exactly as given -> {output name: array}

The request contract (column names, dtypes, limits) is read from the served model's config, so the client needs no
local files.  `predict` builds the request's tensors with the contract, validates them with the same code the
server runs (`BadRequest`: names the field and the fix, before anything is sent), sends them, and reads the
answer back with the contract.  `send` is the one place that turns arrays into Triton inputs and outputs into
arrays; an error reply becomes `ServingError` with the server's message verbatim.

Retrieval repositories have two models: `predict` uses `<model>_batched` (concurrent requests share one
workflow/model pass); `endpoint="ragged"` uses the plain `<model>` in Merlin's ragged convention instead.
Thread-safe: tritonclient's connections are not, so each thread gets its own.
"""
from __future__ import annotations

import json
import threading
from typing import Dict, Mapping, Optional

import numpy as np

from merlin_hstu.serving.contract import (  # noqa: F401  (request_from_events, Recommendations: re-exported)
    CONTRACT_PARAMETER,
    BadRequest,
    Recommendations,
    RetrievalRequest,
    ServingContract,
    contract_from_dict,
    request_from_events,
)


class ServingError(RuntimeError):
    """The server answered with an error, or cannot be reached (its message is kept verbatim)."""


class ServingClient:
    """Talks to `merlin-hstu serve` (any Triton server holding merlin-hstu repositories)."""

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
        self.model_name, self.contract = self._find_model(model_name)

    # --- discovery ----------------------------------------------------------------------------------
    def _config_parameters(self, model: str) -> Dict[str, str]:
        config = self._client.get_model_config(model)
        if self.protocol == "grpc":
            return {k: v.string_value for k, v in config.config.parameters.items()}
        return {k: v["string_value"] for k, v in config.get("parameters", {}).items()}

    def _read_contract(self, model: str) -> Optional[ServingContract]:
        params = self._config_parameters(model)
        return contract_from_dict(json.loads(params[CONTRACT_PARAMETER])) if CONTRACT_PARAMETER in params else None

    def _find_model(self, model_name: Optional[str]):
        """The public merlin-hstu model: `model_name`, or the only one on the server."""
        try:
            index = self._client.get_model_repository_index()
        except Exception as exc:
            raise ServingError(f"cannot reach a Triton server at {self.url}: {exc}") from exc
        entries = index if isinstance(index, list) else [{"name": m.name, "state": m.state} for m in index.models]
        names = [m["name"] for m in entries if m.get("state", "READY") in ("READY", "")]
        if model_name is not None:
            if model_name not in names:
                raise ServingError(f"model {model_name!r} is not loaded at {self.url} (models: {names})")
            contract = self._read_contract(model_name)
            if contract is None:
                raise ServingError(f"model {model_name!r} at {self.url} is not a merlin-hstu export (no "
                                   f"{CONTRACT_PARAMETER!r} parameter in its config)")
            return model_name, contract
        public = []
        for name in names:
            contract = self._read_contract(name)
            if contract is not None and contract.model_name == name:
                public.append((name, contract))
        if len(public) != 1:
            raise ServingError(f"cannot tell which merlin-hstu model to query at {self.url}: "
                               f"{[n for n, _ in public] or 'none'} of the models {names}; pass model_name "
                               "(--model-name)")
        return public[0]

    @property
    def task(self) -> str:
        return self.contract.task

    def is_ready(self) -> bool:
        try:
            return bool(self._client.is_server_ready())
        except Exception:  # connection refused etc.: not ready
            return False

    # --- the wire -----------------------------------------------------------------------------------
    def send(self, model: str, arrays: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
        """Send tensors as given to `model`; -> {output name: array} (the contract's outputs).  Raises ServingError
        on an error reply."""
        inputs = []
        for name, array in arrays.items():
            array = np.asarray(array)
            tensor = self._tc.InferInput(name, list(array.shape), triton_datatype(array))
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        names = [s.name for s in self.contract.outputs()]
        outputs = [self._tc.InferRequestedOutput(name) for name in names]
        try:
            result = self._client.infer(model, inputs, outputs=outputs)
        except Exception as exc:  # tritonclient raises InferenceServerException with the server's message
            raise ServingError(str(exc)) from exc
        return {name: result.as_numpy(name) for name in names}

    def infer(self, arrays: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
        """Raw request tensors to the public model, unchecked (the server judges them)."""
        return self.send(self.model_name, arrays)

    def infer_valid(self, request) -> Dict[str, np.ndarray]:
        """A validated request (`contract.validate` output) through the configured endpoint."""
        c = self.contract
        if self.endpoint == "batched" and c.batched_model_name:
            wire = {name: np.ascontiguousarray(a)[None] for name, a in c.wire(request, batched=True).items()}
            return {name: array[0] for name, array in self.send(c.batched_model_name, wire).items()}
        return self.send(self.model_name, c.wire(request))

    # --- typed requests -----------------------------------------------------------------------------
    def predict(self, request):
        """A typed request (RetrievalRequest | RankingRequest or a list of them | CTRRequest) -> the typed answer.
        Raises BadRequest before sending anything the contract rejects."""
        c = self.contract
        valid = c.validate(c.request_arrays(request))
        return c.result(self.infer_valid(valid), valid)

    def recommend(self, events, query_timestamps: Optional[Mapping] = None, top_k: Optional[int] = None,
                  exclude_history: Optional[bool] = None) -> Recommendations:
        """Retrieval: raw events (one row per event) -> top-K raw item ids and scores per user, in first-appearance
        order."""
        if self.task != "retrieval":
            raise BadRequest(f"recommend() asks a retrieval model; {self.model_name!r} is a {self.task} model: use "
                             "predict() with its request type")
        return self.predict(RetrievalRequest(events, query_timestamps, top_k, exclude_history))

    # --- connections --------------------------------------------------------------------------------
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

    def __enter__(self) -> "ServingClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


HSTUClient = ServingClient  # the retrieval client's name in earlier releases


def triton_datatype(array: np.ndarray) -> str:
    if array.dtype == object or array.dtype.kind in "SU":
        return "BYTES"
    from tritonclient.utils import np_to_triton_dtype

    return np_to_triton_dtype(array.dtype)
