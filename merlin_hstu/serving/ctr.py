"""Export a CTR model (WuKong, DLRM, logistic regression) with its fitted Criteo workflow as a Triton repository.

    merlin-hstu export --run runs/ctr --output runs/ctr_repo              # any task's run; this module for CTR
    repo = export_ctr_ensemble(model, "runs/criteo", "runs/criteo_repo")  # or a model + its Criteo-workflow dir
    with ServingClient("127.0.0.1:8000") as client:                        # merlin_hstu.serving.client
        probabilities = client.predict(CTRRequest(read_criteo_tsv(path, CriteoWorkflowConfig(has_label=False))))

The request contract (I1..I13 FP64, NaN = missing; C1..C26 BYTES, "" = missing; -> click_probability FP32 [B]) is
`merlin_hstu.serving.ctr_contract`.  The graph is a merlin-systems `Ensemble` run in-process by
`merlin_hstu.serving.triton_executor` (merlin-integration.md §3.3 design B, as for retrieval and ranking): nothing
needs the missing libtorch backend, and the repository holds only the fitted NVTabular workflow (its own format)
and a TorchScript program:

    raw columns >> CriteoWorkflowInline(fitted workflow, label input removed) >> PredictCTR(TorchScript)

`CriteoWorkflowInline` maps a request to the workflow's input first: Triton hands text over as bytes, and an
empty categorical field means missing (None, Categorify's null id 1), as `read_criteo_tsv` reads a file.  So
the same raw line gives the same features offline and served, and served AUC equals offline AUC.

Datasets: a `preprocess_criteo` directory (its workflow/); `synthetic-criteo` runs record the cached Criteo-workflow
directory `merlin-hstu train --data synthetic-criteo` generated.  `ml-1m-prefix-ctr` is encoded in pandas by an
`ML1MCTREncoder` (merlin_hstu.ctr.data) that the run keeps in model.pt; its export serves raw `ml1m_ctr_frame`
rows with that encoder instead of a workflow (the repository holds it as encoder.json, no training data):

    raw columns >> ML1MEncoderInline(saved ML1MCTREncoder) >> PredictCTR(TorchScript)
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import numpy as np
import pandas as pd
import torch

import merlin.dtypes as md
from merlin.dag import ColumnSelector, DataFormats
from merlin.schema import ColumnSchema, Schema, Tags

from merlin_hstu.serving.ctr_contract import OUTPUT, CTRContract, CTRRequest  # noqa: F401  (CTRRequest: re-export)
from merlin_hstu.serving.ops import (  # noqa: F401  (TorchScriptOp: old pickles' alias)
    InlineEncoder,
    InlineWorkflow,
    TorchScriptOp,
    transform_with_nulls,
)
from merlin_hstu.serving.repository import (
    EXECUTOR_SHIM,
    ExportConfig,
    TritonModel,
    check_serves,
    export_settings,
    write_repository,
)

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
        return transform_with_nulls(self.workflow._transform_df, df, self.categorical)


class ML1MEncoderInline(InlineEncoder):
    """The run's fitted `ML1MCTREncoder`, run inside the executor: raw ml1m_ctr_frame columns -> ids and standardised
    dense features.  Bytes -> str and "" -> missing (an unseen value, id 0); numbers arrive as float64 (NaN =
    missing), which the encoder's integer vocabularies and counts match by value."""

    def __init__(self, encoder=None, text: Optional[List[str]] = None, numeric: Optional[List[str]] = None):
        super().__init__(encoder)
        self.text = list(text or [])
        self.numeric = list(numeric or [])

    def load_encoder(self, state: dict):
        from merlin_hstu.ctr.data import ML1MCTREncoder

        return ML1MCTREncoder.from_dict(state)

    def compute_output_schema(self, input_schema: Schema, col_selector: ColumnSelector,
                              prev_output_schema: Optional[Schema] = None) -> Schema:
        from merlin_hstu.ctr.data import ML1M_CTR_CATEGORICAL, ML1M_CTR_DENSE

        return Schema([ColumnSchema(c, dtype=md.float64, dims=(None,)) for c in ML1M_CTR_DENSE]
                      + [ColumnSchema(c, dtype=md.int64, dims=(None,)) for c in ML1M_CTR_CATEGORICAL])

    def transform(self, col_selector: ColumnSelector, df: pd.DataFrame) -> pd.DataFrame:
        frame = {}
        for name in self.text:
            values = np.asarray(df[name].to_numpy(), dtype=object).reshape(-1)
            text = [v.decode("utf-8") if isinstance(v, bytes) else v for v in values]
            frame[name] = np.array([None if v == "" else v for v in text], dtype=object)
        for name in self.numeric:
            frame[name] = np.asarray(df[name].to_numpy(), dtype=np.float64).reshape(-1)
        return self.encoder.transform(pd.DataFrame(frame)).reset_index(drop=True)

    @property
    def supported_formats(self) -> DataFormats:
        return DataFormats.PANDAS_DATAFRAME


