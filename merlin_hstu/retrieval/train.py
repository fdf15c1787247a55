"""Retrieval training and evaluation loops (reference protocol), plus run directories on disk.

Training runs through the one loop (`merlin_hstu.train.loop.fit`); `RetrievalTrainingTask` is this task's part of
it. Run directories have the format of `merlin_hstu.train.run_dir` (config.yaml, model.pt, metrics.json with the
final metrics of the model and of the most-popular baseline, run.json), written atomically.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from tqdm.auto import tqdm

from merlin_hstu.common.embeddings import torchrec_tables
from merlin_hstu.common.plots import pyplot, save_figure
from merlin_hstu.retrieval.baselines import MostPopular
from merlin_hstu.retrieval.config import ExperimentConfig, dump_config, encoder_type, load_config
from merlin_hstu.retrieval.data import (LeaveOneOut, SequenceTable, SessionSplits, SessionTables, StreamingLeaveOneOut,
                                        StreamingTable, history_window, load_processed, load_session_splits,
                                        open_streaming, popularity_counts, train_sequences)
from merlin_hstu.retrieval.metrics import RetrievalMetricAccumulator, target_ranks
from merlin_hstu.retrieval.losses import retrieval_loss, softmax_loss_over_sample
from merlin_hstu.retrieval.model import HSTURetrievalModel, RetrievalModelConfig, next_item_training_loss, \
    history_exclusions, supervision
from merlin_hstu.retrieval.negatives import NegativeSample, sample_negatives
from merlin_hstu.retrieval.topk import rankable_from_invalid
from merlin_hstu.train.config import resolve_device
from merlin_hstu.train.loop import EpochShuffle, FitResult, fit, module_device, move_to
from merlin_hstu.train.run_dir import cpu_state_dict, publish_run, read_record, run_record


@dataclass
class TrainResult:
    model: HSTURetrievalModel
    split: LeaveOneOut
    metrics: dict  # {"HSTU": {...}, "most-popular": {...}}
    epoch_losses: list = field(default_factory=list)
    train_seconds: float = 0.0
    epoch_metrics: list = field(default_factory=list)  # [(epoch, metrics)] when train.eval_every > 0
    step_times: list = field(default_factory=list)  # seconds per optimizer step (forward + backward + update)
    epoch_seconds: list = field(default_factory=list)  # training time per epoch, evaluation excluded
    eval_seconds: float = 0.0
    fit: Optional[FitResult] = None  # the loop's full record (device, precision, validation, early stop)


def build_model(table: SequenceTable, cfg: ExperimentConfig) -> HSTURetrievalModel:
    check_table_inputs(table, cfg)
    model_cfg = RetrievalModelConfig(num_items=table.num_items, encoder=cfg.model, input_dropout=cfg.train.input_dropout,
                                     head=cfg.head, inputs=cfg.inputs,
                                     num_actions=table.num_actions if cfg.inputs.uses_actions else 0,
                                     embeddings=cfg.embeddings)
    return HSTURetrievalModel(model_cfg)


def check_table_inputs(table: SequenceTable, cfg: ExperimentConfig) -> None:
    """A config that reads actions needs a table with actions (`load_processed(path, actions=cfg.inputs.actions)`)."""
    if cfg.inputs.uses_actions and not table.has_actions:
        raise ValueError(f"inputs.actions={cfg.inputs.actions!r} reads event types, but the sequence table has no "
                         "actions: load the data with load_processed(path, actions=cfg.inputs.actions) (the CLI does) "
                         "from a dataset preprocessed with its action column, or set inputs.actions=none")


@torch.no_grad()
def evaluate_model(model: HSTURetrievalModel, split: LeaveOneOut, cfg: ExperimentConfig,
                   progress: bool = False, samples=None) -> dict:
    """HR/NDCG@K and MRR on the eval samples (last item per user; `samples` another split of `split`, e.g. its
    validation users), all catalogue items scored, on the model's device.

    Ranks come from the model's brute-force top-K module (merlin_hstu.retrieval.topk: chunked MIPS or MoL,
    history-window filtered, top-`rank_cap` list), the module serving traces as well."""
    model.eval()
    device = module_device(model)
    samples = split.eval if samples is None else samples
    acc = RetrievalMetricAccumulator(ks=cfg.train.ks)
    topk = model.topk(rankable_from_invalid(split.table.num_items, split.table.non_candidate_ids).to(device))
    batches = split.batches(samples, cfg.train.eval_batch_size)
    total = split.num_batches(samples, cfg.train.eval_batch_size)
    for batch in tqdm(batches, total=total, desc="evaluate", leave=False, disable=not progress):
        batch = move_to(batch, device)
        query = model.last_user_vector(batch["ids"], batch["lengths"], batch.get("timestamps"), batch.get("actions"))
        acc.update(topk.target_ranks(query, batch["targets"], history_window(batch), rank_cap=cfg.train.rank_cap))
    return _across_ranks(split, acc)


def _across_ranks(split, acc: RetrievalMetricAccumulator) -> dict:
    """The metrics of every process's samples: a streaming split under --nproc evaluates each rank's own row
    groups, so the ranks' means are combined, weighted by their user counts."""
    from merlin_hstu.distributed.context import current

    ctx = current()
    if not getattr(split, "streaming", False) or split.world_size == 1 or ctx is None:
        return acc.compute()
    metrics = acc.compute() if acc.count else {}
    names = next((sorted(m) for m in ctx.all_gather_object(metrics) if m), None)
    if names is None:
        raise ValueError("no process has evaluation samples in its row groups")
    totals = ctx.all_reduce_sum([acc.count] + [metrics.get(k, 0.0) * acc.count for k in names])
    return {k: totals[1 + i] / totals[0] for i, k in enumerate(names)}


