"""Feature roles -> column names, Merlin tags and properties: the one place they are defined.

A processed dataset (see `merlin_hstu.workflows.session_workflow`) is one row per user or session:

| role          | column             | tags                                | dtype                   |
|---------------|--------------------|-------------------------------------|-------------------------|
| user id       | raw name, e.g. `user_id`    | USER, ID  (Tags.USER_ID)   | raw dtype (not encoded) |
| session id    | raw name, e.g. `session_id` | SESSION, ID (Tags.SESSION_ID) | raw dtype            |
| item          | `item_id-list`     | ITEM, ID, LIST, CATEGORICAL         | int64 list, Categorify  |
| action        | `action-list`      | LIST, CATEGORICAL                   | int64 list, Categorify  |
| timestamp     | `timestamp-list`   | LIST, TIME, CONTINUOUS              | int64 list, unix seconds|
| length        | `length`           | (none: not a model feature)         | int64                   |
| interleaved   | `interleaved-list` | LIST (deliberately not CATEGORICAL) | int64 list              |
| semantic IDs  | `semantic_id-list` | LIST (not CATEGORICAL, like interleaved) | int64 list, T per item (optional step) |

Merlin has no tag for "action" (or "length", "interleaved"), so every column also carries the property
`{"merlin_hstu_role": <role>}`; lookups below use that property first and fall back to tags, so schemas
made by other tools (e.g. a T4R schema with an ITEM_ID list) still resolve.

Categorify layout (NVTabular 23.08, checked in `nvtabular/ops/categorify.py`: PAD_OFFSET=0, NULL_OFFSET=1,
OOV_OFFSET=2, uniques written from index 3): 0 = padding, 1 = null, 2 = out-of-vocabulary, real values 3..
`int_domain.max + 1` is therefore the embedding-table size, and padding_idx = 0 everywhere.

The interleaved column (only when interleaving is on) is [i1, a1 + K, i2, a2 + K, ...] with
K = item cardinality = item `int_domain.max + 1`, stored as property `action_token_offset`. It is not tagged
CATEGORICAL on purpose: T4R's `TabularSequenceFeatures.from_schema` concatenates every CATEGORICAL list
position-wise, and this list is twice as long as the others.

Importing this module is light (no Merlin, torch or pandas: `merlin.schema` is imported inside the functions
that need it), so the command line formats its help from these constants and the Triton entry model's light
contract module reads them.

Note: schema properties round-trip through schema.pbtxt as protobuf Struct numbers, i.e. floats; read
integer properties through the helpers here (`action_token_offset`, `embedding_table_size`).
"""
from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Dict, Iterable, List, Optional, Tuple

if TYPE_CHECKING:  # imported where used: `merlin.schema` loads torch and pandas (seconds)
    from merlin.schema import ColumnSchema, Schema, Tags

# ---- canonical column names ---------------------------------------------------------------------------
ITEM_LIST = "item_id-list"
ACTION_LIST = "action-list"
TIMESTAMP_LIST = "timestamp-list"
LENGTH = "length"
INTERLEAVED_LIST = "interleaved-list"  # only when interleaving is on
# item tables (one row per catalogue item; merlin_hstu.workflows.item_text, merlin_hstu.hllm)
ITEM_ID = "item_id"  # the ENCODED item id of an item-table row (the id model tables and sequences use)
RAW_ITEM_ID = "raw_item_id"  # the item id as the raw log / metadata file spells it
ITEM_TEXT = "item_text"  # the item's text as a language model reads it (its text fields composed)
# semantic IDs (merlin_hstu.workflows.semantic_ids, merlin_hstu.sid): every item of item_id-list as its T tokens
SEMANTIC_ID_LIST = "semantic_id-list"

