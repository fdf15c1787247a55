"""Run the exported serving Ensemble on a batch of validated requests (in the Triton core model, or in-process).

Several requests are served by one pass through the graph: their users are stacked into one TensorTable
(ragged columns as values + shifted offsets; per-user options repeated per row), the NVTabular workflow and
the TorchScript program run once, and the [sum B_i, K_max] results are cut back into per-request
[B_i, K_i] blocks.  Stacking never mixes users: every user is its own row through the whole graph.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Sequence, Tuple

import numpy as np

from merlin_hstu.serving.contract import (
    EXCLUDE_HISTORY,
    OUT_ITEM_IDS,
    OUT_SCORES,
    QUERY_TIMESTAMP,
    TOP_K,
    RequestContract,
    ValidRequest,
)


def stack_requests(contract: RequestContract, requests: Sequence[ValidRequest]):
    """One TensorTable holding every user of `requests`, in order."""
    from merlin.table import TensorTable

    columns = {contract.id_column: np.concatenate([r.ids for r in requests])}
    shifts = np.cumsum([0] + [int(r.offsets[-1]) for r in requests[:-1]])
    offsets = np.concatenate([requests[0].offsets[:1]] + [r.offsets[1:] + s for r, s in zip(requests, shifts)])
    for col in contract.served_list_columns:
        columns[f"{col}__values"] = np.concatenate([r.lists[col] for r in requests])
        columns[f"{col}__offsets"] = offsets.astype(np.int64)
    columns[QUERY_TIMESTAMP] = np.concatenate([r.query_timestamp for r in requests]).astype(np.int64)
    columns[EXCLUDE_HISTORY] = np.concatenate([np.full(r.batch_size, r.exclude_history) for r in requests])
    columns[TOP_K] = np.concatenate([np.full(r.batch_size, r.top_k, dtype=np.int32) for r in requests])
    return TensorTable(columns)


def _dense(column, rows: int) -> np.ndarray:
    """A [rows, K] result column, whether Merlin kept it 2-D or turned it into values + offsets."""
    values = np.asarray(column.values)
    if values.ndim == 2:
        return values
    return values.reshape(rows, -1)


class ServingEnsemble:
    """A loaded serving Ensemble (graph + op artifacts) and the contract its requests follow."""

    def __init__(self, ensemble, contract: RequestContract):
        from merlin.dag.runtime import Runtime

        self.ensemble = ensemble
        self.contract = contract
        self.runtime = Runtime()

    @classmethod
    def load(cls, ensemble_dir: str | Path, contract: RequestContract) -> "ServingEnsemble":
        from merlin.systems.dag.ensemble import Ensemble

        from merlin_hstu.serving.ops import graph_ops

        ensemble = Ensemble.load(str(ensemble_dir))
        for op in graph_ops(ensemble):
            op.load_artifacts(str(ensemble_dir))
        return cls(ensemble, contract)

    def run(self, requests: Sequence[ValidRequest]) -> List[Tuple[np.ndarray, np.ndarray]]:
        """-> [(raw item ids [B_i, K_i], scores [B_i, K_i] float32)] per request, best first."""
        table = stack_requests(self.contract, requests)
        rows = sum(r.batch_size for r in requests)
        out = self.ensemble.transform(table, runtime=self.runtime)
        ids, scores = _dense(out[OUT_ITEM_IDS], rows), _dense(out[OUT_SCORES], rows).astype(np.float32)
        results, start = [], 0
        for r in requests:
            stop = start + r.batch_size
            results.append((ids[start:stop, : r.top_k], scores[start:stop, : r.top_k]))
            start = stop
        return results
