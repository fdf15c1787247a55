"""Training HLLM in its three modes through the one loop (`merlin_hstu.train.loop.fit`), and evaluation by the
retrieval protocol (`merlin_hstu.retrieval.train.evaluate_model`: same top-K module, same metrics).

    frozen    the item LM never trains: every item is encoded once (cached on disk, merlin_hstu.hllm.cache); the
              user model, the projection and the logit scale train
    finetune  the item LM's top k layers and its item token train with the user model: each step encodes the
              batch's distinct items (history, positives, negatives) live; before every evaluation the whole
              catalogue is re-encoded with the current weights (the cache, keyed by the weights, is refreshed)
    hybrid    frozen text embeddings plus a learned ID embedding per item

    result = train_hllm(data, HLLMConfig(train=HLLMTrainConfig(mode="hybrid", epochs=3)))
    result.metrics       {"hr@10": ..., "ndcg@10": ..., "mrr": ...}

`HLLMTrainingTask` is this task's part of the loop (batches: leave-one-out samples shuffled per epoch by one
continuing generator; negatives from a second one), as `RetrievalTrainingTask` is retrieval's.
"""
from __future__ import annotations

import dataclasses
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from merlin_hstu.common.atomic_dir import write_file
from merlin_hstu.hllm.cache import EmbeddingCache
from merlin_hstu.hllm.config import HLLMConfig
from merlin_hstu.hllm.data import HLLMData
from merlin_hstu.hllm.item_encoder import ItemTextEncoder
from merlin_hstu.hllm.model import HLLMModel, HLLMModelConfig
from merlin_hstu.retrieval.data import LeaveOneOut
from merlin_hstu.retrieval.train import evaluate_model
from merlin_hstu.train.config import resolve_device
from merlin_hstu.train.loop import EpochShuffle, FitResult, fit, run_fingerprint


@dataclass
class HLLMResult:
    model: HLLMModel
    split: LeaveOneOut
    metrics: dict  # the final evaluation (on `eval_samples` when given)
    fit: FitResult
    encode_seconds: float = 0.0  # encoding the catalogue before training (0 when every text was cached)
    cache_hits: int = 0
    cache_misses: int = 0
    refresh_seconds: list = field(default_factory=list)  # finetune: re-encoding the catalogue before evaluations

    @property
    def step_times(self) -> list:
        return self.fit.step_times


def catalogue_texts(texts: np.ndarray):
    """(ids [n] of the rows that have a text, their texts) of a texts-by-id array."""
    rows = np.array([i for i, t in enumerate(texts) if t is not None], dtype=np.int64)
    return rows, [str(texts[i]) for i in rows]


def encode_item_table(encoder: ItemTextEncoder, texts: np.ndarray, cache: Optional[EmbeddingCache]) -> torch.Tensor:
    """t for every id: [num_items, H], zero rows where there is no item.  Through the cache when one is given."""
    rows, strings = catalogue_texts(texts)
    vectors = cache.encode(encoder, strings) if cache is not None else encoder.encode(strings)
    table = torch.zeros(len(texts), encoder.hidden_size)
    table[torch.from_numpy(rows)] = vectors
    return table


def tokenize_items(encoder: ItemTextEncoder, texts: np.ndarray):
    """Token ids [num_items, T] and lengths [num_items] of every item's prompt + text (empty rows: the prompt)."""
    strings = ["" if t is None else str(t) for t in texts]
    return encoder.tokenize(strings)


