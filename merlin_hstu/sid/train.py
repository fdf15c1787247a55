"""Training and evaluation of the semantic-ID decoder through the one loop, and its run directory.

    sids = fit_tokenizer(item_ids, embeddings, cfg.tokenizer)              # merlin_hstu.sid.tokenizer
    result = train_sid(table, sids, cfg)                                    # the one loop (merlin_hstu.train.loop)
    save_sid_run("runs/sid", result, cfg)                                   # model + tokenizer + metrics

Samples are the retrieval task's leave-one-out samples (merlin_hstu.retrieval.data.LeaveOneOut; with
`train.validation_fraction: 1.0` every user's second-to-last item is validation and training ends before it).  A
training sample's items (its history and its target) become one token sequence (`item_token_sequences`) and every
token is predicted from the ones before it.  Evaluation decodes the next item after each history with constrained
beam search (merlin_hstu.sid.decode) and ranks the target in the beam list under the retrieval protocol: history
items are dropped from the list (the target itself never), Recall@K (= HR@K) and NDCG@K with K <= beam width, and a
target outside the list has rank beam width + 1.

Run directory (written atomically):  config.yaml, model.pt ({"task": "sid", model config, state dict}),
tokenizer/ (merlin_hstu.sid.tokenizer.SemanticIds.save), metrics.json, run.json (task "sid"; "data": the dataset
directory when known, which `merlin-hstu export RUN` exports the workflow of).
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from merlin_hstu.retrieval.data import LeaveOneOut, SequenceTable, history_window
from merlin_hstu.retrieval.metrics import RetrievalMetricAccumulator
from merlin_hstu.sid import SID_TASK
from merlin_hstu.sid.config import SIDConfig, dump_sid_config, load_sid_config
from merlin_hstu.sid.decode import SemanticIdTrie, beam_ranks, beam_search
from merlin_hstu.sid.model import SIDDecoder, SIDModelConfig, item_token_sequences, next_token_loss
from merlin_hstu.sid.tokenizer import BOS_TOKEN, SemanticIds
from merlin_hstu.train.config import resolve_device
from merlin_hstu.train.loop import EpochShuffle, FitResult, fit, module_device, move_to
from merlin_hstu.train.run_dir import RUN_FILE

TOKENIZER_DIR = "tokenizer"
MODEL_FILE = "model.pt"


@dataclass
class SIDResult:
    model: SIDDecoder
    sids: SemanticIds
    split: LeaveOneOut
    metrics: dict
    fit: Optional[FitResult] = None
    epoch_losses: list = field(default_factory=list)
    validation_metrics: list = field(default_factory=list)


def check_catalogue(table: SequenceTable, sids: SemanticIds) -> None:
    """Every item of the sequences needs a semantic ID: an error naming the ids that have none."""
    have = np.zeros(table.num_items, dtype=bool)
    if sids.item_ids.max() >= table.num_items:
        raise ValueError(f"the tokenizer has item ids up to {int(sids.item_ids.max())} but the dataset only "
                         f"{table.num_items} embedding rows: it was fitted on another dataset")
    have[sids.item_ids] = True
    seen = np.unique(np.concatenate(table.items))
    missing = seen[~have[seen]]
    if len(missing):
        raise ValueError(f"{len(missing)} item(s) of the sequences have no semantic ID (encoded ids e.g. "
                         f"{missing[:5].tolist()}); fit the tokenizer on the whole catalogue (table.candidate_ids)")


def history_tokens(token_table: torch.Tensor, batch: dict, time_bias: bool):
    """Per user of an eval batch: the decoder tokens of the history (BOS first), their slot times and the query
    time (the target's time) - the last two only with time bias."""
    ids, lengths = batch["ids"], batch["lengths"]
    levels = token_table.shape[1]
    histories, times, queries = [], [], None
    for row in range(ids.shape[0]):
        n = int(lengths[row])
        histories.append(torch.cat([ids.new_tensor([BOS_TOKEN]), token_table[ids[row, :n]].reshape(-1)]))
        if time_bias:
            item_times = batch["timestamps"][row, :n]
            times.append(torch.cat([item_times[:1], item_times.repeat_interleave(levels)]))
    if time_bias:
        queries = batch["timestamps"][torch.arange(ids.shape[0]), lengths]
    return histories, (times if time_bias else None), queries


@torch.no_grad()
def evaluate_sid(model: SIDDecoder, trie: SemanticIdTrie, token_table: torch.Tensor, split: LeaveOneOut,
                 samples, cfg: SIDConfig, progress: bool = False, with_ranks: bool = False):
    """Recall (hr@K) / NDCG@K / MRR of the beam lists on `samples` (a split of `split`; module docstring)."""
    model.eval()
    device = module_device(model)
    acc = RetrievalMetricAccumulator(ks=cfg.train.ks)
    time_bias = model.config.encoder.time_bias
    all_ranks = []
    batches = split.batches(samples, cfg.decode.batch_size)
    total = split.num_batches(samples, cfg.decode.batch_size)
    for batch in tqdm(batches, total=total, desc="decode", leave=False, disable=not progress):
        batch = move_to(batch, device)
        histories, times, queries = history_tokens(token_table, batch, time_bias)
        items, _ = beam_search(model, trie, histories, cfg.decode.beam_width, cfg.decode.engine, queries, times)
        history = history_window(batch) if cfg.decode.exclude_history else None
        ranks = beam_ranks(items, batch["targets"], history)
        acc.update(ranks.cpu())
        all_ranks.append(ranks.cpu())
    metrics = acc.compute()
    return (metrics, torch.cat(all_ranks)) if with_ranks else metrics


class SIDTrainingTask:
    """Next-token training over semantic-ID sequences for `merlin_hstu.train.loop.fit` (module docstring)."""

    name = "sid"
    sample_weighted_loss = False

    def __init__(self, split: LeaveOneOut, sids: SemanticIds, cfg: SIDConfig, device: torch.device):
        self.split, self.sids, self.cfg = split, sids, cfg
        self.token_table = sids.token_table(split.table.num_items).to(device)
        self.trie = SemanticIdTrie.from_semantic_ids(sids).to(device)
        self.shuffle = EpochShuffle(cfg.train.seed)

    def steps_per_epoch(self) -> int:
        return self.split.num_batches(self.split.train, self.cfg.train.batch_size)

    def epoch_batches(self, epoch: int):
        return self.split.batches(self.split.train, self.cfg.train.batch_size, shuffle=True,
                                  generator=self.shuffle.begin_epoch())

    def batch_size(self, batch) -> int:
        return int(batch["lengths"].shape[0])

    def loss(self, model, batch):
        times = batch.get("timestamps") if model.config.encoder.time_bias else None
        tokens, lengths, slot_times = item_token_sequences(self.token_table, batch["ids"], batch["lengths"] + 1,
                                                           times)
        return next_token_loss(model, tokens, lengths, slot_times), {}

    def evaluate(self, model, split: str, progress: bool = False) -> dict:
        if split == "validation":
            if self.split.validation is None:
                raise ValueError("no validation split: set train.validation_fraction")
            return evaluate_sid(model, self.trie, self.token_table, self.split, self.split.validation, self.cfg)
        return evaluate_sid(model, self.trie, self.token_table, self.split, self.split.eval, self.cfg, progress)

    def monitor(self, metrics: dict, name: Optional[str]):
        name = name or f"ndcg@{self.cfg.train.ks[-1]}"
        if name not in metrics:
            raise ValueError(f"train.early_stopping_metric={name!r} is not a SID metric; choose one of "
                             f"{sorted(metrics)}")
        return name, float(metrics[name])

    def state_dict(self) -> dict:
        return {"shuffle": self.shuffle.state_dict()}

    def load_state_dict(self, state: dict, mid_epoch: bool) -> None:
        self.shuffle.load_state_dict(state["shuffle"], mid_epoch)


def build_model(sids: SemanticIds, cfg: SIDConfig) -> SIDDecoder:
    return SIDDecoder(cfg.model_config(sids.codebook_sizes))


def sid_split(table: SequenceTable, cfg: SIDConfig) -> LeaveOneOut:
    split = LeaveOneOut(table, max_history=cfg.data.max_history)
    if cfg.train.validation_fraction:
        split.hold_out_validation(cfg.train.validation_fraction, seed=cfg.train.seed)
    if len(split.train.lengths) == 0:
        raise ValueError("no user has enough events for a leave-one-out training sample")
    return split


def train_sid(table: SequenceTable, sids: SemanticIds, cfg: SIDConfig, progress: bool = True,
              log_epoch: Optional[Callable[[int, float, dict], None]] = None, checkpoint_dir: Optional[Path] = None,
              resume: bool = False, fingerprint: str = "", model_name: str = "SID-HSTU") -> SIDResult:
    """Train the decoder on `table`'s leave-one-out samples through the one loop and evaluate it."""
    if cfg.model.time_bias and table.timestamps is None:
        raise ValueError("model.time_bias=true needs timestamps, and this dataset has none (e.g. the Amazon S3-Rec "
                         "files): set model.time_bias=false")
    check_catalogue(table, sids)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    torch.manual_seed(cfg.train.seed)
    split = sid_split(table, cfg)
    model = build_model(sids, cfg)
    device = resolve_device(cfg.train.device)
    task = SIDTrainingTask(split, sids, cfg, device)

    def make_optimizer(m):
        return torch.optim.AdamW(m.parameters(), lr=cfg.train.learning_rate, betas=tuple(cfg.train.betas),
                                 weight_decay=cfg.train.weight_decay)

    fitted = fit(task, model, make_optimizer, cfg.train, epochs=cfg.train.epochs, max_steps=cfg.train.max_steps,
                 eval_every=cfg.train.eval_every, checkpoint_dir=checkpoint_dir, resume=resume,
                 fingerprint=fingerprint, progress=progress, desc=f"train {model_name}", log_epoch=log_epoch)
    return SIDResult(model, sids, split, {model_name: fitted.metrics}, fitted, fitted.epoch_losses,
                     fitted.validation_metrics)


# ------------------------------------------------------------------------------------------------------------
# run directories
# ------------------------------------------------------------------------------------------------------------
def save_sid_run(run_dir: str | Path, result: SIDResult, cfg: SIDConfig, extra: Optional[dict] = None,
                 data_dir: Optional[str | Path] = None) -> Path:
    """Publish RUN (module docstring) atomically.  `data_dir`: the `merlin-hstu preprocess` output the run was
    trained on, recorded in run.json ("data") so that `merlin-hstu export RUN` finds its workflow without --data."""
    from merlin_hstu.common.atomic_dir import publish_dir, staging_dir

    target = Path(run_dir)
    tmp = staging_dir(target)
    try:
        (tmp / "config.yaml").write_text(dump_sid_config(cfg))
        blob = {"task": SID_TASK, "model_config": result.model.config.to_dict(),
                "state_dict": {k: v.detach().cpu() for k, v in result.model.state_dict().items()}}
        torch.save(blob, tmp / MODEL_FILE)
        result.sids.save(tmp / TOKENIZER_DIR)
        record = {"metrics": result.metrics, "epoch_losses": result.epoch_losses,
                  "validation_metrics": [{"epoch": e, **m} for e, m in result.validation_metrics], **(extra or {})}
        (tmp / "metrics.json").write_text(json.dumps(record, indent=2, default=str))
        fitted = result.fit
        run = {"format": 1, "task": SID_TASK, "device": fitted.device if fitted else "cpu",
               "steps": fitted.steps if fitted else 0, "stopped_early": fitted.stopped_early if fitted else False,
               "best_epoch": fitted.best_epoch if fitted else 0,
               "data": str(Path(data_dir).resolve()) if data_dir else None}
        (tmp / RUN_FILE).write_text(json.dumps(run, indent=2))
        publish_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def is_sid_run(run_dir: str | Path) -> bool:
    """Whether `run_dir` is a semantic-ID run directory (its run.json says task "sid")."""
    run = Path(run_dir) / RUN_FILE
    if not run.is_file():
        return False
    try:
        return json.loads(run.read_text()).get("task") == SID_TASK
    except json.JSONDecodeError as error:
        raise ValueError(f"{run} is not valid JSON ({error}); the run directory is damaged: retrain it") from None


def sid_run_data(run_dir: str | Path) -> Optional[Path]:
    """The dataset directory a SID run recorded (save_sid_run's `data_dir`), or None."""
    data = json.loads((Path(run_dir) / RUN_FILE).read_text()).get("data")
    return Path(data) if data else None


def load_sid_run(run_dir: str | Path):
    """-> (SIDDecoder in eval mode on the CPU, SemanticIds, SIDConfig, record)."""
    run_dir = Path(run_dir)
    for name in ("config.yaml", MODEL_FILE, TOKENIZER_DIR):
        if not (run_dir / name).exists():
            raise FileNotFoundError(f"{run_dir} is not a semantic-ID run directory: {name} is missing")
    blob = torch.load(run_dir / MODEL_FILE, map_location="cpu", weights_only=True)
    if blob.get("task") != SID_TASK:
        raise ValueError(f"{run_dir / MODEL_FILE} is not a semantic-ID model (task {blob.get('task')!r})")
    model = SIDDecoder(SIDModelConfig.from_dict(blob["model_config"]))
    model.load_state_dict(blob["state_dict"])
    model.eval()
    record = json.loads((run_dir / "metrics.json").read_text()) if (run_dir / "metrics.json").is_file() else {}
    return model, SemanticIds.load(run_dir / TOKENIZER_DIR), load_sid_config(run_dir / "config.yaml"), record


def recommend_sid(model: SIDDecoder, sids: SemanticIds, histories: Sequence[Sequence[int]], k: int = 10,
                  beam_width: Optional[int] = None, exclude_history: bool = True) -> List[List[int]]:
    """Top-k encoded item ids after each history of encoded item ids (oldest first; the decoder reads the most
    recent ones that fit its sequence length), by constrained beam search; with `exclude_history` the items of that
    window are dropped from the list (the retrieval protocol).  Default beam width: k + the window, so k items
    remain.  Models with time bias need times: use `evaluate_sid`'s path (`history_tokens`)."""
    if model.config.encoder.time_bias:
        raise ValueError("recommend_sid serves decoders without time bias; this one needs event times")
    window = model.config.max_items() - 1
    recent = [list(h)[-window:] for h in histories]
    if any(not h for h in recent):
        raise ValueError("recommend_sid: every history needs at least one item")
    width = beam_width or k + window
    table = sids.token_table()
    tokens = [torch.cat([torch.tensor([BOS_TOKEN]), table[torch.as_tensor(h, dtype=torch.long)].reshape(-1)])
              for h in recent]
    device = next(model.parameters()).device
    items, _ = beam_search(model, SemanticIdTrie.from_semantic_ids(sids), [t.to(device) for t in tokens], width)
    out = []
    for row, history in zip(items.tolist(), recent):
        seen = set(history) if exclude_history else set()
        out.append([i for i in row if i >= 0 and i not in seen][:k])
    return out
