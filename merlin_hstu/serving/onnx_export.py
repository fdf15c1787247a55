"""ONNX export of a trained run of any task: the model graphs, checked with onnxruntime before anything is published.

`merlin-hstu export --run RUN --output DIR --format onnx` writes

    DIR/
      onnx.json             task, graphs (file, inputs and outputs with dtype and shape), the measured
                            onnxruntime-vs-PyTorch difference of each graph, source run, versions
      <graph>.onnx          one file per graph (below)
      workflow/             the run's fitted NVTabular workflow (raw ids -> the model's encoded ids), when
                            the run records one
      item_ids.parquet      retrieval: encoded_id -> raw_id of every item row

Graphs per task (each with a dynamic batch dimension; every other size is fixed or dynamic as listed):

* retrieval  `user_tower.onnx`  ids int64 [B, W], lengths int64 [B], timestamps int64 [B, W], actions int64
             [B, W] -> query [B, D].  Only the inputs the model reads: no timestamps for a model without the time
             bias (e.g. SASRec), no actions unless the model has action inputs (`inputs.actions`).
             W = max_history + 1: the most recent `lengths[b] <= max_history` encoded items, right-padded with
             0; timestamps at j < len are the events' times and at j = len the query time (the last position's
             prediction time), as in the TorchScript scorer (merlin_hstu.serving.scorer).
             `item_scores.onnx`  query [B, D] -> scores [B, V] of every catalogue row (cosine for the default
             head, mixture-of-logits for a MoL head); rows 0..first_id-1 are not items, mask them before top-K.
* ranking    `ranking.onnx`  the jagged history and candidates of `JaggedDlrmHSTU` (values and offsets,
             every length dynamic), contextual int64 [B, C] -> logits [sum of candidates, T].
* ctr        `ctr.onnx`  dense float [B, 13-ish], sparse int64 [B, F] (encoded) -> logit [B].

The graphs are produced by the TorchScript-based exporter (`torch.onnx.export(..., dynamo=False)`) from the same
traceable wrappers our TorchScript artifacts are traced from, so the ONNX graph computes what the served model
does.  The torch.export-based exporter is not used: the models' value checks on lengths (host syncs, skipped under
tracing) are data-dependent guards to it.

Every graph is run by onnxruntime on inputs of *another* shape than the ones it was exported with (a different
batch size and, for the jagged ranking graph, different lengths) and compared with the eager PyTorch model; an
export whose largest difference exceeds `atol + rtol * |expected|` (1e-5 each) fails and publishes nothing.
"""
from __future__ import annotations

import copy
import inspect
import json
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from merlin_hstu.common.atomic_dir import publish_dir, staging_dir

MANIFEST = "onnx.json"
FORMAT = "merlin-hstu-onnx/1"
OPSET = 17
RTOL = ATOL = 1e-5


@dataclass
class OnnxGraph:
    """One graph to export: a traceable module, the inputs it is traced with, and inputs of another shape that
    onnxruntime must reproduce."""

    name: str
    module: nn.Module
    inputs: Tuple[Tensor, ...]
    input_names: List[str]
    output_names: List[str]
    dynamic_axes: Dict[str, Dict[int, str]]
    check_inputs: Tuple[Tensor, ...]
    notes: str = ""
    max_abs_diff: float = field(default=float("nan"), init=False)


def _pytorch_path(model: nn.Module) -> nn.Module:
    """A frozen CPU copy whose attention runs the pure-PyTorch path (the Triton kernels do not trace)."""
    model = copy.deepcopy(model).eval().requires_grad_(False).cpu()
    for module in model.modules():
        if hasattr(getattr(module, "config", None), "kernel"):
            module.config.kernel = "pytorch"
    return model


