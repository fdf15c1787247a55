"""NVTabular item-text step: an item-metadata table (text columns) joined onto the encoded items of a dataset.

Text-based item encoders (merlin_hstu.hllm) need, for every id a model ranks, the text of that item.  The session
workflow (session_workflow.py) encodes items (Categorify, or raw ids for MovieLens) and writes the catalogue of
ENCODED ids (`<dataset>/candidates.parquet`); this step joins a metadata table keyed by RAW item id onto that
catalogue and writes one row per catalogue item:

    item_id        int64   encoded id (the row of every model table)      tags ITEM, ID, CATEGORICAL
    raw_item_id    raw     the metadata's / log's id                       tags ITEM
    <text fields>  str     e.g. title, genres, as in the metadata          tags ITEM, TEXT
    item_text      str     the fields composed: "title: Toy Story (1995). genres: Animation, Comedy."
                                                                           tags ITEM, TEXT

Every column carries the role property of `merlin_hstu.common.schema` (`item_table_id`, `raw_item_id`,
`item_text_field`, `item_text`), so a reader finds the columns by role, not by name.

The workflow is `[item_id, raw_item_id] >> JoinExternal(metadata, on=raw_item_id)`, then the custom op
`ComposeItemText` (composition + tags); NVTabular's own `JoinExternal` does the join.  Nothing is guessed:

* a catalogue item without a metadata row is an error naming the ids (or, with `missing="empty"`, an item with
  empty text, counted in the report);
* a metadata row whose item is not in the catalogue (e.g. a Categorify dataset's item that nobody interacted
  with: it has no encoded id) is left out and counted in the report (`metadata_rows_not_in_catalogue`);
* duplicate raw ids in the metadata, empty text columns and unknown column names are errors.

`write_item_text(dataset_dir, metadata, ...)` writes `<dataset_dir>/item_text/` (parquet + schema.pbtxt +
report.json) atomically; `read_item_text(dataset_dir)` reads it back as the encoded-id -> text mapping.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import pandas as pd
from merlin.core.dispatch import DataFrameType
from merlin.dag import ColumnSelector
from merlin.schema import ColumnSchema, Schema
import merlin.dtypes as md
from nvtabular.ops import Operator

from merlin_hstu.common import schema as roles
from merlin_hstu.common.atomic_dir import publish_dir, staging_dir

PathLike = Union[str, os.PathLike]

ITEM_TEXT_DIR = "item_text"  # <dataset>/item_text/: the joined item table
REPORT_FILE = "report.json"
MISSING_POLICIES = ("error", "empty")


class ComposeItemText(Operator):
    """Compose the text fields of each item into one `item_text` string and tag every column by role.

    text = "<field>: <value>. <field>: <value>." over `fields` in order, with `separators[field]` (e.g. "|" in
    MovieLens genres) turned into ", "; empty values are skipped.  The id columns pass through with their roles.
    Lives here (an importable path) because a saved workflow pickles its ops by reference."""

    def __init__(self, fields: Sequence[str] = (), separators: Optional[Dict[str, str]] = None):
        super().__init__()
        self.fields = list(fields)
        self.separators = dict(separators or {})

    def compose(self, frame: pd.DataFrame) -> pd.Series:
        parts = []
        for name in self.fields:
            values = frame[name].fillna("").astype(str).str.strip()
            sep = self.separators.get(name)
            if sep:
                values = values.str.split(sep, regex=False).str.join(", ")
            parts.append(np.where(values != "", name + ": " + values + ".", ""))
        composed = [" ".join(p for p in row if p) for row in zip(*parts)] if parts else []
        return pd.Series(composed, index=frame.index, dtype=object)

    def transform(self, col_selector: ColumnSelector, df: DataFrameType) -> DataFrameType:
        out = df[list(col_selector.names)].copy()
        out[roles.ITEM_TEXT] = self.compose(df)
        return out

    def column_mapping(self, col_selector: ColumnSelector) -> dict:
        mapping = {name: [name] for name in col_selector.names}
        mapping[roles.ITEM_TEXT] = list(self.fields)
        return mapping

    def compute_output_schema(self, input_schema: Schema, col_selector: ColumnSelector,
                              prev_output_schema: Optional[Schema] = None) -> Schema:
        columns = []
        for name in col_selector.names:
            column = input_schema[name]
            if name == roles.ITEM_ID:
                columns.append(roles.with_role(column.with_dtype(md.int64), roles.ROLE_ITEM_TABLE_ID))
            elif name == roles.RAW_ITEM_ID:
                columns.append(roles.with_role(column, roles.ROLE_RAW_ITEM_ID))
            else:
                columns.append(roles.with_role(column.with_dtype(md.string), roles.ROLE_ITEM_TEXT_FIELD))
        columns.append(roles.with_role(ColumnSchema(roles.ITEM_TEXT, dtype=md.string), roles.ROLE_ITEM_TEXT,
                                       {"fields": list(self.fields)}))
        return Schema(columns)

    @property
    def output_dtype(self):
        return None


def build_item_text_workflow(metadata: pd.DataFrame, text_columns: Sequence[str],
                             separators: Optional[Dict[str, str]] = None):
    """The (stateless) NVTabular workflow: items [item_id, raw_item_id] -> joined, composed, tagged item table.
    `metadata` has a `raw_item_id` column and the `text_columns`."""
    import nvtabular as nvt
    from nvtabular import ops

    joined = [roles.ITEM_ID, roles.RAW_ITEM_ID] >> ops.JoinExternal(
        metadata, on=roles.RAW_ITEM_ID, how="left", columns_ext=[roles.RAW_ITEM_ID, *text_columns])
    return nvt.Workflow(joined >> ComposeItemText(text_columns, separators))


@dataclass
class ItemTextTable:
    """The encoded-id -> text mapping of a dataset (what `read_item_text` returns)."""

    frame: pd.DataFrame  # item_id, raw_item_id, text fields, item_text; one row per catalogue item, by item_id
    schema: Schema
    report: dict

    @property
    def item_ids(self) -> np.ndarray:
        return self.frame[roles.ITEM_ID].to_numpy(dtype=np.int64)

    @property
    def texts(self) -> List[str]:
        return self.frame[roles.ITEM_TEXT].tolist()

    def text_by_id(self, num_items: int) -> np.ndarray:
        """Object array [num_items]: the text of each encoded id, None for ids without an item (padding, ...)."""
        out = np.full(num_items, None, dtype=object)
        ids = self.item_ids
        if len(ids) and ids.max() >= num_items:
            raise ValueError(f"item table has encoded ids up to {int(ids.max())}, beyond num_items={num_items}")
        out[ids] = self.frame[roles.ITEM_TEXT].to_numpy(dtype=object)
        return out


def _catalogue(dataset_dir: Path) -> pd.DataFrame:
    """[item_id (encoded), raw_item_id] of the dataset's catalogue, from candidates.parquet and the workflow."""
    from merlin_hstu.workflows.session_workflow import (ITEM_BASE, CANDIDATES_FILE, load_item_id_mapping,
                                                        read_candidates)

    candidates_path = dataset_dir / CANDIDATES_FILE
    if not candidates_path.is_file():
        raise FileNotFoundError(f"{candidates_path} is missing: pass the output directory of `merlin-hstu "
                                "preprocess` (it holds processed/, workflow/ and candidates.parquet)")
    encoded = read_candidates(candidates_path)
    if (dataset_dir / "workflow" / "categories" / f"unique.{ITEM_BASE}.parquet").is_file():
        mapping = load_item_id_mapping(dataset_dir / "workflow")
        raw = mapping[encoded]
    else:  # raw item ids (RawItemIds): encoded == raw
        raw = encoded.copy()
    return pd.DataFrame({roles.ITEM_ID: encoded.astype(np.int64), roles.RAW_ITEM_ID: raw})


