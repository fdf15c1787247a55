"""Typed configuration of a semantic-ID run: tokenizer, decoder, decoding, training and data sections.

    cfg = load_sid_config("sid-hstu-amazon")                       # a preset (merlin_hstu/configs/sid/)
    cfg = load_sid_config("my.yaml", ["decode.beam_width=20"])     # a file plus dotted overrides

Sections (unknown keys are errors; invalid values fail at construction with the fix):

* `tokenizer` (`merlin_hstu.sid.tokenizer.TokenizerConfig`): rq-kmeans | rq-vae, L levels x K codes, seed, ...
* `model`: the decoder's STU stack (the keys of `HSTUEncoderConfig` except max_seq_len, which follows from
  data.max_history and the tokens per item: 1 + (max_history + 1) * T) plus `input_dropout` and `positions`
  (token | item: relative positions counted in tokens or in items).
* `decode`: beam width (the length of the ranked list: K <= beam width), the engine (cached | full), and whether
  history items are filtered from the list (the retrieval protocol's rule).
* `train` (`SIDTrainConfig`, the one loop's `LoopConfig` inherited): epochs, batch, AdamW, ks, early stopping;
  `validation_fraction: 1.0` is the leave-one-out validation on every user's second-to-last item.
* `data`: the history window in items, and where the item embeddings come from (`embeddings`: collaborative, an
  ID model's item table, trained first with the preset `id_model` unless `embeddings_path` names a run; text, the
  dataset's item texts through the HLLM item encoder; file, a user-supplied matrix at `embeddings_path`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import yaml

from merlin_hstu.encoders.stu import HSTUEncoderConfig
from merlin_hstu.sid.embeddings import SOURCES
from merlin_hstu.sid.model import POSITIONS, SIDModelConfig
from merlin_hstu.sid.tokenizer import TokenizerConfig
from merlin_hstu.train.config import LoopConfig

ENGINES = ("cached", "full")


def _int_at_least(value, low: int, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


@dataclass
class DecoderConfig:
    """The `model` section: the decoder's STU stack and input."""

    embedding_dim: int = 64
    num_blocks: int = 4
    num_heads: int = 4
    attention_dim: int = 16
    linear_dim: int = 16
    linear_dropout: float = 0.2
    input_dropout: float = 0.2
    position_bias: bool = True
    time_bias: bool = False
    num_time_buckets: int = 128
    positions: str = "token"  # token | item
    kernel: str = "auto"

    def __post_init__(self) -> None:
        if self.positions not in POSITIONS:
            raise ValueError(f"model.positions must be one of {POSITIONS}, got {self.positions!r}")
        self.encoder_config(1)  # validates the stack's fields

    def encoder_config(self, max_seq_len: int) -> HSTUEncoderConfig:
        return HSTUEncoderConfig(embedding_dim=self.embedding_dim, num_blocks=self.num_blocks,
                                 num_heads=self.num_heads, attention_dim=self.attention_dim,
                                 linear_dim=self.linear_dim, max_seq_len=max_seq_len,
                                 linear_dropout=self.linear_dropout, position_bias=self.position_bias,
                                 time_bias=self.time_bias, num_time_buckets=self.num_time_buckets, kernel=self.kernel)


@dataclass
class DecodeConfig:
    beam_width: int = 50  # beams kept per level = the length of the ranked list (K <= beam_width)
    engine: str = "cached"  # cached (KV cache) | full (recompute every step)
    exclude_history: bool = True  # drop history items from the ranked list (the retrieval protocol)
    batch_size: int = 128  # users decoded together

    def __post_init__(self) -> None:
        _int_at_least(self.beam_width, 1, "decode.beam_width")
        _int_at_least(self.batch_size, 1, "decode.batch_size")
        if self.engine not in ENGINES:
            raise ValueError(f"decode.engine must be one of {ENGINES}, got {self.engine!r}")


@dataclass
class SIDTrainConfig(LoopConfig):
    epochs: int = 100
    batch_size: int = 128
    learning_rate: float = 1e-3
    betas: tuple = (0.9, 0.98)
    weight_decay: float = 0.0
    seed: int = 42
    threads: int = 0
    max_steps: int = 0
    eval_every: int = 0
    ks: tuple = (5, 10)

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("epochs", "batch_size"):
            _int_at_least(getattr(self, name), 1, f"train.{name}")
        for name in ("seed", "threads", "max_steps", "eval_every"):
            _int_at_least(getattr(self, name), 0, f"train.{name}")
        if not self.learning_rate > 0:
            raise ValueError(f"train.learning_rate must be > 0, got {self.learning_rate!r}")
        self.betas = tuple(float(b) for b in self.betas)
        self.ks = tuple(int(k) for k in self.ks)
        if not self.ks or min(self.ks) < 1:
            raise ValueError(f"train.ks must be positive cut-offs, got {list(self.ks)}")


