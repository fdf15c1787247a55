"""Sharded torchrec tables: `DistributedModelParallel` with torchrec's planner and a fused sparse optimizer.

    dmp = shard_model(module, ctx, sharding="auto", sparse_optimizer="rowwise_adagrad", learning_rate=0.01)

* Every torchrec collection inside `module` (`merlin_hstu.common.embeddings.TorchrecTables`) is sharded across
  the ranks by the plan of `EmbeddingShardingPlanner` over a `Topology(world_size, compute_device)`.
  `sharding`: "auto" (the planner's choice per table), or every table "table_wise" (whole tables on single
  ranks), "row_wise" (each rank a block of rows) or "column_wise" (each rank a block of columns).
* The tables train with a fused optimizer inside fbgemm's table-batched embedding kernel (the update happens in
  the backward pass; `dmp.fused_optimizer` holds its state). On CPU fbgemm offers exact row-wise Adagrad, Adagrad
  and SGD; Adam needs CUDA.
* Every other parameter is replicated and wrapped in `DistributedDataParallel` (its gradients averaged over the
  ranks); `dense_parameters(dmp)` lists them for the dense optimizer.
* The sharded module starts from exactly the weights `module` holds (the seeded single-process initialisation):
  `load_full_state` copies each rank's block of every full tensor into its shard. `gather_full_state` is the
  reverse (every rank gets the full tensors), e.g. to write a run directory or to unshard at the end.

Gradient scale: torchrec divides the tables' gradients by the world size on their way back to the shards, as DDP
averages the dense gradients, so a loss scaled as the training loop scales it (its share of the global batch,
times the world size) gives every parameter the gradient of the global batch.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Dict, List, Tuple

import torch
from torch import nn

from merlin_hstu.common.embeddings import TorchrecTables, quiet_fx_notice

SHARDING_TYPES = ("auto", "table_wise", "row_wise", "column_wise")
#: train.sparse_optimizer -> fbgemm EmbOptimType name
SPARSE_OPTIMIZERS = {"rowwise_adagrad": "EXACT_ROWWISE_ADAGRAD", "adagrad": "EXACT_ADAGRAD", "sgd": "EXACT_SGD",
                     "adam": "ADAM"}
CUDA_ONLY_OPTIMIZERS = ("adam",)


def check_settings(sharding: str, sparse_optimizer: str) -> None:
    if sharding not in SHARDING_TYPES:
        raise ValueError(f"train.sharding must be one of {list(SHARDING_TYPES)}, got {sharding!r}")
    if sparse_optimizer not in SPARSE_OPTIMIZERS:
        raise ValueError(f"train.sparse_optimizer must be one of {list(SPARSE_OPTIMIZERS)}, got {sparse_optimizer!r}")


def torchrec_collections(module: nn.Module) -> List[TorchrecTables]:
    return [m for m in module.modules() if isinstance(m, TorchrecTables)]


@contextmanager
def _quiet_planner():
    """The planner warns that a hand-built Topology skips hardware discovery and that dry-run sizes are estimates:
    both expected here (the topology is the process group's)."""
    loggers = [logging.getLogger(name) for name in ("torchrec.distributed.planner.types",
                                                     "torchrec.distributed.planner.storage_reservations",
                                                     "torchrec.distributed.planner.planners",
                                                     "torchrec.distributed.planner.stats")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def shard_model(module: nn.Module, ctx, sharding: str = "auto", sparse_optimizer: str = "rowwise_adagrad",
                learning_rate: float = 0.01, eps: float = 1e-8):
    """`DistributedModelParallel(module)`: its torchrec tables sharded by the planner, trained by the fused
    `sparse_optimizer`; every other parameter under DDP. All ranks call this together."""
    import warnings

    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    from torchrec.distributed import DistributedModelParallel
    from torchrec.distributed.embedding import EmbeddingCollectionSharder
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
    from torchrec.distributed.types import ShardingEnv

    check_settings(sharding, sparse_optimizer)
    quiet_fx_notice()
    if sparse_optimizer in CUDA_ONLY_OPTIMIZERS and ctx.device.type != "cuda":
        raise ValueError(f"train.sparse_optimizer={sparse_optimizer!r} runs on CUDA only (fbgemm's CPU kernel "
                         f"offers {[k for k in SPARSE_OPTIMIZERS if k not in CUDA_ONLY_OPTIMIZERS]}); choose one "
                         "of those or train on --device cuda")
    collections = torchrec_collections(module)
    if not collections:
        raise ValueError("nothing to shard: the model has no torchrec tables (set model.embeddings=torchrec)")
    full = {k: v.detach().clone() for k, v in module.state_dict().items()}
    fused = {"optimizer": getattr(EmbOptimType, SPARSE_OPTIMIZERS[sparse_optimizer]),
             "learning_rate": float(learning_rate), "eps": float(eps)}
    sharders = [EmbeddingCollectionSharder(fused_params=fused), EmbeddingBagCollectionSharder(fused_params=fused)]
    constraints = None
    if sharding != "auto":
        constraints = {spec.table_name: ParameterConstraints(sharding_types=[sharding])
                       for tables in collections for spec in tables.specs}
    with _quiet_planner(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        topology = Topology(world_size=ctx.world_size, compute_device=ctx.device.type)
        try:
            plan = EmbeddingShardingPlanner(topology=topology, constraints=constraints).collective_plan(
                module, sharders, ctx.group)
        except RuntimeError as exc:
            if "No available sharding type" not in str(exc):
                raise
            kinds = sorted({"EmbeddingBagCollection" if getattr(t, "pooled", False) else "EmbeddingCollection"
                            for t in collections})
            raise ValueError(f"train.sharding={sharding}: torchrec 1.8 has no {ctx.device.type} kernel for that "
                             f"sharding of these tables ({', '.join(kinds)}); pooled CTR tables shard row_wise on "
                             "CUDA only. Use train.sharding=auto, table_wise or column_wise here") from exc
        dmp = DistributedModelParallel(module, env=ShardingEnv.from_process_group(ctx.group), device=ctx.device,
                                       plan=plan, sharders=sharders)
    load_full_state(dmp, full)
    return dmp


def plan_summary(dmp) -> Dict[str, Tuple[str, List[int]]]:
    """{table: (sharding type, ranks holding it)} of a sharded module."""
    out = {}
    for module_plan in dmp.plan.plan.values():
        for table, param in module_plan.items():
            out[table] = (param.sharding_type, list(param.ranks or []))
    return out


def _is_sharded(value) -> bool:
    return hasattr(value, "local_shards")


def load_full_state(dmp, full: Dict[str, torch.Tensor]) -> None:
    """Copy full tensors (keys of `dmp.state_dict()`) into the sharded module: each rank its shards' blocks."""
    state = dmp.state_dict()
    missing = sorted(set(state) - set(full))
    if missing:
        raise KeyError(f"the full state lacks {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    with torch.no_grad():
        for key, value in state.items():
            source = full[key]
            if _is_sharded(value):
                for shard in value.local_shards():
                    offsets, sizes = shard.metadata.shard_offsets, shard.metadata.shard_sizes
                    block = source[tuple(slice(o, o + s) for o, s in zip(offsets, sizes))]
                    shard.tensor.copy_(block.to(shard.tensor.device, shard.tensor.dtype))
            else:
                value.copy_(source.to(value.device, value.dtype))


def gather_full_state(dmp, ctx) -> Dict[str, torch.Tensor]:
    """Every tensor of `dmp.state_dict()` in full, on the CPU, on every rank (a collective)."""
    import warnings

    out = {}
    with warnings.catch_warnings():  # "ShardedTensor is deprecated in favour of DTensor": torchrec's state dicts
        warnings.simplefilter("ignore", FutureWarning)
        state = dmp.state_dict()
    for key, value in state.items():
        if _is_sharded(value):
            device = value.local_shards()[0].tensor.device if value.local_shards() else ctx.device
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                full = torch.empty(tuple(value.size()), dtype=value.dtype, device=device)
            value.gather(dst=0, out=full if ctx.rank == 0 else None)
            ctx.broadcast(full, src=0)
            out[key] = full.cpu()
        else:
            out[key] = value.detach().cpu().clone()
    return out


def dense_parameters(dmp) -> List[Tuple[str, torch.nn.Parameter]]:
    """The parameters the dense optimizer updates: all but the fused-optimizer tables."""
    from torchrec.optim.optimizers import in_backward_optimizer_filter

    return list(in_backward_optimizer_filter(dmp.named_parameters()))


class ParameterSubset:
    """What a task's `make_optimizer(model)` is given in a sharded run: `.parameters()` / `.named_parameters()` of
    the dense parameters only (the tables have their fused optimizer)."""

    def __init__(self, named: List[Tuple[str, torch.nn.Parameter]]):
        self._named = list(named)

    def parameters(self):
        return iter([p for _, p in self._named])

    def named_parameters(self):
        return iter(self._named)


def set_sparse_learning_rate(optimizer, learning_rate: float) -> None:
    """The fused optimizer's learning rate for the next backward pass (its step() hands it to the kernel)."""
    for group in optimizer.param_groups:
        group["lr"] = learning_rate
    optimizer.step()