class HLLMTrainingTask:
    """HLLM next-item training for `merlin_hstu.train.loop.fit` (module docstring)."""

    name = "hllm"
    sample_weighted_loss = False

    def __init__(self, split: LeaveOneOut, cfg: HLLMConfig, pool: torch.Tensor, device: torch.device,
                 texts: np.ndarray, cache: Optional[EmbeddingCache], eval_samples=None):
        self.split, self.cfg, self.pool = split, cfg, pool.to(device)
        self.shuffle = EpochShuffle(cfg.train.seed)
        self.negatives = torch.Generator(device=device).manual_seed(cfg.train.seed + 1)
        self.texts, self.cache = texts, cache
        self.eval_samples = eval_samples
        self.refresh_seconds: list = []

    def steps_per_epoch(self) -> int:
        return self.split.num_batches(self.split.train, self.cfg.train.batch_size)

    def epoch_batches(self, epoch: int):
        return self.split.batches(self.split.train, self.cfg.train.batch_size, shuffle=True,
                                  generator=self.shuffle.begin_epoch())

    def batch_size(self, batch) -> int:
        return int(batch["lengths"].shape[0])

    def loss(self, model: HLLMModel, batch):
        return model.training_loss(batch, self.pool, self.negatives), {"logit_scale": model.logit_scale().detach()}

    def refresh(self, model: HLLMModel) -> None:
        """Finetune: re-encode the catalogue with the LM's current weights for evaluation: from the frozen-layer
        states where the model keeps them, else the whole LM through the cache."""
        if model.item_encoder is None:
            return
        start = time.perf_counter()
        if model.item_encoder.caches_frozen_layers():  # only the trained top layers run (HLLMModel docstring)
            table = torch.zeros_like(model.item_text)
            rows = torch.from_numpy(catalogue_texts(self.texts)[0]).to(table.device)
            table[rows] = model.encode_from_frozen(rows)
            model.set_item_text(table)
        else:
            model.set_item_text(encode_item_table(model.item_encoder, self.texts, self.cache))
        self.refresh_seconds.append(time.perf_counter() - start)

    def evaluate(self, model: HLLMModel, split: str, progress: bool = False) -> dict:
        self.refresh(model)
        if split == "validation":
            if self.split.validation is None:
                raise ValueError("no validation split: set train.validation_fraction")
            return evaluate_model(model, self.split, self.cfg, samples=self.split.validation)
        return evaluate_model(model, self.split, self.cfg, progress=progress, samples=self.eval_samples)

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


def make_optimizer(cfg: HLLMConfig):
    """AdamW; the item LM's trained parameters (finetune) get `train.lm_learning_rate`, the rest `learning_rate`."""
    def make(model: HLLMModel) -> torch.optim.Optimizer:
        lm = {id(p) for p in model.item_encoder.parameters()} if model.item_encoder is not None else set()
        trained = [p for p in model.parameters() if p.requires_grad]
        groups = [{"params": [p for p in trained if id(p) not in lm], "lr": cfg.train.learning_rate}]
        lm_params = [p for p in trained if id(p) in lm]
        if lm_params:
            groups.append({"params": lm_params, "lr": cfg.train.lm_learning_rate})
        return torch.optim.AdamW(groups, weight_decay=cfg.train.weight_decay)
    return make


def build_model(data: HLLMData, cfg: HLLMConfig, encoder: Optional[ItemTextEncoder] = None,
                cache: Optional[EmbeddingCache] = None) -> tuple:
    """(model, encode seconds): the item table encoded (cached), the user model built from `cfg`.  A finetune
    model takes `encoder` itself (it trains); the other modes only read it."""
    encoder = encoder if encoder is not None else ItemTextEncoder(cfg.item_encoder)
    start = time.perf_counter()
    table = encode_item_table(encoder, data.texts, cache)
    seconds = time.perf_counter() - start
    user = cfg.user
    if user.kind == "hstu" and data.table.timestamps is None and user.time_bias:
        user = dataclasses.replace(user, time_bias=False)  # data without timestamps: no time bias
    model_cfg = HLLMModelConfig(num_items=data.table.num_items, text_dim=encoder.hidden_size, mode=cfg.mode,
                                max_history=cfg.data.max_history, user=user, item_encoder=cfg.item_encoder,
                                loss=cfg.loss)
    tokens = tokenize_items(encoder, data.texts) if cfg.mode == "finetune" else None
    needs_lm = cfg.mode == "finetune" or user.init_from_lm
    return HLLMModel(model_cfg, table, encoder if needs_lm else None, tokens), seconds


