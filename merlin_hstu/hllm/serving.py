"""Serving HLLM through the project's export path, with the item table precomputed; new items by their text.

    repo = export_hllm_repository(model, "runs/data", "runs/hllm_repo")     # Triton repository, like a retrieval run
    new_ids = add_items_by_text(model, encoder, ["title: ... genres: ..."])  # no retraining
    export_hllm_repository(model, "runs/data", "runs/hllm_repo", overwrite=True)   # served with the new items

The repository is the retrieval one (merlin_hstu.serving.export): the dataset's NVTabular session workflow in
serving mode, the TorchScript scorer of `merlin_hstu.serving.scorer.build_scorer` and raw-id decoding, written and
checked by `merlin_hstu.serving.repository.write_repository`, served by `merlin-hstu serve`, queried with
`ServingClient`.  What differs is only the model inside the scorer: the HLLM user model, traced, and the item side
as constants - the text table already encoded by the item LM and projected (r = W t [+ E]), normalised.  The
language model itself is not in the artifact: nothing about serving needs it.

New items: `add_items_by_text` encodes their texts with the item LM (the same encoder, so the same space) and
appends them (`HLLMModel.add_items`); exporting again publishes a scorer whose catalogue holds them, with no
weight trained.  Their encoded ids follow the existing ones; with raw item ids (MovieLens) the new raw id is the
new encoded id (`max id + 1, ...`), with Categorify pass `raw_ids` for them.  They can be recommended at once;
a request whose history holds a new item needs the workflow re-fitted (its item encoding does not know them).
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from merlin_hstu.common import schema as roles
from merlin_hstu.hllm.model import HLLMModel

DEFAULT_MODEL_NAME = "hllm_topk"


def serving_model(model: HLLMModel) -> HLLMModel:
    """A copy without the item LM, in eval mode: what the scorer traces.  Scores are unchanged - in eval mode the
    model reads the encoded table, never the LM."""
    encoder = model.item_encoder
    model.item_encoder = None
    try:
        served = copy.deepcopy(model)
    finally:
        model.item_encoder = encoder
    return served.eval()


def _kind(dtype) -> str:
    """A workflow input's dtype as the request contract spells it: int64 or string."""
    import merlin.dtypes as md

    return "int64" if dtype.element_type in (md.ElementType.Int, md.ElementType.UInt) else "string"


def add_items_by_text(model: HLLMModel, encoder, texts: Sequence[str], cache=None) -> torch.Tensor:
    """Encode `texts` with `encoder` (through `cache` when given) and append them to `model`; returns the new
    encoded ids.  `encoder` must be the model's item encoder (finetune: `model.item_encoder`)."""
    if model.item_encoder is not None and encoder is not model.item_encoder:
        raise ValueError("this finetune model trained its own item LM: pass model.item_encoder as the encoder")
    texts = list(texts)
    if not texts:
        raise ValueError("add_items_by_text: no texts given")
    vectors = cache.encode(encoder, texts) if cache is not None else encoder.encode(texts)
    tokens = encoder.tokenize(texts) if model.item_encoder is not None else (None, None)
    return model.add_items(vectors, *tokens)