@dataclass
class SIDDataConfig:
    max_history: int = 50  # history window in ITEMS (the decoder reads T tokens per item)
    min_length: int = 3
    embeddings: str = "collaborative"  # collaborative | text | file
    embeddings_path: Optional[str] = None  # a retrieval run (collaborative), a dataset dir (text), a matrix (file)
    id_model: str = "hstu-amazon"  # collaborative without a run: this retrieval preset is trained first

    def __post_init__(self) -> None:
        _int_at_least(self.max_history, 1, "data.max_history")
        _int_at_least(self.min_length, 1, "data.min_length")
        if self.embeddings not in SOURCES:
            raise ValueError(f"data.embeddings must be one of {SOURCES}, got {self.embeddings!r}")
        if self.embeddings == "file" and not self.embeddings_path:
            raise ValueError("data.embeddings=file reads a matrix: set data.embeddings_path to a .npy or .parquet "
                             "file")


_SECTIONS = {"tokenizer": TokenizerConfig, "model": DecoderConfig, "decode": DecodeConfig, "train": SIDTrainConfig,
             "data": SIDDataConfig}


@dataclass
class SIDConfig:
    name: str = "sid-hstu"
    description: str = ""
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: DecoderConfig = field(default_factory=DecoderConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    train: SIDTrainConfig = field(default_factory=SIDTrainConfig)
    data: SIDDataConfig = field(default_factory=SIDDataConfig)

    def __post_init__(self) -> None:
        if max(self.train.ks) > self.decode.beam_width:
            raise ValueError(f"train.ks={list(self.train.ks)} cuts the ranked list at {max(self.train.ks)}, but beam "
                             f"search returns decode.beam_width={self.decode.beam_width} items: raise the beam width")

    def max_seq_len(self, tokens_per_item: int) -> int:
        """Slots a training sequence needs: BOS + (history + target) items of T tokens."""
        return 1 + (self.data.max_history + 1) * tokens_per_item

    def model_config(self, codebook_sizes: Sequence[int]) -> SIDModelConfig:
        encoder = self.model.encoder_config(self.max_seq_len(len(codebook_sizes)))
        return SIDModelConfig(list(codebook_sizes), encoder, self.model.input_dropout, self.model.positions)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["tokenizer"] = self.tokenizer.to_dict()
        for key in ("betas", "ks"):
            d["train"][key] = list(d["train"][key])
        return d

    @classmethod
    def from_dict(cls, d: Optional[dict]) -> "SIDConfig":
        d = dict(d or {})
        unknown = sorted(set(d) - {"name", "description", *_SECTIONS})
        if unknown:
            raise ValueError(f"unknown top-level key(s) {unknown} in the SID config; valid: name, description, "
                             f"{', '.join(_SECTIONS)}")
        sections = {}
        for key, section in _SECTIONS.items():
            values = dict(d.get(key) or {})
            if section is TokenizerConfig:
                sections[key] = TokenizerConfig.from_dict(values)
                continue
            names = {f.name: f for f in dataclasses.fields(section)}
            bad = sorted(set(values) - set(names))
            if bad:
                raise ValueError(f"unknown key(s) {bad} in section {key!r}; valid keys: {sorted(names)}")
            for name, value in list(values.items()):
                if names[name].type in ("tuple", tuple) and isinstance(value, list):
                    values[name] = tuple(value)
                if names[name].type in ("float", float) and isinstance(value, str):  # YAML 1.1 reads 1e-3 as text
                    try:
                        values[name] = float(value)
                    except ValueError:
                        raise ValueError(f"{key}.{name} must be a number, got {value!r}") from None
            sections[key] = section(**values)
        return cls(name=d.get("name", "sid-hstu"), description=d.get("description", ""), **sections)


def preset_names() -> list:
    from merlin_hstu.common import presets

    return presets.preset_names("sid")


def load_sid_config(name_or_path: str | Path = "sid-hstu-amazon", overrides: Sequence[str] = ()) -> SIDConfig:
    """A SID preset (merlin_hstu/configs/sid/) or YAML file, with dotted `overrides`."""
    from merlin_hstu.common import presets

    return SIDConfig.from_dict(presets.read_preset("sid", name_or_path, overrides))


def dump_sid_config(cfg: SIDConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
