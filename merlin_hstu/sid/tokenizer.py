"""Item tokenizers: an item embedding matrix -> semantic IDs, short tuples of codebook tokens (TIGER, arXiv 2305.05065).

Residual quantisation over L levels of K codes each, for an item's (prepared) embedding x:

    r_0     = x
    c_l     = argmin_k || r_l - C_l[k] ||^2            the item's code at level l      (ties: the smallest k)
    r_{l+1} = r_l - C_l[c_l]                           what level l + 1 quantises
    x_hat_l = x - r_{l+1} = sum_{m <= l} C_m[c_m]       the reconstruction after l + 1 levels

* ``rq-kmeans``: C_l are the k-means centroids of the level-l residuals of every catalogue item (Lloyd's algorithm
  from a k-means++ seeding, float64, an empty cluster re-seeded at the point farthest from its centroid).
* ``rq-vae``: the residuals are those of a learned latent z = Enc(x) (an MLP); the codebooks, the encoder and the
  decoder (a mirrored MLP) train together on

      || x - Dec(z + sg(z_q - z)) ||^2 + sum_l ( || sg(r_l) - C_l[c_l] ||^2 + beta || r_l - sg(C_l[c_l]) ||^2 )

  with z_q = sum_l C_l[c_l] (a straight-through estimator carries the gradient past the argmin), codebooks
  initialised by k-means of the initial latents' residuals, and a code unused for a whole epoch moved to a random
  item's residual (so codes do not die).

Preparation of x (``TokenizerConfig.normalize``): "l2" divides every row by its norm (what a cosine-trained model's
items mean), "center" subtracts the catalogue mean, "none" keeps the matrix.  The reconstruction error of level l is
mean_i || r_{l+1,i} ||^2 / mean_i || x_i - mean(x) ||^2: 1 is "no better than the mean item", 0 is exact.

A final level makes every tuple unique: items whose L codes coincide get a last code 0, 1, 2, ... in the order of
their item ids (an item alone in its group gets 0).  Its size is the largest collision group, so every item has a
distinct tuple of T = L + 1 codes.

Tokens: a decoder reads one vocabulary over all levels.  Token 0 is padding, 1 the begin-of-sequence token, and
code c of level l is token ``FIRST_CODE_TOKEN + offset_l + c`` with offset_l = K_0 + ... + K_{l-1}
(`SemanticIds.token_offsets`); `SemanticIds.token_table(num_items)` maps every encoded item id to its T tokens.

Everything is deterministic for a seed: the k-means seeding and the RQ-VAE's initialisation and shuffles draw from
one `torch.Generator(seed)` (the global RNG is not touched), and ties are broken by index.  A tokenizer is saved as a
directory (`SemanticIds.save`, written atomically): tokenizer.json (config, sizes, statistics, the embedding source),
codes.parquet (item_id and one column per level) and the quantiser's state (codebooks.npz, rqvae.pt).
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from merlin_hstu.common import schema as roles

METHODS = ("rq-kmeans", "rq-vae")
NORMALIZATIONS = ("l2", "center", "none")
PAD_TOKEN = 0
BOS_TOKEN = 1
FIRST_CODE_TOKEN = 2
TOKENIZER_FILE = "tokenizer.json"
CODES_FILE = "codes.parquet"
CODEBOOKS_FILE = "codebooks.npz"
RQVAE_FILE = "rqvae.pt"
FORMAT = 1
_CHUNK = 65536  # rows per distance block (memory O(chunk * K))


def _int_at_least(value, low: int, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


@dataclass
class TokenizerConfig:
    """How items become semantic IDs (the `tokenizer` section of a SID config)."""

    method: str = "rq-kmeans"  # rq-kmeans | rq-vae
    levels: int = 3  # L quantised levels (a final de-duplicating level is added)
    codebook_size: int = 256  # K codes per level
    normalize: str = "l2"  # l2 | center | none: how the embedding rows are prepared
    seed: int = 0
    kmeans_iters: int = 100  # Lloyd iterations at most (stops when no assignment changes)
    # rq-vae only
    latent_dim: int = 32
    hidden_dims: tuple = (256, 128)
    vae_epochs: int = 200
    vae_batch_size: int = 1024
    vae_learning_rate: float = 1e-3
    commitment: float = 0.25  # beta

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"tokenizer.method must be one of {METHODS}, got {self.method!r}")
        if self.normalize not in NORMALIZATIONS:
            raise ValueError(f"tokenizer.normalize must be one of {NORMALIZATIONS}, got {self.normalize!r}")
        _int_at_least(self.levels, 1, "tokenizer.levels")
        _int_at_least(self.codebook_size, 2, "tokenizer.codebook_size")
        for name in ("seed", "kmeans_iters"):
            _int_at_least(getattr(self, name), 0, f"tokenizer.{name}")
        for name in ("latent_dim", "vae_epochs", "vae_batch_size"):
            _int_at_least(getattr(self, name), 1, f"tokenizer.{name}")
        self.hidden_dims = tuple(int(h) for h in self.hidden_dims)
        if any(h < 1 for h in self.hidden_dims):
            raise ValueError(f"tokenizer.hidden_dims must be positive widths, got {list(self.hidden_dims)}")
        if not self.vae_learning_rate > 0 or not self.commitment >= 0:
            raise ValueError("tokenizer.vae_learning_rate must be > 0 and tokenizer.commitment >= 0")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["hidden_dims"] = list(self.hidden_dims)
        return d

    @classmethod
    def from_dict(cls, d: Optional[dict]) -> "TokenizerConfig":
        d = dict(d or {})
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown key(s) {unknown} in section 'tokenizer'; valid keys: {sorted(names)}")
        if "hidden_dims" in d:
            d["hidden_dims"] = tuple(d["hidden_dims"])
        return cls(**d)


# ------------------------------------------------------------------------------------------------------------
# k-means and residual quantisation
# ------------------------------------------------------------------------------------------------------------
def nearest(x: Tensor, centroids: Tensor) -> Tuple[Tensor, Tensor]:
    """(index [N] of each row's nearest centroid, ties to the smallest index; its squared distance [N])."""
    codes, dists = [], []
    c2 = (centroids * centroids).sum(1)
    for start in range(0, x.shape[0], _CHUNK):
        block = x[start:start + _CHUNK]
        d = (block * block).sum(1, keepdim=True) - 2.0 * block @ centroids.T + c2.unsqueeze(0)
        best = d.min(dim=1)
        codes.append(best.indices)
        dists.append(best.values.clamp(min=0.0))
    return torch.cat(codes), torch.cat(dists)


def kmeans(x: Tensor, k: int, iters: int, generator: torch.Generator) -> Tuple[Tensor, Tensor]:
    """Lloyd's k-means of rows x [N, d] (float64) from a k-means++ seeding: (centroids [k, d], codes [N]).

    With fewer distinct rows than k, the surplus centroids duplicate rows and stay unused (ties go to the first)."""
    n = x.shape[0]
    if n == 0:
        raise ValueError("k-means needs at least one item embedding")
    first = int(torch.randint(n, (1,), generator=generator))
    chosen = [first]
    d2 = ((x - x[first]) ** 2).sum(1)
    for _ in range(1, k):
        total = float(d2.sum())
        if total > 0.0:
            index = int(torch.multinomial(d2 / total, 1, generator=generator))
        else:  # every row coincides with a chosen centroid
            index = int(torch.randint(n, (1,), generator=generator))
        chosen.append(index)
        d2 = torch.minimum(d2, ((x - x[index]) ** 2).sum(1))
    centroids = x[torch.tensor(chosen)].clone()
    codes, dist = nearest(x, centroids)
    for _ in range(iters):
        counts = torch.bincount(codes, minlength=k)
        sums = torch.zeros_like(centroids).index_add_(0, codes, x)
        updated = sums / counts.clamp(min=1).unsqueeze(1).to(x.dtype)
        empty = torch.nonzero(counts == 0).flatten()
        updated[empty] = centroids[empty]
        if len(empty) and n > k:  # re-seed each empty cluster at a point far from its centroid (distinct points)
            far = torch.sort(dist, descending=True, stable=True).indices[:len(empty)]
            updated[empty] = x[far]
        new_codes, dist = nearest(x, updated)
        centroids = updated
        if torch.equal(new_codes, codes) and not (len(empty) and n > k):
            break
        codes = new_codes
    codes, _ = nearest(x, centroids)
    return centroids, codes


def residual_codes(x: Tensor, codebooks: Sequence[Tensor]) -> Tuple[Tensor, List[Tensor]]:
    """Codes [N, L] of rows x under residual codebooks, and the residual after each level (L tensors [N, d])."""
    residual = x
    codes, residuals = [], []
    for book in codebooks:
        code, _ = nearest(residual, book)
        residual = residual - book[code]
        codes.append(code)
        residuals.append(residual)
    return torch.stack(codes, dim=1), residuals


def prepare_embeddings(x: np.ndarray | Tensor, normalize: str) -> Tensor:
    """The rows the quantiser sees (float64): l2-normalised, centred or as given (module docstring)."""
    x = torch.as_tensor(np.asarray(x), dtype=torch.float64)
    if x.dim() != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"item embeddings must be a non-empty 2-D matrix [items, dim], got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        bad = torch.nonzero(~torch.isfinite(x).all(1)).flatten()[:5].tolist()
        raise ValueError(f"item embeddings contain NaN or inf (rows {bad}); fix the embedding source")
    if normalize == "l2":
        norms = x.norm(dim=1, keepdim=True)
        if (norms == 0).any():
            bad = torch.nonzero(norms.flatten() == 0).flatten()[:5].tolist()
            raise ValueError(f"item embedding rows {bad} are all zero and cannot be l2-normalised; use "
                             "tokenizer.normalize=center or none, or fix the embedding source")
        return x / norms
    if normalize == "center":
        return x - x.mean(0, keepdim=True)
    return x


def reconstruction_errors(x: Tensor, residuals: Sequence[Tensor]) -> List[float]:
    """mean ||r_{l+1}||^2 / mean ||x - mean(x)||^2 after each level (module docstring)."""
    total = float(((x - x.mean(0, keepdim=True)) ** 2).sum(1).mean())
    total = total if total > 0 else 1.0
    return [float((r ** 2).sum(1).mean()) / total for r in residuals]


# ------------------------------------------------------------------------------------------------------------
# RQ-VAE
# ------------------------------------------------------------------------------------------------------------
def _mlp(widths: Sequence[int]) -> nn.Sequential:
    layers: List[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class RQVAE(nn.Module):
    """Encoder MLP -> residual quantiser (L codebooks of K latent vectors) -> decoder MLP (module docstring)."""

    def __init__(self, input_dim: int, config: TokenizerConfig):
        super().__init__()
        widths = [input_dim, *config.hidden_dims, config.latent_dim]
        self.encoder = _mlp(widths)
        self.decoder = _mlp(widths[::-1])
        self.codebooks = nn.Parameter(torch.zeros(config.levels, config.codebook_size, config.latent_dim))
        self.commitment = config.commitment

    def quantize(self, z: Tensor) -> Tuple[Tensor, Tensor, Tensor, List[Tensor]]:
        """z [N, latent] -> (codes [N, L], z_q [N, latent], the codebook + commitment loss, residuals per level)."""
        residual, z_q = z, torch.zeros_like(z)
        codes, residuals = [], []
        loss = z.new_zeros(())
        for book in self.codebooks:
            code, _ = nearest(residual.detach(), book.detach())
            chosen = book[code]
            loss = loss + ((residual.detach() - chosen) ** 2).sum(1).mean() \
                + self.commitment * ((residual - chosen.detach()) ** 2).sum(1).mean()
            z_q = z_q + chosen
            residual = residual - chosen.detach()
            codes.append(code)
            residuals.append(residual)
        return torch.stack(codes, 1), z_q, loss, residuals

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """-> (reconstruction loss, quantisation loss, codes)."""
        z = self.encoder(x)
        codes, z_q, quant_loss, _ = self.quantize(z)
        decoded = self.decoder(z + (z_q - z).detach())
        return ((x - decoded) ** 2).sum(1).mean(), quant_loss, codes


def train_rqvae(x: Tensor, config: TokenizerConfig, generator: torch.Generator, log=None) -> Tuple[RQVAE, dict]:
    """Train an RQ-VAE on the prepared rows x [N, d] (float32 inside); deterministic for the generator."""
    data = x.to(torch.float32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(2**31 - 1, (1,), generator=generator)))
        model = RQVAE(data.shape[1], config)
    with torch.no_grad():  # codebooks: k-means of the initial latents' residuals, level by level
        residual = model.encoder(data).double()
        for level in range(config.levels):
            book, code = kmeans(residual, config.codebook_size, config.kmeans_iters, generator)
            model.codebooks[level] = book.float()
            residual = residual - book[code]
    optimizer = torch.optim.Adam(model.parameters(), lr=config.vae_learning_rate)
    history = []
    n = data.shape[0]
    for epoch in range(config.vae_epochs):
        model.train()
        order = torch.randperm(n, generator=generator)
        used = torch.zeros(config.levels, config.codebook_size, dtype=torch.bool)
        total_rec = total_quant = 0.0
        for start in range(0, n, config.vae_batch_size):
            batch = data[order[start:start + config.vae_batch_size]]
            rec, quant, codes = model(batch)
            optimizer.zero_grad(set_to_none=True)
            (rec + quant).backward()
            optimizer.step()
            total_rec += float(rec.detach()) * len(batch)
            total_quant += float(quant.detach()) * len(batch)
            used[torch.arange(config.levels).unsqueeze(0), codes] = True
        with torch.no_grad():  # dead codes: moved to random items' residuals at their level
            if not used.all():
                _, _, _, residuals = model.quantize(model.encoder(data))
                inputs = [model.encoder(data)] + residuals[:-1]
                for level in range(config.levels):
                    dead = torch.nonzero(~used[level]).flatten()
                    if len(dead):
                        pick = torch.randint(n, (len(dead),), generator=generator)
                        model.codebooks[level, dead] = inputs[level][pick]
        history.append({"epoch": epoch + 1, "reconstruction": total_rec / n, "quantization": total_quant / n})
        if log is not None:
            log(history[-1])
    model.eval()
    return model, {"vae_history": history}


# ------------------------------------------------------------------------------------------------------------
# the final level, statistics, the container
# ------------------------------------------------------------------------------------------------------------
def deduplicate(codes: np.ndarray, item_ids: np.ndarray) -> np.ndarray:
    """The final level's code of each item: its rank by item id among the items sharing its L codes."""
    codes = np.asarray(codes, dtype=np.int64)
    order = np.lexsort((np.asarray(item_ids), *codes.T[::-1]))  # by tuple, then by item id
    final = np.zeros(len(codes), dtype=np.int64)
    sorted_codes = codes[order]
    new_group = np.ones(len(codes), dtype=bool)
    if len(codes) > 1:
        new_group[1:] = (sorted_codes[1:] != sorted_codes[:-1]).any(axis=1)
    group_start = np.maximum.accumulate(np.where(new_group, np.arange(len(codes)), 0))
    final[order] = np.arange(len(codes)) - group_start
    return final


def code_statistics(codes: np.ndarray, codebook_sizes: Sequence[int]) -> dict:
    """Usage per level (codes used, perplexity of the code distribution) and collisions of the L-code tuples.

    `codes` [N, L + 1] (the last column is the de-duplicating level, `codebook_sizes` its L + 1 sizes)."""
    codes = np.asarray(codes, dtype=np.int64)
    n, t = codes.shape
    levels = []
    for level in range(t):
        counts = np.bincount(codes[:, level], minlength=codebook_sizes[level])
        p = counts[counts > 0] / n
        levels.append({"level": level, "size": int(codebook_sizes[level]), "used": int((counts > 0).sum()),
                       "usage": float((counts > 0).sum() / codebook_sizes[level]),
                       "perplexity": float(np.exp(-(p * np.log(p)).sum())),
                       "largest_code_share": float(counts.max() / n)})
    _, group_sizes = np.unique(codes[:, :-1], axis=0, return_counts=True)
    return {"items": int(n), "levels": levels,
            "distinct_tuples_before_final_level": int(len(group_sizes)),
            "items_in_collisions": int(group_sizes[group_sizes > 1].sum()),
            "colliding_tuples": int((group_sizes > 1).sum()),
            "largest_collision_group": int(group_sizes.max()),
            "unique_final_tuples": int(len(np.unique(codes, axis=0)))}


def format_statistics(stats: dict) -> str:
    """The codebook-usage and collision table printed after fitting."""
    lines = [f"semantic IDs of {stats['items']:,} items ({stats.get('method', '?')}):",
             "  level  size  used  usage  perplexity  largest code  recon. error"]
    errors = stats.get("reconstruction_error", [])
    for row in stats["levels"]:
        err = f"{errors[row['level']]:.4f}" if row["level"] < len(errors) else "(dedupe)"
        lines.append(f"  {row['level']:5d}  {row['size']:4d}  {row['used']:4d}  {row['usage']:5.1%}  "
                     f"{row['perplexity']:10.1f}  {row['largest_code_share']:12.2%}  {err:>12}")
    lines.append(f"  L-code tuples: {stats['distinct_tuples_before_final_level']:,} distinct; "
                 f"{stats['items_in_collisions']:,} items share theirs ({stats['colliding_tuples']:,} tuples, "
                 f"largest group {stats['largest_collision_group']}); with the final level "
                 f"{stats['unique_final_tuples']:,} unique tuples")
    return "\n".join(lines)


@dataclass
class SemanticIds:
    """A fitted tokenizer: every catalogue item's code tuple, the quantiser that made them, and its statistics."""

    item_ids: np.ndarray  # [N] encoded item ids, ascending
    codes: np.ndarray  # [N, T] codes per level (T = L + 1; the last level de-duplicates)
    codebook_sizes: List[int]  # [T]
    config: TokenizerConfig
    stats: dict = field(default_factory=dict)
    source: dict = field(default_factory=dict)  # where the embeddings came from (merlin_hstu.sid.embeddings)
    codebooks: Optional[List[np.ndarray]] = None  # rq-kmeans: L centroid matrices
    rqvae_state: Optional[dict] = None  # rq-vae: the model's state dict
    input_dim: int = 0

    def __post_init__(self) -> None:
        self.item_ids = np.asarray(self.item_ids, dtype=np.int64)
        self.codes = np.asarray(self.codes, dtype=np.int64)
        self.codebook_sizes = [int(s) for s in self.codebook_sizes]
        if self.codes.shape != (len(self.item_ids), len(self.codebook_sizes)):
            raise ValueError(f"codes of shape {self.codes.shape} for {len(self.item_ids)} items and "
                             f"{len(self.codebook_sizes)} levels")
        if len(self.item_ids) and (np.any(np.diff(self.item_ids) <= 0) or self.item_ids[0] < 1):
            raise ValueError("SemanticIds.item_ids must be distinct encoded item ids >= 1, ascending")
        if (self.codes < 0).any() or (self.codes >= np.asarray(self.codebook_sizes)).any():
            raise ValueError("a code lies outside its level's codebook")
        if len(np.unique(self.codes, axis=0)) != len(self.codes):
            raise ValueError("two items share a semantic ID tuple; the final level must make them unique")

    # --- tokens -------------------------------------------------------------------------------------------
    @property
    def num_levels(self) -> int:
        """T: tokens per item (L quantised levels + the final one)."""
        return len(self.codebook_sizes)

    @property
    def token_offsets(self) -> np.ndarray:
        """[T]: token of code c at level l = token_offsets[l] + c."""
        return FIRST_CODE_TOKEN + np.concatenate([[0], np.cumsum(self.codebook_sizes)[:-1]]).astype(np.int64)

    @property
    def vocab_size(self) -> int:
        return FIRST_CODE_TOKEN + int(sum(self.codebook_sizes))

    def tokens(self) -> np.ndarray:
        """[N, T] tokens of the items (rows aligned with item_ids)."""
        return self.codes + self.token_offsets[None, :]

    def token_table(self, num_items: Optional[int] = None) -> Tensor:
        """LongTensor [num_items, T]: the tokens of every encoded item id; rows of non-items are padding (0)."""
        num_items = int(self.item_ids.max()) + 1 if num_items is None else int(num_items)
        if len(self.item_ids) and self.item_ids.max() >= num_items:
            raise ValueError(f"the tokenizer has item ids up to {int(self.item_ids.max())}, beyond the table's "
                             f"{num_items} rows: it was fitted on another dataset")
        table = torch.zeros(num_items, self.num_levels, dtype=torch.long)
        table[torch.from_numpy(self.item_ids)] = torch.from_numpy(self.tokens())
        return table

    def encode(self, embeddings: np.ndarray | Tensor) -> np.ndarray:
        """The L quantised codes [n, L] of new embedding rows (prepared like the fitted ones); the final level is
        not assigned here: a new item's tuple may collide with a fitted one."""
        x = prepare_embeddings(embeddings, self.config.normalize)
        if x.shape[1] != self.input_dim:
            raise ValueError(f"embeddings of width {x.shape[1]}; this tokenizer was fitted on width {self.input_dim}")
        if self.codebooks is not None:
            codes, _ = residual_codes(x, [torch.from_numpy(b) for b in self.codebooks])
            return codes.numpy()
        model = RQVAE(self.input_dim, self.config)
        model.load_state_dict(self.rqvae_state)
        with torch.no_grad():
            codes, _, _, _ = model.quantize(model.encoder(x.float()))
        return codes.numpy()

    # --- files --------------------------------------------------------------------------------------------
    def save(self, directory: str | Path, overwrite: bool = True) -> Path:
        """Write the tokenizer directory atomically (module docstring)."""
        import pandas as pd

        from merlin_hstu.common.atomic_dir import publish_dir, staging_dir

        target = Path(directory)
        if target.exists() and not overwrite:
            raise FileExistsError(f"{target} already exists; pass overwrite=True to replace it")
        tmp = staging_dir(target)
        try:
            meta = {"format": FORMAT, "method": self.config.method, "config": self.config.to_dict(),
                    "codebook_sizes": self.codebook_sizes, "num_levels": self.num_levels,
                    "vocab_size": self.vocab_size, "token_offsets": self.token_offsets.tolist(),
                    "input_dim": self.input_dim, "stats": self.stats, "source": self.source}
            (tmp / TOKENIZER_FILE).write_text(json.dumps(meta, indent=2, default=str) + "\n")
            frame = pd.DataFrame({roles.ITEM_ID: self.item_ids,
                                  **{f"code_{level}": self.codes[:, level] for level in range(self.num_levels)}})
            frame.to_parquet(tmp / CODES_FILE, index=False)
            if self.codebooks is not None:
                np.savez(tmp / CODEBOOKS_FILE, *self.codebooks)
            if self.rqvae_state is not None:
                torch.save(self.rqvae_state, tmp / RQVAE_FILE)
            publish_dir(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return target

    @classmethod
    def load(cls, directory: str | Path) -> "SemanticIds":
        import pandas as pd

        directory = Path(directory)
        meta_path = directory / TOKENIZER_FILE
        if not meta_path.is_file():
            raise FileNotFoundError(f"{directory} is not a semantic-ID tokenizer directory ({TOKENIZER_FILE} is "
                                    "missing); fit one with merlin_hstu.sid.fit_tokenizer or `merlin-hstu bench sid`")
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != FORMAT:
            raise ValueError(f"{meta_path}: tokenizer format {meta.get('format')!r} is not {FORMAT}; fit it again")
        frame = pd.read_parquet(directory / CODES_FILE)
        levels = int(meta["num_levels"])
        missing = [c for c in [roles.ITEM_ID, *(f"code_{l}" for l in range(levels))] if c not in frame.columns]
        if missing:
            raise ValueError(f"{directory / CODES_FILE} lacks column(s) {missing}; fit the tokenizer again")
        codes = np.stack([frame[f"code_{l}"].to_numpy(np.int64) for l in range(levels)], axis=1)
        codebooks = None
        if (directory / CODEBOOKS_FILE).is_file():
            with np.load(directory / CODEBOOKS_FILE) as books:
                codebooks = [books[f"arr_{i}"] for i in range(len(books.files))]
        state = torch.load(directory / RQVAE_FILE, weights_only=True) if (directory / RQVAE_FILE).is_file() else None
        return cls(frame[roles.ITEM_ID].to_numpy(np.int64), codes, meta["codebook_sizes"],
                   TokenizerConfig.from_dict(meta["config"]), meta.get("stats", {}), meta.get("source", {}),
                   codebooks, state, int(meta.get("input_dim", 0)))


def fit_tokenizer(item_ids: Sequence[int] | np.ndarray, embeddings: np.ndarray | Tensor,
                  config: Optional[TokenizerConfig] = None, source: Optional[dict] = None, log=None) -> SemanticIds:
    """Fit RQ-KMeans or RQ-VAE on the embedding rows of the catalogue items `item_ids` (encoded ids, one row each)
    and give every item a unique tuple (module docstring).  Statistics are in `.stats` (`format_statistics`)."""
    config = config or TokenizerConfig()
    item_ids = np.asarray(item_ids, dtype=np.int64)
    if item_ids.ndim != 1 or len(item_ids) != np.asarray(embeddings).shape[0]:
        raise ValueError(f"{len(item_ids)} item ids for an embedding matrix of shape {np.asarray(embeddings).shape}: "
                         "give one row per item")
    if len(np.unique(item_ids)) != len(item_ids):
        raise ValueError("item ids must be distinct (one embedding row per item)")
    order = np.argsort(item_ids, kind="stable")
    item_ids = item_ids[order]
    x = prepare_embeddings(np.asarray(embeddings)[order], config.normalize)
    generator = torch.Generator().manual_seed(config.seed)
    codebooks, state, extra = None, None, {}
    if config.method == "rq-kmeans":
        books, residual = [], x
        for _ in range(config.levels):
            book, code = kmeans(residual, config.codebook_size, config.kmeans_iters, generator)
            books.append(book)
            residual = residual - book[code]
        codes, residuals = residual_codes(x, books)
        errors = reconstruction_errors(x, residuals)
        codebooks = [b.numpy() for b in books]
    else:
        model, extra = train_rqvae(x, config, generator, log)
        with torch.no_grad():
            z = model.encoder(x.float())
            codes, z_q, _, residuals = model.quantize(z)
            errors = reconstruction_errors(z.double(), [r.double() for r in residuals])
            decoded = model.decoder(z_q).double()
            extra["decoder_error"] = float(((x - decoded) ** 2).sum(1).mean()
                                           / max(float(((x - x.mean(0)) ** 2).sum(1).mean()), 1e-12))
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    codes = codes.numpy().astype(np.int64)
    final = deduplicate(codes, item_ids)
    all_codes = np.concatenate([codes, final[:, None]], axis=1)
    sizes = [config.codebook_size] * config.levels + [int(final.max()) + 1]
    stats = {"method": config.method, **code_statistics(all_codes, sizes), "reconstruction_error": errors, **extra}
    return SemanticIds(item_ids, all_codes, sizes, config, stats, dict(source or {}), codebooks, state, x.shape[1])
