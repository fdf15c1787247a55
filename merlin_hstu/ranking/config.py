"""Typed ranking experiment configuration, loaded from YAML presets in `merlin_hstu/configs/ranking/`.

    cfg = load_config("dlrm-hstu", ["train.epochs=3", "model.num_blocks=4"])

Sections: `data` (how a preprocess-ranking directory is read: training windows, the user split, the tasks),
`model` (`type`: dlrm-hstu | dlrm-baseline, then that model's config fields, checked by its builder) and `train`
(`RankingTrainConfig`: optimiser, epochs, and the shared loop settings: device, precision, schedule, checkpoints).
Unknown keys are errors that name the valid ones.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence, Tuple

import yaml

from merlin_hstu.common import presets
from merlin_hstu.common.overrides import replace_fields
from merlin_hstu.ranking.baselines import build_dlrm_baseline
from merlin_hstu.ranking.model import build_dlrm_hstu
from merlin_hstu.ranking.train import RankingTrainConfig

#: model.type -> builder(dataset, model fields) -> a module with forward(RankingBatch) -> [candidates, tasks]
MODELS: Dict[str, Callable] = {"dlrm-hstu": build_dlrm_hstu, "dlrm-baseline": build_dlrm_baseline}


@dataclass
class RankingDataConfig:
    train_windows: int = 1  # samples per training user (1: its last K events; 0: every window; see RankingDataset)
    test_fraction: Optional[float] = None  # None: the split recorded by the workflow (ranking.json)
    split_seed: Optional[int] = None
    tasks: Optional[Tuple[str, ...]] = None  # task names to train; None: every task of the dataset

    def __post_init__(self) -> None:
        if self.tasks is not None:
            self.tasks = tuple(self.tasks)

    def load(self, path, train=None):
        """The dataset at `path` in memory (RankingDataset), or with `train.streaming` (a RankingTrainConfig) read
        row group by row group (StreamingRankingDataset; under torchrun the train split of this rank's row
        groups only)."""
        from merlin_hstu.ranking.data import RankingDataset, StreamingRankingDataset

        if train is None or not train.streaming:
            return RankingDataset.load(path, tasks=self.tasks, test_fraction=self.test_fraction,
                                       split_seed=self.split_seed, train_windows=self.train_windows)
        from merlin_hstu.distributed.context import launched_rank

        rank, world = launched_rank()
        return StreamingRankingDataset(path, tasks=self.tasks, test_fraction=self.test_fraction,
                                       split_seed=self.split_seed, train_windows=self.train_windows,
                                       shuffle_buffer=train.shuffle_buffer, rank=rank, world_size=world,
                                       train_split=train.train_split)


@dataclass
class RankingExperimentConfig:
    name: str = "custom"
    description: str = ""
    data: RankingDataConfig = field(default_factory=RankingDataConfig)
    model: dict = field(default_factory=lambda: {"type": "dlrm-hstu"})
    train: RankingTrainConfig = field(default_factory=RankingTrainConfig)

    @property
    def model_type(self) -> str:
        return self.model.get("type", "dlrm-hstu")

    def model_fields(self) -> dict:
        return {k: tuple(v) if isinstance(v, list) else v for k, v in self.model.items() if k != "type"}

    def build_model(self, dataset):
        return MODELS[self.model_type](dataset, self.model_fields())

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["train"]["betas"] = list(d["train"]["betas"])
        if d["data"]["tasks"] is not None:
            d["data"]["tasks"] = list(d["data"]["tasks"])
        d["model"] = {k: list(v) if isinstance(v, tuple) else v for k, v in d["model"].items()}
        return d


def config_from_dict(d: dict) -> RankingExperimentConfig:
    d = dict(d or {})
    unknown = sorted(set(d) - {"name", "description", "data", "model", "train"})
    if unknown:
        raise ValueError(f"unknown top-level key(s) {unknown}; valid: name, description, data, model, train")
    model = dict(d.get("model") or {})
    kind = model.get("type", "dlrm-hstu")
    if kind not in MODELS:
        raise ValueError(f"unknown model.type {kind!r}; valid: {sorted(MODELS)}")
    model["type"] = kind
    train = replace_fields(RankingTrainConfig(), {k: tuple(v) if isinstance(v, list) else v
                                                  for k, v in (d.get("train") or {}).items()}, "train")
    train.__post_init__()
    data = replace_fields(RankingDataConfig(), d.get("data") or {}, "data")
    data.__post_init__()
    return RankingExperimentConfig(name=d.get("name", "custom"), description=d.get("description", ""), data=data,
                                   model=model, train=train)


def preset_names() -> list:
    return presets.preset_names("ranking")


def load_config(name_or_path: str | Path = "dlrm-hstu", overrides: Sequence[str] = ()) -> RankingExperimentConfig:
    return config_from_dict(presets.read_preset("ranking", name_or_path, overrides))


def dump_config(cfg: RankingExperimentConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
