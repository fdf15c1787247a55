"""Export a trained run as a Triton model repository: raw request lists in, raw top-K item ids out.

Repository layout (both models use Triton's python backend; nothing needs the missing libtorch backend):

    REPO/
      serving.json              what was exported from where (run, K, request contract, versions)
      hstu_topk/                Merlin's plain ragged convention (max_batch_size 0): any Triton client
        config.pbtxt            inputs/outputs of `RequestContract`; optional query_timestamp/top_k/...
        1/model.py              shim -> merlin_hstu.serving.triton_entry (validates, forwards over BLS)
      hstu_topk_batched/        the Merlin executor behind Triton's dynamic batcher (what HSTUClient calls)
        config.pbtxt            max_batch_size > 0, every input allow_ragged_batch (a leading dim of 1)
        1/model.py              shim -> merlin_hstu.serving.triton_batched (validates, runs the Ensemble)
        1/ensemble/             Ensemble.save: ensemble.pkl (the graph of merlin_hstu.serving.ops classes,
                                no model or workflow inside), metadata.json, and the op artifacts:
                                workflow/ (Workflow.save), hstu_scorer.pt (TorchScript),
                                item_id_mapping.parquet

Why two models: Triton only hands several concurrent requests to one execution for a model with a batch
dimension, and Merlin's ragged tensors (values [N], offsets [B+1]) cannot share one.  The batched model takes
each request as one ragged batch element (every tensor with a leading 1), so the NVTabular workflow and the
TorchScript program run once per batch instead of once per request; the plain model keeps the Merlin convention
for clients that cannot add that dimension, at the cost of one BLS hop (docs/serving.md, "Where the time goes").
"""
from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from merlin_hstu.common.atomic_dir import publish_dir, staging_dir
from merlin_hstu.serving.contract import CONTRACT_PARAMETER, EXCLUDE_HISTORY, QUERY_TIMESTAMP, TOP_K, RequestContract

SERVING_FILE = "serving.json"
ENTRY_SHIM = "from merlin_hstu.serving.triton_entry import TritonPythonModel  # noqa: F401\n"
BATCHED_SHIM = "from merlin_hstu.serving.triton_batched import TritonPythonModel  # noqa: F401\n"
BATCHED_MAX_BATCH = 64  # requests per batched execute (each request may hold many users)


