"""CTR models' training entry: typed train config, the model factory (`wukong` | `dlrm` | `logreg`), the task
adapter of the one training loop (`merlin_hstu.train.loop.fit`) and evaluation (AUC, log loss, NE on the logits,
`merlin_hstu.common.metrics`)."""
from __future__ import annotations

import dataclasses
import statistics
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from merlin_hstu.common.embeddings import table_parameter_ids
from merlin_hstu.common.metrics import binary_task_metrics
from merlin_hstu.common.overrides import replace_fields
from merlin_hstu.ctr.data import CTRData, CTRTensors
from merlin_hstu.ctr.dlrm import DLRM, DLRMConfig, LogisticRegression
from merlin_hstu.ctr.wukong import WukongModel, WukongModelConfig
from merlin_hstu.encoders.wukong import WukongConfig
from merlin_hstu.train.config import LoopConfig
from merlin_hstu.train.loop import EpochShuffle, FitResult, fit, module_device

MODELS = ("wukong", "dlrm", "logreg")


@dataclass
class CTRTrainConfig(LoopConfig):
    """Adam on binary cross-entropy; the loop's own settings (device, precision, schedule, checkpoints, early
    stopping) come from `LoopConfig`."""

    epochs: int = 3
    batch_size: int = 512
    learning_rate: float = 2e-3
    weight_decay: float = 0.0
    eval_batch_size: int = 8192
    seed: int = 42
    max_steps: int = 0  # 0: run every epoch in full
    eval_every: int = 0  # evaluate data.valid every n epochs during training (0: only after the last)
    threads: int = 0  # torch intra-op threads (0: torch's default)


@dataclass
class CTRResult:
    model: nn.Module
    metrics: Dict[str, float]  # validation auc / logloss / ne after the last epoch
    epoch_losses: List[float]
    step_times: List[float]
    parameters: int
    dense_parameters: int  # without the embedding tables
    train_seconds: float
    fit: Optional[FitResult] = None  # the loop's full record (device, precision, validation, early stop)

    @property
    def seconds_per_step(self) -> float:
        steady = self.step_times[1:] or self.step_times
        return statistics.median(steady) if steady else float("nan")


def count_parameters(model: nn.Module, embeddings: bool = True) -> int:
    """Trainable parameters; embeddings=False leaves out embedding tables (the dense / interaction part)."""
    skip = set() if embeddings else table_parameter_ids(model)
    return sum(p.numel() for p in model.parameters() if p.requires_grad and id(p) not in skip)


def build_ctr_model(name: str, cardinalities, num_dense: int, overrides: Optional[Dict[str, object]] = None
                    ) -> nn.Module:
    """`wukong` | `dlrm` | `logreg` with `model.<field>` overrides (WuKong tower fields may be given flat)."""
    overrides = dict(overrides or {})
    if name == "wukong":
        tower_fields = {f.name for f in dataclasses.fields(WukongConfig)}
        tower = {k: overrides.pop(k) for k in list(overrides) if k in tower_fields}
        cfg = replace_fields(WukongModelConfig(), overrides, "model (wukong)")
        cfg.tower = replace_fields(cfg.tower, tower, "model (wukong tower)")
        cfg.__post_init__()  # re-validate after replace
        return WukongModel(cardinalities, num_dense, cfg)
    if name == "dlrm":
        return DLRM(cardinalities, num_dense, replace_fields(DLRMConfig(), overrides, "model (dlrm)"))
    if name == "logreg":
        if overrides:
            raise ValueError(f"logreg has no model options (got {sorted(overrides)})")
        return LogisticRegression(cardinalities, num_dense)
    raise ValueError(f"unknown CTR model {name!r}; use one of {list(MODELS)}")


@torch.no_grad()
def predict(model: nn.Module, split, batch_size: int = 8192) -> Tuple[torch.Tensor, torch.Tensor]:
    """(logits, labels) of every row of a split (`CTRTensors` or a streamed `CTRStream`, in its row order), the
    logits computed on the model's device, both returned on the CPU."""
    model.eval()
    device = module_device(model)
    logits, labels = [], []
    for dense, sparse, y in split.batches(batch_size):
        logits.append(model(dense.to(device), sparse.to(device)).float().cpu())
        labels.append(y)
    if not logits:
        return torch.zeros(0), torch.zeros(0)
    return torch.cat(logits), torch.cat(labels)


def predict_logits(model: nn.Module, tensors: CTRTensors, batch_size: int = 8192) -> torch.Tensor:
    """Logits of every row of a split, computed on the model's device, returned on the CPU."""
    return predict(model, tensors, batch_size)[0]


