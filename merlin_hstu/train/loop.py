"""The one training loop: retrieval, ranking and CTR models all train through `fit`.

    result = fit(task, model, make_optimizer, config, epochs=10, checkpoint_dir=work / "checkpoints", resume=True)

What the loop owns (so that no task writes it again):
* device placement (`config.device`: cpu | cuda | cuda:N | auto) of the model and of every batch;
* precision (`config.precision`: fp32, or bf16 autocast, which runs on CPU too);
* the optimizer step: gradient clipping (`grad_clip`), learning-rate warm-up and schedule (`warmup_steps`,
  `lr_schedule`), a clear error when the loss stops being finite;
* a progress bar with the loss and samples/s; periodic evaluation (`eval_every` epochs) and early stopping on a
  validation split (`early_stopping_patience`, `validation_fraction`; the best weights are restored);
* checkpoints every `checkpoint_every` steps and at every epoch end, written atomically (a temporary file renamed
  into place): model, optimizer, scheduler, every RNG state, the task's data position and sampler state, and the
  loop's own counters. `resume=True` continues from the newest one; a run killed at any point and resumed ends with
  the same weights, losses and metrics as one that was never interrupted (CPU, same seed and config).

What a task provides (`TrainingTask`): its batches for an epoch (deterministic given its state), the loss of a
batch, evaluation, and the state of its own random generators. The task packages hold theirs:
`retrieval.train.RetrievalTrainingTask`, `ranking.train.RankingTrainingTask`, `ctr.train.CTRTrainingTask`.

Seeding is the caller's: seed torch before building the model (the weights' initialisation draws from it); the
loop never reseeds, so a task's numbers do not depend on whether it ran through this loop or a plain one.

Multi-process (a process started by torchrun: `merlin-hstu train --nproc N`; `DistributedRun` below) the same loop
trains data-parallel: every rank draws the same global batch order and trains on its contiguous slice of each
global batch (`task.rank_batches`); a model with torchrec tables has them sharded by `DistributedModelParallel`
with a fused sparse optimizer (`train.sharding`, `train.sparse_optimizer`), every other parameter under DDP. The
loss of a step is the global batch's: rank r's mean loss over its n_r terms (`task.loss_count`) is scaled by
n_r * N / n (n = the all-reduced count, N ranks) before backward, so the averaged gradients are those of the global
mean; the logged loss is sum_r n_r loss_r / n. Checkpoints are `torch.distributed.checkpoint` directories when
tables are sharded (`merlin_hstu.distributed.checkpoint`), else the single-process file written by rank 0; either
resumes on another number of processes. See docs/scaling.md.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Protocol, Tuple

import numpy as np
import torch
from tqdm.auto import tqdm

from merlin_hstu.common.atomic_dir import write_file
from merlin_hstu.train.config import RESUMABLE_CHANGES, LoopConfig, autocast, resolve_device

CHECKPOINT_FORMAT = 1


class TrainingTask(Protocol):
    """What `fit` needs from a task (see the task packages' `train.py`)."""

    name: str
    sample_weighted_loss: bool  # True: an epoch's loss is the mean over samples, False: over batches

    def steps_per_epoch(self) -> int: ...

    def epoch_batches(self, epoch: int) -> Iterator[Any]: ...

    def batch_size(self, batch: Any) -> int: ...

    def loss(self, model: torch.nn.Module, batch: Any) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]: ...

    def evaluate(self, model: torch.nn.Module, split: str, progress: bool = False) -> dict: ...

    def monitor(self, metrics: dict, name: Optional[str]) -> Tuple[str, float]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict, mid_epoch: bool) -> None: ...

    # Multi-process training (optional): this rank's part of every global batch of `epoch_batches(epoch)` (the
    # same order on every rank), and the number of terms the task's mean loss averages over in a batch.
    # def rank_batches(self, epoch: int, rank: int, world_size: int) -> Iterator[Any]: ...
    # def loss_count(self, batch: Any) -> int: ...


