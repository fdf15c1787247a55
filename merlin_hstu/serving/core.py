"""Run an exported serving Ensemble on a batch of validated requests (in the Triton model, or in-process).

Several requests are served by one pass through the graph: the contract stacks them into one table
(`contract.table`: ragged columns as values + shifted offsets, per-request options repeated per row), the
Ensemble's operators (NVTabular workflow, TorchScript program) run once, and the contract cuts the output back
into per-request results (`contract.split`).  Stacking never mixes requests: every user / row is its own row
through the whole graph.  The same class serves all three tasks; only the contract differs.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Sequence

from merlin_hstu.serving.contract import ServingContract


class ServingEnsemble:
    """A loaded serving Ensemble (graph + op artifacts) and the contract its requests follow."""

    def __init__(self, ensemble, contract: ServingContract):
        from merlin.dag.runtime import Runtime

        self.ensemble = ensemble
        self.contract = contract
        self.runtime = Runtime()

    @classmethod
    def load(cls, ensemble_dir: str | Path, contract: ServingContract) -> "ServingEnsemble":
        """What the Triton model does when it loads: Ensemble.load, then every operator's artifacts."""
        from merlin.systems.dag.ensemble import Ensemble

        from merlin_hstu.serving.ops import graph_ops

        ensemble = Ensemble.load(str(ensemble_dir))
        for op in graph_ops(ensemble):
            op.load_artifacts(str(ensemble_dir))
        return cls(ensemble, contract)

    def transform(self, table):
        return self.ensemble.transform(table, runtime=self.runtime)

    def run(self, requests: Sequence) -> List[tuple]:
        """Validated requests -> per request, its output arrays in `contract.outputs()` order
        (retrieval: raw item ids [B_i, K_i], scores [B_i, K_i])."""
        return self.contract.split(self.transform(self.contract.table(requests)), requests)
