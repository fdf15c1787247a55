"""Merlin operators of the serving graph (merlin-integration.md §3.3 B: everything runs inside one executor).

    request (B rows: id, ragged item / timestamp (/ action) lists, query_timestamp, exclude_history, top_k)
      >> SessionWorkflowFromRequest(fitted NVTabular workflow)   B rows: the workflow's item / time lists
      >> PredictHSTUTopK(TorchScript program)                    B rows: scores, encoded item ids [B, K]
      >> DecodeItemIds(Categorify's inverse)                     B rows: scores, raw item ids [B, K]

`SessionWorkflowFromRequest` explodes the per-user lists into the workflow's input (one row per event), runs
the fitted workflow, and restores request order.  Why a request row key: the session workflow groups events by
the id column, so two rows with the same user id in one batch would merge, and the output order would follow
the ids.  Replacing the id by the row number (0..B-1, zero-padded text when the workflow's id column is a
string) keeps one output row per request row, in request order.  The per-request options pass through it, so
the graph is one straight chain: each extra branch costs merlin.dag a column merge per request batch.

Heavy state (the workflow, the TorchScript program, the id mapping) is written by `save_artifacts` next to
`ensemble.pkl` and dropped from the pickle, so the pickle holds only these importable classes and plain values.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import numpy as np
import pandas as pd

import merlin.dtypes as md
from merlin.dag import BaseOperator, ColumnSelector, DataFormats
from merlin.schema import ColumnSchema, Schema
from merlin.systems.dag.ops.workflow import TransformWorkflow
from merlin.table import TensorTable

from merlin_hstu.common import schema as roles
from merlin_hstu.serving.contract import EXCLUDE_HISTORY, OUT_ITEM_IDS, OUT_SCORES, QUERY_TIMESTAMP, TOP_K

OPTIONS = (QUERY_TIMESTAMP, EXCLUDE_HISTORY, TOP_K)
SCORER_FILE = "hstu_scorer.pt"
ITEM_MAPPING_FILE = "item_id_mapping.parquet"
WORKFLOW_DIR = "workflow"


def row_keys(count: int, dtype: md.DType) -> np.ndarray:
    """Request row numbers in the id column's dtype; text keys are zero-padded so they sort numerically."""
    if dtype.element_type in (md.ElementType.Int, md.ElementType.UInt):
        return np.arange(count, dtype=np.int64)
    return np.array([f"{i:012d}" for i in range(count)], dtype=object)


def as_text(values: np.ndarray) -> np.ndarray:
    """Triton hands BYTES tensors over as bytes objects; the fitted Categorify knows them as str."""
    if values.dtype == object and len(values) and isinstance(values[0], bytes):
        return np.array([v.decode("utf-8") for v in values], dtype=object)
    return values


NULL_PAD = "\x00merlin-hstu-pad"  # a value no fitted vocabulary holds (Categorify maps it to its OOV id)


def transform_with_nulls(transform, frame: pd.DataFrame, text_columns) -> pd.DataFrame:
    """`transform(frame)` for frames where a text column may be missing (None) in every row.

    Why: NVTabular 23.08's Categorify peeks at a column's first non-null value and fails ("Failed to categorical
    encode column") when there is none - offline batches never are all-null, but a one-row request with an empty
    field is.  The frame gets one padding row (a copy of row 0 with NULL_PAD in those columns), which is dropped
    from the output; Categorify encodes row by row, so the other rows' ids do not change.
    """
    empty = [c for c in text_columns if len(frame) and frame[c].isna().all()]
    if not empty:
        return transform(frame)
    pad = frame.iloc[:1].copy()
    for column in empty:
        pad[column] = np.array([NULL_PAD], dtype=object)
    out = transform(pd.concat([frame, pad], ignore_index=True))
    return out.iloc[:-1].reset_index(drop=True)


def _ragged(name: str) -> ColumnSchema:
    return ColumnSchema(name, dtype=md.int64, is_list=True, is_ragged=True)


def _values_offsets(column: pd.Series) -> tuple:
    lengths = np.fromiter((len(v) for v in column), dtype=np.int64, count=len(column))
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    values = np.concatenate([np.asarray(v, dtype=np.int64) for v in column]) if len(column) else np.zeros(0, np.int64)
    return values, offsets


