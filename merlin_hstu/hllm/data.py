"""HLLM data: item texts of the public datasets, joined to a preprocessed dataset's encoded ids, and the
cold-start protocol.

Recipes (`ITEM_TEXT_RECIPES`): which metadata file a dataset's item texts come from and which columns are text.

    ml-1m, ml-1m-prefix   movies.dat (latin-1, `MovieID::Title::Genres`)   title, genres ("|" -> ", ")
    ml-20m, ml-latest-small  movies.csv (`movieId,title,genres`)           title, genres
    ml-100k               u.item (`id|title|release date|...`)             title, release_date

    data_dir = prepare_dataset("ml-1m-prefix", cache_root="runs/bench/cache", max_history=200)
    data = load_hllm_data(data_dir)              # SequenceTable + texts by encoded id

`prepare_dataset` runs the dataset's session workflow once (merlin_hstu.workflows.datasets) and the item-text step
(merlin_hstu.workflows.item_text) once, both cached under `cache_root`.

Cold start (`cold_start_split`): a seeded `fraction` of the items that occur in the data is made cold.  Each user's
sequence s_1..s_T becomes [s_j for j < T if s_j is warm] + [s_T]: leave-one-out (merlin_hstu.retrieval.data) then
trains on warm items only (history and train target both come from the warm prefix) and evaluates s_T after the
warm history.  `cold_eval_samples` keeps the evaluation samples whose target is cold; every catalogue item, cold
ones included, is ranked.  Training negatives are drawn from the warm items only (`ColdStartSplit.warm_pool`), so
a cold item never appears in training, not even as a negative.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import numpy as np
import pandas as pd

from merlin_hstu.common import schema as roles
from merlin_hstu.retrieval.data import LeaveOneOut, SequenceTable, load_processed


@dataclass(frozen=True)
class ItemTextRecipe:
    file: str  # the metadata file in the dataset's input directory
    reader: str  # name of the reader in merlin_hstu.workflows.datasets
    text_columns: Tuple[str, ...]
    separators: Tuple[Tuple[str, str], ...] = ()


_MOVIES_DAT = ItemTextRecipe("movies.dat", "read_movielens_dat_movies", ("title", "genres"), (("genres", "|"),))
_MOVIES_CSV = ItemTextRecipe("movies.csv", "read_movielens_csv_movies", ("title", "genres"), (("genres", "|"),))
ITEM_TEXT_RECIPES: Dict[str, ItemTextRecipe] = {
    "ml-1m": _MOVIES_DAT,
    "ml-1m-prefix": _MOVIES_DAT,
    "ml-20m": _MOVIES_CSV,
    "ml-latest-small": _MOVIES_CSV,
    "ml-100k": ItemTextRecipe("u.item", "read_movielens_100k_items", ("title", "release_date")),
}


def read_item_metadata(name: str, input_dir: Optional[str | Path] = None) -> Tuple[pd.DataFrame, ItemTextRecipe, Path]:
    """(metadata frame with item_id + text columns, its recipe, the file read) of a known dataset."""
    from merlin_hstu.workflows import datasets

    if name not in ITEM_TEXT_RECIPES:
        raise ValueError(f"no item-text recipe for dataset {name!r}; known: {sorted(ITEM_TEXT_RECIPES)}. For other "
                         "data call merlin_hstu.workflows.item_text.write_item_text with your metadata table")
    recipe = ITEM_TEXT_RECIPES[name]
    source = Path(input_dir) if input_dir else datasets.default_input_dir(name)
    if source is None:
        raise ValueError(f"dataset {name!r} is not staged here: pass the directory holding {recipe.file}")
    path = datasets.locate(Path(source), recipe.file, name)
    frame = getattr(datasets, recipe.reader)(path)
    return frame, recipe, path


def prepare_item_text(dataset_dir: str | Path, name: str, input_dir: Optional[str | Path] = None,
                      overwrite: bool = False):
    """Write `<dataset_dir>/item_text/` for a known dataset (once; `overwrite` rebuilds it)."""
    from merlin_hstu.workflows.item_text import ITEM_TEXT_DIR, read_item_text, write_item_text

    dataset_dir = Path(dataset_dir)
    if (dataset_dir / ITEM_TEXT_DIR / "schema.pbtxt").is_file() and not overwrite:
        return read_item_text(dataset_dir)
    frame, recipe, path = read_item_metadata(name, input_dir)
    return write_item_text(dataset_dir, frame, recipe.text_columns, raw_id_column=roles.LOG_ITEM_ID,
                           separators=dict(recipe.separators), source=str(path))


def prepare_dataset(name: str, cache_root: str | Path, max_history: int = 200,
                    input_dir: Optional[str | Path] = None) -> Path:
    """The dataset preprocessed by its session workflow (cached at `cache_root/<name>-h<max_history>`, the
    directory `merlin-hstu bench` uses too) with its item table; returns the dataset directory."""
    from merlin_hstu.workflows.datasets import cached_dataset

    out = cached_dataset(name, cache_root, max_history, input_dir)
    prepare_item_text(out, name, input_dir)
    return out


@dataclass
class HLLMData:
    """Sequences and item texts of one preprocessed dataset."""

    table: SequenceTable
    texts: np.ndarray  # object [num_items]: the text of each encoded id (None: no item there)
    path: Optional[Path] = None

    def __post_init__(self) -> None:
        if len(self.texts) != self.table.num_items:
            raise ValueError(f"texts has {len(self.texts)} rows for a table of {self.table.num_items} item ids")
        candidates = self.table.candidate_ids.numpy()
        missing = [int(i) for i in candidates if self.texts[i] is None]
        if missing:
            raise ValueError(f"{len(missing)} catalogue item(s) have no text (encoded ids e.g. {missing[:5]}); "
                             "rebuild the item table (merlin_hstu.workflows.item_text) with their metadata")


def load_hllm_data(dataset_dir: str | Path) -> HLLMData:
    """The dataset's sequences (merlin_hstu.retrieval.data.load_processed) and item texts by encoded id."""
    from merlin_hstu.workflows.item_text import read_item_text

    table = load_processed(dataset_dir)
    items = read_item_text(dataset_dir)
    return HLLMData(table, items.text_by_id(table.num_items), Path(dataset_dir))