class PredictCTR(TorchScriptOp):
    """TorchScript CTR model (dense [B, m] float32, sparse [B, c] int64 -> logits [B]) -> sigmoid probabilities.
    `probabilities=True`: the model already answers probabilities (a tr.Trainer model's BinaryClassificationTask)."""

    model_file = MODEL_FILE

    def __init__(self, model=None, dense: Optional[List[str]] = None, sparse: Optional[List[str]] = None,
                 probabilities: bool = False):
        super().__init__()
        self.model = model
        self.dense = list(dense or [])
        self.sparse = list(sparse or [])
        self.probabilities = probabilities

    def compute_output_schema(self, input_schema: Schema, col_selector: ColumnSelector,
                              prev_output_schema: Optional[Schema] = None) -> Schema:
        return Schema([ColumnSchema(OUTPUT, dtype=md.float32, dims=(None,))])

    def transform(self, col_selector: ColumnSelector, df: pd.DataFrame) -> pd.DataFrame:
        rows = len(df)
        dense = torch.from_numpy(df[self.dense].to_numpy(dtype=np.float32).reshape(rows, len(self.dense)))
        sparse = torch.from_numpy(df[self.sparse].to_numpy(dtype=np.int64).reshape(rows, len(self.sparse)))
        with torch.inference_mode():
            out = self.model(dense, sparse)
            probability = out if getattr(self, "probabilities", False) else torch.sigmoid(out)  # old pickles: logits
        return pd.DataFrame({OUTPUT: probability.numpy().astype(np.float32)})

    @property
    def supported_formats(self) -> DataFormats:
        return DataFormats.PANDAS_DATAFRAME


def _features(dataset_dir):
    """(workflow without the label input, dense names, sparse names, cardinalities) of a Criteo-workflow dir, in
    the column order of `load_criteo_tensors`, which the model was trained on."""
    import nvtabular as nvt

    from merlin_hstu.workflows.criteo_workflow import LABEL, load_criteo_dataset

    dataset = load_criteo_dataset(dataset_dir)
    schema = dataset.schema
    dense = schema.select_by_tag(Tags.CONTINUOUS).column_names
    sparse = schema.select_by_tag(Tags.CATEGORICAL).column_names
    cards = [int(schema[name].int_domain.max) + 1 if schema[name].int_domain is not None else None
             for name in sparse]
    workflow = nvt.Workflow.load(str(dataset.workflow_path))
    return workflow.remove_inputs([LABEL]), dense, sparse, cards


def ctr_contract(workflow) -> CTRContract:
    """The request columns: the workflow's raw integer and categorical inputs."""
    from merlin_hstu.workflows.criteo_workflow import CATEGORICAL_COLUMNS, INTEGER_COLUMNS

    names = workflow.input_schema.column_names
    other = [c for c in names if c not in INTEGER_COLUMNS + CATEGORICAL_COLUMNS]
    if other:
        raise ValueError(f"the workflow takes column(s) {other} beyond the Criteo layout; export serves workflows "
                         "written by merlin_hstu.workflows.criteo_workflow.preprocess_criteo")
    return CTRContract([c for c in INTEGER_COLUMNS if c in names], [c for c in CATEGORICAL_COLUMNS if c in names])


def _traced(model: torch.nn.Module, dense, sparse):
    model = model.eval()
    example = (torch.zeros(2, len(dense)), torch.zeros(2, len(sparse), dtype=torch.long))
    with torch.no_grad():
        return torch.jit.trace(model, example, check_trace=False)


def _ensemble(model: torch.nn.Module, workflow, dense, sparse, contract: CTRContract, probabilities: bool = False):
    from merlin.systems.dag.ensemble import Ensemble

    request = workflow.input_schema
    graph = (request.column_names
             >> CriteoWorkflowInline(workflow, contract.categorical_columns, contract.integer_columns)
             >> PredictCTR(_traced(model, dense, sparse), dense, sparse, probabilities))
    return Ensemble(graph, request)