def evaluate_most_popular(split: LeaveOneOut, cfg: ExperimentConfig) -> dict:
    """The same protocol with every user scored by training-set popularity."""
    if getattr(split, "streaming", False):  # counted batch by batch (and summed over the ranks' row groups)
        from merlin_hstu.distributed.context import current

        baseline = MostPopular()
        counts = popularity_counts(split, split.train, split.table.num_items)
        if split.world_size > 1 and current() is not None:
            counts = torch.tensor(current().all_reduce_sum(counts.tolist()), dtype=torch.float32)
        baseline.counts = counts
    else:
        baseline = MostPopular().fit(train_sequences(split.popularity_samples()), num_items=split.table.num_items)
    acc = RetrievalMetricAccumulator(ks=cfg.train.ks)
    invalid = split.table.non_candidate_ids
    for batch in split.batches(split.eval, cfg.train.eval_batch_size):
        scores = baseline.scores(batch["ids"].shape[0])
        acc.update(target_ranks(scores, batch["targets"], history_window(batch),
                                invalid_ids=invalid, rank_cap=cfg.train.rank_cap))
    return _across_ranks(split, acc)


class RetrievalTrainingTask:
    """Next-item retrieval for `merlin_hstu.train.loop.fit`: leave-one-out samples shuffled each epoch by one
    continuing generator (seed), negatives from a second one (seed + 1), evaluation by the reference protocol."""

    name = "retrieval"
    sample_weighted_loss = False
    streams = True  # train.streaming: a StreamingLeaveOneOut split

    def __init__(self, split: LeaveOneOut, cfg: ExperimentConfig, device: torch.device):
        self.split, self.cfg = split, cfg
        self.streaming = getattr(split, "streaming", False)
        self.loss_config = cfg.train.loss_config()
        self.shuffle = EpochShuffle(cfg.train.seed)
        # streaming ranks train on their own samples, so each draws its own negatives (rank 0: the 1-process stream)
        rank = split.rank if self.streaming else 0
        self.negatives = torch.Generator(device=device).manual_seed(cfg.train.seed + 1 + rank)
        self.pool = split.table.candidate_ids.to(device)

    def steps_per_epoch(self) -> int:
        if self.streaming and self.split.world_size > 1:
            return self.split.rank_steps(self.split.train, self.cfg.train.batch_size)
        return self.split.num_batches(self.split.train, self.cfg.train.batch_size)

    def epoch_batches(self, epoch: int):
        return self.split.batches(self.split.train, self.cfg.train.batch_size, shuffle=True,
                                  generator=self.shuffle.begin_epoch())

    def batch_size(self, batch) -> int:
        return int(batch["lengths"].shape[0])

    def loss(self, model, batch):
        if "global_positives" in batch:  # a rank's slice of a global batch (rank_batches)
            return self._rank_loss(model, batch), {}
        return next_item_training_loss(model, batch, self.pool, self.loss_config, self.negatives), {}

    # --- several processes (merlin_hstu.train.loop.DistributedRun) ----------------------------------------
    def rank_batches(self, epoch: int, rank: int, world_size: int):
        """This rank's contiguous slice of every global batch of `epoch_batches(epoch)` (the same shuffle, drawn
        on every rank), with the global batch's supervised positives ("global_positives", row-major) and where
        this slice's start among them ("positive_offset"): negatives are drawn for the global batch, then sliced."""
        from merlin_hstu.distributed.context import rank_slice

        if self.streaming:  # each rank its own row groups: local batches, local negatives (see rank_steps)
            if (rank, world_size) != (self.split.rank, self.split.world_size):
                raise ValueError(f"the streaming split was opened for rank {self.split.rank} of "
                                 f"{self.split.world_size}, not {rank} of {world_size}")
            yield from self.split.rank_batches(self.split.train, self.cfg.train.batch_size, self.shuffle.begin_epoch())
            return
        if self.loss_config.loss == "bce" or self.loss_config.mi_loss_weight:
            raise ValueError("multi-process retrieval training supports loss=sampled_softmax | full_softmax without "
                             "train.mi_loss_weight (bce masks accidental hits per rank, the MoL gate loss is not a "
                             "mean over positions); train this config in one process")
        train = self.split.train
        order = torch.randperm(len(train.lengths), generator=self.shuffle.begin_epoch()).numpy()
        size = self.cfg.train.batch_size
        for start in range(0, len(order), size):
            rows = order[start:start + size]
            if len(rows) < world_size:
                raise ValueError(f"a global batch of {len(rows)} samples (the last of the epoch) cannot be split over "
                                 f"{world_size} processes; change train.batch_size or --nproc")
            lengths = torch.from_numpy(train.lengths[rows])
            ids = torch.from_numpy(train.ids[rows, :int(lengths.max()) + 1])
            supervised, labels = supervision(ids, lengths)
            mine = rank_slice(len(rows), rank, world_size)
            batch = next(self.split.batches(_take(train, rows[mine]), len(rows)))
            batch["global_positives"] = labels[supervised]
            batch["positive_offset"] = supervised[:mine.start].sum()
            yield batch

    def loss_count(self, batch) -> int:
        return int(supervision(batch["ids"], batch["lengths"])[0].sum())

    def _rank_loss(self, model, batch):
        user = model.user_vectors(batch["ids"], batch["lengths"], batch.get("timestamps"), batch.get("actions"))
        supervised, labels = supervision(batch["ids"], batch["lengths"])
        user, positives = user[supervised], labels[supervised]
        config = self.loss_config
        if config.loss == "full_softmax":
            seen = history_exclusions(config, batch["ids"], supervised)
            return retrieval_loss(model, user, positives, self.pool, config, seen=seen)
        every = sample_negatives(config.negatives, batch["global_positives"], self.pool, config.num_negatives,
                                 self.negatives, config.logq_correction)
        mine = slice(int(batch["positive_offset"]), int(batch["positive_offset"]) + positives.numel())
        sample = NegativeSample(every.ids[mine], *(None if t is None else t[mine]
                                                   for t in (every.log_q_positive, every.log_q_negatives)))
        tables = torchrec_tables(model)
        if tables is not None and tables.sharded:  # look up only the rows this step scores, deduplicated
            distinct, inverse = torch.unique(torch.cat([positives, sample.ids.reshape(-1)]), return_inverse=True)
            rows = _ItemRows(model, distinct)
            sample = NegativeSample(inverse[positives.numel():].view_as(sample.ids), sample.log_q_positive,
                                    sample.log_q_negatives)
            return softmax_loss_over_sample(rows, user, inverse[:positives.numel()], sample, config)
        return softmax_loss_over_sample(model, user, positives, sample, config)

    def evaluate(self, model, split: str, progress: bool = False) -> dict:
        if split == "validation":
            if self.split.validation is None:
                raise ValueError("no validation split: set train.validation_fraction")
            return evaluate_model(model, self.split, self.cfg, samples=self.split.validation)
        return evaluate_model(model, self.split, self.cfg, progress=progress)

    def monitor(self, metrics: dict, name: Optional[str]):
        name = name or f"ndcg@{self.cfg.train.ks[0]}"
        if name not in metrics:
            raise ValueError(f"train.early_stopping_metric={name!r} is not a retrieval metric; choose one of "
                             f"{sorted(metrics)}")
        return name, float(metrics[name])

    def state_dict(self) -> dict:
        return {"shuffle": self.shuffle.state_dict(), "negatives": self.negatives.get_state()}

    def load_state_dict(self, state: dict, mid_epoch: bool) -> None:
        self.shuffle.load_state_dict(state["shuffle"], mid_epoch)
        self.negatives.set_state(state["negatives"])


