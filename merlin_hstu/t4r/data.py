"""Trainer inputs from our NVTabular workflows' outputs: the parquet splits `tr.Trainer` reads, and checks on the
T4R loader's `max_sequence_length`.

`tr.Trainer(..., train_dataset_or_path=, eval_dataset_or_path=)` with `data_loader_engine="merlin"` reads
parquet files with T4R's Merlin loader. Each workflow writes one processed table, so the train/eval
split has to be written out:

* retrieval (session workflow, `processed/`): `retrieval_trainer_splits` writes the leave-one-out samples of
  `merlin_hstu.retrieval.data.LeaveOneOut`. These are the samples the native loop trains and evaluates on. Train
  rows hold the history plus the train target, s_1..s_{T-1}, cut to at most H + 1 items. T4R's causal masking
  supervises every position, the native loss does the same. Eval rows hold the history plus the held-out last item,
  s_1..s_T (H + 1 at most). With `eval_on_last_item_seq_only=True`, T4R scores the last item only.
* ranking (ranking workflow, `processed/` + `ranking.json`): `ranking_trainer_splits` writes the users of the
  seeded per-user split recorded in ranking.json (`merlin_hstu.ranking.data.user_split`), the split the native
  loop uses. Rows are copied unchanged.
* CTR (Criteo workflow): the workflow already writes `processed/train` and `processed/valid`.

The column schema of every written split is the workflow's schema.pbtxt. Retrieval lists get the new length
bounds. Output is written to a staging directory and renamed into place.

T4R's Merlin loader pads or cuts every LIST column to `max_sequence_length`. It cuts from the right, so a longer
history loses its most recent events without any message. `TrainerSplits.max_sequence_length` is the longest
list that the split's schema declares. `check_max_sequence_length` raises before that can happen.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import pandas as pd
from merlin.schema import ColumnSchema, Schema, Tags
from merlin.schema.io.tensorflow_metadata import TensorflowMetadata

from merlin_hstu.common import schema as roles
from merlin_hstu.common.atomic_dir import publish_dir, staging_dir

PathLike = Union[str, os.PathLike]
TRAIN, EVAL = "train", "eval"


@dataclass
class TrainerSplits:
    """Where the train / eval parquet directories are, the schema of their columns, and the
    `max_sequence_length` for `T4RecTrainingArguments`. That value is the longest list the schema declares."""

    path: Path
    train: Path
    eval: Path
    schema: Schema
    max_sequence_length: int
    num_rows: dict


def read_schema(directory: PathLike) -> Schema:
    """The merlin-core schema of a processed directory (its schema.pbtxt)."""
    directory = Path(directory)
    if not (directory / "schema.pbtxt").is_file():
        raise FileNotFoundError(f"{directory}/schema.pbtxt is missing; pass a workflow's processed/ directory "
                                "(preprocess, preprocess-ranking or preprocess_criteo write one)")
    return TensorflowMetadata.from_proto_text_file(str(directory)).to_merlin_schema()


def _list_bounds(column: ColumnSchema):
    """(min, max) list length a column declares, or None when its shape has no upper bound."""
    dims = column.shape.dims
    if not column.is_list or dims is None or len(dims) < 2 or dims[1].max is None:
        return None
    return int(dims[1].min or 0), int(dims[1].max)


def max_list_length(schema: Schema) -> int:
    """The longest list any LIST column of `schema` declares (what T4R's loader should pad to)."""
    longest = 0
    for column in schema:
        if Tags.LIST not in column.tags:
            continue
        bounds = _list_bounds(column)
        if bounds is None:
            raise ValueError(f"list column {column.name!r} declares no maximum length (shape {column.shape}); "
                             "the T4R loader cannot be checked against it. Fix: produce the data with a "
                             "merlin_hstu workflow, or set the column's value_count max in schema.pbtxt")
        longest = max(longest, bounds[1])
    if longest == 0:
        raise ValueError(f"the schema has no LIST column (columns: {schema.column_names})")
    return longest


def check_max_sequence_length(schema: Schema, max_sequence_length: Optional[int]) -> None:
    """Raise if T4R's loader would cut a list of `schema` (it keeps the first `max_sequence_length` values, so
    the most recent events would be lost without a message). None means no padding in the loader. The model
    then pads each batch to its longest list, which cuts nothing."""
    if max_sequence_length is None:
        return
    longest = max_list_length(schema)
    if max_sequence_length < longest:
        too_long = [c.name for c in schema if Tags.LIST in c.tags and (_list_bounds(c) or (0, 0))[1] > max_sequence_length]
        raise ValueError(f"max_sequence_length={max_sequence_length} is shorter than the lists of {too_long} "
                         f"(up to {longest}); T4R's loader would cut their most recent values. Fix: set "
                         f"T4RecTrainingArguments(max_sequence_length={longest}) (TrainerSplits.max_sequence_length)")


def _prepare_output(output_dir: PathLike, overwrite: bool) -> Path:
    output_dir = Path(output_dir).resolve()
    if output_dir.exists() and not overwrite:
        raise FileExistsError(f"{output_dir} already exists; remove it or pass overwrite=True")
    return output_dir


def _write_splits(frames: dict, schema: Schema, output_dir: Path) -> dict:
    """Write {split: frame} as output_dir/<split>/part_0.parquet + schema.pbtxt, atomically."""
    from merlin.io import Dataset

    staging = staging_dir(output_dir)
    try:
        for name, frame in frames.items():
            if len(frame) == 0:
                raise ValueError(f"the {name} split is empty; use more data (more users / longer histories)")
            Dataset(frame, cpu=True, schema=schema).to_parquet(str(staging / name), output_files=1)
        publish_dir(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return {name: len(frame) for name, frame in frames.items()}


def _with_list_bounds(column: ColumnSchema, lo: int, hi: int) -> ColumnSchema:
    properties = {k: v for k, v in column.properties.items() if k != "value_count"}
    return ColumnSchema(column.name, tags=list(column.tags), properties=properties, dtype=column.dtype,
                        is_list=True, is_ragged=True, dims=(None, (lo, hi)))


def retrieval_trainer_splits(processed: PathLike, output_dir: PathLike, max_history: int = 200,
                             overwrite: bool = False) -> TrainerSplits:
    """Leave-one-out train / eval rows of a session-workflow output for `tr.Trainer`. See the module docstring.

    `processed` is the workflow's output directory or its processed/ folder. `max_history` is H, as in
    `DataConfig.max_history`. Columns written: the user/session id, the item list and, when the workflow wrote
    it, the timestamp list. Train rows have at least 2 items, eval rows at least 2 and at most H + 1.
    """
    from merlin_hstu.retrieval.data import LeaveOneOut, load_processed

    processed = Path(processed)
    if (processed / "processed").is_dir():
        processed = processed / "processed"
    output_dir = _prepare_output(output_dir, overwrite)
    workflow_schema = read_schema(processed)
    item_col = roles.item_list_column(workflow_schema)
    ts_col = roles.timestamp_list_column(workflow_schema)
    key_col = roles.id_column(workflow_schema)
    split = LeaveOneOut(load_processed(processed), max_history=max_history)
    table = split.table

    def frame(samples) -> pd.DataFrame:
        ends = samples.lengths + 1  # history + target
        out = {}
        if key_col is not None:
            out[key_col] = table.keys[samples.rows]
        out[item_col] = [samples.ids[i, :n] for i, n in enumerate(ends)]
        if ts_col is not None and samples.timestamps is not None:
            out[ts_col] = [samples.timestamps[i, :n] for i, n in enumerate(ends)]
        return pd.DataFrame(out)

    columns = [workflow_schema[key_col]] if key_col is not None else []
    columns.append(_with_list_bounds(workflow_schema[item_col], 2, max_history + 1))
    if ts_col is not None:
        columns.append(_with_list_bounds(workflow_schema[ts_col], 2, max_history + 1))
    schema = Schema(columns)
    rows = _write_splits({TRAIN: frame(split.train), EVAL: frame(split.eval)}, schema, output_dir)
    return TrainerSplits(output_dir, output_dir / TRAIN, output_dir / EVAL, read_schema(output_dir / TRAIN),
                         max_history + 1, rows)


def ranking_trainer_splits(ranking_dir: PathLike, output_dir: PathLike, test_fraction: Optional[float] = None,
                           split_seed: Optional[int] = None, overwrite: bool = False) -> TrainerSplits:
    """The train / test users of a preprocess-ranking directory as two parquet directories for `tr.Trainer`.

    The split is `merlin_hstu.ranking.data.user_split` with ranking.json's test_fraction and seed, unless they are
    given here. It is the split `RankingDataset.load` makes. Rows and schema are the workflow's, unchanged. The
    eval directory holds the test users.
    """
    from merlin_hstu.ranking.data import read_meta, read_processed_frame, user_split

    ranking_dir = Path(ranking_dir)
    meta = read_meta(ranking_dir)
    output_dir = _prepare_output(output_dir, overwrite)
    schema = read_schema(ranking_dir / "processed")
    df = read_processed_frame(ranking_dir)
    recorded = meta.get("split", {})
    fraction = recorded.get("test_fraction", 0.25) if test_fraction is None else test_fraction
    seed = recorded.get("seed", 0) if split_seed is None else split_seed
    rows = user_split(len(df), fraction, seed)
    frames = {TRAIN: df.iloc[rows["train"]].reset_index(drop=True),
              EVAL: df.iloc[rows["test"]].reset_index(drop=True)}
    counts = _write_splits(frames, schema, output_dir)
    return TrainerSplits(output_dir, output_dir / TRAIN, output_dir / EVAL, read_schema(output_dir / TRAIN),
                         max_list_length(schema), counts)


def parquet_files(directory: PathLike) -> list:
    """The parquet files of a split directory, in order (what `train_dataset_or_path` takes)."""
    files = sorted(Path(directory).glob("*.parquet"), key=lambda p: (len(p.name), p.name))
    if not files:
        raise FileNotFoundError(f"no parquet files in {directory}")
    return [str(p) for p in files]


__all__ = ["TrainerSplits", "read_schema", "max_list_length", "check_max_sequence_length",
           "retrieval_trainer_splits", "ranking_trainer_splits", "parquet_files"]