class InlineWorkflow(TransformWorkflow):
    """A fitted NVTabular workflow run inside the executor process.

    A `TransformWorkflow` subclass on purpose: merlin-systems maps the exact type `TransformWorkflow` to a
    separate Triton model called over BLS; a subclass runs in-process.  The workflow is saved with `Workflow.save`
    (NVTabular's own format) next to ensemble.pkl rather than pickled into it.  Subclasses write `transform`
    and may override `load_workflow`.
    """

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "workflow"}

    def save_artifacts(self, artifact_path: Optional[str] = None) -> None:
        if artifact_path and self.workflow is not None:
            self.workflow.save(str(Path(artifact_path) / WORKFLOW_DIR))

    def load_artifacts(self, artifact_path: Optional[str] = None) -> None:
        path = Path(artifact_path) / WORKFLOW_DIR if artifact_path else None
        if path is None or not path.is_dir():
            return  # merlin.dag's Graph calls load_artifacts("") on every op while building
        self.workflow = self.load_workflow(path)

    def load_workflow(self, path: Path):
        import nvtabular as nvt

        return nvt.Workflow.load(str(path))


ENCODER_FILE = "encoder.json"


class InlineEncoder(BaseOperator):
    """A fitted encoder that is not an NVTabular workflow (a typed object with `to_dict` / a `from_dict`), run
    inside the executor process like `InlineWorkflow`.  It is saved as JSON (`ENCODER_FILE`) next to ensemble.pkl
    and dropped from the pickle; subclasses set `load_encoder` (dict -> encoder) and write `transform`."""

    def __init__(self, encoder=None):
        super().__init__()
        self.encoder = encoder

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "encoder"}

    def save_artifacts(self, artifact_path: Optional[str] = None) -> None:
        import json

        if artifact_path and getattr(self, "encoder", None) is not None:
            (Path(artifact_path) / ENCODER_FILE).write_text(json.dumps(self.encoder.to_dict()))

    def load_artifacts(self, artifact_path: Optional[str] = None) -> None:
        import json

        path = Path(artifact_path) / ENCODER_FILE if artifact_path else None
        if path is not None and path.is_file():  # merlin.dag's Graph calls load_artifacts("") while building
            self.encoder = self.load_encoder(json.loads(path.read_text()))

    def load_encoder(self, state: dict):
        raise NotImplementedError

    def compute_input_schema(self, root_schema: Schema, parents_schema: Schema, deps_schema: Schema,
                             selector: ColumnSelector) -> Schema:
        return parents_schema + deps_schema