class EpochShuffle:
    """A torch.Generator that shuffles every epoch, continuing its stream across epochs, and remembers its state at
    the start of the current epoch, so a resumed run can draw the interrupted epoch's order again."""

    def __init__(self, seed: int, device: str | torch.device = "cpu"):
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.epoch_start = self.generator.get_state()

    def begin_epoch(self) -> torch.Generator:
        self.epoch_start = self.generator.get_state()
        return self.generator

    def state_dict(self) -> dict:
        return {"epoch_start": self.epoch_start, "now": self.generator.get_state()}

    def load_state_dict(self, state: dict, mid_epoch: bool) -> None:
        self.generator.set_state(state["epoch_start"] if mid_epoch else state["now"])


def move_to(obj: Any, device: torch.device) -> Any:
    """Tensors inside dicts, lists, tuples and dataclasses (a RankingBatch) moved to `device`; the rest as is.
    A container whose tensors are all there already is returned itself (the CPU path copies nothing)."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, dict):
        moved = {k: move_to(v, device) for k, v in obj.items()}
        return obj if all(moved[k] is v for k, v in obj.items()) else moved
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        moved = [move_to(v, device) for v in obj]
        return obj if all(m is v for m, v in zip(moved, obj)) else type(obj)(moved)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        fields = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj) if f.init}
        moved = {name: move_to(value, device) for name, value in fields.items()}
        if all(moved[name] is value for name, value in fields.items()):
            return obj  # already there: no copy, and no second run of the dataclass's validation per step
        return dataclasses.replace(obj, **moved)
    return obj


def module_device(model: torch.nn.Module) -> torch.device:
    """Where a module's parameters (or buffers) live; CPU for a module without any (e.g. a lookup baseline)."""
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        return tensor.device
    return torch.device("cpu")


def lr_lambda(config: LoopConfig, total_steps: int) -> Callable[[int], float]:
    """Multiplier of the base learning rate after `step` optimizer steps (LambdaLR convention)."""
    warmup, schedule = config.warmup_steps, config.lr_schedule

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        span = max(total_steps - warmup, 1)
        progress = min(max(step - warmup, 0) / span, 1.0)
        return 1.0 - progress if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


@dataclass
class LoopState:
    """The loop's counters, saved in every checkpoint."""

    epoch: int = 0  # the epoch in progress (or next to start)
    step_in_epoch: int = 0  # batches of `epoch` already trained on
    global_step: int = 0
    epoch_loss_sum: float = 0.0
    epoch_count: int = 0
    epoch_extra_sums: Dict[str, float] = field(default_factory=dict)
    epoch_losses: List[float] = field(default_factory=list)
    epoch_extra_losses: List[Dict[str, float]] = field(default_factory=list)
    epoch_metrics: List[Tuple[int, dict]] = field(default_factory=list)
    validation_metrics: List[Tuple[int, dict]] = field(default_factory=list)
    best_value: Optional[float] = None
    best_epoch: int = 0
    evaluations_without_improvement: int = 0
    stopped_early: bool = False
    resumed_from: Optional[int] = None  # global step of the checkpoint this run resumed from


@dataclass
class FitResult:
    model: torch.nn.Module
    metrics: dict  # the final evaluation on the task's eval split
    epoch_losses: List[float]
    epoch_extra_losses: List[Dict[str, float]]
    epoch_metrics: List[Tuple[int, dict]]
    validation_metrics: List[Tuple[int, dict]]
    step_times: List[float]  # seconds per optimizer step (forward + backward + update) in this process
    epoch_seconds: List[float]  # training time per epoch in this process, evaluation excluded
    eval_seconds: float
    steps: int
    stopped_early: bool
    best_epoch: int
    resumed_from: Optional[int]
    device: str
    precision: str
    step_losses: List[float] = field(default_factory=list)  # the loss of every step of this call (multi-process:
    #                                                          the global batch's)

    @property
    def train_seconds(self) -> float:
        return sum(self.epoch_seconds)