# ------------------------------------------------------------------------------------------------------------
# Graphs per task
# ------------------------------------------------------------------------------------------------------------
class _OnnxUserTower(nn.Module):
    """The serving user tower with only the inputs the model reads: ONNX drops unused graph inputs, so a model
    without a time bias takes no timestamps and one without action inputs no actions."""

    def __init__(self, tower: nn.Module, names: Sequence[str]):
        super().__init__()
        self.tower = tower
        self.names = list(names)
        self.takes_actions = "actions" in inspect.signature(tower.forward).parameters

    def forward(self, *inputs: Tensor) -> Tensor:
        given = dict(zip(self.names, inputs))
        ids = given["ids"]
        args = [ids, given["lengths"], given.get("timestamps", torch.zeros_like(ids))]
        if self.takes_actions:
            args.append(given.get("actions", torch.zeros_like(ids)))
        return self.tower(*args)


def _padded_histories(lengths: Sequence[int], width: int, num_items: int, first_id: int, num_actions: int,
                      seed: int):
    """Right-padded users of the given lengths: ids, lengths, increasing timestamps, action ids (0 = padding)."""
    g = torch.Generator().manual_seed(seed)
    n = len(lengths)
    ids = torch.zeros(n, width, dtype=torch.long)
    actions = torch.zeros(n, width, dtype=torch.long)
    for b, length in enumerate(lengths):
        ids[b, :length] = torch.randint(first_id, num_items, (length,), generator=g)
        if num_actions > 1:
            actions[b, :length] = torch.randint(1, num_actions, (length,), generator=g)
    steps = torch.randint(1, 86_400, (n, width), generator=g).cumsum(1)
    return ids, torch.tensor(lengths, dtype=torch.long), steps + 1_600_000_000, actions