class SessionWorkflowFromRequest(InlineWorkflow):
    """Per-user request lists -> the fitted session workflow -> its item (and time) lists, in request order.

    Runs in-process (`InlineWorkflow`); the workflow is reloaded with the min-length filter off
    (`load_serving_workflow`): every request row must produce an output row.
    """

    def __init__(self, workflow=None, id_column: Optional[str] = None, list_columns: Optional[List[str]] = None,
                 item_list: Optional[str] = None, time_list: Optional[str] = None, action_list: Optional[str] = None):
        super().__init__(workflow)
        # names not given come from the workflow's output schema (the contract), else merlin_hstu.common.schema's
        out_schema = workflow.output_schema if workflow is not None else None
        if id_column is None:
            id_column = (roles.id_column(out_schema) if out_schema is not None else None) or roles.LOG_USER_ID
        if item_list is None:
            item_list = roles.item_list_column(out_schema) if out_schema is not None else roles.ITEM_LIST
        self.id_column = id_column
        self.list_columns = list(list_columns or [])
        self.item_list = item_list
        self.time_list = time_list
        self.action_list = action_list  # the workflow's action list, for models that read actions
        self.key_dtype = workflow.input_schema[id_column].dtype if workflow is not None else md.int64

    def _outputs(self) -> List[str]:
        # getattr: graphs pickled before action inputs existed have no action_list
        return [name for name in (self.item_list, self.time_list, getattr(self, "action_list", None)) if name]

    def load_workflow(self, path: Path):
        from merlin_hstu.workflows.session_workflow import load_serving_workflow

        return load_serving_workflow(path)  # the min-length filter off: every request row gives an output row

    def compute_input_schema(self, root_schema: Schema, parents_schema: Schema, deps_schema: Schema,
                             selector: ColumnSelector) -> Schema:
        return parents_schema + deps_schema

    def compute_output_schema(self, input_schema: Schema, col_selector: ColumnSelector,
                              prev_output_schema: Optional[Schema] = None) -> Schema:
        return Schema([_ragged(name) for name in self._outputs()] + [input_schema[name] for name in OPTIONS])

    def transform(self, col_selector: ColumnSelector, table: TensorTable) -> TensorTable:
        offsets = np.asarray(table[self.list_columns[0]].offsets, dtype=np.int64)
        counts = np.diff(offsets)
        keys = row_keys(len(counts), self.key_dtype)
        events = {self.id_column: np.repeat(keys, counts)}
        for name in self.list_columns:
            events[name] = as_text(np.asarray(table[name].values))
        frame = pd.DataFrame(events)[self.workflow.input_schema.column_names]
        sessions = self.workflow._transform_df(frame)
        order = np.argsort(sessions[self.id_column].to_numpy(), kind="stable")
        sessions = sessions.take(order).reset_index(drop=True)
        if not np.array_equal(sessions[self.id_column].to_numpy(), keys):
            raise RuntimeError("the session workflow dropped or merged request rows; every row needs >= 1 event")
        out = {}
        for name in self._outputs():
            out[f"{name}__values"], out[f"{name}__offsets"] = _values_offsets(sessions[name])
        for name in OPTIONS:
            out[name] = np.asarray(table[name].values)
        return TensorTable(out)

    @property
    def supported_formats(self) -> DataFormats:
        return DataFormats.NUMPY_TENSOR_TABLE


class TorchScriptOp(BaseOperator):
    """An operator holding a TorchScript program (`self.model`), saved with `torch.jit.save` as `model_file`
    next to ensemble.pkl and dropped from the pickle.  Subclasses set `model_file` and write `transform`."""

    model_file = "model.pt"

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "model"}

    def save_artifacts(self, artifact_path: Optional[str] = None) -> None:
        import torch

        if artifact_path and getattr(self, "model", None) is not None:
            torch.jit.save(self.model, str(Path(artifact_path) / self.model_file))

    def load_artifacts(self, artifact_path: Optional[str] = None) -> None:
        import torch

        path = Path(artifact_path) / self.model_file if artifact_path else None
        if path is not None and path.is_file():  # merlin.dag's Graph calls load_artifacts("") while building
            self.model = torch.jit.load(str(path)).eval()

    def compute_input_schema(self, root_schema: Schema, parents_schema: Schema, deps_schema: Schema,
                             selector: ColumnSelector) -> Schema:
        return parents_schema + deps_schema


