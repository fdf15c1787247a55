"""Triton python-backend model `<name>_batched`: the Merlin executor behind Triton's dynamic batcher.

Triton hands `execute` every request that is waiting (up to max_batch_size).  Each request is one ragged batch
element (a leading dimension of 1 on every tensor; `HSTUClient` and the public `<name>` model send that).  Every
request is validated on its own - a bad one gets its own error response naming the problem - and all valid ones
are served by ONE pass through the serving Ensemble (`ServingEnsemble.run`): the NVTabular workflow and the
TorchScript program run once per batch instead of once per request.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from merlin_hstu.serving.contract import CONTRACT_PARAMETER, OUT_ITEM_IDS, OUT_SCORES, BadRequest, RequestContract


def contract_from_args(args: dict) -> RequestContract:
    config = json.loads(args["model_config"])
    return RequestContract(**json.loads(config["parameters"][CONTRACT_PARAMETER]["string_value"]))


def error_response(message: str):
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message))


def bad_request(message: str):
    """An error response with Triton's INVALID_ARG code (HTTP 400), not an internal error (500)."""
    code = getattr(pb_utils.TritonError, "INVALID_ARG", None)
    error = pb_utils.TritonError(f"bad request: {message}", code) if code is not None else \
        pb_utils.TritonError(f"bad request: {message}")
    return pb_utils.InferenceResponse(error=error)


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        import torch

        from merlin_hstu.serving.core import ServingEnsemble

        torch.set_num_threads(1)  # one batch at a time per instance; more threads only fight over the cores
        torch.set_num_interop_threads(1)
        self.contract = contract_from_args(args)
        version_dir = Path(args["model_repository"]) / args["model_version"]
        self.served = ServingEnsemble.load(version_dir / "ensemble", self.contract)
        self.names = [n for n, _, _ in self.contract.batched_inputs()]

    def execute(self, requests):
        responses = [None] * len(requests)
        valid, where = [], []
        for i, request in enumerate(requests):
            arrays = {}
            for name in self.names:
                tensor = pb_utils.get_input_tensor_by_name(request, name)
                if tensor is not None:
                    arrays[name] = tensor.as_numpy()
            try:
                valid.append(self.contract.validate(arrays, batched=True))
                where.append(i)
            except BadRequest as exc:
                responses[i] = bad_request(str(exc))
        if not valid:
            return responses
        try:
            results = self.served.run(valid)
        except Exception as exc:  # an internal failure: every request of the batch gets the message
            for i in where:
                responses[i] = error_response(f"merlin-hstu serving failed: {type(exc).__name__}: {exc}")
            return responses
        for i, (ids, scores) in zip(where, results):
            responses[i] = pb_utils.InferenceResponse([
                pb_utils.Tensor(OUT_ITEM_IDS, wire_ids(ids)[None]),
                pb_utils.Tensor(OUT_SCORES, np.ascontiguousarray(scores, dtype=np.float32)[None]),
            ])
        return responses


def wire_ids(ids: np.ndarray) -> np.ndarray:
    """Raw ids as Triton sends them: int64, or BYTES (utf-8) for string ids."""
    if ids.dtype == object:
        return np.vectorize(lambda v: str(v).encode("utf-8"), otypes=[object])(ids)
    return np.ascontiguousarray(ids, dtype=np.int64)
