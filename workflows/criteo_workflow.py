"""NVTabular workflow for click logs in the Criteo layout (Criteo Display Advertising Challenge / Terabyte).

Input: a tab-separated text file (optionally .gz/.xz/.bz2), no header, one impression per line, 40 fields:

    label  I1 ... I13  C1 ... C26
    0/1    integers (counts; may be negative, e.g. I2 = -1), empty = missing
                       C*: hashed categorical values (8 hex digits in the real data), empty = missing

`read_criteo_tsv` checks the layout before NVTabular sees it and names the bad line and field: the number of
fields per line, the label (0 or 1), and that every integer field is empty or a whole number.

Workflow (`build_criteo_workflow`, one branch per column group):

    I*    FillMissing(0) >> Clip(min=0) >> LogOp (log(1 + x)) >> Normalize ((x - mean) / std, fitted on train)
          -> float, tag CONTINUOUS
    C*    Categorify(freq_threshold, max_size, num_buckets=oov_buckets)      -> int64, tag CATEGORICAL
          ids: 0 padding, 1 null (empty field), 2.. out-of-vocabulary (values seen fewer than freq_threshold times
          in train, or beyond the max_size most frequent; oov_buckets > 1 hashes them over that many ids),
          then the vocabulary
    C* in hash_buckets   ValueHashBucket(n): hash(value) mod n, no vocabulary at all (for huge vocabularies;
          the table has n rows whatever the data) -> int64, tag CATEGORICAL.  (NVTabular 23.08's own HashBucket
          hashes the pandas row index together with the value on CPU, so one value gets different ids in
          different rows; ValueHashBucket hashes the value only.)
    label AddMetadata -> int64, tags TARGET, BINARY_CLASSIFICATION

Every categorical column gets `int_domain.max + 1` = rows its embedding table needs.

`preprocess_criteo` splits by position: the last `valid_fraction` of the lines is the validation set (Criteo
lines are in time order, so this is a time split), fits the workflow on the training lines only and writes

    <output>/processed/train/*.parquet + schema.pbtxt
    <output>/processed/valid/*.parquet + schema.pbtxt
    <output>/workflow/                         the fitted workflow (Workflow.load), with its categories

into a hidden staging directory renamed into place when complete (no half-written output is ever visible).
"""
from __future__ import annotations

import bz2
import csv
import gzip
import io
import lzma
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Union

import numpy as np
import pandas as pd

import nvtabular as nvt
from merlin.io import Dataset
from merlin.schema import Schema, Tags
from merlin.schema.io.tensorflow_metadata import TensorflowMetadata
from nvtabular import ops

from merlin_hstu.common.atomic_dir import publish_dir, staging_dir
from merlin_hstu.workflows.cluster import dataset_of, fit_transform, fit_workflow
from merlin_hstu.workflows.session_workflow import _relocate_paths

PathLike = Union[str, os.PathLike]

LABEL = "label"
NUM_INTEGER, NUM_CATEGORICAL = 13, 26
INTEGER_COLUMNS = [f"I{i}" for i in range(1, NUM_INTEGER + 1)]
CATEGORICAL_COLUMNS = [f"C{i}" for i in range(1, NUM_CATEGORICAL + 1)]
COLUMNS = [LABEL, *INTEGER_COLUMNS, *CATEGORICAL_COLUMNS]
NUM_FIELDS = len(COLUMNS)  # 40
TRAIN, VALID = "train", "valid"


class CriteoFormatError(ValueError):
    """The file is not in the Criteo layout; the message names the line, the field and the fix."""