def evaluate_ctr(model: nn.Module, split, batch_size: int = 8192) -> Dict[str, float]:
    """AUC, log loss and NE of `model` on a split (ranking_metrics.binary_task_metrics on the logits). A streamed
    split of a rank's own row groups (the streaming validation rows under --nproc) has every rank's logits and
    labels gathered first, so the metrics are those of the whole split."""
    logits, labels = predict(model, split, batch_size)
    if getattr(split, "streaming", False) and split.world_size > 1:
        from merlin_hstu.distributed.context import current

        ctx = current()
        if ctx is not None:
            parts = ctx.all_gather_object((logits, labels))
            logits, labels = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    if not len(labels):
        raise ValueError("the evaluated split has no rows")
    return binary_task_metrics(labels, logits)


class CTRTrainingTask:
    """Binary CTR for `merlin_hstu.train.loop.fit`: rows shuffled each epoch by one continuing generator (seed),
    BCE on the logits, the epoch loss averaged over rows; evaluation on data.valid (AUC, log loss, NE).

    Data in memory (`CTRTensors`) or streamed (train.streaming: `CTRStream`, row group by row group through a
    shuffle buffer; with train.shuffle_buffer >= the train rows every batch equals the in-memory one). The
    validation rows of train.validation_fraction are a seeded random draw in memory and a seeded hash of each
    row's index when streamed (so the two hold out different rows)."""

    name = "ctr"
    sample_weighted_loss = True
    streams = True  # train.streaming: CTRData of CTRStream splits (ctr.data.open_criteo_stream)

    def __init__(self, data: CTRData, config: CTRTrainConfig):
        from merlin_hstu.ctr.data import VALIDATION_KEY_OFFSET

        self.config = config
        self.streaming = data.streaming
        if bool(config.streaming) != self.streaming:
            kind = "streamed" if self.streaming else "in memory"
            raise ValueError(f"train.streaming={str(bool(config.streaming)).lower()} but the CTR data is {kind}; "
                             "load it with merlin_hstu.ctr.data.load_ctr_dataset(..., streaming=train.streaming)")
        self.train, self.valid, self.validation = data.train, data.valid, None
        if config.validation_fraction:
            seed, fraction = config.seed + VALIDATION_KEY_OFFSET, config.validation_fraction
            n = len(data.train)
            if self.streaming:
                self.validation = data.train.part(fraction, seed, held=True)
                self.train = data.train.part(fraction, seed, held=False)
                empty = data.train.world_size == 1 and (len(self.validation) < 1 or len(self.train) < 1)
            else:
                count = int(round(n * fraction))
                empty = count < 1 or count >= n
                if not empty:
                    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
                    self.validation = data.train.take(order[:count])
                    self.train = data.train.take(order[count:].sort().values)
            if empty:
                raise ValueError(f"train.validation_fraction={fraction} of {n} rows leaves an empty split")
        self.shuffle = EpochShuffle(config.seed)

    def steps_per_epoch(self) -> int:
        if self.streaming and self.train.world_size > 1:
            return self.train.rank_steps(self.config.batch_size)
        return self.train.num_batches(self.config.batch_size)

    def epoch_batches(self, epoch: int):
        return self.train.batches(self.config.batch_size, shuffle=True, generator=self.shuffle.begin_epoch())

    def batch_size(self, batch) -> int:
        return int(batch[2].shape[0])

    def rank_batches(self, epoch: int, rank: int, world_size: int):
        """This rank's contiguous slice of every global batch of `epoch_batches(epoch)` (the same shuffle); streamed:
        its share of each global batch from its own row groups."""
        from merlin_hstu.distributed.context import rank_slice

        if self.streaming:  # each rank its own row groups: its share of every global batch (see CTRStream)
            if (rank, world_size) != (self.train.rank, self.train.world_size):
                raise ValueError(f"the streamed CTR data was opened for rank {self.train.rank} of "
                                 f"{self.train.world_size}, not {rank} of {world_size}")
            yield from self.train.rank_batches(self.config.batch_size, self.shuffle.begin_epoch())
            return
        order = torch.randperm(len(self.train), generator=self.shuffle.begin_epoch())
        size = self.config.batch_size
        for start in range(0, len(order), size):
            rows = order[start:start + size]
            if len(rows) < world_size:
                raise ValueError(f"a global batch of {len(rows)} rows (the last of the epoch) cannot be split over "
                                 f"{world_size} processes; change train.batch_size or --nproc")
            mine = rows[rank_slice(len(rows), rank, world_size)]
            yield self.train.dense[mine], self.train.sparse[mine], self.train.labels[mine]

    def loss_count(self, batch) -> int:
        return int(batch[2].shape[0])  # BCE is a mean over rows

    def loss(self, model, batch):
        dense, sparse, labels = batch
        return nn.functional.binary_cross_entropy_with_logits(model(dense, sparse).float(), labels), {}

    def evaluate(self, model, split: str, progress: bool = False) -> Dict[str, float]:
        tensors = self.valid if split == "eval" else self.validation
        if tensors is None:
            raise ValueError("no validation split: set train.validation_fraction")
        return evaluate_ctr(model, tensors, self.config.eval_batch_size)

    def monitor(self, metrics: Dict[str, float], name: Optional[str]):
        name = name or "auc"
        if name not in metrics:
            raise ValueError(f"train.early_stopping_metric={name!r}; choose one of {sorted(metrics)}")
        return name, -float(metrics[name]) if name in ("logloss", "ne") else float(metrics[name])

    def state_dict(self) -> dict:
        return {"shuffle": self.shuffle.state_dict()}

    def load_state_dict(self, state: dict, mid_epoch: bool) -> None:
        self.shuffle.load_state_dict(state["shuffle"], mid_epoch)