def train_hllm(data: HLLMData, cfg: HLLMConfig, *, split: Optional[LeaveOneOut] = None,
               pool: Optional[np.ndarray] = None, eval_samples=None, encoder: Optional[ItemTextEncoder] = None,
               cache: Optional[EmbeddingCache] = None, progress: bool = False, log_epoch=None,
               checkpoint_dir: Optional[Path] = None, resume: bool = False, stop_after_steps: int = 0) -> HLLMResult:
    """Train an HLLM model on `data` in `cfg.train.mode` and evaluate it (module docstring).

    `split`: the leave-one-out samples (default: built from `data.table` with `cfg.data.max_history`); `pool`: the
    ids negatives are drawn from (default: the catalogue; the cold-start protocol passes the warm items);
    `eval_samples`: evaluate on these samples of `split` (e.g. `merlin_hstu.hllm.data.cold_eval_samples`);
    `encoder`: an item encoder to use (a finetune run trains it: pass a fresh one); `cache`: the embedding cache
    (default: the configured directory).  `checkpoint_dir` / `resume`: the loop's resumable checkpoints (every
    `train.checkpoint_every` steps and at epoch ends); a killed run called again with `resume=True` and the same
    config and data continues from the newest one and ends where an uninterrupted run ends (a checkpoint of
    another config or dataset is refused).  The frozen-layer states of a finetune run are not checkpointed: they
    depend on the text alone and are recomputed on first use.  `stop_after_steps`: end this call after that many
    steps without the final evaluation (tests of resuming)."""
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    torch.manual_seed(cfg.train.seed)
    cache = cache if cache is not None else EmbeddingCache(cfg.data.cache_dir)
    hits, misses = cache.hits, cache.misses
    split = split if split is not None else LeaveOneOut(data.table, max_history=cfg.data.max_history)
    if split.max_history > cfg.data.max_history:
        raise ValueError(f"the split's history window {split.max_history} exceeds data.max_history="
                         f"{cfg.data.max_history}")
    if len(split.train.lengths) == 0:
        raise ValueError("no user has the >= 3 events a leave-one-out train sample needs")
    if cfg.train.validation_fraction and split.validation is None:
        split.hold_out_validation(cfg.train.validation_fraction, seed=cfg.train.seed)
    model, encode_seconds = build_model(data, cfg, encoder, cache)
    device = resolve_device(cfg.train.device)
    pool_ids = torch.as_tensor(pool if pool is not None else data.table.candidate_ids.numpy(), dtype=torch.long)
    task = HLLMTrainingTask(split, cfg, pool_ids, device, data.texts, cache, eval_samples)
    fingerprint = run_fingerprint(cfg.to_dict(), texts=list(data.texts), num_items=data.table.num_items,
                                  train_samples=len(split.train.lengths))
    fitted = fit(task, model, make_optimizer(cfg), cfg.train, epochs=cfg.train.epochs, max_steps=cfg.train.max_steps,
                 eval_every=cfg.train.eval_every, progress=progress, desc=f"train HLLM {cfg.mode}",
                 log_epoch=log_epoch, checkpoint_dir=checkpoint_dir, resume=resume, fingerprint=fingerprint,
                 stop_after_steps=stop_after_steps)
    return HLLMResult(model, split, fitted.metrics, fitted, encode_seconds, cache.hits - hits,
                      cache.misses - misses, task.refresh_seconds)


def evaluate(model: HLLMModel, split: LeaveOneOut, cfg: HLLMConfig, samples=None) -> dict:
    """HR / NDCG / MRR of `model` on `samples` of `split` (default: its evaluation samples), reference protocol."""
    return evaluate_model(model, split, cfg, samples=samples)


# --- saving -----------------------------------------------------------------------------------------------
MODEL_FILE_FORMAT = 1


def save_model(model: HLLMModel, path: str | Path) -> Path:
    """model.pt-style blob (config + weights, CPU) written to a temporary file and renamed into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = {"format": MODEL_FILE_FORMAT, "task": "hllm", "config": model.config.to_dict(),
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}}
    write_file(path, lambda tmp: torch.save(blob, tmp))
    return path


def load_model(path: str | Path) -> HLLMModel:
    """The model `save_model` wrote, in eval mode on the CPU (a finetune model reloads its LM offline)."""
    blob = torch.load(Path(path), map_location="cpu", weights_only=True)
    if blob.get("task") != "hllm":
        raise ValueError(f"{path} is not an HLLM model file (task {blob.get('task')!r})")
    config = HLLMModelConfig.from_dict(blob["config"])
    state = blob["state_dict"]
    encoder, tokens = None, None
    if config.mode == "finetune" or config.user.init_from_lm:
        encoder = ItemTextEncoder(config.item_encoder)
    if config.mode == "finetune":
        tokens = (state["item_token_ids"], state["item_token_lengths"])
    model = HLLMModel(config, state["item_text"], encoder, tokens)
    model.load_state_dict(state)
    return model.eval()


def remove_cache(cache: EmbeddingCache) -> None:
    """Delete a cache directory (tests and throw-away runs)."""
    shutil.rmtree(cache.root, ignore_errors=True)