# ranking datasets (merlin_hstu.workflows.ranking_workflow writes them, merlin_hstu.ranking.data reads them)
WATCH_TIME_LIST = "watch_time-list"
CANDIDATE_ITEM_LIST = "candidate_item_id-list"
CANDIDATE_ACTION_LIST = "candidate_action-list"
CANDIDATE_WATCH_TIME_LIST = "candidate_watch_time-list"
# the candidate pool file (<output>/candidates.parquet): one column of encoded item ids
CANDIDATES_COLUMN = ITEM_ID

# ---- raw event logs -------------------------------------------------------------------------------------
# The default column names a raw log is read with (SessionWorkflowConfig, RankingWorkflowConfig, the retrieval
# config's data section) and the standard event-log form the dataset loaders return (workflows/datasets.py).
# The workflows rename the configured raw columns to the bases below before their Groupby, whose
# `<base>-<agg>` naming gives the list names above (checked at import of the workflows).
LOG_USER_ID = "user_id"
LOG_SESSION_ID = "session_id"
LOG_ITEM_ID = "item_id"
LOG_ACTION = "action"
LOG_TIMESTAMP = "timestamp"
LOG_RATING = "rating"
LOG_WATCH_TIME = "watch_time"
LOG_CATEGORY = "category"  # the item's category on each event of the synthetic log (merlin_hstu.data.synthetic)
ITEM_BASE, ACTION_BASE, TIME_BASE, WATCH_TIME_BASE = LOG_ITEM_ID, LOG_ACTION, LOG_TIMESTAMP, LOG_WATCH_TIME
LIST_SUFFIX = "-list"  # Groupby "list" aggregation: <base>-list

# The Merlin session Parquet layout (one row per session; T4R / Merlin examples' names)
MERLIN_SESSION_ID = "user_session"
MERLIN_SESSION_ITEMS = "item_id_list_seq"
MERLIN_SESSION_EVENTS = "item_event_name_list_seq"
MERLIN_SESSION_TIME = "timestamp_first"  # the session's start time (one value per session)
MERLIN_SESSION_TIME_HINT = "timestamp"  # a list column whose name holds this is a per-event time candidate

# The recommendations frame (serving.contract.Recommendations.to_frame, `merlin-hstu query`): one row per user and
# rank, `<id column>, rank, <RECOMMENDED_ITEM_ID>, score`
RECOMMENDED_ITEM_ID = LOG_ITEM_ID  # the recommended item, as a raw id (the log's spelling)

# ---- roles ------------------------------------------------------------------------------------------
# ColumnSchema property naming a column's role, e.g. {"merlin_hstu_role": "action"}
ACTION_PROPERTY = "merlin_hstu_role"
ROLE_PROPERTY = ACTION_PROPERTY  # same key; the clearer name for non-action roles

ROLE_USER_ID = "user_id"
ROLE_SESSION_ID = "session_id"
ROLE_ITEM = "item"
ROLE_ACTION = "action"
ROLE_TIMESTAMP = "timestamp"
ROLE_LENGTH = "length"
ROLE_INTERLEAVED = "interleaved"
ROLE_ITEM_TABLE_ID = "item_table_id"  # item table: encoded item id
ROLE_RAW_ITEM_ID = "raw_item_id"  # item table: raw item id
ROLE_ITEM_TEXT = "item_text"  # item table: the composed text an item language model reads
ROLE_ITEM_TEXT_FIELD = "item_text_field"  # item table: one source text column (title, genres, ...)
ROLE_SEMANTIC_ID = "semantic_id"  # the semantic-ID tokens of a row's items (T per item, in item order)
ROLE_WATCH_TIME = "watch_time"  # ranking: the continuous signal list (tags: merlin_hstu.workflows.ranking_workflow)


