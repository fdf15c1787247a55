"""The stock merlin-systems serving path (merlin-integration.md §3.3 A): side-by-side benchmarks, and the stock
export of models trained with tr.Trainer (`merlin_hstu.serving.t4r_export`).

    Ensemble(wf.input_schema.column_names >> TransformWorkflow(wf) >> PredictPyTorch(scorer)).export(repo)

exported with merlin-systems' own `TritonExecutorRuntime`: an `executor_model` that runs the DAG and calls
`0_transformworkflowtriton` (merlin's NVTabular python model) and `1_predictpytorchtriton` over BLS.  Two
workarounds make it serve on this CPU-only tritonserver (`export_stock_ensemble` applies both):

* A - the PyTorch node is exported for the libtorch backend, which the pytriton wheel does not ship, so its
  config is rewritten to the python backend and a generic `model.py` (`TorchScriptPythonModel` below) runs the
  same TorchScript file;
* bytes - merlin's workflow model turns BYTES inputs into `"b'view'"` strings (`astype(str)` on bytes), which no
  fitted Categorify knows, so its `model.py` is replaced by `utf8_workflow_model()`: the same model with text
  decoded as UTF-8 and "" read as a missing value (Categorify's null id), as every merlin-hstu contract reads it.

`export_stock_ensemble(..., name=N)` names the executor model N and prefixes the node models with N
(`N_0_transformworkflowtriton`, ...), so several stock repositories can share one server.

`export_stock_repository(run)` is the retrieval baseline of `merlin-hstu bench serve`: requests are raw *events*
(one row per event, the workflow's input columns); the query time is the last event's time and K is fixed at
export.  Nothing here is used by `merlin-hstu serve`.
"""
import json
import os
import shutil
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

STOCK_ENTRY_MODEL = "executor_model"
STOCK_MODEL_SHIM = "from merlin_hstu.serving.stock import TorchScriptPythonModel as TritonPythonModel  # noqa\n"
STOCK_WORKFLOW_SHIM = ("from merlin_hstu.serving.stock import utf8_workflow_model\n"
                       "TritonPythonModel = utf8_workflow_model()\n")


class StockScorer(nn.Module):
    """Dict-in wrapper for PredictPyTorch: the workflow's ragged outputs (values/offsets) -> (scores, ids).

    `inner` is a top-K program with `TopKScorer`'s call (merlin_hstu.serving.scorer); `exclude_history` drops the
    user's window from the results; `raw_ids` (int64, raw id per encoded id): answer raw ids instead of encoded."""

    decode: bool
    exclude_history: bool

    def __init__(self, inner: torch.jit.ScriptModule, item: str, time: str, k: int, exclude_history: bool = True,
                 raw_ids: Optional[Tensor] = None):
        super().__init__()
        self.inner, self.item, self.time, self.k = inner, item, time, k
        self.exclude_history = exclude_history
        self.decode = raw_ids is not None
        self.register_buffer("raw_ids", raw_ids if raw_ids is not None else torch.zeros(0, dtype=torch.long))

    def forward(self, feats: Dict[str, Tensor]) -> Tuple[Tensor, Tensor]:
        values = feats[self.item + "__values"]
        offsets = feats[self.item + "__offsets"].to(torch.long)
        times = feats[self.time + "__values"] if self.time != "" else torch.zeros_like(values)
        counts = offsets[1:] - offsets[:-1]
        query = torch.full_like(counts, -1)  # the last event's time (the default query time)
        exclude = torch.ones_like(counts, dtype=torch.bool) if self.exclude_history else \
            torch.zeros_like(counts, dtype=torch.bool)
        scores, ids = self.inner(values, offsets, times, query, self.k, exclude)
        if self.decode:
            ids = self.raw_ids[ids]
        return scores, ids


