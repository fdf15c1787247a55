"""Kept for repositories exported by earlier releases: their `<name>_batched/1/model.py` imports
`TritonPythonModel` from here.  The executor of every task is `merlin_hstu.serving.triton_executor`."""
from merlin_hstu.serving.triton_executor import TritonPythonModel, bad_request, error_response  # noqa: F401
