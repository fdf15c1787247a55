"""Where item embeddings for a tokenizer come from: a trained ID model, item text, or a user-supplied matrix.

    collaborative  the item table of a trained retrieval run (`merlin-hstu train` / `bench`): E[item] rows, the
                   vectors the model learned from the interactions (merlin_hstu.retrieval.train.load_run)
    text           the item texts of a dataset (its `item_text/` table, merlin_hstu.workflows.item_text) encoded by
                   an item text encoder: the HLLM one (merlin_hstu.hllm: a local language model, cached on disk)
    file           a matrix the user supplies: .npy with one row per encoded item id (row i = item id i) or one row
                   per catalogue item in id order; or .parquet with an `item_id` column and either one list column
                   or several numeric columns

Every function returns float32 [len(item_ids), d] rows aligned with `item_ids` (the encoded catalogue ids) and a
description of the source, which the tokenizer saves (`SemanticIds.source`).  Missing rows are errors naming the
ids and the fix; nothing is filled in.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence, Tuple

import numpy as np

from merlin_hstu.common import schema as roles

SOURCES = ("collaborative", "text", "file")


def collaborative_embeddings(run_dir: str | Path, item_ids: Sequence[int]) -> Tuple[np.ndarray, dict]:
    """Rows of the item embedding table of the retrieval run at `run_dir` (an ID model's learned item vectors)."""
    from merlin_hstu.retrieval.train import load_run

    model, cfg, _ = load_run(run_dir)
    return model_item_embeddings(model, item_ids), {"kind": "collaborative", "run": str(Path(run_dir).resolve()),
                                                    "model": cfg.name}


def model_item_embeddings(model, item_ids: Sequence[int]) -> np.ndarray:
    """The rows `item_ids` of a retrieval model's item table (`HSTURetrievalModel.item_embedding`)."""
    weight = model.item_embedding.weight.detach().cpu().numpy().astype(np.float32)
    ids = np.asarray(item_ids, dtype=np.int64)
    if len(ids) and (ids.min() < 0 or ids.max() >= len(weight)):
        raise ValueError(f"item ids up to {int(ids.max())} but the model's item table has {len(weight)} rows: the "
                         "run was trained on another dataset")
    return weight[ids]


def text_embeddings(dataset_dir: str | Path, item_ids: Sequence[int], encoder, cache=None) -> Tuple[np.ndarray, dict]:
    """The item encoder's vectors of the items' texts (the dataset's `item_text/` table).

    `encoder`: the HLLM item encoder (merlin_hstu.hllm.item_encoder.ItemTextEncoder, a local language model), or any
    object with `encode(texts) -> [n, d]` and `describe()`; `cache`: an on-disk embedding cache with
    `encode(encoder, texts)` (merlin_hstu.hllm.cache.EmbeddingCache) or None.  The caller builds both, so this
    package does not depend on the HLLM package."""
    from merlin_hstu.workflows.item_text import read_item_text

    ids = np.asarray(item_ids, dtype=np.int64)
    table = read_item_text(dataset_dir)
    texts = table.text_by_id(max(int(ids.max()) + 1, int(table.item_ids.max()) + 1))[ids]
    missing = ids[[t is None or t == "" for t in texts]]
    if len(missing):
        raise ValueError(f"{len(missing)} catalogue item(s) have no text in {Path(dataset_dir) / 'item_text'} "
                         f"(encoded ids e.g. {missing[:5].tolist()}); add their metadata or use collaborative "
                         "embeddings (data.embeddings=collaborative)")
    vectors = cache.encode(encoder, list(texts)) if cache is not None else encoder.encode(list(texts))
    vectors = np.asarray(vectors.numpy() if hasattr(vectors, "numpy") else vectors, dtype=np.float32)
    return vectors, {"kind": "text", "dataset": str(Path(dataset_dir).resolve()), "encoder": encoder.describe()}


def file_embeddings(path: str | Path, item_ids: Sequence[int]) -> Tuple[np.ndarray, dict]:
    """A user-supplied matrix (module docstring) as rows aligned with `item_ids`."""
    path = Path(path)
    ids = np.asarray(item_ids, dtype=np.int64)
    if not path.is_file():
        raise FileNotFoundError(f"item embedding file {path} does not exist")
    if path.suffix == ".npy":
        matrix = np.load(path)
        if matrix.ndim != 2:
            raise ValueError(f"{path}: an embedding matrix must be 2-D [rows, dim], got shape {matrix.shape}")
        if len(matrix) == len(ids):
            rows = matrix
        elif len(matrix) > ids.max():
            rows = matrix[ids]
        else:
            raise ValueError(f"{path}: {len(matrix)} rows fit neither the {len(ids)} catalogue items (one row per "
                             f"item, in id order) nor their ids up to {int(ids.max())} (row i = item id i)")
    elif path.suffix in (".parquet", ".pq"):
        import pandas as pd

        frame = pd.read_parquet(path)
        key = roles.ITEM_ID  # encoded item ids, as in an item table
        if key not in frame.columns:
            raise ValueError(f"{path}: needs an {key!r} column of encoded item ids; found {list(frame.columns)}")
        if frame[key].duplicated().any():
            dup = frame.loc[frame[key].duplicated(), key].unique()[:5].tolist()
            raise ValueError(f"{path}: item ids {dup} have more than one row")
        values = [c for c in frame.columns if c != key]
        if len(values) == 1 and frame[values[0]].dtype == object:
            matrix = np.stack([np.asarray(v, dtype=np.float32) for v in frame[values[0]]])
        else:
            matrix = frame[values].to_numpy(dtype=np.float32)
        position = pd.Series(np.arange(len(frame)), index=frame[key].to_numpy(np.int64))
        absent = ids[~np.isin(ids, position.index.to_numpy())]
        if len(absent):
            raise ValueError(f"{path}: {len(absent)} catalogue item(s) have no row (encoded ids e.g. "
                             f"{absent[:5].tolist()}); add them")
        rows = matrix[position.loc[ids].to_numpy()]
    else:
        raise ValueError(f"{path}: item embeddings are read from .npy or .parquet files, not {path.suffix!r}")
    return np.asarray(rows, dtype=np.float32), {"kind": "file", "path": str(path.resolve())}