def export_stock_repository(run_dir: str | Path, output: str | Path, top_k: int = 10) -> Path:
    """Write the stock merlin-systems repository for `run_dir` (see the module docstring)."""
    import merlin.dtypes as md
    from merlin.schema import ColumnSchema, Schema

    from merlin_hstu.common import schema as roles
    from merlin_hstu.serving.export import ExportConfig, load_serving_parts

    # The stock path runs the whole fitted workflow, exactly as `TransformWorkflow(wf)` would.
    parts = load_serving_parts(run_dir, ExportConfig(top_k=top_k, prune_unused_inputs=False))
    if parts.model.config.inputs.uses_actions:
        raise ValueError(f"{run_dir} reads actions (inputs.actions={parts.model.config.inputs.actions!r}); the stock "
                         "merlin-systems baseline feeds the model item and time lists only: export this run with "
                         "`merlin-hstu export` (merlin_hstu.serving.export.export_repository)")
    wf = parts.workflow
    item_list = roles.item_list_column(wf.output_schema)
    time_list = roles.timestamp_list_column(wf.output_schema)
    scripted = torch.jit.script(StockScorer(parts.scorer, item_list, time_list or "", int(top_k)))
    in_cols = [wf.output_schema[item_list]] + ([wf.output_schema[time_list]] if time_list else [])
    model_in = Schema([ColumnSchema(c.name, dtype=md.int64, is_list=True, is_ragged=True) for c in in_cols])
    model_out = Schema([ColumnSchema("scores", dtype=md.float32, dims=(None, top_k)),
                        ColumnSchema("item_ids", dtype=md.int64, dims=(None, top_k))])
    return export_stock_ensemble(wf, scripted, model_in, model_out, output, overwrite=True)


def export_stock_ensemble(workflow, model, model_inputs, model_outputs, output: str | Path,
                          name: Optional[str] = None, overwrite: bool = False) -> Path:
    """The standard merlin-systems graph, exported by merlin-systems, made servable here (module docstring):

        workflow.input_schema.column_names >> TransformWorkflow(workflow) >> PredictPyTorch(model, in, out)
        Ensemble(graph, workflow.input_schema).export(output)

    `model`: TorchScript taking {column (ragged: column__values / column__offsets): tensor}, returning a tensor or
    a tuple / list matched to `model_outputs` in config order.  `name`: the executor model's name and the node
    models' prefix (default: merlin-systems' `executor_model`, `0_transformworkflowtriton`, ...).  Written to a
    staging directory and renamed into place."""
    from merlin.systems.dag.ensemble import Ensemble
    from merlin.systems.dag.ops.pytorch import PredictPyTorch
    from merlin.systems.dag.ops.workflow import TransformWorkflow

    from merlin_hstu.common.atomic_dir import publish_dir, staging_dir

    output = Path(output).resolve()
    if output.exists() and not overwrite:
        raise FileExistsError(f"{output} already exists; remove it or pass overwrite=True (--overwrite)")
    graph = (workflow.input_schema.column_names >> TransformWorkflow(workflow)
             >> PredictPyTorch(model, model_inputs, model_outputs))
    staging = staging_dir(output)
    try:
        if name is None:
            Ensemble(graph, workflow.input_schema).export(str(staging))
        else:
            Ensemble(graph, workflow.input_schema).export(str(staging), runtime=named_triton_runtime(name), name=name)
        _rewrite_pytorch_node_to_python(staging)
        _decode_bytes_in_workflow_node(staging)
        publish_dir(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output


def _node(repo: Path, suffix: str) -> Path:
    nodes = [p for p in repo.iterdir() if p.is_dir() and p.name.endswith(suffix)]
    if len(nodes) != 1:
        raise RuntimeError(f"expected one *{suffix} node in {repo}, found {[p.name for p in nodes]}")
    return nodes[0]


def _rewrite_pytorch_node_to_python(repo: Path) -> None:
    """Workaround A: the libtorch backend is missing, so serve the same model.pt from the python backend."""
    node = _node(repo, "_predictpytorchtriton")
    config = node / "config.pbtxt"
    lines = [line for line in config.read_text().splitlines() if not line.startswith("platform:")]
    text = "\n".join(line.replace('backend: "pytorch"', 'backend: "python"') for line in lines) + "\n"
    config.write_text(text)
    (node / "1" / "model.py").write_text(STOCK_MODEL_SHIM)


def _decode_bytes_in_workflow_node(repo: Path) -> None:
    """Workaround bytes: the workflow node runs `utf8_workflow_model()` instead of merlin's copied model.py."""
    (_node(repo, "_transformworkflowtriton") / "1" / "model.py").write_text(STOCK_WORKFLOW_SHIM)


def named_triton_runtime(prefix: str):
    """merlin-systems' `TritonExecutorRuntime` whose node models are named `<prefix>_<node id>_<op>`.

    merlin-systems names them `<node id>_<op>` only, so two stock repositories in one server would clash.  The
    node ops are subclasses that pass the prefixed id to merlin-systems' own `export`, then become the plain
    merlin-systems classes again: the pickled graph the executor loads names no class of ours."""
    from merlin.systems.dag.ops.pytorch import PredictPyTorch
    from merlin.systems.dag.ops.workflow import TransformWorkflow
    from merlin.systems.dag.runtimes.triton import TritonExecutorRuntime
    from merlin.systems.dag.runtimes.triton.ops.pytorch import PredictPyTorchTriton
    from merlin.systems.dag.runtimes.triton.ops.workflow import TransformWorkflowTriton

    def named(base):
        def export(self, path, input_schema, output_schema, params=None, node_id=None, version=1):
            config = base.export(self, path, input_schema, output_schema, params=params,
                                 node_id=f"{prefix}_{node_id}", version=version)
            self.__class__ = base
            return config

        return type(base.__name__, (base,), {"export": export})  # the same name: it names the node model

    runtime = TritonExecutorRuntime()
    runtime.op_table = {**runtime.op_table, TransformWorkflow: named(TransformWorkflowTriton),
                        PredictPyTorch: named(PredictPyTorchTriton)}
    return runtime


def utf8_workflow_model():
    """merlin-systems' NVTabular workflow model (`merlin.systems.triton.models.workflow_model`) with text inputs
    decoded as UTF-8 ("" = missing) instead of `astype(str)`: the stock workflow node's model (workaround bytes).
    A function because the base class imports triton_python_backend_utils, which only the Triton stub has."""
    import numpy as np
    import triton_python_backend_utils as pb_utils
    from merlin.systems.triton.models.workflow_model import TritonPythonModel as WorkflowModel

    def column(tensor) -> np.ndarray:
        array = tensor.as_numpy()
        if array.ndim == 2:  # [B, 1] scalars, as merlin-systems sends them
            array = array[:, 0]
        if array.dtype == object or array.dtype.kind == "S":
            text = [v.decode("utf-8") if isinstance(v, bytes) else v for v in array]
            array = np.array([None if v == "" else v for v in text], dtype=object)
        return array

    class Utf8WorkflowModel(WorkflowModel):
        def execute(self, requests):
            responses = []
            for request in requests:
                try:
                    inputs = {name: column(pb_utils.get_input_tensor_by_name(request, name))
                              for name in self.input_dtypes}
                    for name in self.input_multihots:
                        inputs[name] = (column(pb_utils.get_input_tensor_by_name(request, f"{name}__values")),
                                        column(pb_utils.get_input_tensor_by_name(request, f"{name}__offsets")))
                    out = self.runner.run_workflow(inputs)
                    responses.append(pb_utils.InferenceResponse([pb_utils.Tensor(n, v) for n, v in out.items()]))
                except Exception as exc:  # the request's own error; the model stays up
                    responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(
                        f"NVTabular workflow failed: {type(exc).__name__}: {exc}")))
            return responses

    return Utf8WorkflowModel


