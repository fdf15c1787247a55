"""The STU stack as an autoregressive decoder over semantic-ID tokens (generative retrieval, TIGER-style).

A user's history of items i_1..i_n becomes one token sequence: a begin-of-sequence token, then the T tokens of every
item in order (merlin_hstu.sid.tokenizer: T = L quantised levels + the de-duplicating level, one vocabulary):

    slot    0     1 .. T          T+1 .. 2T        ...     1+(n-1)T .. nT
    token   BOS   tokens(i_1)     tokens(i_2)      ...     tokens(i_n)

    x_s    = E[token_s] * sqrt(D) + P[pos_s]              pos_s = s ("token" positions) or the item index of slot s
                                                          (0 for BOS, j for the tokens of i_j: "item" positions)
    x_s    = Dropout(x_s) * (s < len)
    h      = STU stack(x)                                 causal; relative position (+ time) bias, next-event rule
    logits = Linear(LayerNorm(h_s))  restricted to level (s mod T)   slot s predicts slot s + 1, whose level is s mod T

Training is next-token cross-entropy at every real slot but the last, each over its level's codes
(`next_token_loss`).  The relative bias follows retrieval HSTU's rule (merlin_hstu.encoders.hstu): row s's query time
is slot s + 1's time, where every token carries its item's event time, BOS the first item's, and the slots of the
item being predicted the query time; with "item" positions the relative position is counted in items, so the tokens
of one item are at distance 0.  Time bias needs timestamps; data without them (the Amazon S3-Rec files) runs with
`time_bias: false`.

Decoding (merlin_hstu.sid.decode) reads the history once into the stack's KV cache (`STUStack.cached_forward`) and
decodes the T tokens of the next item by constrained beam search over the trie of valid tuples.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from merlin_hstu.encoders.stu import HSTUEncoderConfig, STUStack, TokenMeta
from merlin_hstu.sid.tokenizer import BOS_TOKEN, FIRST_CODE_TOKEN

POSITIONS = ("token", "item")


@dataclass
class SIDModelConfig:
    """Everything needed to rebuild a decoder (saved with its weights).  The vocabulary layout comes from the
    tokenizer (`SemanticIds.codebook_sizes`)."""

    codebook_sizes: List[int]  # [T] codes per level (the last: the de-duplicating level)
    encoder: HSTUEncoderConfig = field(default_factory=lambda: HSTUEncoderConfig(time_bias=False))
    input_dropout: float = 0.2
    positions: str = "token"  # token | item (module docstring)

    def __post_init__(self) -> None:
        if isinstance(self.encoder, dict):
            self.encoder = HSTUEncoderConfig(**self.encoder)
        self.codebook_sizes = [int(s) for s in self.codebook_sizes]
        if not self.codebook_sizes or min(self.codebook_sizes) < 1:
            raise ValueError(f"codebook_sizes must be positive, one per level, got {self.codebook_sizes}")
        if self.positions not in POSITIONS:
            raise ValueError(f"model.positions must be one of {POSITIONS}, got {self.positions!r}")
        if not 0.0 <= self.input_dropout < 1.0:
            raise ValueError(f"model.input_dropout must be in [0, 1), got {self.input_dropout!r}")

    @property
    def num_levels(self) -> int:
        return len(self.codebook_sizes)

    @property
    def vocab_size(self) -> int:
        return FIRST_CODE_TOKEN + sum(self.codebook_sizes)

    @property
    def token_offsets(self) -> List[int]:
        offsets, total = [], FIRST_CODE_TOKEN
        for size in self.codebook_sizes:
            offsets.append(total)
            total += size
        return offsets

    def max_items(self) -> int:
        """The most items (history + the one decoded) a sequence of max_seq_len slots holds."""
        return (self.encoder.max_seq_len - 1) // self.num_levels

    def to_dict(self) -> dict:
        return {"codebook_sizes": list(self.codebook_sizes), "encoder": self.encoder.to_dict(),
                "input_dropout": self.input_dropout, "positions": self.positions}

    @classmethod
    def from_dict(cls, d: dict) -> "SIDModelConfig":
        return cls(codebook_sizes=list(d["codebook_sizes"]), encoder=HSTUEncoderConfig(**d["encoder"]),
                   input_dropout=float(d.get("input_dropout", 0.2)), positions=d.get("positions", "token"))


class SIDDecoder(nn.Module):
    """Token embedding -> STU stack -> per-level next-token logits (module docstring)."""

    def __init__(self, config: SIDModelConfig):
        super().__init__()
        self.config = config
        dim = config.encoder.embedding_dim
        self.token_embedding = nn.Embedding(config.vocab_size, dim, padding_idx=0)
        self.position_embedding = nn.Embedding(config.encoder.max_seq_len, dim)
        self.input_dropout = nn.Dropout(config.input_dropout)
        self.stack = STUStack(config.encoder)
        self.output_norm = nn.LayerNorm(dim)
        self.output = nn.Linear(dim, config.vocab_size)
        # level_mask[l, v]: token v is a code of level l
        mask = torch.zeros(config.num_levels, config.vocab_size, dtype=torch.bool)
        for level, (offset, size) in enumerate(zip(config.token_offsets, config.codebook_sizes)):
            mask[level, offset:offset + size] = True
        self.register_buffer("level_mask", mask, persistent=False)
        nn.init.trunc_normal_(self.token_embedding.weight, std=0.02, a=-0.04, b=0.04)
        nn.init.xavier_normal_(self.position_embedding.weight)

    # --- slots -------------------------------------------------------------------------------------------
    def slot_positions(self, slots: Tensor) -> Tensor:
        """Position of each slot (module docstring): the slot itself, or its item index."""
        if self.config.positions == "token":
            return slots
        return torch.where(slots > 0, (slots - 1).div(self.config.num_levels, rounding_mode="floor") + 1,
                           torch.zeros_like(slots))

    def embed(self, tokens: Tensor, slots: Tensor) -> Tensor:
        """E[token] * sqrt(D) + P[pos(slot)] (no dropout): tokens and slots of one shape -> [..., D]."""
        scale = math.sqrt(self.config.encoder.embedding_dim)
        positions = self.slot_positions(slots).clamp(0, self.config.encoder.max_seq_len - 1)
        return self.token_embedding(tokens) * scale + self.position_embedding(positions)

    def key_meta(self, slots: Tensor, times: Optional[Tensor]) -> TokenMeta:
        """Bias metadata of slots [B or 1, W] (times [B, W] or None)."""
        return TokenMeta(self.slot_positions(slots), times if self.config.encoder.time_bias else None)

    # --- full forward ------------------------------------------------------------------------------------
    def hidden(self, tokens: Tensor, lengths: Tensor, times: Optional[Tensor] = None) -> Tensor:
        """tokens [B, W] right-padded (slot 0 = BOS), lengths [B], times [B, W] per slot (slot len_b: the query
        time; required with time_bias) -> normalised hidden states [B, W, D] (zeros past each length)."""
        batch, width = tokens.shape
        if width > self.config.encoder.max_seq_len:
            raise ValueError(f"a sequence of {width} tokens exceeds model.max_seq_len={self.config.encoder.max_seq_len}"
                             f" (1 + {self.config.num_levels} tokens per item); shorten data.max_history")
        if self.config.encoder.time_bias and times is None:
            raise ValueError("this decoder has time_bias=True: pass the slot times (or build it with time_bias=False)")
        slots = torch.arange(width, device=tokens.device).unsqueeze(0)
        real = slots < lengths.unsqueeze(1)
        x = self.input_dropout(self.embed(tokens, slots)) * real.unsqueeze(-1).to(torch.float32)
        bias = self.stack.bias_index(self.key_meta(slots, times), rule="next_event")
        out = self.stack(x[real], real, lengths, bias)
        h = x.new_zeros(batch, width, x.shape[-1]).index_put((real,), out)
        return self.output_norm(h)

    def level_logits(self, h: Tensor, level: int) -> Tensor:
        """Logits [..., K_level] of level `level`'s codes from normalised hidden states [..., D]."""
        offset, size = self.config.token_offsets[level], self.config.codebook_sizes[level]
        return F.linear(h, self.output.weight[offset:offset + size], self.output.bias[offset:offset + size])