def first_users(table: SequenceTable, count: int) -> SequenceTable:
    """The first `count` sequences (small runs); the catalogue is unchanged."""
    if count <= 0 or count >= len(table.items):
        return table
    return dataclasses.replace(
        table, items=table.items[:count], keys=table.keys[:count],
        timestamps=None if table.timestamps is None else table.timestamps[:count],
        actions=None if table.actions is None else table.actions[:count])


@dataclass
class ColdStartSplit:
    table: SequenceTable  # per user: the warm events before the last one, then the last event
    cold_items: np.ndarray  # sorted encoded ids that never appear in training
    warm_pool: np.ndarray  # catalogue ids training may use (negatives): the catalogue minus the cold items


def cold_start_split(table: SequenceTable, fraction: float = 0.15, seed: int = 0) -> ColdStartSplit:
    """The cold-start protocol's sequences (module docstring)."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"cold-start fraction must be in (0, 1), got {fraction!r}")
    occurring = np.unique(np.concatenate([np.asarray(s, dtype=np.int64) for s in table.items]))
    count = int(round(fraction * len(occurring)))
    if count < 1:
        raise ValueError(f"{fraction:.0%} of {len(occurring)} items is no item: use more data or a larger fraction")
    cold = np.sort(np.random.default_rng(seed).choice(occurring, size=count, replace=False))
    is_cold = np.zeros(table.num_items, dtype=bool)
    is_cold[cold] = True
    items, times = [], [] if table.timestamps is not None else None
    for row, seq in enumerate(table.items):
        seq = np.asarray(seq, dtype=np.int64)
        keep = np.append(~is_cold[seq[:-1]], True)
        items.append(seq[keep])
        if times is not None:
            times.append(np.asarray(table.timestamps[row], dtype=np.int64)[keep])
    actions = None
    if table.actions is not None:
        actions = [np.asarray(a)[np.append(~is_cold[np.asarray(s)[:-1]], True)]
                   for a, s in zip(table.actions, table.items)]
    cold_table = dataclasses.replace(table, items=items, timestamps=times, actions=actions)
    catalogue = table.candidate_ids.numpy()
    return ColdStartSplit(cold_table, cold, catalogue[~is_cold[catalogue]])


def eval_samples_where(split: LeaveOneOut, keep: Callable[[np.ndarray], np.ndarray]):
    """The evaluation samples of `split` whose target ids satisfy `keep(targets) -> bool mask` (same layout as
    `split.eval`; for `evaluate_model(..., samples=...)`)."""
    samples = split.eval
    targets = samples.ids[np.arange(len(samples.lengths)), samples.lengths]
    mask = np.asarray(keep(targets), dtype=bool)
    if not mask.any():
        raise ValueError("no evaluation sample satisfies the filter (e.g. no user's last item is cold); use more "
                         "users or another seed")
    fields = {f.name: getattr(samples, f.name) for f in dataclasses.fields(samples)}
    return dataclasses.replace(samples, **{k: (None if v is None else v[mask]) for k, v in fields.items()})


def cold_eval_samples(split: LeaveOneOut, cold_items: np.ndarray):
    """Evaluation samples whose held-out target is a cold item."""
    return eval_samples_where(split, lambda targets: np.isin(targets, cold_items))
