"""Export a trained retrieval run as a Triton model repository: raw request lists in, raw top-K item ids out.

Repository layout (written by `merlin_hstu.serving.repository.write_repository`; both models use Triton's python
backend, nothing needs the missing libtorch backend):

    REPO/
      serving.json              task, source run, K, request contract, model config, versions
      hstu_topk/                Merlin's plain ragged convention (max_batch_size 0): any Triton client
        config.pbtxt            inputs/outputs of `RequestContract`; optional query_timestamp/top_k/...
        1/model.py              shim -> merlin_hstu.serving.triton_entry (validates, forwards over BLS)
      hstu_topk_batched/        the Merlin executor behind Triton's dynamic batcher (what ServingClient calls)
        config.pbtxt            max_batch_size > 0, every input allow_ragged_batch (a leading dim of 1)
        1/model.py              shim -> merlin_hstu.serving.triton_executor (validates, runs the Ensemble)
        1/ensemble/             Ensemble.save: ensemble.pkl (the graph of merlin_hstu.serving.ops classes,
                                no model or workflow inside), metadata.json, and the op artifacts:
                                workflow/ (Workflow.save), hstu_scorer.pt (TorchScript),
                                item_id_mapping.parquet

Why two models: Triton only hands several concurrent requests to one execution for a model with a batch
dimension, and Merlin's ragged tensors (values [N], offsets [B+1]) cannot share one.  The batched model takes
each request as one ragged batch element (every tensor with a leading 1), so the NVTabular workflow and the
TorchScript program run once per batch instead of once per request; the plain model keeps the Merlin convention
for clients that cannot add that dimension, at the cost of one BLS hop (docs/serving.md, "Where the time goes").

Item ids: with Categorify (0 pad, 1 null, 2 OOV, items from 3) the graph decodes encoded ids back to raw ones.  A
dataset preprocessed with raw item ids (`item_encoding="raw"`, op RawItemIds: MovieLens, `--dataset ml-1m-prefix`)
has no Categorify statistics: its ids ARE the embedding rows, so requests carry raw = encoded ids, the decoding is
the identity, items start at 1, and an id outside [1, max_item_id] is a bad request (there is no OOV row).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from merlin_hstu.serving.contract import (
    EXCLUDE_HISTORY,
    QUERY_TIMESTAMP,
    TOP_K,
    RequestContract,
    example_request,
)
from merlin_hstu.serving.repository import (  # noqa: F401  (read_serving_record: re-exported for callers)
    ENTRY_SHIM,
    EXECUTOR_SHIM,
    ExportConfig,
    TritonModel,
    check_serves,
    export_settings,
    read_serving_record,
    write_repository,
)

CATEGORIFY_FIRST_ID = 3  # Categorify: 0 padding, 1 null, 2 out-of-vocabulary
RAW_FIRST_ID = 1  # raw ids: 0 is padding


@dataclass
class ItemIds:
    """How the run's workflow encodes item ids, and the way back."""

    encoding: str  # "categorify" | "raw"
    mapping: np.ndarray  # raw item id per encoded id (entries below first_id are placeholders)
    first_id: int  # the smallest id of a real item
    max_id: Optional[int] = None  # raw: the largest id the workflow accepts


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
    item_mapping: np.ndarray  # raw item id per encoded id (below first_item_id: placeholders)
    contract: RequestContract
    candidates_file: Optional[Path]
    first_item_id: int = CATEGORIFY_FIRST_ID


def _dtype_kind(dtype) -> str:
    import merlin.dtypes as md

    return "int64" if dtype.element_type in (md.ElementType.Int, md.ElementType.UInt) else "string"


def item_ids_of(workflow, workflow_path: Path) -> ItemIds:
    """The item encoding of a fitted session workflow: RawItemIds (raw ids kept) or Categorify."""
    from merlin.dag import postorder_iter_nodes

    from merlin_hstu.workflows.ops import RawItemIds
    from merlin_hstu.workflows.session_workflow import load_item_id_mapping

    for node in postorder_iter_nodes(workflow.output_node):
        if isinstance(node.op, RawItemIds):
            if node.op.max_id is None:
                raise ValueError(f"the workflow at {workflow_path} has an unfitted RawItemIds op; re-run preprocess")
            return ItemIds("raw", np.arange(node.op.max_id + 1, dtype=np.int64), RAW_FIRST_ID, int(node.op.max_id))
    return ItemIds("categorify", load_item_id_mapping(workflow_path), CATEGORIFY_FIRST_ID)