def train_ctr(model: nn.Module, data: CTRData, cfg: CTRTrainConfig, progress: bool = False,
              desc: str = "train", checkpoint_dir=None, resume: bool = False, fingerprint: str = "",
              stop_after_steps: int = 0) -> CTRResult:
    """Adam on BCE-with-logits over shuffled batches through the one training loop; evaluate on data.valid after
    the last epoch. Seed torch before building `model` (its initialisation draws from it)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    task = CTRTrainingTask(data, cfg)
    start = time.perf_counter()
    fitted = fit(task, model, lambda m: torch.optim.Adam(m.parameters(), lr=cfg.learning_rate,
                                                         weight_decay=cfg.weight_decay),
                 cfg, epochs=cfg.epochs, max_steps=cfg.max_steps, eval_every=cfg.eval_every,
                 checkpoint_dir=checkpoint_dir, resume=resume, fingerprint=fingerprint, progress=progress,
                 desc=desc, stop_after_steps=stop_after_steps)
    return CTRResult(model, fitted.metrics, fitted.epoch_losses, fitted.step_times, count_parameters(model),
                     count_parameters(model, embeddings=False), time.perf_counter() - start, fitted)


# ---------------------------------------------------------------------------------------------------------------
# run directories (merlin_hstu.train.run_dir)
# ---------------------------------------------------------------------------------------------------------------
def save_run(run_dir, model: nn.Module, cfg, result: CTRResult, data: CTRData, data_dir=None,
             extra: Optional[dict] = None):
    """Publish a CTR run directory: config.yaml (CTRExperimentConfig), model.pt (weights + feature shape, and for
    ml-1m-prefix-ctr the fitted encoder as a plain dict, `ML1MCTREncoder.to_dict`), metrics.json, run.json (task,
    data, device, ...), training_curves.png.  `load_run` reads runs with or without the encoder."""

    from merlin_hstu.ctr.config import dump_config
    from merlin_hstu.train.run_dir import cpu_state_dict, plot_losses, publish_run, run_record

    blob = {"task": "ctr", "model_type": cfg.model_type, "cardinalities": list(data.cardinalities),
            "num_dense": int(data.num_dense), "dense_names": list(data.train.dense_names),
            "sparse_names": list(data.train.sparse_names),
            "state_dict": cpu_state_dict(model)}
    if "encoder" in data.info:  # ml-1m-prefix-ctr: the fitted pandas encoding, what its export serves
        blob["data_name"], blob["encoder"] = data.name, dict(data.info["encoder"])
    record = {"metrics": result.metrics, "epoch_losses": result.epoch_losses, "train_seconds": result.train_seconds,
              "parameters": result.parameters, "dense_parameters": result.dense_parameters, **(extra or {})}
    run = run_record(result.fit, cfg.model_type, data_dir, steps=len(result.step_times))
    return publish_run(run_dir, "ctr", dump_config(cfg), blob, record, run,
                       lambda path: plot_losses(result.epoch_losses, path, "ctr"))


def load_run(run_dir) -> tuple:
    """-> (CTR model in eval mode on the CPU, CTRExperimentConfig, record)."""
    from pathlib import Path

    from merlin_hstu.ctr.config import load_config
    from merlin_hstu.train.run_dir import read_record

    run_dir = Path(run_dir)
    cfg = load_config(run_dir / "config.yaml")
    blob = torch.load(run_dir / "model.pt", map_location="cpu", weights_only=False)
    # a loaded run has plain nn.Embedding tables whatever trained it (model.embeddings: the same weights)
    fields = {k: v for k, v in cfg.model_fields().items() if k != "embeddings"}
    model = build_ctr_model(cfg.model_type, blob["cardinalities"], blob["num_dense"], fields)
    model.load_state_dict(blob["state_dict"])
    return model.eval(), cfg, read_record(run_dir)
