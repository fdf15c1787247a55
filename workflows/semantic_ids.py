"""NVTabular semantic-ID step: every item of a processed dataset's `item_id-list` as its semantic-ID tokens.

A fitted tokenizer (merlin_hstu.sid.tokenizer.SemanticIds, saved as a directory) gives every encoded item id a tuple
of T codes; a decoder reads them as tokens of one vocabulary (0 padding, 1 begin-of-sequence, code c of level l =
token_offsets[l] + c).  This step appends to each row of a processed dataset (the session workflow's output,
merlin_hstu.workflows.session_workflow)

    semantic_id-list   int64 list of len * T tokens: the T tokens of item 1, then of item 2, ...
                       tags LIST (not CATEGORICAL: it is T times longer than the other lists, like
                       interleaved-list), properties merlin_hstu_role="semantic_id", tokens_per_item=T,
                       domain [0, vocab_size - 1]

and passes every other column through with its schema.  The workflow is `[columns] >> SemanticIdTokens(table)`, the
op holding the id -> tokens table (pickled with the workflow, so a saved workflow transforms a request without the
tokenizer directory).  An item id without a semantic ID is an error naming the ids and the fix; nothing becomes
padding silently.

`write_semantic_ids(dataset_dir, tokenizer)` writes `<dataset_dir>/semantic_ids/` atomically: the parquet rows with
their schema.pbtxt, the fitted workflow (workflow/) and report.json; `read_semantic_ids(dataset_dir)` reads the rows.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Dict, List, Optional, Union

import numpy as np
import pandas as pd
from merlin.core.dispatch import DataFrameType, is_cpu_object
from merlin.dag import ColumnSelector
from merlin.schema import ColumnSchema, Schema
import merlin.dtypes as md
from nvtabular.ops import Operator

from merlin_hstu.common import schema as roles
from merlin_hstu.common.atomic_dir import publish_dir, staging_dir

SEMANTIC_IDS_DIR = "semantic_ids"  # <dataset>/semantic_ids/
REPORT_FILE = "report.json"


class SemanticIdTokens(Operator):
    """item_id-list -> semantic_id-list (module docstring); every other selected column passes through.

    `token_table` [num_items, T]: the tokens of every encoded item id; a row of zeros marks an id without a semantic
    ID.  Lives here (an importable path) because a saved workflow pickles its ops by reference."""

    def __init__(self, token_table: np.ndarray, vocab_size: int):
        super().__init__()
        table = np.asarray(token_table, dtype=np.int64)
        if table.ndim != 2 or table.shape[1] < 1:
            raise ValueError(f"token_table must be [num_items, tokens per item], got shape {table.shape}")
        self.token_table = table
        self.vocab_size = int(vocab_size)
        self.known = (table > 0).all(axis=1)

    @property
    def tokens_per_item(self) -> int:
        return int(self.token_table.shape[1])

    def tokens(self, items: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """Flat item ids (rows of `lengths` items) -> their flat tokens; unknown ids are an error."""
        items = np.asarray(items, dtype=np.int64)
        bad = (items < 0) | (items >= len(self.token_table))
        if not bad.any():
            bad = ~self.known[items]
        if bad.any():
            ids = np.unique(items[bad])[:5].tolist()
            raise ValueError(f"{roles.ITEM_LIST}: item id(s) {ids} have no semantic ID (the tokenizer covers "
                             f"{int(self.known.sum())} ids below {len(self.token_table)}); fit the tokenizer on the "
                             "whole catalogue of this dataset (candidates.parquet)")
        return self.token_table[items].reshape(-1)

    def column_mapping(self, col_selector: ColumnSelector) -> Dict[str, List[str]]:
        mapping = {name: [name] for name in col_selector.names}
        mapping[roles.SEMANTIC_ID_LIST] = [roles.ITEM_LIST]
        return mapping

    def compute_output_schema(self, input_schema: Schema, col_selector: ColumnSelector,
                              prev_output_schema: Optional[Schema] = None) -> Schema:
        names = list(col_selector.names) if col_selector else list(input_schema.column_names)
        if roles.ITEM_LIST not in names:
            raise ValueError(f"SemanticIdTokens needs the item list column {roles.ITEM_LIST!r}; got {names}")
        columns = [input_schema[name] for name in names]
        properties = {roles.TOKENS_PER_ITEM_PROPERTY: self.tokens_per_item,
                      "domain": {"min": 0, "max": self.vocab_size - 1, "name": roles.SEMANTIC_ID_LIST}}
        column = ColumnSchema(roles.SEMANTIC_ID_LIST, properties=properties, dtype=md.int64, is_list=True,
                              is_ragged=True)
        columns.append(roles.with_role(column, roles.ROLE_SEMANTIC_ID))
        return Schema(columns)

    def transform(self, col_selector: ColumnSelector, df: DataFrameType) -> DataFrameType:
        if not is_cpu_object(df):  # GPU (untested here): round-trip through pandas
            import cudf

            return cudf.from_pandas(self._transform_pandas(df.to_pandas(), col_selector))
        return self._transform_pandas(df, col_selector)

    def _transform_pandas(self, df: pd.DataFrame, col_selector: ColumnSelector) -> pd.DataFrame:
        out = df[list(col_selector.names)].copy()
        lists = [np.asarray(v, dtype=np.int64) for v in df[roles.ITEM_LIST]]
        lengths = np.fromiter((len(v) for v in lists), dtype=np.int64, count=len(lists))
        flat = self.tokens(np.concatenate(lists) if lists else np.zeros(0, np.int64), lengths)
        cuts = np.cumsum(lengths * self.tokens_per_item)[:-1]
        out[roles.SEMANTIC_ID_LIST] = list(np.split(flat, cuts)) if len(lists) else []
        return out

    @property
    def dynamic_dtypes(self) -> bool:
        return False


def build_semantic_id_workflow(columns: List[str], sids):
    """The workflow `columns >> SemanticIdTokens` for a fitted tokenizer `sids` (merlin_hstu.sid.tokenizer.SemanticIds:
    its `token_table()` and `vocab_size`)."""
    import nvtabular as nvt

    return nvt.Workflow(columns >> SemanticIdTokens(sids.token_table().numpy(), sids.vocab_size))


def write_semantic_ids(dataset_dir: Union[str, Path], sids, overwrite: bool = True):
    """Append semantic_id-list to the processed rows of `dataset_dir` (the output of `merlin-hstu preprocess`) with
    the fitted tokenizer `sids` (merlin_hstu.sid.tokenizer.SemanticIds; `SemanticIds.load(directory)` reads a saved
    one); write `<dataset_dir>/semantic_ids/`."""
    from merlin.io import Dataset

    dataset_dir = Path(dataset_dir)
    processed = dataset_dir / "processed"
    if not (processed / "schema.pbtxt").is_file():
        raise FileNotFoundError(f"{processed} holds no processed dataset; pass the output directory of "
                                "`merlin-hstu preprocess`")
    target = dataset_dir / SEMANTIC_IDS_DIR
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} already exists; pass overwrite=True to replace it")
    source = Dataset(str(processed), engine="parquet", cpu=True)
    item_list = roles.item_list_column(source.schema)
    if item_list != roles.ITEM_LIST:
        raise ValueError(f"{processed}/schema.pbtxt names the item list {item_list!r}, not {roles.ITEM_LIST!r}; "
                         "re-run merlin-hstu preprocess")
    workflow = build_semantic_id_workflow(source.schema.column_names, sids)
    result = workflow.fit_transform(source).to_ddf().compute()
    tokens = result[roles.SEMANTIC_ID_LIST]
    report = {"rows": int(len(result)), "tokens_per_item": sids.num_levels, "vocab_size": sids.vocab_size,
              "tokens": int(sum(len(t) for t in tokens)), "tokenizer": sids.stats.get("method"),
              "tokenizer_source": sids.source}
    staging = staging_dir(target)
    try:
        Dataset(result, cpu=True, schema=workflow.output_schema).to_parquet(str(staging), output_files=1)
        workflow.save(str(staging / "workflow"))
        (staging / REPORT_FILE).write_text(json.dumps(report, indent=2, default=str) + "\n")
        publish_dir(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return read_semantic_ids(dataset_dir)


def read_semantic_ids(dataset_dir: Union[str, Path]) -> pd.DataFrame:
    """The rows `write_semantic_ids` wrote (every processed column plus semantic_id-list)."""
    from merlin.io import Dataset

    folder = Path(dataset_dir) / SEMANTIC_IDS_DIR
    if not (folder / "schema.pbtxt").is_file():
        raise FileNotFoundError(f"{folder} holds no semantic-ID rows; write them with "
                                "merlin_hstu.workflows.semantic_ids.write_semantic_ids")
    dataset = Dataset(str(folder), engine="parquet", cpu=True)
    if roles.semantic_id_list_column(dataset.schema) is None:
        raise ValueError(f"{folder}/schema.pbtxt has no column with {roles.ROLE_PROPERTY}="
                         f"{roles.ROLE_SEMANTIC_ID!r}; write it again")
    return dataset.to_ddf().compute()
