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
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Protocol, Tuple

import numpy as np
import torch
from tqdm.auto import tqdm

from merlin_hstu.train.config import LoopConfig, autocast, resolve_device

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


def checkpoint_paths(directory: Path) -> List[Path]:
    """The checkpoints in `directory`, oldest first (temporary files of an interrupted write are ignored)."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.glob("step-*.pt") if p.name[5:-3].isdigit())


def save_checkpoint(directory: Path, payload: dict, step: int, keep: int) -> Path:
    """Write `step-NNNNNNNN.pt` atomically (temporary file, fsync, rename) and drop all but the newest `keep`."""
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"step-{step:08d}.pt"
    tmp = directory / f".{final.name}.tmp-{os.getpid()}"
    with open(tmp, "wb") as handle:
        torch.save(payload, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, final)
    for old in checkpoint_paths(directory)[:-keep]:
        old.unlink(missing_ok=True)
    return final


def load_latest_checkpoint(directory: Path) -> Optional[dict]:
    paths = checkpoint_paths(directory)
    if not paths:
        return None
    return torch.load(paths[-1], map_location="cpu", weights_only=False)


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
    device = resolve_device(config.device)
    model.to(device)
    optimizer = make_optimizer(model)
    steps_per_epoch = task.steps_per_epoch()
    if steps_per_epoch < 1:
        raise ValueError(f"the {task.name} training split has no batches to train on")
    total_steps = epochs * steps_per_epoch
    if max_steps:
        total_steps = min(total_steps, max_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config, total_steps))
    state = LoopState()

    if resume and checkpoint_dir is not None:
        checkpoint = load_latest_checkpoint(checkpoint_dir)
        if checkpoint is not None:
            if checkpoint.get("format") != CHECKPOINT_FORMAT:
                raise ValueError(f"{checkpoint_dir}: checkpoint format {checkpoint.get('format')} is not "
                                 f"{CHECKPOINT_FORMAT}; start the run again without --resume")
            if checkpoint["fingerprint"] != fingerprint:
                raise ValueError(f"{checkpoint_dir} holds checkpoints of a different configuration or dataset; "
                                 "resume with the same config and data, or train into a new --output")
            model.load_state_dict(checkpoint["model"])
            optimizer.load_state_dict(checkpoint["optimizer"])
            scheduler.load_state_dict(checkpoint["scheduler"])
            state = LoopState(**checkpoint["loop"])
            state.epoch_metrics = [tuple(x) for x in state.epoch_metrics]
            state.validation_metrics = [tuple(x) for x in state.validation_metrics]
            task.load_state_dict(checkpoint["task"], mid_epoch=state.step_in_epoch > 0)
            _set_rng_state(checkpoint["rng"])
            state.resumed_from = state.global_step
            best_weights = checkpoint.get("best_model")
        else:
            best_weights = None
    else:
        best_weights = None

    def checkpoint() -> None:
        if checkpoint_dir is None:
            return
        payload = {"format": CHECKPOINT_FORMAT, "fingerprint": fingerprint, "model": model.state_dict(),
                   "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                   "loop": dataclasses.asdict(state), "task": task.state_dict(), "rng": _rng_state(),
                   "best_model": best_weights}
        save_checkpoint(checkpoint_dir, payload, state.global_step, config.keep_checkpoints)

    step_times: List[float] = []
    epoch_seconds: List[float] = []
    eval_seconds = 0.0
    steps_this_call = 0
    interrupted = False
    bar = tqdm(total=total_steps, initial=state.global_step, desc=desc, unit="step", disable=not progress)
    last_log, logged_samples, logged_time = time.monotonic(), 0, 0.0
    parameters = [p for p in model.parameters() if p.requires_grad]
    while state.epoch < epochs and not state.stopped_early:
        if max_steps and state.global_step >= max_steps:
            break  # a smoke run: the step budget is spent
        epoch = state.epoch
        model.train()
        batches = task.epoch_batches(epoch)
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
            step_times.append(time.perf_counter() - t0)
            if not math.isfinite(value):
                raise FloatingPointError(
                    f"the training loss became {value} at step {state.global_step + 1} (epoch {epoch + 1}); lower "
                    "train.learning_rate, set train.grad_clip, or use train.precision=fp32")
            state.global_step += 1
            state.step_in_epoch += 1
            steps_this_call += 1
            weight = task.batch_size(batch) if task.sample_weighted_loss else 1  # epoch loss: per sample or per batch
            state.epoch_loss_sum += value * weight
            state.epoch_count += weight
            for key, extra in extras.items():
                state.epoch_extra_sums[key] = state.epoch_extra_sums.get(key, 0.0) + float(extra.detach() if torch.is_tensor(extra) else extra) * weight
            bar.update(1)
            samples = task.batch_size(batch)
            bar.set_postfix(epoch=epoch + 1, loss=f"{value:.4f}", samples_s=f"{samples / max(step_times[-1], 1e-9):.0f}")
            logged_samples, logged_time = logged_samples + samples, logged_time + step_times[-1]
            if not progress and time.monotonic() - last_log >= log_interval:
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
        if config.early_stopping_patience or config.validation_fraction:
            validation = task.evaluate(model, "validation")
            state.validation_metrics.append((state.epoch, validation))
            name, monitored = task.monitor(validation, config.early_stopping_metric)
            if state.best_value is None or monitored > state.best_value:
                state.best_value, state.best_epoch = monitored, state.epoch
                state.evaluations_without_improvement = 0
                best_weights = copy.deepcopy(model.state_dict())
            else:
                state.evaluations_without_improvement += 1
                if config.early_stopping_patience and \
                        state.evaluations_without_improvement >= config.early_stopping_patience:
                    state.stopped_early = True
            bar.set_postfix(epoch=state.epoch, loss=f"{state.epoch_losses[-1]:.4f}", **{f"val_{name}": f"{monitored:.4f}"})
        if eval_every and state.epoch % eval_every == 0 and not last and not state.stopped_early:
            metrics = task.evaluate(model, "eval")
            state.epoch_metrics.append((state.epoch, metrics))
            log_epoch(state.epoch, state.epoch_losses[-1], metrics)
        eval_seconds += time.perf_counter() - t0
        checkpoint()
    bar.close()
    if interrupted:
        return FitResult(model, {}, state.epoch_losses, state.epoch_extra_losses, state.epoch_metrics,
                         state.validation_metrics, step_times, epoch_seconds, eval_seconds, state.global_step, False,
                         state.best_epoch, state.resumed_from, str(device), config.precision)
    if best_weights is not None and config.early_stopping_patience:
        model.load_state_dict(best_weights)  # early stopping: the weights of the best validation epoch
    t0 = time.perf_counter()
    metrics = task.evaluate(model, "eval", progress=progress)
    eval_seconds += time.perf_counter() - t0
    state.epoch_metrics.append((len(state.epoch_losses), metrics))
    log_epoch(len(state.epoch_losses), state.epoch_losses[-1] if state.epoch_losses else float("nan"), metrics)
    return FitResult(model, metrics, state.epoch_losses, state.epoch_extra_losses, state.epoch_metrics,
                     state.validation_metrics, step_times, epoch_seconds, eval_seconds, state.global_step,
                     state.stopped_early, state.best_epoch, state.resumed_from, str(device), config.precision)