class _ItemRows:
    """The item table restricted to `ids` (what a loss function needs of a model: `item_vectors()` and `head`)."""

    def __init__(self, model, ids: torch.Tensor):
        self.head = model.head
        self.vectors = model.item_vectors(ids)

    def item_vectors(self):
        return self.vectors


def _take(split, rows):
    """The samples `rows` of a LeaveOneOut split, as a split."""
    import dataclasses

    return dataclasses.replace(split, **{f.name: None if getattr(split, f.name) is None else getattr(split, f.name)[rows]
                                         for f in dataclasses.fields(split)})


def make_retrieval_optimizer(cfg: ExperimentConfig):
    def make(model: torch.nn.Module) -> torch.optim.Optimizer:
        return torch.optim.AdamW(model.parameters(), lr=cfg.train.learning_rate, betas=tuple(cfg.train.betas),
                                 weight_decay=cfg.train.weight_decay)
    return make


def training_table(data_dir, cfg: ExperimentConfig):
    """The data `train_retrieval` reads: the processed dataset in memory (SequenceTable), or with
    train.streaming its row groups (StreamingTable; under torchrun only this rank's, r::N), or with
    train.split=sessions the Merlin train / valid / test files of DATA/splits/ (SessionTables)."""
    if cfg.train.split == "sessions":
        return load_session_splits(data_dir, actions=cfg.inputs.actions)
    if not cfg.train.streaming:
        return load_processed(data_dir, actions=cfg.inputs.actions)
    from merlin_hstu.distributed.context import launched_rank

    rank, world = launched_rank()
    return open_streaming(data_dir, actions=cfg.inputs.actions, rank=rank, world_size=world)