#: ROLE_TAGS: the exact tag set each role's column carries (tags are replaced, not merged, so nothing leaks from
#: the source)
@functools.lru_cache(maxsize=None)
def _role_tags() -> Dict[str, Tuple["Tags", ...]]:
    from merlin.schema import Tags

    return {
        ROLE_USER_ID: (Tags.USER, Tags.ID),
        ROLE_SESSION_ID: (Tags.SESSION, Tags.ID),
        ROLE_ITEM: (Tags.ITEM, Tags.ID, Tags.LIST, Tags.CATEGORICAL),
        ROLE_ACTION: (Tags.LIST, Tags.CATEGORICAL),
        ROLE_TIMESTAMP: (Tags.LIST, Tags.TIME, Tags.CONTINUOUS),
        ROLE_LENGTH: (),
        ROLE_INTERLEAVED: (Tags.LIST,),
        ROLE_ITEM_TABLE_ID: (Tags.ITEM, Tags.ID, Tags.CATEGORICAL),
        ROLE_RAW_ITEM_ID: (Tags.ITEM,),
        ROLE_ITEM_TEXT: (Tags.ITEM, Tags.TEXT),
        ROLE_ITEM_TEXT_FIELD: (Tags.ITEM, Tags.TEXT),
        ROLE_SEMANTIC_ID: (Tags.LIST,),  # not CATEGORICAL: T times longer than the other lists (see interleaved)
    }


def __getattr__(name: str):
    """`ROLE_TAGS`, built on first use (module-level `__getattr__`, PEP 562) so that importing stays light."""
    if name == "ROLE_TAGS":
        return _role_tags()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---- other properties ---------------------------------------------------------------------------------
ACTION_TOKEN_OFFSET_PROPERTY = "action_token_offset"  # interleaved-list: action token = action id + offset
TIME_UNIT_PROPERTY = "time_unit"  # timestamp-list: always "s" (unix seconds)
TOKENS_PER_ITEM_PROPERTY = "tokens_per_item"  # semantic_id-list: T tokens per item

# Categorify (NVTabular 23.08) reserved ids
PADDING_ID = 0
NULL_ID = 1
OOV_ID = 2
FIRST_REAL_ID = 3


class SchemaRoleError(ValueError):
    """A schema lacks a required role column, or has more than one candidate for a role."""


def with_role(column: ColumnSchema, role: str, extra_properties: Optional[dict] = None) -> ColumnSchema:
    """Return `column` with exactly the tags of `role` and the role property set.

    Tags are replaced rather than merged: a Groupby output inherits its source column's tags, and a stray
    ID tag on e.g. a count column would make item-id lookups ambiguous.
    """
    from merlin.schema import ColumnSchema

    role_tags = _role_tags()
    if role not in role_tags:
        raise ValueError(f"unknown role {role!r}; known roles: {sorted(role_tags)}")
    properties = {**column.properties, ROLE_PROPERTY: role, **(extra_properties or {})}
    properties.pop("value_count", None)  # re-derived from the shape below; a stale copy would conflict
    return ColumnSchema(
        column.name,
        tags=list(role_tags[role]),
        properties=properties,
        dtype=column.dtype,
        is_list=column.is_list,
        is_ragged=column.is_ragged,
        dims=column.shape.as_tuple if column.shape.dims is not None else None,
    )


def _columns_with_role(schema: Schema, role: str) -> List[str]:
    return [c.name for c in schema if c.properties.get(ROLE_PROPERTY) == role]


def _is_list(column: ColumnSchema) -> bool:
    from merlin.schema import Tags

    return bool(column.is_list) or Tags.LIST in column.tags or Tags.SEQUENCE in column.tags


def _columns_with_tags(schema: Schema, tags: Iterable[Tags], list_only: bool) -> List[str]:
    wanted = set(tags)
    return [c.name for c in schema if wanted <= set(c.tags) and (_is_list(c) or not list_only)]


