"""Typed retrieval experiment configuration, loaded from YAML presets shipped in `merlin_hstu/configs/retrieval/`.

    cfg = load_config("demo")                              # a preset name
    cfg = load_config("my.yaml", ["train.epochs=3"])       # a file plus dotted overrides

Sections: `data`, `model` (the encoder), `inputs` (event types as inputs: actions none | concat | interleave and
the concatenated action width; `merlin_hstu.retrieval.model.RetrievalInputsConfig`), `head` (how queries and items are
compared: similarity dot | mol, query / item normalisation, the MoL shape;
`merlin_hstu.retrieval.similarity.RetrievalHeadConfig`) and `train` (optimiser, epochs and the objective: loss
sampled_softmax | full_softmax | bce, negatives uniform | in_batch, logQ, temperature;
`merlin_hstu.retrieval.losses.RetrievalLossConfig` validates the combination).  The `inputs` section is written out
only when it is not the default, so action-free configs dump (and fingerprint) as they always did.

Unknown keys are errors (a typo must not silently fall back to a default); so are invalid combinations.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import yaml

from merlin_hstu.common import presets
from merlin_hstu.common import schema as roles
from merlin_hstu.common.embeddings import check_backend
from merlin_hstu.encoders.hstu import HSTUEncoderConfig
from merlin_hstu.retrieval.losses import RetrievalLossConfig
from merlin_hstu.retrieval.model import RetrievalInputsConfig
from merlin_hstu.encoders.sasrec import SASRecEncoderConfig
from merlin_hstu.retrieval.similarity import RetrievalHeadConfig
from merlin_hstu.train.config import LoopConfig

#: train.split: how retrieval samples are split (merlin_hstu.retrieval.data: LeaveOneOut | SessionSplits)
SPLIT_MODES = ("leave_one_out", "sessions")

# model.type -> the encoder's typed config
ENCODER_CONFIGS = {"hstu": HSTUEncoderConfig, "sasrec": SASRecEncoderConfig}


def encoder_type(model_config) -> str:
    for name, cls in ENCODER_CONFIGS.items():
        if type(model_config) is cls:
            return name
    raise TypeError(f"unknown encoder config type {type(model_config).__name__}")


@dataclass
class DataConfig:
    id_column: str = roles.LOG_USER_ID
    id_kind: str = "user"  # user | session
    item_column: str = roles.LOG_ITEM_ID
    action_column: Optional[str] = roles.LOG_ACTION
    timestamp_column: Optional[str] = roles.LOG_TIMESTAMP
    max_history: int = 200  # history window H; the encoder's max_seq_len must be >= H + 1
    min_length: int = 3  # a user needs 3 events: >= 1 history item, a train target, an eval target


@dataclass
class TrainConfig(LoopConfig):
    """The retrieval objective and protocol; the loop's own settings (device, precision, schedule, checkpoints,
    early stopping) are inherited from `merlin_hstu.train.config.LoopConfig`."""

    epochs: int = 10
    batch_size: int = 128
    learning_rate: float = 1e-3
    betas: tuple = (0.9, 0.98)
    weight_decay: float = 0.0
    num_negatives: int = 128
    temperature: float = 0.05
    input_dropout: float = 0.2
    seed: int = 42
    eval_batch_size: int = 256
    rank_cap: int = 2500
    ks: tuple = (10, 50, 200)
    eval_every: int = 0  # evaluate every n epochs during training (0: only at the end)
    threads: int = 0  # torch intra-op threads (0: leave torch's default)
    max_steps: int = 0  # stop after this many optimizer steps in total (0: run every epoch in full)
    loss: str = "sampled_softmax"  # sampled_softmax | full_softmax | bce
    negatives: str = "uniform"  # uniform (over the catalogue) | in_batch (the batch's supervised positives)
    logq_correction: bool = False  # in-batch negatives only: logit - log q(item)
    mi_loss_weight: float = 0.0  # MoL heads: weight of the gates' mutual-information aux loss
    # full_softmax only: false keeps each position's already-seen items out of its softmax (the metrics never rank
    # them); written out only when false, so earlier configs dump (and fingerprint) as they did
    history_negatives: bool = True
    # leave_one_out: per user, train on s_1..s_{T-1}, evaluate s_T (processed/); sessions: the Merlin train / valid /
    # test files of DATA/splits/ (train on train, validate on valid, final metrics on test; last item per session)
    split: str = "leave_one_out"

    def __post_init__(self) -> None:
        if self.split not in SPLIT_MODES:
            raise ValueError(f"train.split must be one of {list(SPLIT_MODES)}, got {self.split!r}")
        super().__post_init__()
        if self.split == "sessions" and self.validation_fraction:
            raise ValueError(f"train.validation_fraction={self.validation_fraction} holds users out of leave-one-out "
                             "training, but with train.split=sessions the valid sessions (DATA/splits/valid.parquet) "
                             "are the validation split: set train.validation_fraction=0")
        if self.split == "sessions" and self.streaming:
            raise ValueError("train.split=sessions reads the train / valid / test files in memory; streaming reads "
                             "processed/ for leave-one-out: set train.streaming=false or train.split=leave_one_out")
        try:  # an invalid loss / negatives / temperature combination fails here, at load time
            self.loss_config()
        except ValueError as error:
            raise ValueError(f"train section: {error} (keys train.loss, train.negatives, train.num_negatives, "
                             "train.temperature, train.logq_correction, train.mi_loss_weight, train.history_negatives)") from None

    @property
    def validates(self) -> bool:
        return bool(self.validation_fraction) or self.split == "sessions"

    def loss_config(self) -> RetrievalLossConfig:
        return RetrievalLossConfig(num_negatives=self.num_negatives, temperature=self.temperature, loss=self.loss,
                                   negatives=self.negatives, logq_correction=self.logq_correction,
                                   mi_loss_weight=self.mi_loss_weight, history_negatives=self.history_negatives)


@dataclass
class ExperimentConfig:
    name: str = "custom"
    description: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    model: HSTUEncoderConfig | SASRecEncoderConfig = field(default_factory=HSTUEncoderConfig)
    head: RetrievalHeadConfig = field(default_factory=RetrievalHeadConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    inputs: RetrievalInputsConfig = field(default_factory=RetrievalInputsConfig)
    embeddings: str = "torch"  # model.embeddings: torch | torchrec (merlin_hstu.common.embeddings)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["model"] = {"type": encoder_type(self.model), **d["model"]}
        if d.pop("embeddings") != "torch":  # written only when set, so torch configs dump as they always did
            d["model"]["embeddings"] = self.embeddings
        for key in ("betas", "ks"):
            d["train"][key] = list(d["train"][key])
        if self.inputs == RetrievalInputsConfig():
            del d["inputs"]
        if d["train"]["split"] == TrainConfig.split:  # written only when set: leave-one-out configs dump as before
            del d["train"]["split"]
        if d["train"]["history_negatives"] is TrainConfig.history_negatives:
            del d["train"]["history_negatives"]
        return d


_SECTIONS = {"data": DataConfig, "inputs": RetrievalInputsConfig, "head": RetrievalHeadConfig, "train": TrainConfig}


def _build(cls, values: dict, where: str):
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in {where}; valid keys: {sorted(names)}")
    kwargs = {}
    for key, value in values.items():
        if names[key].type in ("tuple", tuple) and isinstance(value, list):
            value = tuple(value)
        kwargs[key] = value
    return cls(**kwargs)


def config_from_dict(d: dict) -> ExperimentConfig:
    d = dict(d or {})
    unknown = sorted(set(d) - {"name", "description", "model", *_SECTIONS})
    if unknown:
        raise ValueError(f"unknown top-level key(s) {unknown}; valid: name, description, data, model, inputs, head, "
                         "train")
    sections = {k: _build(cls, d.get(k) or {}, k) for k, cls in _SECTIONS.items()}
    model = dict(d.get("model") or {})
    kind = model.pop("type", "hstu")
    if kind not in ENCODER_CONFIGS:
        raise ValueError(f"unknown model.type {kind!r}; valid: {sorted(ENCODER_CONFIGS)}")
    embeddings = check_backend(model.pop("embeddings", "torch"), "model.embeddings")
    sections["model"] = _build(ENCODER_CONFIGS[kind], model, f"model (type {kind})")
    cfg = ExperimentConfig(name=d.get("name", "custom"), description=d.get("description", ""),
                           embeddings=embeddings, **sections)
    if cfg.train.mi_loss_weight and cfg.head.similarity != "mol":
        raise ValueError(f"train.mi_loss_weight={cfg.train.mi_loss_weight} weighs MoL's gate loss, but "
                         f"head.similarity={cfg.head.similarity!r}: set head.similarity=mol or mi_loss_weight=0")
    cfg.inputs.item_dim(cfg.model.embedding_dim)  # concat: the action width must leave room for the items
    tokens = cfg.inputs.tokens_per_event()
    if cfg.model.max_seq_len < tokens * (cfg.data.max_history + 1):
        raise ValueError(
            f"model.max_seq_len={cfg.model.max_seq_len} must be >= data.max_history + 1 = {cfg.data.max_history + 1}"
            if tokens == 1 else
            f"model.max_seq_len={cfg.model.max_seq_len} must be >= 2 * (data.max_history + 1) = "
            f"{2 * (cfg.data.max_history + 1)} with inputs.actions=interleave (two tokens per event)"
        )
    return cfg


def preset_names() -> list:
    return presets.preset_names("retrieval")


def load_config(name_or_path: str | Path = "demo", overrides: Sequence[str] = ()) -> ExperimentConfig:
    """A retrieval preset (merlin_hstu/configs/retrieval/) or YAML file, with dotted `overrides`."""
    return config_from_dict(presets.read_preset("retrieval", name_or_path, overrides))


def dump_config(cfg: ExperimentConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
