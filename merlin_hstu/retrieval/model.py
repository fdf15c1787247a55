"""Generative retrieval with HSTU: input embedding -> encoder -> query vectors -> head -> loss / top-K.

The pieces follow the reference research path (reference-hstu.md §1.3, §1.6-1.8):

    x      = E[ids] * sqrt(D) + P[position]        positions absolute from the oldest kept item
    x      = Dropout(x) * (position < len)         only real history tokens enter the encoder
    h      = HSTU(x)                               [B, W, D]
    u      = norm_Q(h)                             the query ("user") vector at every position
    e      = norm_X(E[item])                       the item vector
    s(u,e) = <u, e>  or  MoL(u, e)                 merlin_hstu.retrieval.similarity

The reference default is norm_Q = norm_X = L2 (u / max(||u||, 1e-6)) and the dot product, so s is a cosine; the
RAILS MoL configs use a layer norm on u, raw item embeddings and MoL (`RetrievalHeadConfig`).

Training supervises every history position i to predict the next item ids[i+1] (the last real position predicts
the target) with the configured loss (merlin_hstu.retrieval.losses: sampled softmax over uniform or in-batch negatives, full
softmax, or BCE).  Top-K over the catalogue (evaluation, `recommend`, serving) is merlin_hstu.retrieval.topk.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from merlin_hstu.encoders.hstu import HSTUEncoder, HSTUEncoderConfig
from merlin_hstu.retrieval.losses import (  # noqa: F401  (re-exported: the loss API used to live here)
    MASKED_LOGIT,
    RetrievalLossConfig,
    SampledSoftmaxConfig,
    retrieval_loss,
    sampled_softmax_loss,
)
from merlin_hstu.encoders.sasrec import SASRecEncoder, SASRecEncoderConfig, positional_table_init
from merlin_hstu.retrieval.similarity import L2_EPS, RetrievalHead, RetrievalHeadConfig, l2_normalize  # noqa: F401
from merlin_hstu.retrieval.topk import BruteForceTopK, build_topk, rankable_from_invalid

ENCODERS = {HSTUEncoderConfig: HSTUEncoder, SASRecEncoderConfig: SASRecEncoder}



@dataclass
class RetrievalModelConfig:
    """Everything needed to rebuild a retrieval model (saved next to its weights)."""

    num_items: int  # embedding rows: max encoded item id + 1 (row 0 is padding)
    encoder: HSTUEncoderConfig | SASRecEncoderConfig
    input_dropout: float = 0.2
    head: RetrievalHeadConfig = field(default_factory=RetrievalHeadConfig)

    def to_dict(self) -> dict:
        kind = "sasrec" if isinstance(self.encoder, SASRecEncoderConfig) else "hstu"
        return {"num_items": self.num_items, "input_dropout": self.input_dropout,
                "encoder_type": kind, "encoder": self.encoder.to_dict(), "head": self.head.to_dict()}

    @classmethod
    def from_dict(cls, d: dict) -> "RetrievalModelConfig":
        enc_cls = SASRecEncoderConfig if d.get("encoder_type") == "sasrec" else HSTUEncoderConfig
        # Runs saved before the head existed are dot-product / L2 models: the default head.
        return cls(num_items=int(d["num_items"]), input_dropout=float(d["input_dropout"]),
                   encoder=enc_cls(**d["encoder"]), head=RetrievalHeadConfig.from_dict(d.get("head")))


class HSTURetrievalModel(nn.Module):
    def __init__(self, config: RetrievalModelConfig):
        super().__init__()
        self.config = config
        dim = config.encoder.embedding_dim
        self.item_embedding = nn.Embedding(config.num_items, dim, padding_idx=0)
        self.position_embedding = nn.Embedding(config.encoder.max_seq_len, dim)
        self.input_dropout = nn.Dropout(config.input_dropout)
        self.encoder = ENCODERS[type(config.encoder)](config.encoder)
        # A dot-product head has no parameters (and draws no random numbers): existing models are unchanged.
        self.head = RetrievalHead(config.head, dim, dim)
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
        timestamps [B, W] (event times, the target's time at position len) -> query vectors [B, W, D]
        (L2-normalised with the default head)."""
        width = ids.shape[1]
        if width > self.config.encoder.max_seq_len:
            raise ValueError(f"batch width {width} exceeds encoder.max_seq_len={self.config.encoder.max_seq_len}")
        positions = torch.arange(width, device=ids.device)
        real = positions.unsqueeze(0) < lengths.unsqueeze(1)
        x = self.item_embedding(ids) * math.sqrt(self.item_embedding.embedding_dim) + self.position_embedding(positions)
        x = self.input_dropout(x) * real.unsqueeze(-1).to(x.dtype)
        h = self.encoder(x, lengths, timestamps if getattr(self.config.encoder, "time_bias", False) else None)
        return self.head.normalize_query(h)

    def last_user_vector(self, ids, lengths, timestamps=None) -> torch.Tensor:
        """The query vector at the last real position (predicts the item after the history): [B, D]."""
        u = self.user_vectors(ids, lengths, timestamps)
        return u[torch.arange(u.shape[0], device=u.device), (lengths - 1).clamp(min=0)]

    def item_vectors(self, item_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        weight = self.item_embedding.weight if item_ids is None else self.item_embedding(item_ids)
        return self.head.normalize_items(weight)

    @torch.no_grad()
    def topk(self, rankable: Optional[torch.Tensor] = None, chunk_size: Optional[int] = None) -> BruteForceTopK:
        """A brute-force top-K module over the current item table (MIPS, or MoL for a MoL head)."""
        return build_topk(self.head, self.item_vectors().detach(), rankable, chunk_size)

    def score_all_items(self, ids, lengths, timestamps=None) -> torch.Tensor:
        """Similarity of each user's query vector with every catalogue row: [B, num_items] (cosine by default)."""
        query = self.last_user_vector(ids, lengths, timestamps)
        if not self.head.is_mol:  # one matmul; the top-K module computes the same in chunks
            return query @ self.item_vectors().T
        return self.topk().scores(query)


def next_item_training_loss(model, batch: dict, negative_pool, config: RetrievalLossConfig, generator=None):
    """Every history position i predicts ids[i+1]; the last real position predicts the target at ids[len].
    `negative_pool` is the catalogue: what uniform negatives and the full softmax range over."""
    user = model.user_vectors(batch["ids"], batch["lengths"], batch.get("timestamps"))
    supervised, labels = supervision(batch["ids"], batch["lengths"])
    return retrieval_loss(model, user[supervised], labels[supervised], negative_pool, config, generator)


def supervision(ids: torch.Tensor, lengths: torch.Tensor):
    """(mask [B, W]: positions that predict an item, labels [B, W]: the item each predicts, ids[i+1]).
    Padding is never a label: positions >= len, and positions whose next id is 0, are not supervised."""
    labels = torch.cat([ids[:, 1:], ids.new_zeros(ids.shape[0], 1)], dim=1)
    real = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0) < lengths.unsqueeze(1)
    return real & (labels != 0), labels


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
    device = model.item_embedding.weight.device
    ids, lengths = ids.to(device), lengths.to(device)
    timestamps = timestamps.to(device) if timestamps is not None else None
    topk = model.topk(rankable_from_invalid(model.config.num_items, table.non_candidate_ids).to(device))
    history = ids.masked_fill(torch.arange(width, device=device).unsqueeze(0) >= lengths.unsqueeze(1), -1)
    _, top = topk(model.last_user_vector(ids, lengths, timestamps), k, exclude=history)
    return top.cpu().tolist()