# ---------------------------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------------------------
def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def config_fingerprint(description: Any) -> str:
    """A short hash of what must not change between a checkpoint and its resume (config, data)."""
    return hashlib.sha1(json.dumps(description, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_fingerprint(cfg_dict: dict, **data: Any) -> str:
    """`config_fingerprint` of a run's config (its `to_dict()`) and a description of its data, without the loop
    settings a resume may change (`RESUMABLE_CHANGES`: device, threads, checkpoint cadence, sharding) and without
    the config's prose `description` (a preset whose text is reworded is the same run)."""
    cfg = json.loads(json.dumps(cfg_dict, default=str))
    for key in RESUMABLE_CHANGES:
        cfg.get("train", {}).pop(key, None)
    cfg.pop("description", None)
    return config_fingerprint({"config": cfg, **data})


def checkpoint_paths(directory: Path) -> List[Path]:
    """The checkpoints in `directory`, oldest first (temporary files of an interrupted write are ignored)."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.glob("step-*.pt") if p.name[5:-3].isdigit())


def save_checkpoint(directory: Path, payload: dict, step: int, keep: int) -> Path:
    """Write `step-NNNNNNNN.pt` atomically (temporary file, fsync, rename) and drop all but the newest `keep`."""
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"step-{step:08d}.pt"
    write_file(final, lambda tmp: torch.save(payload, tmp))
    for old in checkpoint_paths(directory)[:-keep]:
        old.unlink(missing_ok=True)
    return final


def load_latest_checkpoint(directory: Path) -> Optional[dict]:
    paths = checkpoint_paths(directory)
    if not paths:
        return None
    return torch.load(paths[-1], map_location="cpu", weights_only=False)


def latest_checkpoint(directory: Path) -> Optional[Path]:
    """The newest checkpoint of either kind: a single-process file `step-N.pt` or a sharded `step-N.dcp/`."""
    from merlin_hstu.distributed.checkpoint import sharded_checkpoint_paths

    paths = checkpoint_paths(directory) + sharded_checkpoint_paths(directory)
    return max(paths, key=lambda p: int(p.name[5:13])) if paths else None


def _check_checkpoint(checkpoint: dict, checkpoint_dir: Path, fingerprint: str) -> None:
    """Refuse a checkpoint of another format, config or dataset (before any weight is loaded)."""
    if checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{checkpoint_dir}: checkpoint format {checkpoint.get('format')} is not "
                         f"{CHECKPOINT_FORMAT}; start the run again without --resume")
    if checkpoint["fingerprint"] != fingerprint:
        raise ValueError(f"{checkpoint_dir} holds checkpoints of a different configuration or dataset; "
                         "resume with the same config and data, or train into a new --output")


def _restore(checkpoint: dict, optimizer, scheduler, task, rank: int = 0,
             world_size: int = 1) -> Tuple["LoopState", Optional[dict]]:
    """Restore optimizer, schedule, task and RNG from a checked checkpoint; -> (loop state, best weights). Model
    weights are the caller's (they differ between a single process and sharded tables)."""
    optimizer.load_state_dict(checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["scheduler"])
    state = LoopState(**checkpoint["loop"])
    state.epoch_metrics = [tuple(x) for x in state.epoch_metrics]
    state.validation_metrics = [tuple(x) for x in state.validation_metrics]
    task.load_state_dict(checkpoint["task"], mid_epoch=state.step_in_epoch > 0)
    per_rank = checkpoint.get("rng_per_rank")
    # every rank its own RNG streams when the process count is unchanged; else rank 0's (dropout masks differ)
    _set_rng_state(per_rank[rank] if per_rank and len(per_rank) == world_size else checkpoint["rng"])
    state.resumed_from = state.global_step
    return state, checkpoint.get("best_model")


# ---------------------------------------------------------------------------------------------------------------
# several processes
# ---------------------------------------------------------------------------------------------------------------
class _TaskLoss(torch.nn.Module):
    """The module DDP / DistributedModelParallel wrap: forward(batch) = task.loss(model, batch), so the gradient
    synchronisation sees every step go through a forward (the task's loss calls model methods, not forward)."""

    def __init__(self, task: TrainingTask, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.__dict__["task"] = task  # not a module

    def forward(self, batch):
        return self.task.loss(self.model, batch)


class DistributedRun:
    """The loop's multi-process side (module docstring): the wrapped model, its optimizers, one step, checkpoints."""

    def __init__(self, task: TrainingTask, model: torch.nn.Module, make_optimizer, config: LoopConfig, ctx):
        from merlin_hstu.distributed import sharding

        for method in ("rank_batches", "loss_count"):
            if not callable(getattr(task, method, None)):
                raise ValueError(f"the {task.name} task does not support multi-process training (it has no "
                                 f"{method}); train it in one process (without --nproc)")
        self.task, self.model, self.config, self.ctx = task, model, config, ctx
        model.to(ctx.device)
        self.sparse_optimizer = None
        self.sparse_learning_rate = float(config.sparse_learning_rate or getattr(config, "learning_rate", 0.01))
        if sharding.torchrec_collections(model):
            self.module = sharding.shard_model(_TaskLoss(task, model), ctx, config.sharding, config.sparse_optimizer,
                                               self.sparse_learning_rate)
            self.sparse_optimizer = self.module.fused_optimizer
            if ctx.is_main:
                tables = ", ".join(f"{table} {kind} on ranks {ranks}"
                                   for table, (kind, ranks) in sharding.plan_summary(self.module).items())
                print(f"{ctx.world_size} process(es); sharded tables: {tables}; sparse optimizer "
                      f"{config.sparse_optimizer} (lr {self.sparse_learning_rate:g})", flush=True)
            dense = sharding.dense_parameters(self.module)
            self.optimizer = make_optimizer(sharding.ParameterSubset(dense))
            self.parameters = [p for _, p in dense if p.requires_grad]
        else:
            from torch.nn.parallel import DistributedDataParallel

            self.module = DistributedDataParallel(
                _TaskLoss(task, model), device_ids=[ctx.device] if ctx.device.type == "cuda" else None)
            self.optimizer = make_optimizer(model)
            self.parameters = [p for p in model.parameters() if p.requires_grad]

    @classmethod
    def start(cls, task, model, make_optimizer, config: LoopConfig, device: torch.device) -> Optional["DistributedRun"]:
        """A run for a process started by torchrun (joining its process group), None for a plain process."""
        from merlin_hstu.distributed import context

        if not context.launched():
            return None
        return cls(task, model, make_optimizer, config, context.init_from_env(device))

    @property
    def sharded(self) -> bool:
        return self.sparse_optimizer is not None

    def batches(self, epoch: int):
        return self.task.rank_batches(epoch, self.ctx.rank, self.ctx.world_size)

    def step(self, batch, scheduler, lr_factor: float) -> Tuple[float, Dict[str, float], int]:
        """One optimizer step on this rank's slice -> (global mean loss, global extras, global batch size)."""
        config, ctx = self.config, self.ctx
        batch = move_to(batch, ctx.device)
        count = float(self.task.loss_count(batch))
        if count <= 0:
            raise ValueError(f"rank {ctx.rank}'s share of a global batch has nothing to average its loss over; use a "
                             f"larger train.batch_size for {ctx.world_size} processes")
        with autocast(ctx.device, config.precision):
            loss, extras = self.module(batch)
        keys = sorted(extras)
        local = [count, float(self.task.batch_size(batch)), float(loss.detach()) * count,
                 *(float(extras[k].detach() if torch.is_tensor(extras[k]) else extras[k]) * count for k in keys)]
        totals = ctx.all_reduce_sum(local)
        self.optimizer.zero_grad(set_to_none=True)
        if self.sparse_optimizer is not None:  # the tables update inside backward: their rate is set before it
            from merlin_hstu.distributed.sharding import set_sparse_learning_rate

            set_sparse_learning_rate(self.sparse_optimizer, self.sparse_learning_rate * lr_factor)
        (loss * (count * ctx.world_size / totals[0])).backward()
        if config.grad_clip:  # the dense parameters (their gradients are the same on every rank after DDP)
            torch.nn.utils.clip_grad_norm_(self.parameters, config.grad_clip)
        self.optimizer.step()
        scheduler.step()
        return totals[2] / totals[0], {k: totals[3 + i] / totals[0] for i, k in enumerate(keys)}, int(totals[1])

    # --- weights --------------------------------------------------------------------------------------------
    def full_state(self) -> dict:
        """The model's weights in full on every rank (sharded tables gathered)."""
        if not self.sharded:
            return copy.deepcopy(self.model.state_dict())
        from merlin_hstu.distributed.sharding import gather_full_state

        prefix = "model."
        return {k[len(prefix):]: v for k, v in gather_full_state(self.module, self.ctx).items()}

    def finish(self, best_weights: Optional[dict]) -> None:
        """End of training: `best_weights` (early stopping) loaded; sharded tables gathered and put back as plain
        collections, so the caller's model is a single-process model with the trained weights on every rank."""
        if best_weights is not None:
            self.model.load_state_dict(best_weights) if not self.sharded else self._load_full(best_weights)
        if self.sharded:
            from merlin_hstu.distributed.sharding import torchrec_collections

            weights = self.full_state()
            for tables in torchrec_collections(self.model):
                tables.unshard(self.ctx.device)
            self.model.load_state_dict(weights)
        self.ctx.barrier()

    def _load_full(self, weights: dict) -> None:
        from merlin_hstu.distributed.sharding import load_full_state

        load_full_state(self.module, {f"model.{k}": v for k, v in weights.items()})

    # --- checkpoints ------------------------------------------------------------------------------------------
    def save(self, directory: Path, payload: dict, step: int, keep: int) -> None:
        payload = {**payload, "rng_per_rank": self.ctx.all_gather_object(payload["rng"]),
                   "world_size": self.ctx.world_size}
        payload["rng"] = payload["rng_per_rank"][0]
        if self.sharded:
            from merlin_hstu.distributed.checkpoint import save_sharded

            save_sharded(directory, step, self.module, self.sparse_optimizer, payload, self.ctx, keep)
            return
        if self.ctx.is_main:  # replicated weights: rank 0 writes the single-process format
            save_checkpoint(directory, {**payload, "model": self.model.state_dict()}, step, keep)
        self.ctx.barrier()

    def resume(self, latest: Path, directory: Path, fingerprint: str, scheduler, task):
        if latest.is_dir() != self.sharded:
            kind = "sharded torchrec tables" if latest.is_dir() else "a single process or replicated tables"
            raise ValueError(f"{latest} was written by a run with {kind}; resume it with the same model.embeddings "
                             "(sharded tables: model.embeddings=torchrec under --nproc)")
        if self.sharded:
            from merlin_hstu.distributed.checkpoint import load_sharded, read_trainer_state

            checkpoint = read_trainer_state(latest)
            _check_checkpoint(checkpoint, directory, fingerprint)
            load_sharded(latest, self.module, self.sparse_optimizer)
        else:
            checkpoint = torch.load(latest, map_location="cpu", weights_only=False)
            _check_checkpoint(checkpoint, directory, fingerprint)
            self.model.load_state_dict(checkpoint["model"])
        return _restore(checkpoint, self.optimizer, scheduler, task, self.ctx.rank, self.ctx.world_size)


# ---------------------------------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------------------------------
def fit(task: TrainingTask, model: torch.nn.Module,
        make_optimizer: Callable[[torch.nn.Module], torch.optim.Optimizer], config: LoopConfig, *,
        epochs: int, max_steps: int = 0, eval_every: int = 0, checkpoint_dir: Optional[Path] = None,
        resume: bool = False, fingerprint: str = "", progress: bool = True, desc: str = "train",
        log_epoch: Optional[Callable[[int, float, dict], None]] = None,
        stop_after_steps: int = 0, log_interval: float = 30.0) -> FitResult:
    """Train `model` on `task` for `epochs` (or `max_steps` optimizer steps in all), then evaluate it.

    `make_optimizer(model)` is called after the model is on its device. `eval_every`: evaluate the eval split every
    n epochs (0: only at the end). `checkpoint_dir`: where checkpoints go (None: no checkpoints, no resume).
    `fingerprint`: a resumed checkpoint must carry the same one (see `config_fingerprint`).
    `stop_after_steps`: end the process's training after this many steps *of this call* without the final
    evaluation (for tests and smoke runs of resuming; 0: off). Without a progress bar, a line with the step, loss
    and samples/s is printed at least every `log_interval` seconds, so a long quiet run still says it is alive."""
    log_epoch = log_epoch or (lambda epoch, loss, metrics: None)
    if getattr(config, "streaming", False) and not getattr(task, "streams", False):
        raise ValueError(f"train.streaming: the {task.name} task reads its data in memory (streaming is implemented "
                         "for the retrieval, ranking and CTR tasks); set train.streaming=false")
    checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    device = resolve_device(config.device)
    run = DistributedRun.start(task, model, make_optimizer, config, device)
    if run is None:
        model.to(device)
        optimizer = make_optimizer(model)
    else:
        device, optimizer = run.ctx.device, run.optimizer
    reports = run is None or run.ctx.is_main  # one process reports
    if not reports:
        progress, log_epoch = False, (lambda epoch, loss, metrics: None)
    steps_per_epoch = task.steps_per_epoch()
    if steps_per_epoch < 1:
        raise ValueError(f"the {task.name} training split has no batches to train on")
    total_steps = epochs * steps_per_epoch
    if max_steps:
        total_steps = min(total_steps, max_steps)
    schedule = lr_lambda(config, total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    state = LoopState()
    best_weights = None

    if resume and checkpoint_dir is not None:
        latest = latest_checkpoint(checkpoint_dir)
        if latest is not None and run is not None:
            state, best_weights = run.resume(latest, checkpoint_dir, fingerprint, scheduler, task)
        elif latest is not None:
            if latest.is_dir():
                raise ValueError(f"{latest} was written by a multi-process run with sharded torchrec tables; resume "
                                 "it with --nproc N (any N) and the same config")
            checkpoint = torch.load(latest, map_location="cpu", weights_only=False)
            _check_checkpoint(checkpoint, checkpoint_dir, fingerprint)
            model.load_state_dict(checkpoint["model"])
            state, best_weights = _restore(checkpoint, optimizer, scheduler, task)

    def checkpoint() -> None:
        if checkpoint_dir is None:
            return
        payload = {"format": CHECKPOINT_FORMAT, "fingerprint": fingerprint, "optimizer": optimizer.state_dict(),
                   "scheduler": scheduler.state_dict(), "loop": dataclasses.asdict(state),
                   "task": task.state_dict(), "rng": _rng_state(), "best_model": best_weights}
        if run is not None:
            run.save(checkpoint_dir, payload, state.global_step, config.keep_checkpoints)
            return
        payload = {"format": CHECKPOINT_FORMAT, "fingerprint": fingerprint, "model": model.state_dict(), **payload}
        save_checkpoint(checkpoint_dir, payload, state.global_step, config.keep_checkpoints)

    step_times: List[float] = []
    step_losses: List[float] = []
    epoch_seconds: List[float] = []
    eval_seconds = 0.0
    steps_this_call = 0
    interrupted = False
    bar = tqdm(total=total_steps, initial=state.global_step, desc=desc, unit="step", disable=not progress)
    last_log, logged_samples, logged_time = time.monotonic(), 0, 0.0
    parameters = [p for p in model.parameters() if p.requires_grad] if run is None else run.parameters
    while state.epoch < epochs and not state.stopped_early:
        if max_steps and state.global_step >= max_steps:
            break  # a smoke run: the step budget is spent
        epoch = state.epoch
        model.train()
        batches = task.epoch_batches(epoch) if run is None else run.batches(epoch)
        if state.step_in_epoch:  # resuming mid-epoch: the same order, the trained-on batches skipped
            batches = itertools.islice(batches, state.step_in_epoch, None)
        epoch_start = time.perf_counter()
        for batch in batches:
            if max_steps and state.global_step >= max_steps:
                break
            if stop_after_steps and steps_this_call >= stop_after_steps:
                interrupted = True
                break
            t0 = time.perf_counter()
            if run is None:
                batch = move_to(batch, device)
                with autocast(device, config.precision):
                    loss, extras = task.loss(model, batch)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if config.grad_clip:
                    torch.nn.utils.clip_grad_norm_(parameters, config.grad_clip)
                optimizer.step()
                scheduler.step()
                value = loss.item()
                samples = task.batch_size(batch)
            else:  # this rank's slice of the global batch; value, extras and samples are the global batch's
                value, extras, samples = run.step(batch, scheduler, schedule(state.global_step))
            step_times.append(time.perf_counter() - t0)
            step_losses.append(value)
            if not math.isfinite(value):
                raise FloatingPointError(
                    f"the training loss became {value} at step {state.global_step + 1} (epoch {epoch + 1}); lower "
                    "train.learning_rate, set train.grad_clip, or use train.precision=fp32")
            state.global_step += 1
            state.step_in_epoch += 1
            steps_this_call += 1
            weight = samples if task.sample_weighted_loss else 1  # epoch loss: per sample or per batch
            state.epoch_loss_sum += value * weight
            state.epoch_count += weight
            for key, extra in extras.items():
                state.epoch_extra_sums[key] = state.epoch_extra_sums.get(key, 0.0) + float(extra.detach() if torch.is_tensor(extra) else extra) * weight
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{value:.4f}", samples_s=f"{samples / max(step_times[-1], 1e-9):.0f}")
            logged_samples, logged_time = logged_samples + samples, logged_time + step_times[-1]
            if not progress and reports and time.monotonic() - last_log >= log_interval:
                print(f"{desc}: epoch {epoch + 1}, step {state.global_step}/{total_steps}, loss {value:.4f}, "
                      f"{logged_samples / max(logged_time, 1e-9):.0f} samples/s", flush=True)
                last_log, logged_samples, logged_time = time.monotonic(), 0, 0.0
            if config.checkpoint_every and state.global_step % config.checkpoint_every == 0:
                checkpoint()
        epoch_seconds.append(time.perf_counter() - epoch_start)
        if interrupted:
            break
        # --- end of the epoch ---
        count = max(state.epoch_count, 1)
        state.epoch_losses.append(state.epoch_loss_sum / count)
        state.epoch_extra_losses.append({k: v / count for k, v in state.epoch_extra_sums.items()})
        state.epoch_loss_sum, state.epoch_count, state.epoch_extra_sums = 0.0, 0, {}
        state.epoch, state.step_in_epoch = epoch + 1, 0
        last = state.epoch >= epochs or bool(max_steps and state.global_step >= max_steps)
        t0 = time.perf_counter()
        if config.early_stopping_patience or config.validates:
            validation = task.evaluate(model, "validation")
            state.validation_metrics.append((state.epoch, validation))
            name, monitored = task.monitor(validation, config.early_stopping_metric)
            if state.best_value is None or monitored > state.best_value:
                state.best_value, state.best_epoch = monitored, state.epoch
                state.evaluations_without_improvement = 0
                best_weights = copy.deepcopy(model.state_dict()) if run is None else run.full_state()
            else:
                state.evaluations_without_improvement += 1
                if config.early_stopping_patience and \
                        state.evaluations_without_improvement >= config.early_stopping_patience:
                    state.stopped_early = True
            bar.set_postfix(epoch=state.epoch, loss=f"{state.epoch_losses[-1]:.4f}", **{f"val_{name}": f"{monitored:.4f}"})
            if not progress and reports:  # a log without a bar still shows how early stopping stands
                patience = (f", {state.evaluations_without_improvement} of {config.early_stopping_patience} "
                            "without improvement" if config.early_stopping_patience else "")
                print(f"{desc}: epoch {state.epoch}, loss {state.epoch_losses[-1]:.4f}, validation {name} "
                      f"{monitored:.4f} (best {state.best_value:.4f} at epoch {state.best_epoch}{patience})",
                      flush=True)
        if eval_every and state.epoch % eval_every == 0 and not last and not state.stopped_early:
            metrics = task.evaluate(model, "eval")
            state.epoch_metrics.append((state.epoch, metrics))
            log_epoch(state.epoch, state.epoch_losses[-1], metrics)
        eval_seconds += time.perf_counter() - t0
        checkpoint()
    bar.close()
    if run is not None:
        run.finish(best_weights if best_weights is not None and config.early_stopping_patience and not interrupted
                   else None)
    if interrupted:
        return FitResult(model, {}, state.epoch_losses, state.epoch_extra_losses, state.epoch_metrics,
                         state.validation_metrics, step_times, epoch_seconds, eval_seconds, state.global_step, False,
                         state.best_epoch, state.resumed_from, str(device), config.precision, step_losses)
    if best_weights is not None and config.early_stopping_patience and run is None:
        model.load_state_dict(best_weights)  # early stopping: the weights of the best validation epoch
    t0 = time.perf_counter()
    metrics = task.evaluate(model, "eval", progress=progress)
    eval_seconds += time.perf_counter() - t0
    state.epoch_metrics.append((len(state.epoch_losses), metrics))
    log_epoch(len(state.epoch_losses), state.epoch_losses[-1] if state.epoch_losses else float("nan"), metrics)
    return FitResult(model, metrics, state.epoch_losses, state.epoch_extra_losses, state.epoch_metrics,
                     state.validation_metrics, step_times, epoch_seconds, eval_seconds, state.global_step,
                     state.stopped_early, state.best_epoch, state.resumed_from, str(device), config.precision,
                     step_losses)