def export_hllm_repository(model: HLLMModel, dataset_dir: str | Path, output: str | Path, config=None,
                           overwrite: bool = False, id_column: str = roles.LOG_USER_ID,
                           item_column: str = roles.LOG_ITEM_ID, timestamp_column: Optional[str] = roles.LOG_TIMESTAMP,
                           raw_ids: Optional[Sequence] = None) -> Path:
    """Write a Triton model repository serving `model` on the raw events of the dataset at `dataset_dir` (its
    workflow/ and candidates.parquet).  `config`: `merlin_hstu.serving.repository.ExportConfig` (its model name
    defaults to hllm_topk).  `raw_ids`: raw ids of items added after the workflow was fitted (Categorify only)."""
    from merlin_hstu.serving.contract import RequestContract, example_request
    from merlin_hstu.serving.export import ServingParts, build_ensemble, item_ids_of, load_candidates
    from merlin_hstu.serving.repository import (ENTRY_SHIM, EXECUTOR_SHIM, ExportConfig, TritonModel, check_serves,
                                                export_settings, write_repository)
    from merlin_hstu.serving.scorer import build_scorer, rankable_mask
    from merlin_hstu.workflows.session_workflow import load_serving_workflow

    config = config or ExportConfig(model_name=DEFAULT_MODEL_NAME)
    output = Path(output).resolve()
    if output.exists() and not overwrite:
        raise FileExistsError(f"{output} already exists; remove it or pass overwrite=True")
    dataset_dir = Path(dataset_dir)
    workflow_path = dataset_dir / "workflow"
    if not workflow_path.is_dir():
        raise FileNotFoundError(f"{workflow_path} is missing: pass the `merlin-hstu preprocess` output the model was "
                                "trained on (it holds workflow/ and candidates.parquet)")
    workflow = load_serving_workflow(workflow_path)
    inputs = workflow.input_schema.column_names
    columns = [c for c in (id_column, item_column, timestamp_column) if c]
    missing = [c for c in columns if c not in inputs]
    if missing:
        raise ValueError(f"the workflow at {workflow_path} does not take column(s) {missing} (its inputs: {inputs}); "
                         "pass id_column / item_column / timestamp_column as the raw log names them")
    extra = [c for c in inputs if c not in columns]
    if extra:  # e.g. an action column: HLLM reads no actions, so the served workflow drops that branch
        workflow.remove_inputs(extra)
    kinds = {c: _kind(workflow.input_schema[c].dtype) for c in columns}
    items = item_ids_of(workflow, workflow_path)
    num_items = model.config.num_items
    added = num_items - len(items.mapping)
    if added < 0:
        raise ValueError(f"the workflow encodes {len(items.mapping)} item ids but the model has {num_items} rows; "
                         f"{workflow_path} is not the workflow this model was trained with")
    mapping = items.mapping
    if items.encoding == "categorify" and kinds[item_column] == "int64":
        mapping = np.array([-1 if v is None else int(v) for v in mapping], dtype=np.int64)
    if added:
        if raw_ids is None and items.encoding == "raw":
            new_raw = np.arange(len(mapping), num_items, dtype=np.int64)  # raw ids: encoded == raw
        elif raw_ids is None or len(raw_ids) != added:
            raise ValueError(f"{added} item(s) were added after the workflow was fitted: pass their raw ids "
                             f"(raw_ids, {added} values)")
        else:
            new_raw = np.asarray(list(raw_ids), dtype=mapping.dtype)
        mapping = np.concatenate([mapping, new_raw])
    candidates = None
    candidates_file = dataset_dir / "candidates.parquet"
    if candidates_file.is_file():
        candidates = load_candidates(candidates_file, num_items)
        candidates = np.concatenate([candidates, np.arange(num_items - added, num_items)])
    else:
        candidates_file = None
    rankable = rankable_mask(num_items, items.first_id, candidates)
    served = serving_model(model)
    uses_time = bool(served.config.encoder.time_bias) and bool(timestamp_column)
    scorer = build_scorer(served, model.config.max_history, rankable)
    if config.top_k > scorer.max_k:
        raise ValueError(f"top_k={config.top_k} is larger than this catalogue allows ({scorer.max_k})")
    item_list = roles.item_list_column(workflow.output_schema)
    contract = RequestContract(
        id_column=id_column, id_dtype=kinds[id_column], item_column=item_column, item_dtype=kinds[item_column],
        timestamp_column=timestamp_column, reads_actions=False, max_history=model.config.max_history,
        max_k=scorer.max_k, default_k=config.top_k, exclude_history=config.exclude_history,
        model_name=config.name_for("retrieval"), batched_model_name=config.batched_name,
        item_encoding=items.encoding, max_item_id=items.max_id,
        extra={"item_list": item_list, "uses_time": uses_time, "model": "hllm"})
    parts = ServingParts(dataset_dir, served, None, {}, workflow, workflow_path, scorer, mapping, contract,
                         candidates_file, items.first_id)
    models = [TritonModel(contract.model_name, contract, ENTRY_SHIM, instances=config.entry_instances),
              TritonModel(contract.batched_model_name, contract, EXECUTOR_SHIM, ensemble=build_ensemble(parts),
                          batched=True, instances=config.instances, max_queue_delay_us=config.max_queue_delay_us)]
    example = example_request(contract, [mapping[items.first_id]])

    def expect(outputs) -> Optional[str]:
        ids, scores = outputs
        if ids.shape != (1, contract.default_k) or not np.all(np.isfinite(scores)):
            return f"ids of shape {ids.shape} and scores {scores}"
        return None

    record = {"source": "merlin_hstu.hllm", "dataset": str(dataset_dir.resolve()), "workflow": str(workflow_path.resolve()),
              "candidates": str(candidates_file) if candidates_file else None, "added_items": int(added),
              "export": export_settings(config, "retrieval"), "model": model.config.to_dict()}
    return write_repository(output, models, record, check=lambda repo: check_serves(repo, contract, example, expect),
                            overwrite=overwrite)
