"""Custom NVTabular operators for the session workflow.

Three ops, all on the single chain of the workflow (see session_workflow.py):

* `RawItemIds` - the `item_encoding="raw"` alternative to Categorify: keeps positive integer item ids as
  they are and gives them an int_domain (embedding rows = largest id + 1), as the reference does for MovieLens.
* `ChronologicalGroupby` - a Groupby that stable-sorts events by time first (ties keep input order).
* `FinalizeSequences` - after the Groupby: min-length filter, keep-most-recent truncation, `length`,
  optional interleaving, and the output schema (tags + role properties from `merlin_hstu.common.schema`).
  Doing all of it in one op keeps the workflow single-branch: on CPU, merlin.dag re-executes a Groupby once
  for every branch that selects from its output (merlin-integration.md section 5).

Both live at an importable path (`merlin_hstu.workflows.ops`) because a saved workflow pickles them by
reference; the Triton python backend that serves a workflow imports them from there.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np
from merlin.core.dispatch import DataFrameType, is_cpu_object
from merlin.dag import ColumnSelector
from merlin.schema import ColumnSchema, Schema
import merlin.dtypes as md
from nvtabular.ops import Groupby, Operator
from nvtabular.ops.stat_operator import StatOperator

from merlin_hstu.common import schema as roles

#: ColumnSchema property set on raw-id item columns: {"item_encoding": "raw"} (Categorify columns lack it)
ITEM_ENCODING_PROPERTY = "item_encoding"


class RawItemIds(StatOperator):
    """Keep item ids as given (no Categorify); fit records the id range so the schema gets an int_domain.

    Why: the reference keeps raw MovieLens movie ids, so the embedding table has max_id + 1 rows and the
    candidate pool can hold catalogue items that nobody rated (Categorify only knows the ids it saw).
    0 is padding, so every id must be >= 1. After fit

        max_id = max(largest id in the fitted data, min_max_id)      int_domain = [0, max_id]

    `min_max_id` lets a catalogue larger than the rated items (e.g. ML-1M movies.dat, max 3952) size the
    table. `transform` rejects ids outside [1, max_id] instead of passing an out-of-range index on.
    """

    def __init__(self, min_max_id: Optional[int] = None):
        super().__init__()
        if min_max_id is not None and (isinstance(min_max_id, bool) or int(min_max_id) < 1):
            raise ValueError(f"RawItemIds(min_max_id=...) must be an integer >= 1 or None, got {min_max_id!r}")
        self.min_max_id = None if min_max_id is None else int(min_max_id)
        self.max_id: Optional[int] = None

    def fit(self, col_selector: ColumnSelector, ddf):
        names = list(col_selector.names)
        return {"min": ddf[names].min(), "max": ddf[names].max()}

    def fit_finalize(self, dask_stats) -> None:
        mins, maxs = dask_stats["min"], dask_stats["max"]
        for name in mins.index:
            if int(mins[name]) < 1:
                raise ValueError(
                    f"column {name!r} has item id {int(mins[name])}; raw item ids must be >= 1 (0 is padding). "
                    "Fix: shift the ids (+1) or use item_encoding='categorify'."
                )
        top = max(int(v) for v in maxs.to_numpy())
        self.max_id = max(top, self.min_max_id or 0)

    def clear(self) -> None:
        self.max_id = None

    def transform(self, col_selector: ColumnSelector, df: DataFrameType) -> DataFrameType:
        if self.max_id is None:
            raise RuntimeError("RawItemIds: fit the workflow before transforming (max_id is unknown)")
        out = type(df)()
        for name in col_selector.names:
            values = df[name]
            if not np.issubdtype(np.dtype(values.dtype), np.integer):
                raise ValueError(
                    f"column {name!r} has dtype {values.dtype}; raw item ids must be integers. "
                    f"Fix: cast them, e.g. df[{name!r}] = df[{name!r}].astype('int64')."
                )
            bad = (values < 1) | (values > self.max_id)
            if bool(bad.any()):
                first = values[bad].iloc[0]
                raise ValueError(
                    f"column {name!r} has {int(bad.sum())} item id(s) outside 1..{self.max_id} (e.g. {first}); "
                    "raw ids must be >= 1 and no larger than the fitted catalogue's largest id. "
                    "Fix: re-fit the workflow on data/catalogue that includes these items."
                )
            out[name] = values.astype("int64")
        return out

    @property
    def output_dtype(self):
        return md.int64

    def _compute_properties(self, col_schema: ColumnSchema, input_schema: Schema) -> ColumnSchema:
        col_schema = super()._compute_properties(col_schema, input_schema)
        # Before fit the domain holds only what is known (padding, or the catalogue's largest id), as an
        # unfitted Categorify reports just its reserved ids; fit's dtype-capturing pass needs some domain
        # downstream (FinalizeSequences' interleave offset), and the schema is rebuilt after fit.
        top = self.max_id if self.max_id is not None else (self.min_max_id or 0)
        properties = {
            **col_schema.properties,
            ITEM_ENCODING_PROPERTY: "raw",
            "domain": {"min": 0, "max": top, "name": col_schema.name},
        }
        return col_schema.with_properties(properties)


class ChronologicalGroupby(Groupby):
    """`Groupby` that first sorts the partition's rows by `time_column` with a stable sort.

    Equal times keep their input order. Why not `Groupby(sort_cols=...)`: it calls `DataFrame.sort_values` with
    pandas' default quicksort, which is not stable for a single key. Why not a separate sort op before the
    Groupby: Groupby declares its groupby columns as dependencies, so merlin.dag feeds it those columns again
    straight from the raw input, in raw order, replacing the sorted copy - ids and lists would misalign.
    """

    def __init__(self, groupby_cols, time_column: Optional[str], aggs, name_sep: str = "_"):
        super().__init__(groupby_cols=groupby_cols, sort_cols=None, aggs=aggs, name_sep=name_sep)
        self.time_column = time_column

    def transform(self, col_selector: ColumnSelector, df: DataFrameType) -> DataFrameType:
        if self.time_column is not None:
            df = stable_sort(df, self.time_column)
        return super().transform(col_selector, df)


def stable_sort(df: DataFrameType, column: str) -> DataFrameType:
    """Rows sorted by `column` ascending; ties keep their input order."""
    if is_cpu_object(df):
        order = np.argsort(df[column].to_numpy(), kind="stable")
        return df.take(order).reset_index(drop=True)
    # GPU (untested here): make ties explicit with the row position, so stability does not depend on the
    # sort algorithm.
    import cupy

    position = "__merlin_hstu_position__"
    df = df.assign(**{position: cupy.arange(len(df))})
    return df.sort_values([column, position]).drop(columns=[position]).reset_index(drop=True)


class FinalizeSequences(Operator):
    """Groupby output -> final per-row sequences.

    Input columns: the id column and some of `item_id-list`, `action-list`, `timestamp-list` (chronological,
    equal length per row). For each row with n events:

        keep the row      iff n >= min_length                  (counted before truncation)
        every list        <- list[-max_length:]                (the most recent events)
        length            =  min(n, max_length)
        interleaved-list  =  [i_1, a_1 + K, i_2, a_2 + K, ...]  K = item cardinality (only if interleave)

    K comes from the fitted item Categorify: NVTabular recomputes every node's output schema after `fit`, and
    this op reads the item domain there (`int_domain.max + 1`) and keeps it as `action_token_offset`; it is
    pickled with the workflow, so a loaded workflow transforms without re-fitting.
    """

    def __init__(
        self,
        id_column: str,
        id_role: str,
        max_length: int,
        min_length: int,
        interleave: bool = False,
    ):
        super().__init__()
        if id_role not in (roles.ROLE_USER_ID, roles.ROLE_SESSION_ID):
            raise ValueError(f"id_role must be {roles.ROLE_USER_ID!r} or {roles.ROLE_SESSION_ID!r}, got {id_role!r}")
        self.id_column = id_column
        self.id_role = id_role
        self.max_length = int(max_length)
        self.min_length = int(min_length)
        self.interleave = bool(interleave)
        self.action_token_offset: Optional[int] = None

    # ---- column bookkeeping --------------------------------------------------------------------------
    def _list_columns(self, names: List[str]) -> List[str]:
        return [c for c in (roles.ITEM_LIST, roles.ACTION_LIST, roles.TIMESTAMP_LIST) if c in names]

    def column_mapping(self, col_selector: ColumnSelector) -> Dict[str, List[str]]:
        names = list(col_selector.names)
        mapping = {name: [name] for name in names}
        mapping[roles.LENGTH] = [roles.ITEM_LIST]
        if self.interleave:
            mapping[roles.INTERLEAVED_LIST] = [roles.ITEM_LIST, roles.ACTION_LIST]
        return mapping

    def compute_output_schema(
        self, input_schema: Schema, col_selector: ColumnSelector, prev_output_schema: Optional[Schema] = None
    ) -> Schema:
        names = list(col_selector.names) if col_selector else list(input_schema.column_names)
        expected = {self.id_column, roles.ITEM_LIST, roles.ACTION_LIST, roles.TIMESTAMP_LIST}
        unexpected = [n for n in names if n not in expected]
        if unexpected or roles.ITEM_LIST not in names or self.id_column not in names:
            raise ValueError(
                f"FinalizeSequences expects {sorted(expected)} (item list and id required), got {names}"
            )
        if self.interleave and roles.ACTION_LIST not in names:
            raise ValueError("FinalizeSequences(interleave=True) needs an action list column")

        # value_count: rows have between min_length and max_length events after filtering/truncation
        lo, hi = min(self.min_length, self.max_length), self.max_length
        list_role = {
            roles.ITEM_LIST: roles.ROLE_ITEM,
            roles.ACTION_LIST: roles.ROLE_ACTION,
            roles.TIMESTAMP_LIST: roles.ROLE_TIMESTAMP,
        }
        columns = []
        for name in names:
            source = input_schema[name]
            if name == self.id_column:
                columns.append(roles.with_role(source, self.id_role))
                continue
            extra = {roles.TIME_UNIT_PROPERTY: "s"} if name == roles.TIMESTAMP_LIST else None
            columns.append(roles.with_role(_list_schema(source, lo, hi), list_role[name], extra))

        length = ColumnSchema(roles.LENGTH, dtype=md.int64, is_list=False, is_ragged=False)
        columns.append(roles.with_role(length, roles.ROLE_LENGTH))

        if self.interleave:
            item_domain = input_schema[roles.ITEM_LIST].int_domain
            action_domain = input_schema[roles.ACTION_LIST].int_domain
            fitted = item_domain is not None and item_domain.max is not None and action_domain is not None
            self.action_token_offset = int(item_domain.max) + 1 if fitted else None
            properties = {}
            if fitted:
                # token ids 0 .. K + |actions| - 1: 0 stays padding; action a -> a + K
                top = self.action_token_offset + int(action_domain.max)
                properties = {
                    "domain": {"min": 0, "max": top, "name": roles.INTERLEAVED_LIST},
                    roles.ACTION_TOKEN_OFFSET_PROPERTY: self.action_token_offset,
                }
            inter = ColumnSchema(
                roles.INTERLEAVED_LIST, properties=properties, dtype=md.int64, dims=(None, (2 * lo, 2 * hi))
            )
            columns.append(roles.with_role(inter, roles.ROLE_INTERLEAVED))
        return Schema(columns)

    # ---- data ----------------------------------------------------------------------------------------
    def transform(self, col_selector: ColumnSelector, df: DataFrameType) -> DataFrameType:
        if not is_cpu_object(df):  # GPU (untested here): round-trip through pandas
            import cudf

            return cudf.from_pandas(self._transform_pandas(df.to_pandas()))
        return self._transform_pandas(df)

    def _transform_pandas(self, df):
        list_columns = self._list_columns(list(df.columns))
        n_events = np.fromiter((len(v) for v in df[roles.ITEM_LIST]), dtype=np.int64, count=len(df))
        keep = n_events >= self.min_length
        out = df.loc[keep].reset_index(drop=True)
        for name in list_columns:
            out[name] = _int64_lists(v[-self.max_length :] for v in out[name])
        out[roles.LENGTH] = np.minimum(n_events[keep], self.max_length).astype(np.int64)
        if self.interleave:
            if self.action_token_offset is None:
                raise RuntimeError(
                    "FinalizeSequences: action_token_offset is unknown; fit the workflow before transforming"
                )
            out[roles.INTERLEAVED_LIST] = [
                _interleave(items, actions, self.action_token_offset)
                for items, actions in zip(out[roles.ITEM_LIST], out[roles.ACTION_LIST])
            ]
        return out

    @property
    def dynamic_dtypes(self) -> bool:
        return False


def _list_schema(source: ColumnSchema, lo: int, hi: int) -> ColumnSchema:
    """An int64 ragged list column with `source`'s properties (keeps Categorify's domain, cat_path, ...)."""
    properties = {k: v for k, v in source.properties.items() if k != "value_count"}
    return ColumnSchema(source.name, properties=properties, dtype=md.int64, dims=(None, (lo, hi)))


def _int64_lists(rows) -> list:
    return [np.asarray(row, dtype=np.int64) for row in rows]


def _interleave(items: np.ndarray, actions: np.ndarray, offset: int) -> np.ndarray:
    tokens = np.empty(2 * len(items), dtype=np.int64)
    tokens[0::2] = items
    tokens[1::2] = np.asarray(actions, dtype=np.int64) + offset
    return tokens