def load_candidates(path: Path, num_items: int) -> np.ndarray:
    """Encoded candidate ids from `candidates.parquet`: its column `schema.CANDIDATES_COLUMN` (or the only column)."""
    import pandas as pd

    from merlin_hstu.common import schema as roles

    frame = pd.read_parquet(path)
    column = (roles.CANDIDATES_COLUMN if roles.CANDIDATES_COLUMN in frame.columns
              else (frame.columns[0] if len(frame.columns) == 1 else None))
    if column is None:
        raise ValueError(f"{path} must have a {roles.CANDIDATES_COLUMN!r} column (or exactly one column) of encoded "
                         f"item ids; found {list(frame.columns)}")
    return frame[column].to_numpy(dtype=np.int64)


def _raw_columns(data, workflow, workflow_path: Path) -> list:
    """The config's raw columns that the workflow takes: id and item always; action and timestamp when the data
    had them (e.g. `--dataset ml-1m-prefix` has no actions, whatever the preset names)."""
    inputs = workflow.input_schema.column_names
    missing = [c for c in (data.id_column, data.item_column) if c not in inputs]
    if missing:
        raise ValueError(f"the run's config names raw column(s) {missing} that the workflow at {workflow_path} "
                         f"does not take (workflow inputs: {inputs})")
    columns = [c for c in (data.id_column, data.item_column, data.action_column, data.timestamp_column)
               if c and c in inputs]
    unnamed = [c for c in inputs if c not in columns]
    if unnamed:
        raise ValueError(f"the workflow at {workflow_path} takes column(s) {unnamed} that the run's config does not "
                         "name (data.id_column / item_column / action_column / timestamp_column); retrain with a "
                         "config that names them")
    return columns


def load_serving_parts(run_dir: str | Path, config: Optional[ExportConfig] = None,
                       data: Optional[str | Path] = None) -> ServingParts:
    """Load the run, its fitted workflow (serving mode) and build the TorchScript scorer.  `data`: the dataset
    directory (workflow/, candidates.parquet) when the run does not record it or it moved."""
    from merlin_hstu.common import schema as roles
    from merlin_hstu.retrieval.train import load_run
    from merlin_hstu.serving.scorer import build_scorer, rankable_mask
    from merlin_hstu.workflows.session_workflow import load_serving_workflow

    config = config or ExportConfig()
    run_dir = Path(run_dir)
    model, cfg, record = load_run(run_dir)
    data_dir = Path(data) if data else (Path(record["data"]) if record.get("data") else None)
    workflow_path = data_dir / "workflow" if data else record.get("workflow")
    if not workflow_path or not Path(workflow_path).is_dir():
        raise FileNotFoundError(
            f"{run_dir} does not point at a fitted NVTabular workflow (\"workflow\": {str(workflow_path)!r}); pass "
            "--data with the `merlin-hstu preprocess` output the run was trained on (it holds workflow/)")
    workflow_path = Path(workflow_path)
    workflow = load_serving_workflow(workflow_path)
    d = cfg.data
    raw_columns = _raw_columns(d, workflow, workflow_path)
    kinds = {c: _dtype_kind(workflow.input_schema[c].dtype) for c in raw_columns}
    action_column = d.action_column if d.action_column in raw_columns else None
    timestamp_column = d.timestamp_column if d.timestamp_column in raw_columns else None
    model_actions = model.config.inputs.actions
    if model_actions != "none" and action_column is None:
        raise ValueError(f"{run_dir} reads actions (inputs.actions={model_actions!r}) but the workflow at "
                         f"{workflow_path} takes no action column (inputs: {workflow.input_schema.column_names}); "
                         "export it with the workflow of the dataset it was trained on")
    # A model without action inputs reads item ids and timestamps only.  The action branch (a string Categorify
    # and a list aggregation) is about 40% of the workflow's time on a request-sized frame, so it is then removed
    # with NVTabular's own Workflow.remove_inputs - unless the interleaved item/action tokens need it.
    reads_actions = bool(action_column) and (
        model_actions != "none" or not config.prune_unused_inputs
        or roles.interleaved_list_column(workflow.output_schema) is not None)
    if action_column and not reads_actions:
        workflow.remove_inputs([action_column])
    # The scorer takes the action ids per event (the interleaved tokens are the same ids shifted by K).
    action_list = roles.action_list_column(workflow.output_schema) if model_actions != "none" else None
    item_list = roles.item_list_column(workflow.output_schema)
    num_items = model.config.num_items
    items = item_ids_of(workflow, workflow_path)
    if len(items.mapping) != num_items:
        raise ValueError(f"the workflow encodes {len(items.mapping)} item ids but the model has {num_items} embedding "
                         f"rows; {workflow_path} is not the workflow this model was trained with")
    mapping = items.mapping
    item_kind = kinds[d.item_column]
    if items.encoding == "raw" and item_kind != "int64":
        raise ValueError(f"{workflow_path} keeps raw item ids, which must be integers, but its {d.item_column!r} "
                         "input is text")
    if items.encoding == "categorify" and item_kind == "int64":
        mapping = np.array([-1 if v is None else int(v) for v in mapping], dtype=np.int64)
    candidates_file = None
    candidates = None
    if data_dir is not None and (data_dir / "candidates.parquet").is_file():
        candidates_file = data_dir / "candidates.parquet"
        candidates = load_candidates(candidates_file, num_items)
    rankable = rankable_mask(num_items, items.first_id, candidates)
    scorer = build_scorer(model, d.max_history, rankable)
    if config.top_k > scorer.max_k:
        raise ValueError(f"top_k={config.top_k} is larger than this catalogue allows: {int(rankable.sum())} "
                         f"rankable items minus a history window of {d.max_history} = {scorer.max_k}")
    contract = RequestContract(
        id_column=d.id_column,
        id_dtype=kinds[d.id_column],
        item_column=d.item_column,
        item_dtype=item_kind,
        action_column=action_column,
        action_dtype=kinds.get(action_column),
        reads_actions=reads_actions,
        timestamp_column=timestamp_column,
        max_history=d.max_history,
        max_k=scorer.max_k,
        default_k=config.top_k,
        exclude_history=config.exclude_history,
        model_name=config.name_for("retrieval"),
        batched_model_name=config.batched_name,
        item_encoding=items.encoding,
        max_item_id=items.max_id,
        extra={"item_list": item_list, "uses_time": bool(model.config.encoder.time_bias) and bool(timestamp_column),
               **({"action_list": action_list} if action_list else {})},
    )
    return ServingParts(run_dir, model, cfg, record, workflow, workflow_path, scorer, mapping, contract,
                        candidates_file, items.first_id)


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
    action_list = c.extra.get("action_list")  # models with action inputs (inputs.actions concat | interleave)
    sessions = request_schema.column_names >> ops.SessionWorkflowFromRequest(
        wf, c.id_column, c.served_list_columns, item_list, time_list, action_list)
    topk = sessions >> ops.PredictHSTUTopK(parts.scorer, item_list, time_list, action_list)
    decoded = topk >> ops.DecodeItemIds(parts.item_mapping, raw(c.item_dtype), parts.first_item_id)
    return Ensemble(decoded, request_schema)


