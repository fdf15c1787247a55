"""Generative retrieval with HSTU: input embedding -> encoder -> L2-normalised user vectors, sampled softmax.

The pieces follow the reference research path (reference-hstu.md §1.3, §1.6, §1.8):

    x      = E[ids] * sqrt(D) + P[position]        positions absolute from the oldest kept item
    x      = Dropout(x) * (position < len)         only real history tokens enter the encoder
    h      = HSTU(x)                               [B, W, D]
    u      = h / max(||h||, 1e-6)                  the query ("user") vector at every position
    logit  = <u_i, e_item> / tau                   e_item = E[item] / max(||E[item]||, 1e-6)

Training supervises every history position i to predict the next item ids[i+1] (the last real position
predicts the target) with a (1 + R)-way softmax over the positive and R uniform random negatives drawn per
position from the catalogue; a negative equal to the positive is masked out.  No logQ correction: uniform
sampling has constant q, so the correction would be a constant shift of every logit.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from merlin_hstu.hstu import HSTUEncoder, HSTUEncoderConfig
from merlin_hstu.sasrec import SASRecEncoder, SASRecEncoderConfig, positional_table_init

ENCODERS = {HSTUEncoderConfig: HSTUEncoder, SASRecEncoderConfig: SASRecEncoder}

L2_EPS = 1e-6
MASKED_LOGIT = -5e4  # a sampled negative that equals the positive gets this logit


def l2_normalize(x: torch.Tensor, eps: float = L2_EPS) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp(min=eps)


@dataclass
class RetrievalModelConfig:
    """Everything needed to rebuild a retrieval model (saved next to its weights)."""

    num_items: int  # embedding rows: max encoded item id + 1 (row 0 is padding)
    encoder: HSTUEncoderConfig | SASRecEncoderConfig
    input_dropout: float = 0.2

    def to_dict(self) -> dict:
        kind = "sasrec" if isinstance(self.encoder, SASRecEncoderConfig) else "hstu"
        return {"num_items": self.num_items, "input_dropout": self.input_dropout,
                "encoder_type": kind, "encoder": self.encoder.to_dict()}

    @classmethod
    def from_dict(cls, d: dict) -> "RetrievalModelConfig":
        enc_cls = SASRecEncoderConfig if d.get("encoder_type") == "sasrec" else HSTUEncoderConfig
        return cls(num_items=int(d["num_items"]), input_dropout=float(d["input_dropout"]),
                   encoder=enc_cls(**d["encoder"]))


class HSTURetrievalModel(nn.Module):
    def __init__(self, config: RetrievalModelConfig):
        super().__init__()
        self.config = config
        dim = config.encoder.embedding_dim
        self.item_embedding = nn.Embedding(config.num_items, dim, padding_idx=0)
        self.position_embedding = nn.Embedding(config.encoder.max_seq_len, dim)
        self.input_dropout = nn.Dropout(config.input_dropout)
        self.encoder = ENCODERS[type(config.encoder)](config.encoder)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Truncated normal, std 0.02, cut at +-2 std (row 0 included; padding rows get no gradient).
        nn.init.trunc_normal_(self.item_embedding.weight, std=0.02, a=-0.04, b=0.04)
        if isinstance(self.encoder, HSTUEncoder):
            # The reference's HSTU re-initialises the positional table with xavier_normal_.
            nn.init.xavier_normal_(self.position_embedding.weight)
        else:  # SASRec keeps the preprocessor's truncated normal, std sqrt(1/D)
            positional_table_init(self.position_embedding.weight)

    # --- encoding ----------------------------------------------------------------------------------
    def user_vectors(self, ids: torch.Tensor, lengths: torch.Tensor, timestamps: Optional[torch.Tensor] = None):
        """ids [B, W] (positions >= len are ignored, position len may hold the target), lengths [B],
        timestamps [B, W] (event times, the target's time at position len) -> L2-normalised [B, W, D]."""
        width = ids.shape[1]
        if width > self.config.encoder.max_seq_len:
            raise ValueError(f"batch width {width} exceeds encoder.max_seq_len={self.config.encoder.max_seq_len}")
        positions = torch.arange(width, device=ids.device)
        real = positions.unsqueeze(0) < lengths.unsqueeze(1)
        x = self.item_embedding(ids) * math.sqrt(self.item_embedding.embedding_dim) + self.position_embedding(positions)
        x = self.input_dropout(x) * real.unsqueeze(-1).to(x.dtype)
        h = self.encoder(x, lengths, timestamps if getattr(self.config.encoder, "time_bias", False) else None)
        return l2_normalize(h)

    def last_user_vector(self, ids, lengths, timestamps=None) -> torch.Tensor:
        """The query vector at the last real position (predicts the item after the history): [B, D]."""
        u = self.user_vectors(ids, lengths, timestamps)
        return u[torch.arange(u.shape[0], device=u.device), (lengths - 1).clamp(min=0)]

    def item_vectors(self, item_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        weight = self.item_embedding.weight if item_ids is None else self.item_embedding(item_ids)
        return l2_normalize(weight)

    def score_all_items(self, ids, lengths, timestamps=None) -> torch.Tensor:
        """Cosine similarity of each user's query vector with every catalogue row: [B, num_items]."""
        return self.last_user_vector(ids, lengths, timestamps) @ self.item_vectors().T


@dataclass
class SampledSoftmaxConfig:
    num_negatives: int = 128
    temperature: float = 0.05


def sampled_softmax_loss(
    model: HSTURetrievalModel,
    user: torch.Tensor,
    positives: torch.Tensor,
    negative_pool: torch.Tensor,
    config: SampledSoftmaxConfig,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Token-level mean (1 + R)-way softmax loss over supervised positions.

    user [P, D] (L2-normalised), positives [P] item ids, negative_pool [M] candidate ids; negatives are drawn
    uniformly with replacement, independently per position.

    The catalogue is L2-normalised once ([V, D]) instead of per gathered row ([P, R, D]).  When the catalogue
    is smaller than R * D (ML-1M: 3,953 rows vs 128 * 50), the dense [P, V] similarity matrix is both smaller
    and cheaper than the [P, R, D] gathered rows, so it is computed with one matmul and the sampled columns
    are gathered from it; otherwise the sampled rows are gathered.  Both give the same logits.
    """
    draws = torch.randint(0, negative_pool.numel(), (positives.numel(), config.num_negatives),
                          generator=generator, device=positives.device)
    negatives = negative_pool[draws]  # [P, R]
    ids = torch.cat([positives.unsqueeze(1), negatives], dim=1)  # [P, 1 + R]
    table = model.item_vectors()  # [V, D], normalised once
    if table.shape[0] <= config.num_negatives * table.shape[1]:
        logits = (user @ table.T).gather(1, ids)
    else:
        logits = torch.einsum("pd,prd->pr", user, table[ids])
    accidental = torch.cat([torch.zeros_like(positives, dtype=torch.bool).unsqueeze(1),
                            negatives == positives.unsqueeze(1)], dim=1)
    logits = logits.masked_fill(accidental, MASKED_LOGIT * config.temperature) / config.temperature
    return -F.log_softmax(logits, dim=1)[:, 0].mean()


def next_item_training_loss(model, batch: dict, negative_pool, config: SampledSoftmaxConfig, generator=None):
    """Every history position i predicts ids[i+1]; the last real position predicts the target at ids[len]."""
    ids, lengths = batch["ids"], batch["lengths"]
    user = model.user_vectors(ids, lengths, batch.get("timestamps"))
    width = ids.shape[1]
    labels = torch.cat([ids[:, 1:], ids.new_zeros(ids.shape[0], 1)], dim=1)
    supervised = (torch.arange(width, device=ids.device).unsqueeze(0) < lengths.unsqueeze(1)) & (labels != 0)
    return sampled_softmax_loss(model, user[supervised], labels[supervised], negative_pool, config, generator)


@torch.no_grad()
def recommend(model: HSTURetrievalModel, table, rows, k: int = 10, max_history: int = 200) -> list:
    """Top-k encoded item ids after each selected user's full history (history items and non-item rows
    excluded).  The query time of the last position is the last event's time: the future is unknown."""
    model.eval()
    histories = [table.items[r][-max_history:] for r in rows]
    width = max(len(h) for h in histories) + 1
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    lengths = torch.tensor([len(h) for h in histories])
    timestamps = torch.zeros(len(rows), width, dtype=torch.long) if table.timestamps is not None else None
    for i, (r, h) in enumerate(zip(rows, histories)):
        ids[i, : len(h)] = torch.as_tensor(h.copy())
        if timestamps is not None:
            times = table.timestamps[r][-max_history:]
            timestamps[i, : len(h)] = torch.as_tensor(times.copy())
            timestamps[i, len(h)] = int(times[-1])
    scores = model.score_all_items(ids, lengths, timestamps)
    scores[:, list(table.non_candidate_ids)] = float("-inf")
    scores.scatter_(1, ids, float("-inf"))  # also hits column 0 via padding: already excluded
    return scores.topk(k, dim=1).indices.tolist()
