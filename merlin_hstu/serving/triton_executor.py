"""Triton python-backend model that runs a serving Ensemble: the executor of every task's repository.

Retrieval's `<name>_batched` (max_batch_size > 0, behind Triton's dynamic batcher: each request is one ragged batch
element, a leading dimension of 1 on every tensor), ranking's and CTR's `<name>` (max_batch_size 0, Merlin's plain
ragged convention).  `execute` gets every request that is waiting.  Each is validated on its own against the
repository's contract - a bad one gets its own error response (Triton's INVALID_ARG, HTTP 400) naming the field
and the fix - and all valid ones are served by ONE pass through the Ensemble (`ServingEnsemble.run`): the NVTabular
workflow and the TorchScript program run once per batch instead of once per request.
"""
from __future__ import annotations

import json
from pathlib import Path

import triton_python_backend_utils as pb_utils

from merlin_hstu.serving.contract import BadRequest, contract_from_config, wire_array

ENSEMBLE_DIR = "ensemble"  # = merlin_hstu.serving.repository.ENSEMBLE_DIR (not imported: keep this module light)


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
        config = json.loads(args["model_config"])
        self.contract = contract_from_config(config)
        self.batched = int(config.get("max_batch_size", 0)) > 0
        version_dir = Path(args["model_repository"]) / args["model_version"]
        self.served = ServingEnsemble.load(version_dir / ENSEMBLE_DIR, self.contract)
        self.names = [s.name for s in self.contract.inputs(batched=self.batched)]
        self.outputs = [s.name for s in self.contract.outputs()]

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
                valid.append(self.contract.validate(arrays, batched=self.batched))
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
        for i, arrays in zip(where, results):
            tensors = []
            for name, array in zip(self.outputs, arrays):
                array = wire_array(array)
                tensors.append(pb_utils.Tensor(name, array[None] if self.batched else array))
            responses[i] = pb_utils.InferenceResponse(tensors)
        return responses