def build_ctr_ensemble(model: torch.nn.Module, dataset_dir):
    """The serving `Ensemble` for `model`, trained on the tensors of `load_criteo_tensors(dataset_dir)`."""
    workflow, dense, sparse, _ = _features(dataset_dir)
    return _ensemble(model, workflow, dense, sparse, ctr_contract(workflow))


def export_ctr_ensemble(model: torch.nn.Module, dataset_dir, output_dir, overwrite: bool = False,
                        config: Optional[ExportConfig] = None, source: Optional[dict] = None,
                        probabilities: bool = False) -> Path:
    """Write the Triton model repository for `model` (its fitted Criteo workflow from `dataset_dir`): one executor
    model, serving.json; staged, checked on a one-row request, renamed into place.  `model(dense, sparse)` answers
    logits, or probabilities with `probabilities=True`."""
    config = config or ExportConfig()
    output = Path(output_dir).resolve()
    if output.exists() and not overwrite:
        raise FileExistsError(f"{output} already exists; remove it or pass overwrite=True (--overwrite)")
    workflow, dense, sparse, _ = _features(dataset_dir)
    contract = ctr_contract(workflow)
    contract.model_name = config.name_for("ctr")
    models = [TritonModel(contract.model_name, contract, EXECUTOR_SHIM,
                          ensemble=_ensemble(model, workflow, dense, sparse, contract, probabilities),
                          instances=config.instances)]
    missing_row = pd.DataFrame({**{c: [np.nan] for c in contract.integer_columns},
                                **{c: [None] for c in contract.categorical_columns}})

    def expect(outputs) -> Optional[str]:
        (p,) = outputs
        return None if p.shape == (1,) and 0.0 < float(p[0]) < 1.0 else f"probabilities {p.tolist()} for one row"

    record = {**(source or {}), "data": str(Path(dataset_dir).resolve()),
              "workflow": str((Path(dataset_dir) / "workflow").resolve()), "export": export_settings(config, "ctr"),
              "model": {"type": type(model).__name__, "dense": list(dense), "sparse": list(sparse)}}
    example = contract.request_arrays(CTRRequest(missing_row))
    return write_repository(output, models, record, overwrite=overwrite,
                            check=lambda repo: check_serves(repo, contract, example, expect))


def ml1m_ctr_contract(encoder) -> CTRContract:
    """The request columns of an ml-1m-prefix-ctr export: the encoder's raw columns, text where its vocabulary
    holds text (gender, zip_prefix, genres), numbers (FP64) otherwise."""
    from merlin_hstu.ctr.data import ML1M_CTR_RAW

    text = [c for c in ML1M_CTR_RAW if any(isinstance(v, str) for v in encoder.vocabularies.get(c, []))]
    return CTRContract([c for c in ML1M_CTR_RAW if c not in text], text, encoding="ml-1m-ctr")


def export_ml1m_ctr_ensemble(model: torch.nn.Module, encoder, output_dir, overwrite: bool = False,
                             config: Optional[ExportConfig] = None, source: Optional[dict] = None) -> Path:
    """Write the Triton model repository for `model` trained on ml-1m-prefix-ctr: raw ml1m_ctr_frame rows ->
    `encoder` (an ML1MCTREncoder or its dict) -> the model; staged, checked on a one-row request, renamed into
    place.  The repository holds the encoder as JSON and needs no training data."""
    from merlin.systems.dag.ensemble import Ensemble

    from merlin_hstu.ctr.data import ML1M_CTR_CATEGORICAL, ML1M_CTR_DENSE, ML1MCTREncoder

    config = config or ExportConfig()
    output = Path(output_dir).resolve()
    if output.exists() and not overwrite:
        raise FileExistsError(f"{output} already exists; remove it or pass overwrite=True (--overwrite)")
    encoder = encoder if isinstance(encoder, ML1MCTREncoder) else ML1MCTREncoder.from_dict(encoder)
    contract = ml1m_ctr_contract(encoder)
    contract.model_name = config.name_for("ctr")
    request = Schema([ColumnSchema(c, dtype=md.float64, dims=(None,)) for c in contract.integer_columns]
                     + [ColumnSchema(c, dtype=md.string, dims=(None,)) for c in contract.categorical_columns])
    graph = (request.column_names
             >> ML1MEncoderInline(encoder, contract.categorical_columns, contract.integer_columns)
             >> PredictCTR(_traced(model, ML1M_CTR_DENSE, ML1M_CTR_CATEGORICAL), ML1M_CTR_DENSE,
                           ML1M_CTR_CATEGORICAL))
    models = [TritonModel(contract.model_name, contract, EXECUTOR_SHIM, ensemble=Ensemble(graph, request),
                          instances=config.instances)]
    missing_row = pd.DataFrame({**{c: [np.nan] for c in contract.integer_columns},
                                **{c: [None] for c in contract.categorical_columns}})

    def expect(outputs) -> Optional[str]:
        (p,) = outputs
        return None if p.shape == (1,) and 0.0 < float(p[0]) < 1.0 else f"probabilities {p.tolist()} for one row"

    record = {**(source or {}), "data": "ml-1m-prefix-ctr", "encoder": "ML1MCTREncoder (encoder.json)",
              "export": export_settings(config, "ctr"),
              "model": {"type": type(model).__name__, "dense": list(ML1M_CTR_DENSE),
                        "sparse": list(ML1M_CTR_CATEGORICAL)}}
    example = contract.request_arrays(CTRRequest(missing_row))
    return write_repository(output, models, record, overwrite=overwrite,
                            check=lambda repo: check_serves(repo, contract, example, expect))


