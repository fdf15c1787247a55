"""Run by tests/test_distributed.py under torchrun: retrieval trainings through the one loop, results as JSON.

    python -m torch.distributed.run --nproc-per-node N tests/distributed_worker.py TABLE.pt OUT.json JOBS.json

JOBS.json: [{"name", "task": "retrieval" | "ctr", "overrides": [...], "checkpoint_dir": null | path,
"stop_after_steps": 0, "resume": false}, ...], run one after another in the same processes; rank 0 writes
{name: {step_losses, epoch_losses, metrics, ...}}. Retrieval trains on TABLE.pt (a pickled SequenceTable, read
from a preprocessed directory by the test: the processes need not import NVTabular), CTR on a seeded in-memory
table (`ctr_data`).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def ctr_data():
    """600 train / 200 valid seeded rows: 3 dense features, 4 categorical ones; the label depends on both."""
    import torch

    from merlin_hstu.ctr.data import CTRData, CTRTensors

    g = torch.Generator().manual_seed(11)
    cards = [20, 30, 15, 25]

    def split(n):
        dense = torch.randn(n, 3, generator=g)
        sparse = torch.stack([torch.randint(0, c, (n,), generator=g) for c in cards], dim=1)
        logit = dense[:, 0] - dense[:, 1] + ((sparse[:, 0] % 3) - 1).float() + ((sparse[:, 1] % 2) * 2 - 1).float()
        labels = (torch.rand(n, generator=g) < torch.sigmoid(logit)).float()
        return CTRTensors(dense, sparse, labels, ["d0", "d1", "d2"], ["c0", "c1", "c2", "c3"], cards)

    return CTRData("seeded", split(600), split(200))


def train_ctr_job(job):
    import torch

    from merlin_hstu.ctr.config import load_config
    from merlin_hstu.ctr.train import train_ctr

    cfg = load_config("dlrm", job["overrides"])
    data = ctr_data()
    torch.manual_seed(cfg.train.seed)
    model = cfg.build_model(data.cardinalities, data.num_dense)
    return train_ctr(model, data, cfg.train, checkpoint_dir=job.get("checkpoint_dir"),
                     resume=job.get("resume", False), fingerprint="test",
                     stop_after_steps=job.get("stop_after_steps", 0))


def main(data: str, out: str, jobs_file: str) -> None:
    import torch

    from merlin_hstu.distributed import context
    from merlin_hstu.retrieval.config import load_config
    from merlin_hstu.retrieval.train import train_retrieval

    torch.set_num_threads(1)
    table = torch.load(data, weights_only=False)
    results = {}
    for job in json.loads(Path(jobs_file).read_text()):
        if job.get("task", "retrieval") == "ctr":
            result = train_ctr_job(job)
            metrics, weight = result.metrics, result.model.embeddings[0].weight
        else:
            cfg = load_config("demo", job["overrides"])
            result = train_retrieval(table, cfg, progress=False, checkpoint_dir=job.get("checkpoint_dir"),
                                     resume=job.get("resume", False), fingerprint="test",
                                     stop_after_steps=job.get("stop_after_steps", 0))
            metrics, weight = result.metrics.get("HSTU"), result.model.item_embedding.weight
        tables = getattr(result.model, "sparse", None)
        results[job["name"]] = {
            "world_size": context.current().world_size, "step_losses": result.fit.step_losses,
            "epoch_losses": result.epoch_losses, "metrics": metrics or None, "resumed_from": result.fit.resumed_from,
            "table_rows": weight.detach()[3:6, :4].tolist(), "sharded_after_fit": bool(tables and tables.sharded)}
    if context.is_main_process():
        Path(out).write_text(json.dumps(results))
    context.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:4])