def retrieval_graphs(model, max_history: int, first_id: int = 3) -> List[OnnxGraph]:
    """The user tower at width max_history + 1 and the catalogue scores of a retrieval model."""
    from merlin_hstu.serving.scorer import _CatalogueScores, _UserTower

    model = _pytorch_path(model)
    width, num_items = max_history + 1, model.config.num_items
    if num_items <= first_id:
        raise ValueError(f"the retrieval model has {num_items} embedding rows; no items to score")
    uses_time = bool(getattr(model.config.encoder, "time_bias", False))
    inputs = getattr(model.config, "inputs", None)
    uses_actions = bool(inputs is not None and inputs.uses_actions)
    num_actions = int(getattr(model.config, "num_actions", 0)) if uses_actions else 0
    names = ["ids", "lengths"] + (["timestamps"] if uses_time else []) + (["actions"] if uses_actions else [])
    tower = _OnnxUserTower(_UserTower(model, uses_time), names).eval()
    keep = [("ids", "lengths", "timestamps", "actions").index(n) for n in names]
    # Traced on two users of different lengths (no shape specialised to equal rows), checked on five.
    example = _padded_histories([min(3, max_history), 1], width, num_items, first_id, num_actions, seed=0)
    check = _padded_histories([1, max_history, max(max_history // 2, 1), 2, max_history], width, num_items,
                              first_id, num_actions, seed=1)
    example, check = tuple(example[i] for i in keep), tuple(check[i] for i in keep)
    batch = {0: "batch"}
    with torch.no_grad():
        query, check_query = tower(*example), tower(*check)
    scores = _CatalogueScores(model.topk()).eval()
    read = ", ".join(n for n in ("timestamps", "actions") if n in names) or "no timestamps or actions"
    return [
        OnnxGraph("user_tower", tower, example, names, ["query"], {**{n: batch for n in names}, "query": batch},
                  check, notes=f"W = {width}: right-padded encoded item ids; the model reads {read}"
                               + ("; timestamps[b, lengths[b]] is the query time" if uses_time else "")
                               + ("; actions are encoded action ids aligned with ids (0 = padding)"
                                  if uses_actions else "")),
        OnnxGraph("item_scores", scores, (query,), ["query"], ["scores"], {"query": batch, "scores": batch},
                  (check_query,), notes=f"scores of all {num_items} embedding rows; ids below {first_id} are "
                                        "not items"),
    ]


def ranking_graphs(model) -> List[OnnxGraph]:
    """DLRM-HSTU over jagged histories and candidates (the TorchScript export's wrapper and examples)."""
    from merlin_hstu.serving.ranking import JaggedDlrmHSTU, _example

    model = _pytorch_path(model)
    c, per, n = model.num_contextual, model.tokens_per_event, model.config.max_seq_len
    history = max((n - c - 1) // per, 1)
    cands = [n - c - per * history, 1]
    if cands[0] < 1:
        raise ValueError(f"DlrmHSTUConfig.max_seq_len={n} leaves no room for one history event and one candidate "
                         f"after {c} contextual tokens")
    names = ["history_items", "history_actions", "history_times", "history_offsets", "candidate_items",
             "candidate_times", "candidate_offsets", "contextual"]
    dynamic = {name: {0: f"{name}_len"} for name in names}
    dynamic["logits"] = {0: "candidates"}
    return [OnnxGraph("ranking", JaggedDlrmHSTU(model).eval(), _example(model, [history, 1], cands, 0), names,
                      ["logits"], dynamic, _example(model, [1, max(history // 2, 1), 2], [1, 2, 1], 1),
                      notes=f"logits [candidates, {len(model.tasks)}]: one column per task "
                            f"({', '.join(t.name for t in model.tasks)}); offsets are [B + 1] row starts")]


def ctr_graphs(model, num_dense: int, cardinalities: Sequence[int]) -> List[OnnxGraph]:
    model = _pytorch_path(model)
    g = torch.Generator().manual_seed(0)

    def rows(n: int):
        dense = torch.rand(n, num_dense, generator=g) * 3
        sparse = torch.stack([torch.randint(0, int(card), (n,), generator=g) for card in cardinalities], 1) \
            if len(cardinalities) else torch.zeros(n, 0, dtype=torch.long)
        return dense, sparse

    batch = {0: "batch"}
    return [OnnxGraph("ctr", model, rows(2), ["dense", "sparse"], ["logit"],
                      {"dense": batch, "sparse": batch, "logit": batch}, rows(7),
                      notes="dense: the workflow's normalised integer features; sparse: encoded categorical ids")]


# ------------------------------------------------------------------------------------------------------------
# Export and check
# ------------------------------------------------------------------------------------------------------------
def _describe(names: Sequence[str], tensors: Sequence[Tensor], dynamic: Dict[str, Dict[int, str]]) -> list:
    out = []
    for name, t in zip(names, tensors):
        shape = [dynamic.get(name, {}).get(i, int(s)) for i, s in enumerate(t.shape)]
        out.append({"name": name, "dtype": str(t.dtype).replace("torch.", ""), "shape": shape})
    return out


def export_graph(graph: OnnxGraph, path: Path, opset: int = OPSET) -> dict:
    """Write `graph` as ONNX to `path`, run it with onnxruntime on the check inputs, compare with PyTorch."""
    import onnxruntime as ort

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings about Python-side checks, the exporter's deprecation note
        torch.onnx.export(graph.module, graph.inputs, str(path), input_names=graph.input_names,
                          output_names=graph.output_names, dynamic_axes=graph.dynamic_axes, opset_version=opset,
                          dynamo=False)
        expected = graph.module(*graph.check_inputs)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    got = session.run(None, {n: t.numpy() for n, t in zip(graph.input_names, graph.check_inputs)})[0]
    want = expected.numpy()
    if got.shape != want.shape:
        raise RuntimeError(f"ONNX graph {graph.name}: onnxruntime returned shape {got.shape} for inputs of another "
                           f"shape than the traced ones, PyTorch {want.shape}; the graph does not generalise")
    diff = np.abs(got.astype(np.float64) - want.astype(np.float64))
    finite = np.isfinite(want)
    if not np.array_equal(finite, np.isfinite(got)):
        raise RuntimeError(f"ONNX graph {graph.name}: onnxruntime and PyTorch disagree on which outputs are finite")
    worst = float(diff[finite].max()) if finite.any() else 0.0
    if (diff[finite] > ATOL + RTOL * np.abs(want[finite])).any():
        raise RuntimeError(f"ONNX graph {graph.name}: onnxruntime differs from PyTorch by up to {worst:.3g} "
                           f"(allowed {ATOL} + {RTOL} * |value|); not exported")
    graph.max_abs_diff = worst
    return {"file": path.name, "inputs": _describe(graph.input_names, graph.inputs, graph.dynamic_axes),
            "outputs": _describe(graph.output_names, [expected], graph.dynamic_axes), "notes": graph.notes,
            "checked_batch": int(graph.check_inputs[0].shape[0]), "max_abs_diff_vs_pytorch": worst}


def _versions() -> dict:
    import onnx
    import onnxruntime

    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


def write_onnx_export(output: str | Path, task: str, graphs: Sequence[OnnxGraph], record: dict,
                      extra: Optional[Callable[[Path], dict]] = None, overwrite: bool = False,
                      opset: int = OPSET) -> Path:
    """Export `graphs` into a staging folder, check each with onnxruntime, then publish `output` atomically.
    `extra(staging)` may write more files and returns manifest entries."""
    output = Path(output).resolve()
    if output.exists() and not overwrite:
        raise FileExistsError(f"{output} already exists; remove it or pass --overwrite")
    staging = staging_dir(output)
    try:
        manifest = {"format": FORMAT, "task": task, "opset": opset, **record, "graphs": {}}
        for graph in graphs:
            manifest["graphs"][graph.name] = export_graph(graph, staging / f"{graph.name}.onnx", opset)
        if extra is not None:
            manifest.update(extra(staging))
        manifest.update(exported_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"), versions=_versions())
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
        publish_dir(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output


def _copy_workflow(workflow_dir: Optional[str]) -> Callable[[Path], dict]:
    def copy_into(staging: Path) -> dict:
        if not workflow_dir or not Path(workflow_dir).is_dir():
            return {"workflow": None}
        shutil.copytree(workflow_dir, staging / "workflow")
        return {"workflow": "workflow"}

    return copy_into


def export_onnx_run(run_dir: str | Path, output: str | Path, data: Optional[str] = None,
                    overwrite: bool = False, opset: int = OPSET) -> Path:
    """`merlin-hstu export --format onnx` for a run of any task (module docstring)."""
    from merlin_hstu.train.run_dir import load_run

    run = load_run(run_dir)
    source = {"run_dir": str(Path(run_dir).resolve()), "model_type": run.record.get("model_type")}
    if run.task == "retrieval":
        from merlin_hstu.serving.export import load_serving_parts

        parts = load_serving_parts(run_dir, data=data)
        max_history = int(run.config.data.max_history)
        graphs = retrieval_graphs(run.model, max_history, parts.first_item_id)

        def extra(staging: Path) -> dict:
            import pandas as pd

            encoded = np.arange(parts.first_item_id, len(parts.item_mapping), dtype=np.int64)
            raw = list(parts.item_mapping[parts.first_item_id:])
            pd.DataFrame({"encoded_id": encoded, "raw_id": raw}).to_parquet(staging / "item_ids.parquet")
            entries = _copy_workflow(str(parts.workflow_path))(staging)
            return {**entries, "item_ids": "item_ids.parquet", "item_encoding": parts.contract.item_encoding,
                    "first_item_id": int(parts.first_item_id), "max_history": max_history}

        return write_onnx_export(output, "retrieval", graphs, {"source": source}, extra, overwrite, opset)
    if run.task == "ranking":
        dataset_dir = data or run.record.get("data")
        workflow = str(Path(dataset_dir) / "workflow") if dataset_dir else None
        return write_onnx_export(output, "ranking", ranking_graphs(run.model), {"source": source},
                                 _copy_workflow(workflow), overwrite, opset)
    from merlin_hstu.serving.ctr import _trained_features

    trained = _trained_features(run.path)
    cards = list(trained["cardinalities"] or [])
    graphs = ctr_graphs(run.model, len(trained["dense_names"] or []), cards)
    record = {"source": source, "dense_names": list(trained["dense_names"] or []),
              "sparse_names": list(trained["sparse_names"] or []), "cardinalities": cards}
    workflow = str(Path(run.record["data"]) / "workflow") if run.record.get("data") else None
    return write_onnx_export(output, "ctr", graphs, record, _copy_workflow(workflow), overwrite, opset)