def make_split(table, cfg: ExperimentConfig):
    """The samples `train_retrieval` trains, validates and evaluates on, by train.split / train.streaming:
    LeaveOneOut (a SequenceTable), StreamingLeaveOneOut (a StreamingTable) or SessionSplits (SessionTables), with the
    validation split of train.validation_fraction (leave-one-out) or of the valid sessions."""
    kinds = {"sessions": SessionTables, "streaming": StreamingTable, "leave_one_out": SequenceTable}
    mode = "sessions" if cfg.train.split == "sessions" else "streaming" if cfg.train.streaming else "leave_one_out"
    if not isinstance(table, kinds[mode]):
        setting = "train.streaming=true" if mode == "streaming" else f"train.split={cfg.train.split}"
        raise ValueError(f"{setting} but the data is a {type(table).__name__} (not a {kinds[mode].__name__}); "
                         "open it with merlin_hstu.retrieval.train.training_table(path, cfg)")
    if mode == "sessions":
        return SessionSplits(table, max_history=cfg.data.max_history)
    if mode == "streaming":
        split = StreamingLeaveOneOut(table, max_history=cfg.data.max_history, shuffle_buffer=cfg.train.shuffle_buffer)
    else:
        split = LeaveOneOut(table, max_history=cfg.data.max_history)
    if cfg.train.validation_fraction:
        split.hold_out_validation(cfg.train.validation_fraction, seed=cfg.train.seed)
    if split.num_batches(split.train, 1) == 0:
        raise ValueError("no user has the >= 3 events a leave-one-out train sample needs")
    return split


def train_retrieval(table, cfg: ExperimentConfig, progress: bool = True,
                    log_epoch: Optional[Callable[[int, float, dict], None]] = None,
                    model_name: str = "HSTU", checkpoint_dir: Optional[Path] = None, resume: bool = False,
                    fingerprint: str = "", stop_after_steps: int = 0) -> TrainResult:
    """Train a retrieval model (HSTU or SASRec encoder) with the configured head and loss (`cfg.head`,
    `cfg.train.loss` / `negatives`; reference default: dot product, sampled softmax over 128 uniform negatives)
    through the one training loop (`merlin_hstu.train.loop.fit`: device, precision, schedule, checkpoints);
    evaluate it and most-popular.

    `table`: what `training_table(path, cfg)` returns (a SequenceTable; train.streaming: a StreamingTable;
    train.split=sessions: SessionTables, trained on the train sessions, validated on valid, evaluated on test).
    `log_epoch(epoch, mean_loss, metrics)` is called after every evaluated epoch (train.eval_every)."""
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    torch.manual_seed(cfg.train.seed)
    split = make_split(table, cfg)
    model = build_model(split.table, cfg)
    device = resolve_device(cfg.train.device)
    task = RetrievalTrainingTask(split, cfg, device)
    metrics: dict = {}
    fitted = fit(task, model, make_retrieval_optimizer(cfg), cfg.train, epochs=cfg.train.epochs,
                 max_steps=cfg.train.max_steps, eval_every=cfg.train.eval_every, checkpoint_dir=checkpoint_dir,
                 resume=resume, fingerprint=fingerprint, progress=progress, desc=f"train {model_name}",
                 log_epoch=log_epoch if cfg.train.eval_every else None, stop_after_steps=stop_after_steps)
    if stop_after_steps and not fitted.metrics:
        return TrainResult(model, split, {}, fitted.epoch_losses, fitted.train_seconds, [], fitted.step_times,
                           fitted.epoch_seconds, fitted.eval_seconds, fitted)
    metrics[model_name] = fitted.metrics
    metrics["most-popular"] = evaluate_most_popular(split, cfg)
    epoch_metrics = fitted.epoch_metrics if cfg.train.eval_every else []
    return TrainResult(model, split, metrics, fitted.epoch_losses, fitted.train_seconds, epoch_metrics,
                       fitted.step_times, fitted.epoch_seconds, fitted.eval_seconds, fitted)