def next_token_loss(model: SIDDecoder, tokens: Tensor, lengths: Tensor, times: Optional[Tensor] = None) -> Tensor:
    """Mean cross-entropy of every real slot s < len - 1 predicting token s + 1 among its level's codes."""
    h = model.hidden(tokens, lengths, times)
    width = tokens.shape[1]
    slots = torch.arange(width, device=tokens.device)
    supervised = slots.unsqueeze(0) < (lengths - 1).unsqueeze(1)
    labels = torch.cat([tokens[:, 1:], tokens.new_zeros(tokens.shape[0], 1)], dim=1)
    next_level = (slots % model.config.num_levels).expand_as(tokens)
    logits = model.output(h[supervised])
    logits = logits.masked_fill(~model.level_mask[next_level[supervised]], float("-inf"))
    return F.cross_entropy(logits, labels[supervised])


def item_token_sequences(token_table: Tensor, ids: Tensor, lengths: Tensor, times: Optional[Tensor] = None):
    """Item windows -> decoder sequences.  ids [B, W] (items at positions < lengths[b], 0 after), lengths [B]
    (items per row), times [B, W] (item times) -> (tokens [B, 1 + W*T], token lengths 1 + len*T,
    slot times [B, 1 + W*T] or None: each token its item's time, BOS the first item's)."""
    batch, width = ids.shape
    real = torch.arange(width, device=ids.device).unsqueeze(0) < lengths.unsqueeze(1)
    per_item = token_table[ids * real]  # [B, W, T]; padding rows of the table are 0
    levels = per_item.shape[-1]
    bos = torch.full((batch, 1), BOS_TOKEN, dtype=torch.long, device=ids.device)
    tokens = torch.cat([bos, per_item.reshape(batch, width * levels)], dim=1)
    slot_times = None
    if times is not None:
        slot_times = torch.cat([times[:, :1], times.repeat_interleave(levels, dim=1)], dim=1)
    return tokens, 1 + lengths * levels, slot_times