def _check_metadata(metadata: pd.DataFrame, raw_id_column: str, text_columns: Sequence[str], source: str) -> None:
    missing = [c for c in [raw_id_column, *text_columns] if c not in metadata.columns]
    if missing:
        raise ValueError(f"{source}: column(s) {missing} are not in the item metadata (columns: "
                         f"{list(metadata.columns)}); name the raw item id column and the text columns that exist")
    if not text_columns:
        raise ValueError(f"{source}: no text columns given; name at least one (e.g. title)")
    duplicated = metadata[raw_id_column][metadata[raw_id_column].duplicated()]
    if len(duplicated):
        raise ValueError(f"{source}: raw item id(s) {duplicated.unique()[:5].tolist()} occur more than once in "
                         f"column {raw_id_column!r}; an item needs exactly one metadata row")
    for column in text_columns:
        if metadata[column].isna().all() or (metadata[column].astype(str).str.strip() == "").all():
            raise ValueError(f"{source}: text column {column!r} is empty in every row")


def write_item_text(dataset_dir: PathLike, metadata: pd.DataFrame, text_columns: Sequence[str],
                    raw_id_column: str = roles.LOG_ITEM_ID, separators: Optional[Dict[str, str]] = None,
                    missing: str = "error", source: str = "item metadata", overwrite: bool = True) -> ItemTextTable:
    """Join `metadata` (one row per raw item id) onto the catalogue of the preprocessed dataset at `dataset_dir`
    and write `<dataset_dir>/item_text/` atomically (see the module docstring)."""
    import nvtabular as nvt  # noqa: F401  (the workflow below needs it; imported here to fail early)
    from merlin.io import Dataset

    if missing not in MISSING_POLICIES:
        raise ValueError(f"missing must be one of {MISSING_POLICIES}, got {missing!r}")
    dataset_dir = Path(dataset_dir)
    _check_metadata(metadata, raw_id_column, text_columns, source)
    catalogue = _catalogue(dataset_dir)
    meta = metadata[[raw_id_column, *text_columns]].rename(columns={raw_id_column: roles.RAW_ITEM_ID})
    if meta[roles.RAW_ITEM_ID].dtype != catalogue[roles.RAW_ITEM_ID].dtype:
        try:  # raw ids are integers in one and objects (from the Categorify mapping) in the other
            catalogue[roles.RAW_ITEM_ID] = catalogue[roles.RAW_ITEM_ID].astype(meta[roles.RAW_ITEM_ID].dtype)
        except (TypeError, ValueError):
            raise ValueError(f"{source}: raw item ids of dtype {meta[roles.RAW_ITEM_ID].dtype} cannot be matched with "
                             f"the dataset's item ids ({catalogue[roles.RAW_ITEM_ID].dtype})") from None
    known = catalogue[roles.RAW_ITEM_ID].isin(meta[roles.RAW_ITEM_ID])
    if not known.all() and missing == "error":
        absent = catalogue.loc[~known, roles.RAW_ITEM_ID].tolist()
        raise ValueError(f"{source}: {len(absent)} catalogue item(s) have no metadata row (raw ids e.g. "
                         f"{absent[:5]}); add their rows, or pass missing='empty' to give them empty text")
    workflow = build_item_text_workflow(meta, list(text_columns), separators)
    result = workflow.fit_transform(Dataset(catalogue, cpu=True)).to_ddf().compute()
    result = result.sort_values(roles.ITEM_ID, kind="stable").reset_index(drop=True)
    for column in text_columns:
        result[column] = result[column].fillna("").astype(str)
    report = {"source": source, "catalogue_items": int(len(catalogue)), "metadata_rows": int(len(metadata)),
              "items_without_metadata": int((~known).sum()),
              "metadata_rows_not_in_catalogue": int((~meta[roles.RAW_ITEM_ID].isin(
                  catalogue[roles.RAW_ITEM_ID])).sum()),
              "items_with_empty_text": int((result[roles.ITEM_TEXT] == "").sum()),
              "text_columns": list(text_columns)}
    target = dataset_dir / ITEM_TEXT_DIR
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} already exists; pass overwrite=True to replace it")
    staging = staging_dir(target)
    try:
        Dataset(result, cpu=True, schema=workflow.output_schema).to_parquet(str(staging), output_files=1)
        (staging / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
        publish_dir(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return read_item_text(dataset_dir)


def _role_column(schema: Schema, role: str, where: Path) -> str:
    names = [c.name for c in schema if c.properties.get(roles.ROLE_PROPERTY) == role]
    if len(names) != 1:
        raise ValueError(f"{where}/schema.pbtxt should have exactly one column with {roles.ROLE_PROPERTY}={role!r}, "
                         f"found {names}; write it with merlin_hstu.workflows.item_text.write_item_text")
    return names[0]


def read_item_text(dataset_dir: PathLike) -> ItemTextTable:
    """The item table written by `write_item_text` (columns found by role), sorted by encoded id."""
    from merlin.io import Dataset

    folder = Path(dataset_dir) / ITEM_TEXT_DIR
    if not (folder / "schema.pbtxt").is_file():
        raise FileNotFoundError(f"{folder} holds no item table; build it with merlin_hstu.workflows.item_text."
                                "write_item_text (or merlin_hstu.hllm.data.prepare_item_text for a known dataset)")
    dataset = Dataset(str(folder), engine="parquet", cpu=True)
    schema = dataset.schema
    id_col = _role_column(schema, roles.ROLE_ITEM_TABLE_ID, folder)
    text_col = _role_column(schema, roles.ROLE_ITEM_TEXT, folder)
    frame = dataset.to_ddf().compute().rename(columns={id_col: roles.ITEM_ID, text_col: roles.ITEM_TEXT})
    frame = frame.sort_values(roles.ITEM_ID, kind="stable").reset_index(drop=True)
    frame[roles.ITEM_ID] = frame[roles.ITEM_ID].astype(np.int64)
    report = json.loads((folder / REPORT_FILE).read_text()) if (folder / REPORT_FILE).is_file() else {}
    return ItemTextTable(frame, schema, report)