class PredictHSTUTopK(TorchScriptOp):
    """The HSTU retrieval model and top-K as one TorchScript program, run inside the executor.

    Inputs: the workflow's item list (and timestamp list, when the model uses time; action list, when it reads
    actions) plus the per-row options `query_timestamp` (< 0: the last event's time), `exclude_history` and
    `top_k` (the batch is ranked once with the largest K; `RequestContract.split` cuts each request to its own
    K).  Outputs `scores` and encoded `item_ids`, [B, K] each.
    """

    model_file = SCORER_FILE

    def __init__(self, scorer=None, item_list: str = roles.ITEM_LIST, time_list: Optional[str] = None,
                 action_list: Optional[str] = None):
        super().__init__()
        self.model = scorer
        self.item_list = item_list
        self.time_list = time_list
        self.action_list = action_list

    def compute_output_schema(self, input_schema: Schema, col_selector: ColumnSelector,
                              prev_output_schema: Optional[Schema] = None) -> Schema:
        return Schema([ColumnSchema(OUT_SCORES, dtype=md.float32, dims=(None, None)),
                       ColumnSchema(OUT_ITEM_IDS, dtype=md.int64, dims=(None, None))])

    def transform(self, col_selector: ColumnSelector, table: TensorTable) -> TensorTable:
        import torch

        items = table[self.item_list]
        values = torch.from_numpy(np.asarray(items.values, dtype=np.int64))
        offsets = torch.from_numpy(np.asarray(items.offsets, dtype=np.int64))
        times = (torch.from_numpy(np.asarray(table[self.time_list].values, dtype=np.int64))
                 if self.time_list else torch.zeros_like(values))
        query = torch.from_numpy(np.asarray(table[QUERY_TIMESTAMP].values, dtype=np.int64))
        exclude = torch.from_numpy(np.asarray(table[EXCLUDE_HISTORY].values, dtype=bool))
        k = int(np.max(np.asarray(table[TOP_K].values)))
        action_list = getattr(self, "action_list", None)  # graphs pickled before action inputs: none
        with torch.inference_mode():
            if action_list:
                actions = torch.from_numpy(np.asarray(table[action_list].values, dtype=np.int64))
                scores, ids = self.model(values, offsets, times, query, k, exclude, actions)
            else:  # the call programs exported before action inputs take
                scores, ids = self.model(values, offsets, times, query, k, exclude)
        return TensorTable({OUT_SCORES: scores.numpy(), OUT_ITEM_IDS: ids.numpy()})

    @property
    def supported_formats(self) -> DataFormats:
        return DataFormats.NUMPY_TENSOR_TABLE


class DecodeItemIds(BaseOperator):
    """Encoded item ids -> the raw ids the client knows (the inverse of the workflow's Categorify).

    The mapping is stored as parquet (`encoded`, `raw` for every real item), not as a pickle.
    """

    def __init__(self, mapping: Optional[np.ndarray] = None, raw_dtype: md.DType = md.int64, first_id: int = 3):
        super().__init__()
        self.mapping = mapping
        self.raw_dtype = raw_dtype
        self.first_id = first_id

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "mapping"}

    def save_artifacts(self, artifact_path: Optional[str] = None) -> None:
        if artifact_path and self.mapping is not None:
            encoded = np.arange(self.first_id, len(self.mapping), dtype=np.int64)
            pd.DataFrame({"encoded": encoded, "raw": self.mapping[self.first_id:]}).to_parquet(
                Path(artifact_path) / ITEM_MAPPING_FILE, index=False)

    def load_artifacts(self, artifact_path: Optional[str] = None) -> None:
        path = Path(artifact_path) / ITEM_MAPPING_FILE if artifact_path else None
        if path is None or not path.is_file():
            return
        frame = pd.read_parquet(path)
        text = self.raw_dtype.element_type not in (md.ElementType.Int, md.ElementType.UInt)
        mapping = np.full(int(frame["encoded"].max()) + 1, None if text else -1, dtype=object if text else np.int64)
        mapping[frame["encoded"].to_numpy()] = frame["raw"].to_numpy()
        self.mapping = mapping

    def compute_output_schema(self, input_schema: Schema, col_selector: ColumnSelector,
                              prev_output_schema: Optional[Schema] = None) -> Schema:
        return Schema([ColumnSchema(OUT_SCORES, dtype=md.float32, dims=(None, None)),
                       ColumnSchema(OUT_ITEM_IDS, dtype=self.raw_dtype, dims=(None, None))])

    def transform(self, col_selector: ColumnSelector, table: TensorTable) -> TensorTable:
        ids = np.asarray(table[OUT_ITEM_IDS].values)
        return TensorTable({OUT_SCORES: np.asarray(table[OUT_SCORES].values), OUT_ITEM_IDS: self.mapping[ids]})

    @property
    def supported_formats(self) -> DataFormats:
        return DataFormats.NUMPY_TENSOR_TABLE


def graph_ops(ensemble) -> list:
    """The distinct operators of an ensemble's graph, in post-order (the order Merlin saves artifacts in)."""
    from merlin.dag import postorder_iter_nodes

    seen, out = set(), []
    for node in postorder_iter_nodes(ensemble.graph.output_node, flatten_subgraphs=True):
        if node.op is not None and id(node.op) not in seen:
            seen.add(id(node.op))
            out.append(node.op)
    return out