class TorchScriptPythonModel:
    """Generic python-backend model for a TorchScript file (workaround A): config inputs in, config outputs out.

    Inputs are handed to the module as one dict {name: tensor} (offsets cast to int64, as the merlin loader
    emits them at training time); a tuple or list result is matched to the config's outputs in order.
    """

    def initialize(self, args: dict) -> None:
        import triton_python_backend_utils as pb_utils

        torch.set_num_threads(1)
        config = json.loads(args["model_config"])
        self.inputs: List[str] = [i["name"] for i in config["input"]]
        self.outputs = [(o["name"], pb_utils.triton_string_to_numpy(o["data_type"])) for o in config["output"]]
        path = os.path.join(args["model_repository"], args["model_version"], "model.pt")
        self.model = torch.jit.load(path).eval()

    def execute(self, requests):
        import triton_python_backend_utils as pb_utils

        responses = []
        for request in requests:
            feats = {}
            for name in self.inputs:
                array = pb_utils.get_input_tensor_by_name(request, name).as_numpy()
                tensor = torch.from_numpy(array)
                feats[name] = tensor.to(torch.long) if name.endswith("__offsets") else tensor
            with torch.inference_mode():
                result = self.model(feats)
            result = tuple(result) if isinstance(result, (tuple, list)) else (result,)
            responses.append(pb_utils.InferenceResponse([
                pb_utils.Tensor(name, value.numpy().astype(dtype)) for (name, dtype), value in zip(self.outputs, result)
            ]))
        return responses