def export_repository(run_dir: str | Path, output: str | Path, config: Optional[ExportConfig] = None,
                      overwrite: bool = False, data: Optional[str | Path] = None) -> Path:
    """Write the Triton model repository for the retrieval run `run_dir` to `output` (atomically).

    Returns the repository path.  The ensemble is checked on a one-user request, loaded from the staged files as
    the server loads it, before anything is published, so a repository that exists has served a request.
    """
    config = config or ExportConfig()
    output = Path(output).resolve()
    if output.exists() and not overwrite:
        raise FileExistsError(f"{output} already exists; remove it or pass overwrite=True (--overwrite)")
    parts = load_serving_parts(run_dir, config, data=data)
    record = {"run_dir": str(parts.run_dir.resolve()), "workflow": str(parts.workflow_path.resolve()),
              "candidates": str(parts.candidates_file) if parts.candidates_file else None,
              "export": export_settings(config, "retrieval"), "model": parts.model.config.to_dict()}
    return write_retrieval_repository(parts, output, config, record, overwrite)


def write_retrieval_repository(parts: ServingParts, output: Path, config: ExportConfig, record: dict,
                               overwrite: bool = False) -> Path:
    """The retrieval repository of `parts` (the plain ragged model + the batched executor), checked on a
    one-user request and published atomically; `record` goes to serving.json.  Shared by the run export
    above and `merlin_hstu.serving.t4r_export` (models trained with tr.Trainer)."""
    c = parts.contract
    models = [TritonModel(c.model_name, c, ENTRY_SHIM, instances=config.entry_instances),
              TritonModel(c.batched_model_name, c, EXECUTOR_SHIM, ensemble=build_ensemble(parts), batched=True,
                          instances=config.instances, max_queue_delay_us=config.max_queue_delay_us)]
    example = example_request(c, [parts.item_mapping[parts.first_item_id]])

    def expect(outputs) -> Optional[str]:
        ids, scores = outputs
        if ids.shape != (1, c.default_k) or not np.all(np.isfinite(scores)):
            return f"ids of shape {ids.shape} and scores {scores}"
        return None

    return write_repository(output, models, record, check=lambda repo: check_serves(repo, c, example, expect),
                            overwrite=overwrite)
