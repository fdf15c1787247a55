"""Export a CTR model (WuKong, DLRM, logistic regression) with its fitted Criteo workflow for Triton serving.

    repo = export_ctr_ensemble(model, "runs/criteo", "runs/criteo_repo")     # a Triton model repository
    merlin-hstu serve runs/criteo_repo                                         # the serving issue's server
    probabilities = query_ctr("127.0.0.1:8000", read_criteo_tsv(lines, CriteoWorkflowConfig(has_label=False)))
    # request to model "executor_model": I1..I13 (FP64, NaN = missing), C1..C26 (BYTES, "" = missing), [B] each
    # response: click_probability (FP32) [B]

The graph is a merlin-systems `Ensemble` run by its executor model (python backend; merlin-integration.md §3.3
design B, as `merlin_hstu.serving` does for HSTU): both steps run inside the executor, nothing needs the
missing libtorch backend, and the repository holds only the fitted NVTabular workflow (its own format) and a
TorchScript program:

    raw columns >> CriteoWorkflowInline(fitted workflow, label input removed) >> PredictCTR(TorchScript)

`CriteoWorkflowInline` maps a request to the workflow's input first: Triton hands text over as bytes, and an
empty categorical field means missing (None, Categorify's null id 1), as `read_criteo_tsv` reads a file.  So
the same raw line gives the same features offline and served, and served AUC equals offline AUC.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import List, Optional

import numpy as np
import pandas as pd
import torch

import merlin.dtypes as md
from merlin.dag import BaseOperator, ColumnSelector, DataFormats
from merlin.schema import ColumnSchema, Schema, Tags

from merlin_hstu.common.atomic_dir import publish_dir, staging_dir
from merlin_hstu.serving.ops import InlineWorkflow  # re-exported: ranking_export builds on it

OUTPUT = "click_probability"
MODEL_FILE = "ctr_model.pt"


class CriteoWorkflowInline(InlineWorkflow):
    """The fitted Criteo workflow, run inside the executor.  Bytes -> str, "" -> missing, integers -> float64."""

    @property
    def supported_formats(self) -> DataFormats:
        return DataFormats.PANDAS_DATAFRAME

    def __init__(self, workflow=None, categorical: Optional[List[str]] = None, integer: Optional[List[str]] = None):
        super().__init__(workflow)
        self.categorical = list(categorical or [])
        self.integer = list(integer or [])

    def transform(self, col_selector: ColumnSelector, df: pd.DataFrame) -> pd.DataFrame:
        df = df.copy()
        for name in self.categorical:
            values = np.asarray(df[name].to_numpy(), dtype=object).reshape(-1)
            text = [v.decode("utf-8") if isinstance(v, bytes) else v for v in values]
            df[name] = np.array([None if v == "" else v for v in text], dtype=object)
        for name in self.integer:
            df[name] = np.asarray(df[name].to_numpy(), dtype=np.float64).reshape(-1)
        return self.workflow._transform_df(df)


class TorchScriptOp(BaseOperator):
    """An operator holding a TorchScript program, saved with `torch.jit.save` next to ensemble.pkl (not pickled)."""

    model_file = MODEL_FILE

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "model"}

    def save_artifacts(self, artifact_path: Optional[str] = None) -> None:
        if artifact_path and self.model is not None:
            torch.jit.save(self.model, str(Path(artifact_path) / self.model_file))

    def load_artifacts(self, artifact_path: Optional[str] = None) -> None:
        path = Path(artifact_path) / self.model_file if artifact_path else None
        if path is not None and path.is_file():
            self.model = torch.jit.load(str(path)).eval()

    def compute_input_schema(self, root_schema: Schema, parents_schema: Schema, deps_schema: Schema,
                             selector: ColumnSelector) -> Schema:
        return parents_schema + deps_schema


class PredictCTR(TorchScriptOp):
    """TorchScript CTR model (dense [B, m] float32, sparse [B, c] int64 -> logits [B]) -> sigmoid probabilities."""

    def __init__(self, model=None, dense: Optional[List[str]] = None, sparse: Optional[List[str]] = None):
        super().__init__()
        self.model = model
        self.dense = list(dense or [])
        self.sparse = list(sparse or [])

    def compute_output_schema(self, input_schema: Schema, col_selector: ColumnSelector,
                              prev_output_schema: Optional[Schema] = None) -> Schema:
        return Schema([ColumnSchema(OUTPUT, dtype=md.float32, dims=(None,))])

    def transform(self, col_selector: ColumnSelector, df: pd.DataFrame) -> pd.DataFrame:
        rows = len(df)
        dense = torch.from_numpy(df[self.dense].to_numpy(dtype=np.float32).reshape(rows, len(self.dense)))
        sparse = torch.from_numpy(df[self.sparse].to_numpy(dtype=np.int64).reshape(rows, len(self.sparse)))
        with torch.inference_mode():
            probability = torch.sigmoid(self.model(dense, sparse))
        return pd.DataFrame({OUTPUT: probability.numpy().astype(np.float32)})

    @property
    def supported_formats(self) -> DataFormats:
        return DataFormats.PANDAS_DATAFRAME


def build_ctr_ensemble(model: torch.nn.Module, dataset_dir):
    """The serving `Ensemble` for `model`, trained on the tensors of `load_criteo_tensors(dataset_dir)`."""
    import nvtabular as nvt
    from merlin.systems.dag.ensemble import Ensemble

    from merlin_hstu.workflows.criteo_workflow import CATEGORICAL_COLUMNS, INTEGER_COLUMNS, LABEL, load_criteo_dataset

    dataset = load_criteo_dataset(dataset_dir)
    schema = dataset.schema
    # the column order of load_criteo_tensors, which the model was trained on
    dense = schema.select_by_tag(Tags.CONTINUOUS).column_names
    sparse = schema.select_by_tag(Tags.CATEGORICAL).column_names
    workflow = nvt.Workflow.load(str(dataset.workflow_path))
    workflow = workflow.remove_inputs([LABEL])
    model = model.eval()
    example = (torch.zeros(2, len(dense)), torch.zeros(2, len(sparse), dtype=torch.long))
    with torch.no_grad():
        traced = torch.jit.trace(model, example, check_trace=False)
    request = workflow.input_schema
    graph = (request.column_names
             >> CriteoWorkflowInline(workflow, [c for c in CATEGORICAL_COLUMNS if c in request.column_names],
                                     [c for c in INTEGER_COLUMNS if c in request.column_names])
             >> PredictCTR(traced, dense, sparse))
    return Ensemble(graph, request)


def export_ctr_ensemble(model: torch.nn.Module, dataset_dir, output_dir, overwrite: bool = False) -> Path:
    """Write the Triton model repository (executor_model + artifacts); temp directory, then rename."""
    output_dir = Path(output_dir).resolve()
    if output_dir.exists() and not overwrite:
        raise FileExistsError(f"{output_dir} already exists; remove it or pass overwrite=True")
    return write_repository(build_ctr_ensemble(model, dataset_dir), output_dir, overwrite=True)


def write_repository(ensemble, output_dir, overwrite: bool = False) -> Path:
    """`ensemble.export` into a temp directory beside `output_dir`, then rename it into place."""
    output_dir = Path(output_dir).resolve()
    if output_dir.exists() and not overwrite:
        raise FileExistsError(f"{output_dir} already exists; remove it or pass overwrite=True")
    staging = staging_dir(output_dir)
    try:
        ensemble.export(str(staging))
        publish_dir(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output_dir


def request_inputs(frame: pd.DataFrame) -> list:
    """tritonclient HTTP inputs for raw Criteo rows (`read_criteo_tsv` output, with or without the label)."""
    import tritonclient.http as th

    from merlin_hstu.workflows.criteo_workflow import CATEGORICAL_COLUMNS, INTEGER_COLUMNS

    missing = [c for c in INTEGER_COLUMNS + CATEGORICAL_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"CTR request lacks column(s) {missing}; send I1..I13 and C1..C26 (read_criteo_tsv output)")
    inputs = []
    for name in INTEGER_COLUMNS:
        values = pd.to_numeric(frame[name], errors="raise").to_numpy(dtype=np.float64)
        inputs.append(th.InferInput(name, [len(values)], "FP64"))
        inputs[-1].set_data_from_numpy(values)
    for name in CATEGORICAL_COLUMNS:
        values = np.array([b"" if v is None or v != v else str(v).encode("utf-8") for v in frame[name]], dtype=object)
        inputs.append(th.InferInput(name, [len(values)], "BYTES"))
        inputs[-1].set_data_from_numpy(values)
    return inputs


def query_ctr(url: str, frame: pd.DataFrame, model_name: str = "executor_model") -> np.ndarray:
    """Click probabilities for the rows of `frame` from a server running an `export_ctr_ensemble` repository."""
    import tritonclient.http as th

    with th.InferenceServerClient(url) as client:
        result = client.infer(model_name, request_inputs(frame), outputs=[th.InferRequestedOutput(OUTPUT)])
    return result.as_numpy(OUTPUT)