@dataclass
class CriteoWorkflowConfig:
    """Encoding choices of the Criteo workflow (see the module docstring for the id layout)."""

    freq_threshold: int = 0  # Categorify: values seen fewer times than this in train -> OOV
    max_size: int = 0  # Categorify: at most this many ids per column (0: no cap); excludes freq_threshold
    oov_buckets: int = 0  # Categorify num_buckets: hash OOV values over this many ids (0/1: one OOV id)
    hash_buckets: Dict[str, int] = field(default_factory=dict)  # column -> HashBucket(n) instead of Categorify
    valid_fraction: float = 0.1  # the last lines (time order) form the validation split
    has_label: bool = True  # False: 39 fields (I1..I13, C1..C26), e.g. Criteo's unlabeled test file
    row_group_size: int = 50_000  # rows per Parquet row group: what a streaming reader (train.streaming) holds

    def __post_init__(self) -> None:
        for name in ("freq_threshold", "max_size", "oov_buckets"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
                raise ValueError(f"CriteoWorkflowConfig.{name} must be an integer >= 0, got {value!r}")
        size = self.row_group_size
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
            raise ValueError(f"CriteoWorkflowConfig.row_group_size must be an integer >= 1 (rows), got {size!r}")
        if self.freq_threshold and self.max_size:
            raise ValueError("CriteoWorkflowConfig: NVTabular Categorify cannot combine freq_threshold and "
                             "max_size; set one of them to 0")
        if self.max_size and self.max_size < self.oov_buckets + 3:
            raise ValueError(f"CriteoWorkflowConfig.max_size={self.max_size} must be >= oov_buckets + 3 "
                             "(ids 0 and 1 are padding and null, then the OOV ids)")
        unknown = sorted(set(self.hash_buckets) - set(CATEGORICAL_COLUMNS))
        if unknown:
            raise ValueError(f"CriteoWorkflowConfig.hash_buckets names {unknown}, which are not categorical "
                             f"columns; use names from C1..C{NUM_CATEGORICAL}")
        for name, n in self.hash_buckets.items():
            if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
                raise ValueError(f"CriteoWorkflowConfig.hash_buckets[{name!r}] must be an integer >= 1, got {n!r}")
        if not 0.0 <= self.valid_fraction < 1.0:
            raise ValueError(f"CriteoWorkflowConfig.valid_fraction must be in [0, 1), got {self.valid_fraction}")

    @property
    def columns(self) -> List[str]:
        return COLUMNS if self.has_label else COLUMNS[1:]


# ---------------------------------------------------------------------------------------------------------
# reading and validation
# ---------------------------------------------------------------------------------------------------------
def read_criteo_tsv(path: Union[PathLike, pd.DataFrame], config: Optional[CriteoWorkflowConfig] = None
                    ) -> pd.DataFrame:
    """The validated file as a DataFrame: label int64, I* float64 (NaN = missing), C* str (None = missing).

    A DataFrame with the Criteo column names (strings or numbers) goes through the same checks.
    """
    config = config or CriteoWorkflowConfig()
    expected = len(config.columns)
    if isinstance(path, pd.DataFrame):
        missing = [c for c in config.columns if c not in path.columns]
        if missing:
            raise CriteoFormatError(f"DataFrame is missing Criteo column(s) {missing} (has {list(path.columns)}). "
                                    f"Fix: name the columns {config.columns[0]}, ..., {config.columns[-1]}.")
        raw = path[config.columns].astype(object).where(path[config.columns].notna(), "").astype(str)
        where = "DataFrame"
    else:
        where = str(path)
        if not Path(path).is_file():
            raise CriteoFormatError(f"Criteo file {where!r} does not exist")
        raw = _read_fields(Path(path), expected)
        raw.columns = config.columns
    return _validate(raw, config, where)


_OPENERS = {".gz": gzip.open, ".xz": lzma.open, ".bz2": bz2.open}


def _read_fields(path: Path, expected: int) -> pd.DataFrame:
    """All fields as strings ("" = empty), after checking that every line has exactly `expected` fields."""
    with _OPENERS.get(path.suffix.lower(), open)(path, "rb") as f:
        data = f.read()
    if not data.strip():
        raise CriteoFormatError(f"{path}: the file is empty; expected one impression per line with {expected} "
                                "tab-separated fields")
    # pandas pads short lines with "" (indistinguishable from empty fields), so count the tabs per line here
    buf = np.frombuffer(data, dtype=np.uint8)
    ends = np.flatnonzero(buf == ord("\n"))
    if buf[-1] != ord("\n"):
        ends = np.append(ends, len(buf))
    starts = np.r_[0, ends[:-1] + 1]
    tabs = np.add.reduceat((buf == ord("\t")).astype(np.int32), np.minimum(starts, len(buf) - 1))
    tabs[ends == starts] = -1  # a blank line has no fields at all
    bad = np.flatnonzero(tabs + 1 != expected)
    if len(bad):
        line = int(bad[0])
        raise CriteoFormatError(_field_count_message(path, line + 1, max(int(tabs[line]) + 1, 0), expected))
    return pd.read_csv(io.BytesIO(data), sep="\t", header=None, dtype=str, na_filter=False,
                       quoting=csv.QUOTE_NONE, engine="c")


def _field_count_message(path, line: int, saw: int, expected: int) -> str:
    layout = "label, I1..I13, C1..C26" if expected == NUM_FIELDS else "I1..I13, C1..C26"
    return (f"{path}: line {line} has {saw} tab-separated fields, expected {expected} ({layout}). Fix: every line "
            "needs all fields, empty where a value is missing (two tabs in a row); set "
            "CriteoWorkflowConfig.has_label=False for a file without the label column.")


def _validate(raw: pd.DataFrame, config: CriteoWorkflowConfig, where: str) -> pd.DataFrame:
    if len(raw) == 0:
        raise CriteoFormatError(f"{where}: no lines; expected one impression per line")
    out = {}
    if config.has_label:
        labels = pd.to_numeric(raw[LABEL].str.strip(), errors="coerce").to_numpy(dtype=np.float64)
        bad = ~np.isin(labels, (0.0, 1.0))
        if bad.any():
            row = int(np.argmax(bad))
            raise CriteoFormatError(f"{where}: line {row + 1}, field {LABEL!r} is {raw[LABEL].iloc[row]!r}; the "
                                    "label must be 0 or 1. Fix: the first field of every line is the click label.")
        out[LABEL] = labels.astype(np.int64)
    for name in INTEGER_COLUMNS:
        text = raw[name].str.strip()
        values = pd.to_numeric(text, errors="coerce").to_numpy(dtype=np.float64)
        present = (text != "").to_numpy()
        bad = present & (~np.isfinite(values) | (values != np.round(values)))
        if bad.any():
            row = int(np.argmax(bad))
            raise CriteoFormatError(
                f"{where}: line {row + 1}, integer field {name!r} is {raw[name].iloc[row]!r}, not a whole number. "
                f"Fix: {name} must be an integer or empty (missing); check the field order "
                "(label, I1..I13, C1..C26) and the separator (tab).")
        values[~present] = np.nan
        out[name] = values
    for name in CATEGORICAL_COLUMNS:
        values = raw[name].to_numpy(dtype=object)
        out[name] = np.where(values == "", None, values)
    return pd.DataFrame(out)


# ---------------------------------------------------------------------------------------------------------
# workflow
# ---------------------------------------------------------------------------------------------------------
class ValueHashBucket(ops.HashBucket):
    """`HashBucket` whose CPU path hashes the value only: id = hash(value) mod n, the same in every row.

    NVTabular 23.08 hashes a pandas column with `hash_pandas_object(series)`, whose default includes the row
    index; here `index=False`.  pandas' hash uses a fixed key, so ids are stable across processes (a saved
    workflow encodes serving requests like training data).  Nulls hash to one fixed bucket.
    """

    def transform(self, col_selector, df):
        if not isinstance(df, pd.DataFrame):  # cudf: Series.hash_values() is value-only already
            return super().transform(col_selector, df)
        buckets = self.num_buckets
        df = df.copy()
        for name in col_selector.names:
            n = buckets if isinstance(buckets, int) else buckets[name]
            hashed = pd.util.hash_pandas_object(df[name], index=False).to_numpy()
            df[name] = (hashed % np.uint64(n)).astype(np.int64)
        return df

    def _compute_properties(self, col_schema, input_schema):
        # ids are 0..n-1, so int_domain.max = n - 1 (the parent reports n and copies the first input's properties)
        n = self.num_buckets if isinstance(self.num_buckets, int) else self.num_buckets[col_schema.name]
        _, dim = self.get_embedding_sizes([col_schema.name])[col_schema.name]
        return col_schema.with_properties({
            "domain": {"min": 0, "max": n - 1, "name": col_schema.name},
            "embedding_sizes": {"cardinality": n, "dimension": dim},
            "num_buckets": n,
        })

    @property
    def output_dtype(self):
        return np.int64


def build_criteo_workflow(config: Optional[CriteoWorkflowConfig] = None,
                          categories_dir: Optional[PathLike] = None) -> nvt.Workflow:
    """The unfitted workflow; `categories_dir` receives Categorify's statistics during fit."""
    config = config or CriteoWorkflowConfig()
    out_path = str(categories_dir) if categories_dir is not None else tempfile.mkdtemp(prefix="merlin_hstu_criteo_")
    integers = INTEGER_COLUMNS >> ops.FillMissing(fill_val=0) >> ops.Clip(min_value=0) >> ops.LogOp() \
        >> ops.Normalize()
    vocabulary = [c for c in CATEGORICAL_COLUMNS if c not in config.hash_buckets]
    features = integers
    if vocabulary:
        features = features + (vocabulary >> ops.Categorify(
            freq_threshold=config.freq_threshold, max_size=config.max_size,
            num_buckets=config.oov_buckets or None, out_path=out_path))
    if config.hash_buckets:
        features = features + (list(config.hash_buckets) >> ValueHashBucket(dict(config.hash_buckets)))
    if config.has_label:
        features = features + ([LABEL] >> ops.AddMetadata(tags=[Tags.TARGET, Tags.BINARY_CLASSIFICATION]))
    return nvt.Workflow(features)


@dataclass
class CriteoDataset:
    """What `preprocess_criteo` wrote; `splits` maps "train" / "valid" to their parquet directories."""

    path: Path
    splits: Dict[str, Path]
    schema: Schema
    workflow_path: Path
    num_rows: Dict[str, int]

    def parquet_files(self, split: str) -> List[Path]:
        if split not in self.splits:
            raise KeyError(f"no {split!r} split in {self.path} (splits: {sorted(self.splits)})")
        return sorted(self.splits[split].glob("*.parquet"), key=lambda p: (len(p.name), p.name))

    def to_pandas(self, split: str = TRAIN) -> pd.DataFrame:
        """One split's processed rows (the directory also holds schema.pbtxt, so read the files)."""
        return pd.concat([pd.read_parquet(p) for p in self.parquet_files(split)], ignore_index=True)


def preprocess_criteo(source: Union[PathLike, pd.DataFrame], output_dir: PathLike,
                      config: Optional[CriteoWorkflowConfig] = None, *, overwrite: bool = False) -> CriteoDataset:
    """Read + validate, split by position, fit on train, transform both splits, write atomically."""
    config = config or CriteoWorkflowConfig()
    if not config.has_label:
        raise ValueError("preprocess_criteo needs labels (CriteoWorkflowConfig.has_label=True); transform "
                         "unlabeled lines with the saved workflow instead")
    output_dir = Path(output_dir).resolve()
    if output_dir.exists() and not overwrite:
        raise FileExistsError(f"{output_dir} already exists; remove it or pass overwrite=True")
    df = read_criteo_tsv(source, config)
    n_valid = int(round(len(df) * config.valid_fraction))
    if len(df) - n_valid < 1:
        raise CriteoFormatError(f"{len(df)} line(s) leave no training rows with valid_fraction="
                                f"{config.valid_fraction}")
    parts = {TRAIN: df.iloc[: len(df) - n_valid].reset_index(drop=True)}
    if n_valid:
        parts[VALID] = df.iloc[len(df) - n_valid:].reset_index(drop=True)

    staging = staging_dir(output_dir)
    try:
        workflow_dir = staging / "workflow"
        workflow = build_criteo_workflow(config, categories_dir=workflow_dir)
        fit_workflow(workflow, dataset_of(parts[TRAIN]))
        schema = _relocate_paths(workflow.output_schema, str(staging), str(output_dir))
        rows = {}
        for name, part in parts.items():
            # row order is the log's: on a Dask cluster (workflows/cluster.py) the partitions come back in order
            result = fit_transform(workflow, part, fit=False)
            Dataset(result, cpu=True, schema=schema).to_parquet(str(staging / "processed" / name), output_files=1,
                                                                row_group_size=config.row_group_size)
            rows[name] = len(result)
        workflow.save(str(workflow_dir))
        publish_dir(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    splits = {name: output_dir / "processed" / name for name in parts}
    schema = TensorflowMetadata.from_proto_text_file(str(splits[TRAIN])).to_merlin_schema()
    return CriteoDataset(path=output_dir, splits=splits, schema=schema, workflow_path=output_dir / "workflow",
                         num_rows=rows)


def load_criteo_dataset(path: PathLike) -> CriteoDataset:
    """A `preprocess_criteo` output directory, read back (schema from processed/train/schema.pbtxt)."""
    path = Path(path)
    splits = {name: path / "processed" / name for name in (TRAIN, VALID) if (path / "processed" / name).is_dir()}
    if TRAIN not in splits or not (splits[TRAIN] / "schema.pbtxt").is_file():
        raise FileNotFoundError(f"{path} is not a preprocess_criteo output (no processed/train/schema.pbtxt)")
    schema = TensorflowMetadata.from_proto_text_file(str(splits[TRAIN])).to_merlin_schema()
    import pyarrow.parquet as pq

    rows = {name: sum(pq.ParquetFile(p).metadata.num_rows for p in d.glob("*.parquet"))
            for name, d in splits.items()}
    return CriteoDataset(path=path, splits=splits, schema=schema, workflow_path=path / "workflow", num_rows=rows)
