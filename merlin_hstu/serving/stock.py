"""The stock merlin-systems serving path, built for side-by-side benchmarks (merlin-integration.md §3.3 A).

    Ensemble(wf.input_schema >> TransformWorkflow(wf) >> PredictPyTorch(scorer)).export(repo)

exported with merlin-systems' own `TritonExecutorRuntime`: an `executor_model` that runs the DAG and calls
`0_transformworkflowtriton` (merlin's NVTabular python model) and `1_predictpytorchtriton` over BLS.  The
PyTorch node is exported for the libtorch backend, which the pytriton wheel does not ship, so - workaround A -
its config is rewritten to the python backend and a generic `model.py` (`TorchScriptPythonModel` below) runs the
same TorchScript file.  Requests are raw *events* (one row per event, the workflow's input columns); the
query time is the last event's time and K is fixed at export.  Nothing here is used by `merlin-hstu serve`.
"""
import json
import os
import shutil
from pathlib import Path
from typing import Dict, List, Tuple

import torch
from torch import Tensor, nn

STOCK_ENTRY_MODEL = "executor_model"
STOCK_MODEL_SHIM = "from merlin_hstu.serving.stock import TorchScriptPythonModel as TritonPythonModel  # noqa\n"


class StockScorer(nn.Module):
    """Dict-in wrapper for PredictPyTorch: the workflow's ragged outputs (values/offsets) -> (scores, ids)."""

    def __init__(self, inner: torch.jit.ScriptModule, item: str, time: str, k: int):
        super().__init__()
        self.inner, self.item, self.time, self.k = inner, item, time, k

    def forward(self, feats: Dict[str, Tensor]) -> Tuple[Tensor, Tensor]:
        values = feats[self.item + "__values"]
        offsets = feats[self.item + "__offsets"].to(torch.long)
        times = feats[self.time + "__values"] if self.time != "" else torch.zeros_like(values)
        counts = offsets[1:] - offsets[:-1]
        query = torch.full_like(counts, -1)  # the last event's time (the default query time)
        return self.inner(values, offsets, times, query, self.k, torch.ones_like(counts, dtype=torch.bool))


def export_stock_repository(run_dir: str | Path, output: str | Path, top_k: int = 10) -> Path:
    """Write the stock merlin-systems repository for `run_dir` (see the module docstring)."""
    import merlin.dtypes as md
    from merlin.schema import ColumnSchema, Schema
    from merlin.systems.dag.ensemble import Ensemble
    from merlin.systems.dag.ops.pytorch import PredictPyTorch
    from merlin.systems.dag.ops.workflow import TransformWorkflow

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
    graph = wf.input_schema.column_names >> TransformWorkflow(wf) >> PredictPyTorch(scripted, model_in, model_out)
    output = Path(output)
    if output.exists():
        shutil.rmtree(output)
    Ensemble(graph, wf.input_schema).export(str(output))
    _rewrite_pytorch_node_to_python(output)
    return output


def _rewrite_pytorch_node_to_python(repo: Path) -> None:
    """Workaround A: the libtorch backend is missing, so serve the same model.pt from the python backend."""
    nodes = [p for p in repo.iterdir() if p.is_dir() and p.name.endswith("_predictpytorchtriton")]
    if len(nodes) != 1:
        raise RuntimeError(f"expected one *_predictpytorchtriton node in {repo}, found {[p.name for p in nodes]}")
    config = nodes[0] / "config.pbtxt"
    lines = [line for line in config.read_text().splitlines() if not line.startswith("platform:")]
    text = "\n".join(line.replace('backend: "pytorch"', 'backend: "python"') for line in lines) + "\n"
    config.write_text(text)
    (nodes[0] / "1" / "model.py").write_text(STOCK_MODEL_SHIM)


class TorchScriptPythonModel:
    """Generic python-backend model for a TorchScript file (workaround A): config inputs in, config outputs out.

    Inputs are handed to the module as one dict {name: tensor} (offsets cast to int64, as the merlin loader
    emits them at training time); a tuple result is matched to the config's outputs in order.
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
            result = result if isinstance(result, tuple) else (result,)
            responses.append(pb_utils.InferenceResponse([
                pb_utils.Tensor(name, value.numpy().astype(dtype)) for (name, dtype), value in zip(self.outputs, result)
            ]))
        return responses
