"""CTR data for the WuKong / DLRM models: a synthetic Criteo-layout generator with planted interactions, the
ml-1m-prefix CTR table, and the tensors the models train on.

Synthetic Criteo layout (`generate_synthetic_criteo`, seeded; `write_criteo_tsv` writes the 40-field TSV that
`merlin_hstu.workflows.criteo_workflow` reads).  The real Criteo logs may not be redistributed, so the
benchmark plants a known structure instead:

* I1..I13: counts floor(exp(N(mu_j, 1.2))) (I2 is -1 in 5% of rows, as in Criteo); a fraction `missing_rate`
  of every integer and categorical field is empty.  z_j = standardised log(1 + max(I_j, 0)) with missing = 0,
  i.e. exactly what the workflow computes, so the planted signal survives preprocessing.
* C1..C26: 8-hex-digit strings.  The columns that carry signal (C1..C10) draw their values uniformly from
  small vocabularies; the others are noise with Zipf-distributed values and Criteo-like vocabularies up to
  `max_cardinality`.  s_j(v) = +-1 is a fixed random sign per value of column j (half the values each).
* label ~ Bernoulli(sigmoid(logit)) with

      logit = base
            + a1 (z_1 + s_1 + s_2)                                   order 1
            + a2 (s_3 s_4 + s_5 s_6 + z_2 s_7)                       order 2
            + a3 (s_3 s_4 s_8 + s_5 s_6 s_9 + z_2 s_7 s_10)          order 3

  A product of independent balanced signs has no lower-order part, so logistic regression cannot see the
  order-2/3 terms at all, and a model limited to pairwise terms cannot see the order-3 ones.  Each order-3
  term extends an order-2 term by one more column - the way a stack of interaction layers builds them (layer
  2 multiplies a learned pair with a third feature).  A "pure" three-way sign product with no order-2 part
  is a 3-bit parity: the gradient carries no first-order signal towards it, and in our runs no model (WuKong
  included) picked it up within a few epochs among 26 columns (a small clean case is learned: see
  tests/test_wukong.py).  `extra_columns` / `extra_terms` make the problem harder for scaling curves: more
  signal columns and more random nested (order-2 + order-3) terms over them.  The generator also returns the planted logit split by order
  (`SyntheticCriteo.ceiling_aucs`): the AUC a model capturing orders <= 1, <= 2, <= 3 could reach.

ml-1m-prefix CTR (`load_ml1m_ctr`): every rating of the staged MovieLens-1M prefix is one impression,
label = rating >= 4.  Categorical features: user id, item id, gender, age, occupation, zip prefix (first 3
characters), first and second genre, hour and weekday of the rating (UTC).  Dense features: log(1 + ratings
of the user in train), log(1 + ratings of the item in train), release year (from the title), standardised
with train statistics.  Split: per user by time - each user's last 20% of ratings (at least one, stable sort
by timestamp) are the validation rows, so every validation rating is later than that user's train ratings.
Categorical ids are 1.. in order of first appearance in train; 0 is a value never seen in train.  The fitted
encoding is an `ML1MCTREncoder` (fit on the train rows, transform any rows), kept as CTRData.info["encoder"]
and in the run, so a served model encodes raw rows as training did.

Criteo-workflow directories load in memory (`load_criteo_tensors` -> `CTRTensors`) or, with train.streaming, row
group by row group (`open_criteo_stream` -> `CTRStream`, the same `batches` interface; docs/scaling.md).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import pandas as pd
import torch

from merlin_hstu.common import schema as roles
from merlin_hstu.common.atomic_dir import write_file
from merlin_hstu.common.overrides import replace_fields

PathLike = Union[str, os.PathLike]

# Which columns carry the planted signal (1-based Criteo names); see the module docstring.
MAIN_DENSE, MAIN_CATEGORICAL = 1, (1, 2)  # z_1; s_1, s_2
ORDER2_PAIRS = ((3, 4), (5, 6))  # s_3 s_4, s_5 s_6
ORDER2_DENSE_PAIR = (2, 7)  # z_2 s_7
ORDER3_EXTRA = (8, 9, 10)  # the third column of each order-3 term, in the order of the three order-2 terms
GENERATOR_VERSION = 2  # bump when the generated data changes (benchmark caches key on it)
SIGNAL_COLUMNS = 10  # C1..C10 carry signal (uniform, small vocabularies); C11..C26 are noise

@dataclass
class SyntheticCriteoConfig:
    """Size, seed and planted-signal strengths of the synthetic Criteo-layout data."""

    num_rows: int = 200_000
    seed: int = 0
    signal_cardinality: int = 10  # vocabulary of each signal column C1..C10 (uniform values)
    max_cardinality: int = 50_000  # largest noise-column vocabulary (C11..C26 span 20 .. this, log-spaced)
    zipf_exponent: float = 1.1  # noise columns: P(value rank r) ~ 1 / r^exponent
    missing_rate: float = 0.02
    base_logit: float = -1.0
    order1: float = 0.4
    order2: float = 0.8
    order3: float = 1.0
    # difficulty knob (scaling curves): C11..C(10 + extra_columns) become signal columns too, and extra_terms
    # random nested terms  extra_strength * (s_a s_b + s_a s_b s_c)  over distinct signal columns a, b, c >= 3
    extra_columns: int = 0
    extra_terms: int = 0
    extra_strength: float = 0.5

    def __post_init__(self) -> None:
        for name in ("num_rows", "signal_cardinality", "max_cardinality"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 2:
                raise ValueError(f"SyntheticCriteoConfig.{name} must be an integer >= 2, got {value!r}")
        if not 0 <= self.extra_columns <= 26 - SIGNAL_COLUMNS or self.extra_terms < 0:
            raise ValueError(f"SyntheticCriteoConfig.extra_columns must be in [0, {26 - SIGNAL_COLUMNS}] and "
                             f"extra_terms >= 0, got {self.extra_columns}, {self.extra_terms}")
        if not 0.0 <= self.missing_rate < 1.0:
            raise ValueError(f"SyntheticCriteoConfig.missing_rate must be in [0, 1), got {self.missing_rate}")

    @property
    def signal_columns(self) -> int:
        return SIGNAL_COLUMNS + self.extra_columns

    def cardinalities(self) -> List[int]:
        noise = np.geomspace(20, self.max_cardinality, 26 - self.signal_columns).round().astype(int).tolist()
        return [self.signal_cardinality] * self.signal_columns + noise


@dataclass
class SyntheticCriteo:
    frame: pd.DataFrame  # label (int), I1..I13 (nullable Int64), C1..C26 (str or None)
    planted_logit: np.ndarray  # [num_rows] the logit the labels were drawn from
    planted_terms: Dict[str, np.ndarray]  # "order1" / "order2" / "order3" parts of it (plus base_logit)

    def ceiling_aucs(self, rows: slice = slice(None)) -> Dict[str, float]:
        """AUC of the planted logit truncated to orders <= 1, <= 2 and all: what a model that captures
        exactly those orders could reach on `rows`."""
        from merlin_hstu.common.metrics import auc

        y = self.frame["label"].to_numpy()[rows]
        t = {k: v[rows] for k, v in self.planted_terms.items()}
        return {"order<=1": auc(y, t["order1"]), "order<=2": auc(y, t["order1"] + t["order2"]),
                "order<=3": auc(y, self.planted_logit[rows])}


def _balanced_signs(rng: np.random.Generator, n: int) -> np.ndarray:
    signs = np.where(np.arange(n) % 2 == 0, 1.0, -1.0)
    return rng.permutation(signs)


def generate_synthetic_criteo(config: Optional[SyntheticCriteoConfig] = None) -> SyntheticCriteo:
    """Rows in the Criteo layout with the planted logit of the module docstring (deterministic per seed)."""
    cfg = config or SyntheticCriteoConfig()
    rng = np.random.default_rng(cfg.seed)
    n = cfg.num_rows
    # integers: log-normal counts, I2 sometimes -1, some missing
    mu = rng.uniform(0.0, 4.0, 13)
    ints = np.floor(np.exp(rng.normal(mu, 1.2, size=(n, 13)))).astype(np.int64)
    ints[rng.random(n) < 0.05, 1] = -1
    int_missing = rng.random((n, 13)) < cfg.missing_rate
    logs = np.log1p(np.where(int_missing, 0, np.maximum(ints, 0)))
    z = (logs - logs.mean(0)) / logs.std(0)  # what the workflow's FillMissing/Clip/LogOp/Normalize gives

    cards = cfg.cardinalities()
    codes = np.empty((n, 26), dtype=np.int64)
    signs = np.empty((n, 26))
    for j, card in enumerate(cards):
        if j < cfg.signal_columns:
            codes[:, j] = rng.integers(0, card, n)
        else:
            p = 1.0 / np.arange(1, card + 1) ** cfg.zipf_exponent
            codes[:, j] = rng.choice(card, size=n, p=p / p.sum())
        signs[:, j] = _balanced_signs(rng, card)[codes[:, j]]
    cat_missing = rng.random((n, 26)) < cfg.missing_rate
    signs[cat_missing] = 0.0  # a missing value carries no signal (it maps to the null id)

    s = lambda c: signs[:, c - 1]  # noqa: E731  (1-based Criteo column numbers read like the docstring)
    pairs = [s(a) * s(b) for a, b in ORDER2_PAIRS] + [z[:, ORDER2_DENSE_PAIR[0] - 1] * s(ORDER2_DENSE_PAIR[1])]
    terms = {"order1": cfg.order1 * (z[:, MAIN_DENSE - 1] + s(MAIN_CATEGORICAL[0]) + s(MAIN_CATEGORICAL[1])),
             "order2": cfg.order2 * sum(pairs),
             "order3": cfg.order3 * sum(pair * s(c) for pair, c in zip(pairs, ORDER3_EXTRA))}
    extra = np.random.default_rng([cfg.seed, 1])  # its own stream: extra_terms=0 leaves the data unchanged
    for _ in range(cfg.extra_terms):
        a, b, c = extra.choice(np.arange(3, cfg.signal_columns + 1), size=3, replace=False)
        terms["order2"] = terms["order2"] + cfg.extra_strength * s(a) * s(b)
        terms["order3"] = terms["order3"] + cfg.extra_strength * s(a) * s(b) * s(c)
    logit = cfg.base_logit + terms["order1"] + terms["order2"] + terms["order3"]
    labels = (rng.random(n) < 1.0 / (1.0 + np.exp(-logit))).astype(np.int64)

    frame = {"label": labels}
    for j in range(13):
        frame[f"I{j + 1}"] = pd.array(np.where(int_missing[:, j], 0, ints[:, j]), dtype="Int64")
        frame[f"I{j + 1}"][int_missing[:, j]] = pd.NA
    for j, card in enumerate(cards):
        hashes = rng.choice(2**32, size=card, replace=False)
        vocab = np.array([f"{h:08x}" for h in hashes], dtype=object)
        values = vocab[codes[:, j]]
        values[cat_missing[:, j]] = None
        frame[f"C{j + 1}"] = values
    return SyntheticCriteo(pd.DataFrame(frame), logit, terms)


def write_criteo_tsv(frame: pd.DataFrame, path: PathLike) -> Path:
    """Write rows in the Criteo layout (tab-separated, no header, empty = missing); temp file then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_file(path, lambda tmp: frame.to_csv(tmp, sep="\t", header=False, index=False, na_rep=""))
    return path