def _trained_features(run_dir: Path) -> dict:
    """The feature layout a CTR run's model was trained on (model.pt: dense / sparse names, cardinalities, and
    the fitted encoder of an ml-1m-prefix-ctr run)."""
    blob = torch.load(Path(run_dir) / "model.pt", map_location="cpu", weights_only=False)
    return {k: blob.get(k) for k in ("dense_names", "sparse_names", "cardinalities", "encoder")}


def resolve_ctr_data(run, data: Optional[str] = None) -> Path:
    """The Criteo-workflow directory of a CTR run: `data`, else the run's recorded dataset.  Checks that its
    features are the ones the model was trained on."""
    from merlin_hstu.ctr.data import ML1M_CTR_CATEGORICAL

    trained = _trained_features(run.path)
    if data == "ml-1m-prefix-ctr" or (not data and not run.record.get("data")
                                      and list(trained["sparse_names"] or []) == ML1M_CTR_CATEGORICAL):
        raise ValueError(f"{run.path} was trained on ml-1m-prefix-ctr but keeps no fitted encoder (model.pt has "
                         "no 'encoder': the run predates it), so there is no encoding to serve; train it again with "
                         "this version and export that run")
    data = data or run.record.get("data")
    if not data:
        raise ValueError(f"{run.path} does not record its dataset directory; pass --data DIR, the Criteo-workflow "
                         "directory it was trained on (preprocess_criteo output, or the synthetic-criteo cache entry "
                         "under the training --cache)")
    _, dense, sparse, cards = _features(data)
    if (list(dense), list(sparse), cards) != (trained["dense_names"], trained["sparse_names"],
                                              trained["cardinalities"]):
        raise ValueError(f"{data} is not the dataset {run.path} was trained on: its features (dense {len(dense)}, "
                         f"categorical cardinalities {cards[:5]}...) differ from the model's (dense "
                         f"{len(trained['dense_names'] or [])}, {list(trained['cardinalities'] or [])[:5]}...); "
                         "pass the --data it was trained on")
    return Path(data)


def export_ctr_run(run_dir, output, config: Optional[ExportConfig] = None, data: Optional[str] = None,
                   overwrite: bool = False) -> Path:
    """`merlin-hstu export` for a CTR run: its model, and the Criteo-workflow directory it was trained on (or, for an
    ml-1m-prefix-ctr run, the encoder it keeps)."""
    from merlin_hstu.train.run_dir import load_run

    run = load_run(run_dir, expected_task="ctr")
    encoder = _trained_features(run.path)["encoder"]
    if encoder is not None and data in (None, "ml-1m-prefix-ctr"):  # ml-1m-prefix-ctr: the run's own encoder
        return export_ml1m_ctr_ensemble(run.model, encoder, output, overwrite, config,
                                        source={"run_dir": str(Path(run_dir).resolve()),
                                                "model_type": run.record.get("model_type")})
    data_dir = resolve_ctr_data(run, data)
    return export_ctr_ensemble(run.model, data_dir, output, overwrite, config,
                               source={"run_dir": str(Path(run_dir).resolve()),
                                       "model_type": run.record.get("model_type")})