def plot_training_curves(record: dict, path: Path) -> Optional[Path]:
    """Loss per epoch and, when recorded, HR@10 / NDCG@10 per epoch against the most-popular level."""
    plt = pyplot()
    if plt is None:  # plotting is a convenience; the numbers are in metrics.json
        return None
    has_eval = bool(record.get("epoch_metrics"))
    fig, axes = plt.subplots(1, 2 if has_eval else 1, figsize=(10 if has_eval else 5, 3.6), squeeze=False)
    losses = record["epoch_losses"]
    axes[0, 0].plot(range(1, len(losses) + 1), losses, marker="o")
    axes[0, 0].set(title=f"training loss ({record.get('loss', 'sampled_softmax')})", xlabel="epoch", ylabel="loss")
    if has_eval:
        ax = axes[0, 1]
        epochs = [m["epoch"] for m in record["epoch_metrics"]]
        for key in ("hr@10", "ndcg@10"):
            ax.plot(epochs, [m[key] for m in record["epoch_metrics"]], marker="o", label=f"model {key}")
        pop = record["metrics"].get("most-popular", {})
        if "hr@10" in pop:
            ax.axhline(pop["hr@10"], color="gray", linestyle="--", label="most-popular hr@10")
        ax.set(title="evaluation (leave-one-out, last item)", xlabel="epoch")
        ax.legend(fontsize=8)
    return save_figure(fig, path)


# --- run directories ------------------------------------------------------------------------------
def save_run(run_dir: str | Path, result: TrainResult, cfg: ExperimentConfig, extra: Optional[dict] = None) -> Path:
    """Publish the run directory (merlin_hstu.train.run_dir): config.yaml, model.pt, metrics.json, run.json."""
    record = {"metrics": result.metrics, "epoch_losses": result.epoch_losses, "loss": cfg.train.loss,
              "epoch_metrics": [{"epoch": e, **m} for e, m in result.epoch_metrics],
              "train_seconds": result.train_seconds, **(extra or {})}
    if isinstance(result.split, SessionSplits):  # the protocol and what each split held (leave-one-out: as before)
        record["split"] = {"protocol": "sessions", "folder": str(result.split.tables.folder), **{
            name: len(samples.lengths) for name, samples in
            (("train", result.split.train), ("valid", result.split.validation), ("test", result.split.eval))},
            "validation_metrics": [{"epoch": e, **m} for e, m in result.fit.validation_metrics]}
    run = run_record(result.fit, encoder_type(cfg.model), record.get("data"), record.get("workflow"),
                     steps=len(result.step_times))
    blob = {"task": "retrieval", "model_type": run["model_type"], "model_config": result.model.config.to_dict(),
            "state_dict": cpu_state_dict(result.model)}
    return publish_run(run_dir, "retrieval", dump_config(cfg), blob, record, run,
                       lambda path: plot_training_curves(record, path))


def load_run(run_dir: str | Path) -> tuple:
    """-> (HSTURetrievalModel in eval mode on the CPU, ExperimentConfig, record: metrics.json + run.json)."""
    run_dir = Path(run_dir)
    for name in ("config.yaml", "model.pt"):
        if not (run_dir / name).is_file():
            raise FileNotFoundError(f"{run_dir} is not a merlin-hstu run directory: {name} is missing")
    cfg = load_config(run_dir / "config.yaml")
    blob = torch.load(run_dir / "model.pt", map_location="cpu", weights_only=True)
    model = HSTURetrievalModel(RetrievalModelConfig.from_dict(blob["model_config"]))
    model.load_state_dict(blob["state_dict"])
    model.eval()
    return model, cfg, read_record(run_dir)
