"""Triton python-backend model `<name>` of a retrieval repository: Merlin's ragged convention (max_batch_size 0).

Any Merlin/Triton client can call it with plain ragged tensors (values [N], offsets [B+1]).  It validates each
request against the `RequestContract` (an error response names the tensor and the fix), fills in the defaults,
and forwards it over BLS to `<name>_batched` as one ragged batch element (a leading dimension of 1 on every
tensor), where Triton's dynamic batcher groups it with whatever else is in flight.  It imports neither Merlin
nor torch, so its instances are cheap: one per request in flight.
"""
from __future__ import annotations

import json

import numpy as np
import triton_python_backend_utils as pb_utils

from merlin_hstu.serving.contract import BadRequest, contract_from_config
from merlin_hstu.serving.triton_executor import bad_request  # imports Merlin/torch only inside initialize()


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        self.contract = contract_from_config(json.loads(args["model_config"]))
        self.names = [s.name for s in self.contract.inputs()]
        self.outputs = [s.name for s in self.contract.outputs()]

    def execute(self, requests):
        return [self._serve(request) for request in requests]

    def _serve(self, request):
        arrays = {}
        for name in self.names:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is not None:
                arrays[name] = tensor.as_numpy()
        try:
            valid = self.contract.validate(arrays)
        except BadRequest as exc:
            return bad_request(str(exc))
        inputs = [pb_utils.Tensor(name, np.ascontiguousarray(array)[None])
                  for name, array in self.contract.wire(valid, batched=True).items()]
        batched = pb_utils.InferenceRequest(model_name=self.contract.batched_model_name, inputs=inputs,
                                            requested_output_names=self.outputs)
        reply = batched.exec()
        if reply.has_error():
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(reply.error().message()))
        outputs = [pb_utils.Tensor(name, pb_utils.get_output_tensor_by_name(reply, name).as_numpy()[0])
                   for name in self.outputs]
        return pb_utils.InferenceResponse(outputs)
