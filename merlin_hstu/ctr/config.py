"""Typed CTR experiment configuration, loaded from YAML presets in `merlin_hstu/configs/ctr/`.

    cfg = load_config("wukong", ["model.num_layers=3", "train.epochs=2"])

Sections: `model` (`type`: wukong | dlrm | logreg, then that model's fields; WuKong tower fields may be given flat,
checked by `merlin_hstu.ctr.train.build_ctr_model`) and `train` (`CTRTrainConfig`: optimiser, epochs and the shared
loop settings: device, precision, schedule, checkpoints). The data is a directory written by the Criteo workflow.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import yaml

from merlin_hstu.common import presets
from merlin_hstu.common.overrides import replace_fields
from merlin_hstu.ctr.train import MODELS, CTRTrainConfig, build_ctr_model


@dataclass
class CTRExperimentConfig:
    name: str = "custom"
    description: str = ""
    model: dict = field(default_factory=lambda: {"type": "wukong"})
    train: CTRTrainConfig = field(default_factory=CTRTrainConfig)

    @property
    def model_type(self) -> str:
        return self.model.get("type", "wukong")

    def model_fields(self) -> dict:
        return {k: tuple(v) if isinstance(v, list) else v for k, v in self.model.items() if k != "type"}

    def build_model(self, cardinalities, num_dense: int):
        return build_ctr_model(self.model_type, cardinalities, num_dense, self.model_fields())

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["model"] = {k: list(v) if isinstance(v, tuple) else v for k, v in d["model"].items()}
        return d


def config_from_dict(d: dict) -> CTRExperimentConfig:
    d = dict(d or {})
    unknown = sorted(set(d) - {"name", "description", "model", "train"})
    if unknown:
        raise ValueError(f"unknown top-level key(s) {unknown}; valid: name, description, model, train")
    model = dict(d.get("model") or {})
    kind = model.get("type", "wukong")
    if kind not in MODELS:
        raise ValueError(f"unknown model.type {kind!r}; valid: {list(MODELS)}")
    model["type"] = kind
    train = replace_fields(CTRTrainConfig(), d.get("train") or {}, "train")
    train.__post_init__()
    return CTRExperimentConfig(name=d.get("name", "custom"), description=d.get("description", ""), model=model,
                               train=train)


def preset_names() -> list:
    return presets.preset_names("ctr")


def load_config(name_or_path: str | Path = "wukong", overrides: Sequence[str] = ()) -> CTRExperimentConfig:
    return config_from_dict(presets.read_preset("ctr", name_or_path, overrides))


def dump_config(cfg: CTRExperimentConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