def _find(schema: Schema, role: str, fallback_tags: Optional[Iterable[Tags]], required: bool) -> Optional[str]:
    """Find the single column of `role`: by role property first, then by tags (list columns only)."""
    names = _columns_with_role(schema, role)
    how = f"property {ROLE_PROPERTY}={role!r}"
    if not names and fallback_tags is not None:
        names = _columns_with_tags(schema, fallback_tags, list_only=True)
        how = "tags " + "+".join(t.value for t in fallback_tags) + " on a list column"
    if len(names) > 1:
        raise SchemaRoleError(
            f"ambiguous {role} column: {names} all match {how}. Keep one, or set "
            f"properties {{{ROLE_PROPERTY!r}: {role!r}}} on exactly one column."
        )
    if names:
        return names[0]
    if required:
        raise SchemaRoleError(
            f"no {role} column in schema (columns: {schema.column_names}). Expected a list column with "
            f"property {ROLE_PROPERTY}={role!r}"
            + (f" or tags {'+'.join(t.value for t in fallback_tags)}" if fallback_tags else "")
            + "; produce the dataset with merlin_hstu.workflows.session_workflow.preprocess."
        )
    return None


def role_column(schema: Schema, role: str) -> Optional[str]:
    """Name of the one column with property merlin_hstu_role=`role`, or None (several are an error)."""
    return _find(schema, role, None, required=False)


def item_list_column(schema: Schema) -> str:
    """Name of the item-id sequence column (required)."""
    from merlin.schema import Tags

    return _find(schema, ROLE_ITEM, (Tags.ITEM, Tags.ID), required=True)


def action_list_column(schema: Schema) -> Optional[str]:
    """Name of the action sequence column, or None. Merlin has no action tag: found by role property only."""
    return _find(schema, ROLE_ACTION, None, required=False)


def timestamp_list_column(schema: Schema) -> Optional[str]:
    """Name of the timestamp sequence column (unix seconds), or None."""
    from merlin.schema import Tags

    return _find(schema, ROLE_TIMESTAMP, (Tags.TIME,), required=False)


def interleaved_list_column(schema: Schema) -> Optional[str]:
    """Name of the interleaved item/action token column, or None when interleaving was off."""
    return _find(schema, ROLE_INTERLEAVED, None, required=False)


def semantic_id_list_column(schema: Schema) -> Optional[str]:
    """Name of the semantic-ID token column, or None when the dataset has none."""
    return _find(schema, ROLE_SEMANTIC_ID, None, required=False)


def length_column(schema: Schema) -> Optional[str]:
    """Name of the per-row event-count column, or None."""
    return _find(schema, ROLE_LENGTH, None, required=False)


def id_column(schema: Schema) -> Optional[str]:
    """Name of the user or session id column (role property, then USER_ID / SESSION_ID tags), or None."""
    from merlin.schema import Tags

    names = _columns_with_role(schema, ROLE_USER_ID) + _columns_with_role(schema, ROLE_SESSION_ID)
    if not names:
        names = [
            c.name
            for c in schema
            if not _is_list(c) and Tags.ID in c.tags and (Tags.USER in c.tags or Tags.SESSION in c.tags)
        ]
    if len(names) > 1:
        raise SchemaRoleError(f"ambiguous user/session id column: {names}; keep exactly one.")
    return names[0] if names else None


def embedding_table_size(schema: Schema, column: str) -> int:
    """Rows an embedding table for categorical `column` needs: int_domain.max + 1 (ids 0..max)."""
    domain = schema[column].int_domain
    if domain is None or domain.max is None:
        raise SchemaRoleError(
            f"column {column!r} has no int_domain.max; it must come from a fitted Categorify "
            "(run merlin_hstu.workflows.session_workflow.preprocess)."
        )
    return int(domain.max) + 1


def action_token_offset(schema: Schema) -> int:
    """K in the interleaved encoding: action token = encoded action id + K (K = item cardinality)."""
    name = interleaved_list_column(schema)
    if name is None:
        raise SchemaRoleError(
            f"no {ROLE_INTERLEAVED} column in schema (columns: {schema.column_names}); "
            "preprocess with SessionWorkflowConfig(interleave_actions=True)."
        )
    value = schema[name].properties.get(ACTION_TOKEN_OFFSET_PROPERTY)
    if value is None:
        raise SchemaRoleError(f"column {name!r} lacks property {ACTION_TOKEN_OFFSET_PROPERTY!r}")
    return int(value)