@dataclass
class ExportConfig:
    """Knobs of `export_repository`."""

    top_k: int = 10  # default K of a request (a request may ask for 1..max_k)
    exclude_history: bool = True  # default: drop each user's history window from the results (eval protocol)
    model_name: str = "hstu_topk"
    entry_instances: int = 8  # plain-model instances = its requests in flight (each waits on the batched model)
    batched_instances: int = 2  # executor instances, each runs whole batches (2 measured best on 2 cores)
    max_queue_delay_us: int = 0  # extra wait to grow a batch; 0: batch whatever is queued when an instance frees
    prune_unused_inputs: bool = True  # drop workflow branches the model never reads (the action lists)

    def __post_init__(self) -> None:
        if not self.model_name or not self.model_name.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"ExportConfig.model_name must be letters, digits, '_' or '-', got {self.model_name!r}")
        for name in ("top_k", "entry_instances", "batched_instances"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"ExportConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_queue_delay_us < 0:
            raise ValueError(f"ExportConfig.max_queue_delay_us must be >= 0, got {self.max_queue_delay_us}")

    @property
    def batched_name(self) -> str:
        return f"{self.model_name}_batched"


@dataclass
class ServingParts:
    """Everything the serving graph is built from, loaded from a run directory."""

    run_dir: Path
    model: object  # HSTURetrievalModel (eval mode)
    cfg: object  # ExperimentConfig
    record: dict
    workflow: object  # nvt.Workflow with the min-length filter off
    workflow_path: Path
    scorer: object  # torch.jit.ScriptModule (merlin_hstu.serving.scorer.TopKScorer)
    item_mapping: np.ndarray  # raw item id per encoded id (0..2: placeholders)
    contract: RequestContract
    candidates_file: Optional[Path]


def _dtype_kind(dtype) -> str:
    import merlin.dtypes as md

    return "int64" if dtype.element_type in (md.ElementType.Int, md.ElementType.UInt) else "string"


def load_candidates(path: Path, num_items: int) -> np.ndarray:
    """Encoded candidate ids from `candidates.parquet`: a column `item_id` (or the only column) of encoded ids."""
    import pandas as pd

    frame = pd.read_parquet(path)
    column = "item_id" if "item_id" in frame.columns else (frame.columns[0] if len(frame.columns) == 1 else None)
    if column is None:
        raise ValueError(f"{path} must have an 'item_id' column (or exactly one column) of encoded item ids; "
                         f"found {list(frame.columns)}")
    return frame[column].to_numpy(dtype=np.int64)


def load_serving_parts(run_dir: str | Path, config: Optional[ExportConfig] = None) -> ServingParts:
    """Load the run, its fitted workflow (serving mode) and build the TorchScript scorer."""
    from merlin_hstu.common import schema as roles
    from merlin_hstu.serving.scorer import build_scorer, rankable_mask
    from merlin_hstu.retrieval.train import load_run
    from merlin_hstu.workflows.session_workflow import load_item_id_mapping, load_serving_workflow

    config = config or ExportConfig()
    run_dir = Path(run_dir)
    model, cfg, record = load_run(run_dir)
    workflow_path = record.get("workflow")
    if not workflow_path or not Path(workflow_path).is_dir():
        raise FileNotFoundError(
            f"{run_dir}/metrics.json does not point at a fitted NVTabular workflow (\"workflow\": {workflow_path!r}); "
            "train the run with `merlin-hstu train --data <preprocess output>` so the workflow is recorded")
    workflow_path = Path(workflow_path)
    workflow = load_serving_workflow(workflow_path)
    data = cfg.data
    raw_columns = [c for c in (data.id_column, data.item_column, data.action_column, data.timestamp_column) if c]
    missing = [c for c in raw_columns if c not in workflow.input_schema.column_names]
    if missing:
        raise ValueError(f"the run's config names raw column(s) {missing} that the workflow at {workflow_path} "
                         f"does not take (workflow inputs: {workflow.input_schema.column_names})")
    kinds = {c: _dtype_kind(workflow.input_schema[c].dtype) for c in raw_columns}
    # The retrieval model reads item ids and timestamps only.  The action branch (a string Categorify and a
    # list aggregation) is about 40% of the workflow's time on a request-sized frame, so it is removed with
    # NVTabular's own Workflow.remove_inputs - unless the interleaved item/action tokens need it.
    reads_actions = bool(data.action_column) and (
        not config.prune_unused_inputs or roles.interleaved_list_column(workflow.output_schema) is not None)
    if data.action_column and not reads_actions:
        workflow.remove_inputs([data.action_column])
    item_list = roles.item_list_column(workflow.output_schema)
    num_items = model.config.num_items
    mapping = load_item_id_mapping(workflow_path)
    if len(mapping) != num_items:
        raise ValueError(f"the workflow encodes {len(mapping)} item ids but the model has {num_items} embedding "
                         f"rows; {workflow_path} is not the workflow this model was trained with")
    item_kind = kinds[data.item_column]
    if item_kind == "int64":
        mapping = np.array([-1 if v is None else int(v) for v in mapping], dtype=np.int64)
    candidates_file = None
    candidates = None
    if record.get("data") and (Path(record["data"]) / "candidates.parquet").is_file():
        candidates_file = Path(record["data"]) / "candidates.parquet"
        candidates = load_candidates(candidates_file, num_items)
    rankable = rankable_mask(num_items, roles.FIRST_REAL_ID, candidates)
    scorer = build_scorer(model, data.max_history, rankable)
    if config.top_k > scorer.max_k:
        raise ValueError(f"top_k={config.top_k} is larger than this catalogue allows: {int(rankable.sum())} "
                         f"rankable items minus a history window of {data.max_history} = {scorer.max_k}")
    contract = RequestContract(
        id_column=data.id_column,
        id_dtype=kinds[data.id_column],
        item_column=data.item_column,
        item_dtype=item_kind,
        action_column=data.action_column,
        action_dtype=kinds.get(data.action_column),
        reads_actions=reads_actions,
        timestamp_column=data.timestamp_column,
        max_history=data.max_history,
        max_k=scorer.max_k,
        default_k=config.top_k,
        exclude_history=config.exclude_history,
        model_name=config.model_name,
        batched_model_name=config.batched_name,
        extra={"item_list": item_list, "uses_time": bool(model.config.encoder.time_bias)},
    )
    return ServingParts(run_dir, model, cfg, record, workflow, workflow_path, scorer, mapping, contract,
                        candidates_file)


def build_ensemble(parts: ServingParts):
    """The serving graph of `merlin_hstu.serving.ops` as a merlin-systems `Ensemble` (request schema in)."""
    import merlin.dtypes as md
    from merlin.schema import ColumnSchema, Schema
    from merlin.systems.dag.ensemble import Ensemble

    from merlin_hstu.common import schema as roles
    from merlin_hstu.serving import ops

    c = parts.contract
    wf = parts.workflow

    def raw(kind: str):
        return md.int64 if kind == "int64" else md.string

    columns = [ColumnSchema(c.id_column, dtype=raw(c.id_dtype))]
    for col in c.served_list_columns:
        columns.append(ColumnSchema(col, dtype=raw(c.column_dtype(col)), is_list=True, is_ragged=True))
    columns += [ColumnSchema(QUERY_TIMESTAMP, dtype=md.int64), ColumnSchema(EXCLUDE_HISTORY, dtype=md.boolean),
                ColumnSchema(TOP_K, dtype=md.int32)]
    request_schema = Schema(columns)

    time_list = roles.timestamp_list_column(wf.output_schema) if c.extra["uses_time"] else None
    item_list = c.extra["item_list"]
    sessions = request_schema.column_names >> ops.SessionWorkflowFromRequest(
        wf, c.id_column, c.served_list_columns, item_list, time_list)
    topk = sessions >> ops.PredictHSTUTopK(parts.scorer, item_list, time_list)
    decoded = topk >> ops.DecodeItemIds(parts.item_mapping, raw(c.item_dtype), roles.FIRST_REAL_ID)
    return Ensemble(decoded, request_schema)


# --- Triton configs ---------------------------------------------------------------------------------
def _tensor_block(name: str, dtype: str, dims, extra: str = "") -> str:
    return f'  {{ name: "{name}" data_type: {dtype} dims: [ {", ".join(str(d) for d in dims)} ]{extra} }}'


def entry_config(contract: RequestContract, config: ExportConfig) -> str:
    inputs = [_tensor_block(n, t, d) for n, t, d in contract.required_inputs()]
    inputs += [_tensor_block(n, t, d, " optional: true") for n, t, d in contract.optional_inputs()]
    outputs = [_tensor_block(n, t, d) for n, t, d in contract.outputs()]
    return "\n".join([
        f'name: "{config.model_name}"',
        'backend: "python"',
        "max_batch_size: 0",
        "input [", ",\n".join(inputs), "]",
        "output [", ",\n".join(outputs), "]",
        f"instance_group [ {{ kind: KIND_CPU count: {config.entry_instances} }} ]",
        _contract_parameter(contract),
        "",
    ])


def batched_config(contract: RequestContract, config: ExportConfig) -> str:
    inputs = [_tensor_block(n, t, d, " allow_ragged_batch: true") for n, t, d in contract.batched_inputs()]
    outputs = [_tensor_block(n, t, d) for n, t, d in contract.outputs()]
    return "\n".join([
        f'name: "{config.batched_name}"',
        'backend: "python"',
        f"max_batch_size: {BATCHED_MAX_BATCH}",
        f"dynamic_batching {{ max_queue_delay_microseconds: {config.max_queue_delay_us} }}",
        "input [", ",\n".join(inputs), "]",
        "output [", ",\n".join(outputs), "]",
        f"instance_group [ {{ kind: KIND_CPU count: {config.batched_instances} }} ]",
        _contract_parameter(contract),
        "",
    ])


def _contract_parameter(contract: RequestContract) -> str:
    """The contract as a config parameter: clients read it with get_model_config, no files needed."""
    text = json.dumps(json.dumps(asdict(contract), separators=(",", ":")))  # JSON, quoted for protobuf text
    return f'parameters {{ key: "{CONTRACT_PARAMETER}" value {{ string_value: {text} }} }}'


def export_repository(run_dir: str | Path, output: str | Path, config: Optional[ExportConfig] = None,
                      overwrite: bool = False) -> Path:
    """Write the Triton model repository for `run_dir` to `output` (atomically: a temp sibling, renamed).

    Returns the repository path.  The ensemble is checked in-process on a one-user request before anything is
    published, so a repository that exists has served at least one request.
    """
    from merlin_hstu.serving import ops

    config = config or ExportConfig()
    output = Path(output).resolve()
    if output.exists() and not overwrite:
        raise FileExistsError(f"{output} already exists; remove it or pass overwrite=True (--overwrite)")
    parts = load_serving_parts(run_dir, config)
    ensemble = build_ensemble(parts)
    staging = staging_dir(output)
    try:
        entry_dir, batched_dir = staging / config.model_name, staging / config.batched_name
        (entry_dir / "1").mkdir(parents=True)
        (batched_dir / "1").mkdir(parents=True)
        (entry_dir / "config.pbtxt").write_text(entry_config(parts.contract, config))
        (entry_dir / "1" / "model.py").write_text(ENTRY_SHIM)
        (batched_dir / "config.pbtxt").write_text(batched_config(parts.contract, config))
        (batched_dir / "1" / "model.py").write_text(BATCHED_SHIM)
        ensemble_dir = batched_dir / "1" / "ensemble"
        ensemble.save(str(ensemble_dir))
        for op in ops.graph_ops(ensemble):
            op.save_artifacts(str(ensemble_dir))
        _smoke_test(ensemble_dir, parts)
        (staging / SERVING_FILE).write_text(json.dumps(_serving_record(parts, config), indent=2, default=str))
        publish_dir(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output


def _smoke_test(ensemble_dir: Path, parts: ServingParts) -> None:
    """Load the saved ensemble as the server will, and serve one synthetic one-event user."""
    from merlin_hstu.serving.client import example_request
    from merlin_hstu.serving.core import ServingEnsemble

    served = ServingEnsemble.load(ensemble_dir, parts.contract)
    c = parts.contract
    first_item = parts.item_mapping[3]
    request = c.validate(example_request(c, [first_item]))
    ids, scores = served.run([request])[0]
    if ids.shape != (1, c.default_k) or not np.all(np.isfinite(scores)):
        raise RuntimeError(f"the exported ensemble answered a one-user request with ids of shape {ids.shape} "
                           f"and scores {scores}; the export is broken")


def _serving_record(parts: ServingParts, config: ExportConfig) -> dict:
    import torch

    return {
        "run_dir": str(parts.run_dir.resolve()),
        "workflow": str(parts.workflow_path.resolve()),
        "candidates": str(parts.candidates_file) if parts.candidates_file else None,
        "export": asdict(config),
        "contract": asdict(parts.contract),
        "model": parts.model.config.to_dict(),
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": {"python": sys.version.split()[0], "torch": torch.__version__},
    }


def read_serving_record(repo: str | Path) -> dict:
    path = Path(repo) / SERVING_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{repo} is not a merlin-hstu model repository ({SERVING_FILE} is missing); "
                                "create one with `merlin-hstu export --model RUN_DIR --output REPO`")
    return json.loads(path.read_text())