# ---------------------------------------------------------------------------------------------------------
# tensors
# ---------------------------------------------------------------------------------------------------------
@dataclass
class CTRTensors:
    """One split as tensors: dense [N, m] float32, sparse [N, c] int64 (< cardinalities), labels [N] float32."""

    dense: torch.Tensor
    sparse: torch.Tensor
    labels: torch.Tensor
    dense_names: List[str]
    sparse_names: List[str]
    cardinalities: List[int]

    def __post_init__(self) -> None:
        n = len(self.labels)
        if self.dense.shape != (n, len(self.dense_names)) or self.sparse.shape != (n, len(self.sparse_names)):
            raise ValueError(f"CTRTensors: dense {tuple(self.dense.shape)} / sparse {tuple(self.sparse.shape)} "
                             f"do not match {n} labels and {len(self.dense_names)} dense / "
                             f"{len(self.sparse_names)} categorical names")

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, index: torch.Tensor) -> "CTRTensors":
        """The rows at `index`, as a new split."""
        return CTRTensors(self.dense[index], self.sparse[index], self.labels[index], self.dense_names,
                          self.sparse_names, self.cardinalities)

    def batches(self, batch_size: int, shuffle: bool = False, generator: Optional[torch.Generator] = None
                ) -> Iterator[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(dense, sparse, labels) batches; the last one may be smaller."""
        order = torch.randperm(len(self), generator=generator) if shuffle else torch.arange(len(self))
        for start in range(0, len(self), batch_size):
            idx = order[start:start + batch_size]
            yield self.dense[idx], self.sparse[idx], self.labels[idx]

    def num_batches(self, batch_size: int) -> int:
        return -(-len(self) // batch_size)


@dataclass
class CTRData:
    """The train and valid splits: tensors in memory (`CTRTensors`), or streamed row group by row group
    (`CTRStream`, `open_criteo_stream`; the same `batches` interface)."""

    name: str
    train: Union[CTRTensors, "CTRStream"]
    valid: Union[CTRTensors, "CTRStream"]
    info: Dict[str, object] = field(default_factory=dict)

    @property
    def streaming(self) -> bool:
        return isinstance(self.train, CTRStream)

    @property
    def cardinalities(self) -> List[int]:
        return self.train.cardinalities

    @property
    def num_dense(self) -> int:
        return len(self.train.dense_names)


def tensors_from_frame(df: pd.DataFrame, dense: Sequence[str], sparse: Sequence[str], label: str,
                       cardinalities: Sequence[int]) -> CTRTensors:
    missing = [c for c in [*dense, *sparse, label] if c not in df.columns]
    if missing:
        raise ValueError(f"CTR frame lacks column(s) {missing} (has {list(df.columns)})")
    return CTRTensors(
        dense=torch.as_tensor(df[list(dense)].to_numpy(dtype=np.float32).reshape(len(df), len(dense))),
        sparse=torch.as_tensor(df[list(sparse)].to_numpy(dtype=np.int64).reshape(len(df), len(sparse))),
        labels=torch.as_tensor(df[label].to_numpy(dtype=np.float32)),
        dense_names=list(dense), sparse_names=list(sparse), cardinalities=[int(c) for c in cardinalities])


@dataclass(frozen=True)
class CriteoColumns:
    """What a Criteo-workflow schema says: dense (CONTINUOUS), categorical (CATEGORICAL) and label (TARGET) column
    names, and each categorical column's table size (int_domain.max + 1)."""

    dense: List[str]
    sparse: List[str]
    label: str
    cardinalities: List[int]


def criteo_columns(dataset, path: PathLike) -> CriteoColumns:
    from merlin.schema import Tags

    from merlin_hstu.workflows.criteo_workflow import VALID

    if VALID not in dataset.splits:
        raise ValueError(f"{path} has no processed/valid split; preprocess with valid_fraction > 0")
    schema = dataset.schema
    dense = schema.select_by_tag(Tags.CONTINUOUS).column_names
    sparse = schema.select_by_tag(Tags.CATEGORICAL).column_names
    targets = schema.select_by_tag(Tags.TARGET).column_names
    if len(targets) != 1:
        raise ValueError(f"{path}: expected one TARGET column in the schema, found {targets}")
    cards = []
    for name in sparse:
        domain = schema[name].int_domain
        if domain is None or domain.max is None:
            raise ValueError(f"{path}: categorical column {name!r} has no int_domain.max in schema.pbtxt")
        cards.append(int(domain.max) + 1)
    return CriteoColumns(list(dense), list(sparse), targets[0], cards)


def load_criteo_tensors(path: PathLike) -> CTRData:
    """A `preprocess_criteo` output (or any processed dir with train/valid splits tagged CONTINUOUS /
    CATEGORICAL / TARGET) as tensors; table sizes come from the schema (int_domain.max + 1)."""
    from merlin_hstu.workflows.criteo_workflow import TRAIN, VALID, load_criteo_dataset

    dataset = load_criteo_dataset(path)
    columns = criteo_columns(dataset, path)
    splits = {}
    for name in (TRAIN, VALID):
        df = dataset.to_pandas(name)
        splits[name] = tensors_from_frame(df, columns.dense, columns.sparse, columns.label, columns.cardinalities)
    return CTRData(Path(path).name, splits[TRAIN], splits[VALID],
                   {"path": str(path), "rows": dataset.num_rows, "workflow": str(dataset.workflow_path)})


# ---------------------------------------------------------------------------------------------------------
# streaming (train.streaming): a Criteo-workflow directory read row group by row group
# ---------------------------------------------------------------------------------------------------------
VALIDATION_KEY_OFFSET = 7  # the streaming validation rows are keyed by train.seed + 7 (the in-memory draw's seed)


@dataclass
class CTRStream:
    """One split of a Criteo-workflow directory read row group by row group (`merlin_hstu.data.stream`): what a
    process holds is one row group, the shuffle buffer and a batch, never the split.

    `batches(batch_size, shuffle, generator)` has `CTRTensors.batches`' signature and, when the split fits in the
    buffer (`shuffle_buffer` >= its rows), its exact output: the rows in file order, `torch.randperm(n, generator)`,
    batched in order. A smaller buffer shuffles within it (row groups in a seeded random order). `holdout`
    (fraction, seed, held) keeps only the rows whose seeded hash of their index in the split
    (`data.stream.key_fraction`) is below the fraction (held) or not (the rest): train.validation_fraction."""

    groups: list  # this process's row groups (data.stream.RowGroup), in file order
    dense_names: List[str]
    sparse_names: List[str]
    label: str
    cardinalities: List[int]
    shuffle_buffer: int = 10000
    holdout: Optional[Tuple[float, int, bool]] = None
    rank: int = 0  # groups = the split's row groups rank::world_size (the valid split: all of them, rank 0 of 1)
    world_size: int = 1
    streaming = True

    def __post_init__(self) -> None:
        if self.shuffle_buffer < 1:
            raise ValueError(f"train.shuffle_buffer must be >= 1 row, got {self.shuffle_buffer}")
        self._count: Optional[int] = None

    def _keep(self, rows: np.ndarray) -> Optional[np.ndarray]:
        if self.holdout is None:
            return None
        from merlin_hstu.data.stream import key_fraction

        fraction, seed, held = self.holdout
        below = key_fraction(rows, seed) < fraction
        return below if held else ~below

    def __len__(self) -> int:
        """Rows of this process's row groups in the split (counted from the footers and row indices only)."""
        if self._count is None:
            total = 0
            for g in self.groups:
                keep = self._keep(np.arange(g.first_row, g.first_row + g.num_rows))
                total += g.num_rows if keep is None else int(keep.sum())
            self._count = total
        return self._count

    def part(self, fraction: float, seed: int, held: bool) -> "CTRStream":
        """The rows whose key hash is below `fraction` (held=True: the validation rows) or the others."""
        return dataclasses.replace(self, holdout=(float(fraction), int(seed), bool(held)))

    def samples(self, groups=None) -> Iterator[Dict[str, np.ndarray]]:
        """Per row group: dense float32 [n, m], sparse int64 [n, c], labels float32 [n], rows int64 (index in the
        split). Nulls, and ids outside a table, are errors naming the column."""
        from merlin_hstu.data.stream import read_groups

        names = [*self.dense_names, *self.sparse_names, self.label]
        for group, frame in read_groups(self.groups if groups is None else groups, names):
            where = f"{group.path.name}, row group {group.index}"
            for name in names:
                nulls = frame.column(name).null_count
                if nulls:
                    raise ValueError(f"column {name!r} has {nulls} null value(s) ({where}); the Criteo workflow "
                                     "fills every value: re-run preprocess_criteo")
            column = lambda name, dtype: frame.column(name).to_numpy().astype(dtype, copy=False)  # noqa: E731
            n = frame.num_rows
            sparse = np.stack([column(c, np.int64) for c in self.sparse_names], 1) if self.sparse_names \
                else np.zeros((n, 0), np.int64)
            for j, (name, card) in enumerate(zip(self.sparse_names, self.cardinalities)):
                if n and (sparse[:, j].min() < 0 or sparse[:, j].max() >= card):
                    raise ValueError(f"categorical column {name!r} has id {int(sparse[:, j].max())} or "
                                     f"{int(sparse[:, j].min())} outside its table of {card} rows ({where}; "
                                     "int_domain.max in schema.pbtxt); re-run preprocess_criteo")
            out = {"dense": np.stack([column(c, np.float32) for c in self.dense_names], 1) if self.dense_names
                   else np.zeros((n, 0), np.float32),
                   "sparse": sparse, "labels": column(self.label, np.float32),
                   "rows": np.arange(group.first_row, group.first_row + n, dtype=np.int64)}
            keep = self._keep(out["rows"])
            yield out if keep is None else {k: v[keep] for k, v in out.items()}

    def batches(self, batch_size: int, shuffle: bool = False, generator: Optional[torch.Generator] = None
                ) -> Iterator[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(dense, sparse, labels) batches, as `CTRTensors.batches`; the last one may be smaller."""
        from merlin_hstu.data.stream import epoch_batches

        if shuffle and generator is None:
            raise ValueError("a shuffled stream needs its generator")
        for b in epoch_batches(self.samples, self.groups, len(self), batch_size, self.shuffle_buffer,
                               generator if shuffle else None):
            yield torch.from_numpy(b["dense"]), torch.from_numpy(b["sparse"]), torch.from_numpy(b["labels"])

    def num_batches(self, batch_size: int) -> int:
        return -(-len(self) // batch_size)

    # --- several processes ----------------------------------------------------------------------------------
    def rank_steps(self, batch_size: int) -> int:
        from merlin_hstu.data.stream import rank_steps

        return rank_steps(len(self), batch_size, self.world_size)

    def rank_batches(self, batch_size: int, generator: torch.Generator):
        """This rank's batches of an epoch: its share of the global `batch_size` from its own row groups, shuffled,
        exactly `rank_steps` of them (its stream restarted, the generator going on, when it ends early)."""
        from merlin_hstu.data.stream import batch_share, repeat_for

        share = batch_share(batch_size, self.rank, self.world_size)
        return repeat_for(lambda: self.batches(share, shuffle=True, generator=generator), self.rank_steps(batch_size))


def open_criteo_stream(path: PathLike, shuffle_buffer: int = 10000, rank: int = 0, world_size: int = 1) -> CTRData:
    """A `preprocess_criteo` output for streaming: the train split's row groups of this process (rank r of N:
    groups r::N, `data.stream.shard`) and the whole valid split (every process evaluates all of it, so AUC is
    exact); reads footers and the schema only."""
    from merlin_hstu.data.stream import row_groups, shard
    from merlin_hstu.workflows.criteo_workflow import TRAIN, VALID, load_criteo_dataset

    dataset = load_criteo_dataset(path)
    c = criteo_columns(dataset, path)
    splits = {}
    for name in (TRAIN, VALID):
        groups = row_groups(dataset.parquet_files(name))
        if not sum(g.num_rows for g in groups):
            raise ValueError(f"{path}: the {name} split holds no rows")
        mine = shard(groups, rank, world_size) if name == TRAIN else groups
        splits[name] = CTRStream(mine, c.dense, c.sparse, c.label, c.cardinalities, shuffle_buffer,
                                 rank=rank if name == TRAIN else 0, world_size=world_size if name == TRAIN else 1)
    return CTRData(Path(path).name, splits[TRAIN], splits[VALID],
                   {"path": str(path), "rows": dataset.num_rows, "workflow": str(dataset.workflow_path),
                    "streaming": True})


# ---------------------------------------------------------------------------------------------------------
# ml-1m-prefix CTR
# ---------------------------------------------------------------------------------------------------------
ML1M_CTR_CATEGORICAL = [roles.LOG_USER_ID, roles.LOG_ITEM_ID, "gender", "age", "occupation", "zip_prefix", "genre_1", "genre_2",
                        "hour", "weekday"]
ML1M_CTR_DENSE = ["user_log_count", "item_log_count", "release_year"]
ML1M_CTR_LABEL = "label"
VALID_FRACTION = 0.2


def ml1m_ctr_frame(events: pd.DataFrame, users: pd.DataFrame, movies: pd.DataFrame) -> pd.DataFrame:
    """One row per rating with raw feature values, the label and the split ("train" / "valid")."""
    user, item, time = roles.LOG_USER_ID, roles.LOG_ITEM_ID, roles.LOG_TIMESTAMP
    df = events.merge(users, on=user, how="left", validate="many_to_one")
    df = df.merge(movies, on=item, how="left", validate="many_to_one")
    df[ML1M_CTR_LABEL] = (df[roles.LOG_RATING] >= 4).astype(np.int64)
    df["zip_prefix"] = df["zip_code"].astype(str).str[:3]
    genres = df["genres"].fillna("").str.split("|")
    df["genre_1"] = genres.str[0].fillna("none")
    df["genre_2"] = genres.str[1].fillna("none")
    when = pd.to_datetime(df[time], unit="s", utc=True)
    df["hour"], df["weekday"] = when.dt.hour, when.dt.weekday
    df["release_year"] = pd.to_numeric(df["title"].str.extract(r"\((\d{4})\)\s*$")[0], errors="coerce")
    # per-user time split: stable sort by time, the last ceil(20%) of each user's ratings are validation
    df = df.reset_index(drop=True)
    order = np.lexsort((np.arange(len(df)), df[time].to_numpy(), df[user].to_numpy()))
    df = df.iloc[order].reset_index(drop=True)
    rank = df.groupby(user).cumcount().to_numpy()
    count = df.groupby(user)[user].transform("size").to_numpy()
    n_valid = np.maximum(1, np.ceil(count * VALID_FRACTION)).astype(np.int64)
    df["split"] = np.where(rank >= count - n_valid, "valid", "train")
    return df


ML1M_CTR_RAW = [*ML1M_CTR_CATEGORICAL, "release_year"]  # the columns the encoder reads (ml1m_ctr_frame's)


@dataclass
class ML1MCTREncoder:
    """The fitted ml-1m-prefix CTR encoding (fit on the train rows, applied to any rows), JSON-serialisable so a
    run can keep it and a served model can encode raw rows without the training data.

    transform: categorical value -> 1 + its position in `vocabularies[column]` (order of first appearance in
    the fitted rows; unseen -> 0).  user_log_count / item_log_count = log(1 + train ratings of the row's
    user / item), release_year as is; each dense value is NaN-filled with `fill[name]` and standardised as
    (value - mean[name]) / std[name], all in float64 (the models get float32).
    """

    vocabularies: Dict[str, list]  # per ML1M_CTR_CATEGORICAL column, the train values in order of appearance
    user_counts: Dict[str, list]  # {"values": user ids, "counts": ratings in the fitted rows}
    item_counts: Dict[str, list]
    fill: Dict[str, float]  # per ML1M_CTR_DENSE column: the NaN fill (mean of the non-NaN fitted values)
    mean: Dict[str, float]
    std: Dict[str, float]  # 1.0 where the fitted values are constant

    def __post_init__(self) -> None:
        for name, columns in (("vocabularies", ML1M_CTR_CATEGORICAL), ("fill", ML1M_CTR_DENSE),
                              ("mean", ML1M_CTR_DENSE), ("std", ML1M_CTR_DENSE)):
            missing = [c for c in columns if c not in getattr(self, name)]
            if missing:
                raise ValueError(f"ML1MCTREncoder.{name} lacks column(s) {missing}; build it with "
                                 "ML1MCTREncoder.fit(train rows) or from_dict(a saved encoder)")

    @classmethod
    def fit(cls, frame: pd.DataFrame) -> "ML1MCTREncoder":
        """Fit on `frame` (the train rows of `ml1m_ctr_frame`)."""
        _check_raw_columns(frame)
        vocabularies = {name: pd.unique(frame[name]).tolist() for name in ML1M_CTR_CATEGORICAL}
        counts = {}
        for column in (roles.LOG_USER_ID, roles.LOG_ITEM_ID):
            c = frame[column].value_counts()
            counts[column] = {"values": c.index.tolist(), "counts": [int(v) for v in c.to_numpy()]}
        raw = _raw_dense(frame, counts[roles.LOG_USER_ID], counts[roles.LOG_ITEM_ID])
        fill, mean, std = {}, {}, {}
        for name, values in raw.items():
            fill[name] = float(np.nanmean(values))
            values = np.where(np.isnan(values), fill[name], values)
            mean[name], std[name] = float(values.mean()), float(values.std() or 1.0)
        return cls(vocabularies, counts[roles.LOG_USER_ID], counts[roles.LOG_ITEM_ID], fill, mean, std)

    def transform(self, frame: pd.DataFrame) -> pd.DataFrame:
        """Raw rows -> ML1M_CTR_CATEGORICAL ids (int64) and standardised ML1M_CTR_DENSE (float64), in row order."""
        _check_raw_columns(frame)
        out = {}
        for name in ML1M_CTR_CATEGORICAL:
            out[name] = pd.Index(self.vocabularies[name]).get_indexer(frame[name]).astype(np.int64) + 1  # -1 -> 0
        for name, values in _raw_dense(frame, self.user_counts, self.item_counts).items():
            values = np.where(np.isnan(values), self.fill[name], values)
            out[name] = (values - self.mean[name]) / self.std[name]
        return pd.DataFrame(out, index=frame.index)

    def cardinalities(self) -> List[int]:
        return [len(self.vocabularies[name]) + 1 for name in ML1M_CTR_CATEGORICAL]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, object]) -> "ML1MCTREncoder":
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls)})


def _check_raw_columns(frame: pd.DataFrame) -> None:
    missing = [c for c in ML1M_CTR_RAW if c not in frame.columns]
    if missing:
        raise ValueError(f"ml-1m-prefix CTR rows lack column(s) {missing}; they need {ML1M_CTR_RAW} "
                         "(ml1m_ctr_frame output)")


def _raw_dense(frame: pd.DataFrame, user_counts: dict, item_counts: dict) -> Dict[str, np.ndarray]:
    """The dense features before filling and standardising (float64; unseen user / item -> count 0)."""
    def log_count(column: str, counts: dict) -> np.ndarray:
        table = pd.Series(counts["counts"], index=counts["values"], dtype=np.int64)
        return np.log1p(frame[column].map(table).fillna(0).to_numpy(dtype=np.float64))

    return {"user_log_count": log_count(roles.LOG_USER_ID, user_counts),
            "item_log_count": log_count(roles.LOG_ITEM_ID, item_counts),
            "release_year": frame["release_year"].to_numpy(dtype=np.float64)}


def encode_ml1m_ctr(df: pd.DataFrame) -> CTRData:
    """Ids and standardised dense features, the encoder fitted on the train rows only (unseen values -> id 0);
    the fitted encoder is kept as info["encoder"] (its `to_dict`)."""
    train = df["split"].to_numpy() == "train"
    encoder = ML1MCTREncoder.fit(df[train])
    out = encoder.transform(df)
    out[ML1M_CTR_LABEL] = df[ML1M_CTR_LABEL].to_numpy()
    args = (ML1M_CTR_DENSE, ML1M_CTR_CATEGORICAL, ML1M_CTR_LABEL, encoder.cardinalities())
    return CTRData("ml-1m-prefix-ctr", tensors_from_frame(out[train], *args), tensors_from_frame(out[~train], *args),
                   {"rows": {"train": int(train.sum()), "valid": int((~train).sum())},
                    "positive_rate": float(out[ML1M_CTR_LABEL].mean()), "encoder": encoder.to_dict()})


def load_ml1m_ctr(input_dir: Optional[PathLike] = None) -> CTRData:
    """The ml-1m-prefix CTR table (module docstring) from the staged MovieLens files or `input_dir`."""
    from merlin_hstu.workflows.datasets import default_input_dir, load_dataset

    source = input_dir or default_input_dir("ml-1m-prefix")
    if source is None:
        raise ValueError("ml-1m-prefix is not staged here: pass --input DIR with ratings.dat, movies.dat, users.dat")
    loaded = load_dataset("ml-1m-prefix", source)
    return encode_ml1m_ctr(ml1m_ctr_frame(loaded.events, loaded.user_features, loaded.item_features))


DATASETS = ("synthetic-criteo", "ml-1m-prefix-ctr")


# ---------------------------------------------------------------------------------------------------------
# datasets by name (the CLI's --data / the bench's --dataset)
# ---------------------------------------------------------------------------------------------------------
def load_ctr_dataset(name_or_path: str, cache_root: Path, data_overrides: Dict[str, object],
                     input_dir: Optional[str] = None, log: Callable[[str], None] = print,
                     streaming: bool = False, shuffle_buffer: int = 10000) -> CTRData:
    """A named CTR dataset or a Criteo-workflow directory; `streaming` (train.streaming) opens the directory's row
    groups instead of reading it (under torchrun only this rank's train row groups, r::N)."""
    if name_or_path == "ml-1m-prefix-ctr" and streaming:
        raise ValueError("ml-1m-prefix-ctr is encoded in memory (pandas); train.streaming reads a Criteo-workflow "
                         "directory or synthetic-criteo: set train.streaming=false")
    if name_or_path == "synthetic-criteo":
        return synthetic_criteo_dataset(cache_root, data_overrides, log, streaming, shuffle_buffer)
    if data_overrides:
        raise ValueError(f"data.* overrides apply to synthetic-criteo only (got {sorted(data_overrides)})")
    if name_or_path == "ml-1m-prefix-ctr":
        return load_ml1m_ctr(input_dir)
    path = Path(name_or_path)
    if (path / "processed" / "train").is_dir():
        return _open_criteo(path, streaming, shuffle_buffer)
    raise ValueError(f"unknown CTR dataset {name_or_path!r}: use {' | '.join(DATASETS)} or a directory written by "
                     "merlin_hstu.workflows.criteo_workflow.preprocess_criteo")


SYNTHETIC_FREQ_THRESHOLD = 5  # Categorify freq_threshold for synthetic-criteo (its noise columns are Zipf-long)


def _open_criteo(path: Path, streaming: bool, shuffle_buffer: int) -> CTRData:
    if not streaming:
        return load_criteo_tensors(path)
    from merlin_hstu.distributed.context import launched_rank

    rank, world = launched_rank()
    return open_criteo_stream(path, shuffle_buffer, rank, world)


def synthetic_criteo_dataset(cache_root: Path, overrides: Dict[str, object], log, streaming: bool = False,
                             shuffle_buffer: int = 10000) -> CTRData:
    """Generate (seeded) -> Criteo TSV -> NVTabular Criteo workflow, cached by a hash of the full config."""
    from merlin_hstu.common.atomic_dir import exclusive
    from merlin_hstu.workflows.criteo_workflow import CriteoWorkflowConfig, preprocess_criteo

    overrides = dict(overrides)
    workflow_cfg = CriteoWorkflowConfig(freq_threshold=int(overrides.pop("freq_threshold", SYNTHETIC_FREQ_THRESHOLD)))
    cfg = replace_fields(SyntheticCriteoConfig(), overrides, "data (synthetic-criteo)")
    cfg.__post_init__()
    described = {"generator_version": GENERATOR_VERSION, **dataclasses.asdict(cfg),
                 "freq_threshold": workflow_cfg.freq_threshold, "valid_fraction": workflow_cfg.valid_fraction,
                 "row_group_size": workflow_cfg.row_group_size}  # older caches: one row group per split
    digest = hashlib.sha1(json.dumps(described, sort_keys=True).encode()).hexdigest()[:10]
    out = cache_root / f"synthetic-criteo-{cfg.num_rows}-{digest}"
    ceilings_path = out / "ceilings.json"
    with exclusive(out):  # one process generates (the ranks of --nproc, commands sharing the cache)
        if not ceilings_path.is_file():
            log(f"generating synthetic Criteo-layout data ({cfg.num_rows:,} rows, seed {cfg.seed}) -> {out}")
            synthetic = generate_synthetic_criteo(cfg)
            staging = cache_root / f".{out.name}.tsv"
            tsv = write_criteo_tsv(synthetic.frame, staging)
            t0 = time.perf_counter()
            try:
                preprocess_criteo(tsv, out, workflow_cfg, overwrite=True)
            finally:
                tsv.unlink(missing_ok=True)
            log(f"NVTabular Criteo workflow: {time.perf_counter() - t0:.1f} s")
            n_valid = int(round(cfg.num_rows * workflow_cfg.valid_fraction))
            ceilings = synthetic.ceiling_aucs(slice(cfg.num_rows - n_valid, None))
            for name, text in (("config.json", json.dumps(described, indent=2)),
                               ("ceilings.json", json.dumps({"config": described, "valid_ceiling_auc": ceilings}))):
                write_file(out / name, text)  # ceilings.json last: its presence marks a complete cache entry
    data = _open_criteo(out, streaming, shuffle_buffer)
    data.name = "synthetic-criteo"
    data.info["config"] = described
    data.info["ceiling_auc"] = json.loads(ceilings_path.read_text())["valid_ceiling_auc"]
    return data
