"""HSTU encoder (research variant of arXiv 2402.17152), pure PyTorch.

One Sequential Transduction Unit (STU) on jagged tokens x [T, D] (reference-hstu.md §1.4):

    xn         = LayerNorm(x)                                    no affine, eps 1e-6
    u, v, q, k = split(SiLU(xn @ W_uvqk))                        one bias-free projection
    A          = SiLU(q k^T + rab) / N  (causal, real tokens only)
    y          = u * LayerNorm(A v)                              no affine, over all heads together
    x_out      = x + Linear_o(Dropout(y))

rab is a per-layer relative bias: a learned weight per relative position (j - i) plus a learned weight per
log-bucket of the time gap between the query's prediction time and the key's event time.

The encoder works natively on jagged tokens (values + offsets): pointwise work touches real tokens only,
attention runs on a padded view.  `forward` accepts right-padded [B, W, D] input and returns the same
values as `forward_jagged` on the equivalent jagged input.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from merlin_hstu.kernels.bucket_gather import bucket_gather
from merlin_hstu.kernels.dispatch import resolve_kernel, validate_kernel
from merlin_hstu.kernels.hstu_attention import hstu_attention, hstu_attention_reference, valid_attention_mask

TIME_BUCKET_DIVISOR = 0.301  # log-time buckets are ln(dt) / 0.301 wide (about log2 steps)


@dataclass
class HSTUEncoderConfig:
    """Typed configuration of an HSTU encoder stack.

    `max_seq_len` is N: the attention normaliser (A = SiLU(.)/N) and the size of the relative-position
    table (2N - 1 entries).  It is a constant, never the batch's longest sequence.  The reference uses
    N = 211 (200 history slots + 11 output slots).
    """

    embedding_dim: int = 50
    num_blocks: int = 2
    num_heads: int = 1
    attention_dim: int = 50  # dqk per head
    linear_dim: int = 50  # dv per head
    max_seq_len: int = 211
    linear_dropout: float = 0.2
    position_bias: bool = True
    time_bias: bool = True  # needs timestamps at call time; False switches the time bias off explicitly
    num_time_buckets: int = 128  # bucket ids 0..num_time_buckets
    layer_norm_eps: float = 1e-6
    causal: bool = True
    kernel: str = "auto"  # attention kernel: "pytorch" | "triton" | "auto" (see merlin_hstu.kernels.dispatch)

    def __post_init__(self) -> None:
        for name in ("embedding_dim", "num_blocks", "num_heads", "attention_dim", "linear_dim", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"HSTUEncoderConfig.{name} must be a positive int, got {value!r}")
        if not 0.0 <= self.linear_dropout < 1.0:
            raise ValueError(f"HSTUEncoderConfig.linear_dropout must be in [0, 1), got {self.linear_dropout}")
        validate_kernel(self.kernel, "HSTUEncoderConfig.kernel")

    def to_dict(self) -> dict:
        return asdict(self)


def time_bucket_ids(query_times: torch.Tensor, key_times: torch.Tensor, num_buckets: int) -> torch.Tensor:
    """Bucket of |query_time[i] - key_time[j]|: clamp(floor(ln(max(|dt|, 1)) / 0.301), 0, num_buckets).

    query_times: [B, W]; key_times: [B, W] -> [B, W, W] int64.  Differences are taken in float64 so unix
    timestamps keep second precision.
    """
    dt = (query_times.to(torch.float64).unsqueeze(2) - key_times.to(torch.float64).unsqueeze(1)).abs()
    buckets = torch.log(dt.clamp(min=1.0)) / TIME_BUCKET_DIVISOR
    return buckets.long().clamp(0, num_buckets).detach()


class RelativeBucketedTimeAndPositionBias(nn.Module):
    """rab[b,i,j] = w_pos[j - i + N - 1] + w_time[bucket(t_query[b,i] - t[b,j])]."""

    def __init__(self, max_seq_len: int, num_time_buckets: int, position_bias: bool, time_bias: bool):
        super().__init__()
        self.max_seq_len = max_seq_len
        self.num_time_buckets = num_time_buckets
        self.position_weights = nn.Parameter(torch.empty(2 * max_seq_len - 1)) if position_bias else None
        self.time_weights = nn.Parameter(torch.empty(num_time_buckets + 1)) if time_bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for weight in (self.position_weights, self.time_weights):
            if weight is not None:
                nn.init.normal_(weight, mean=0.0, std=0.02)

    def forward(self, width: int, query_times: Optional[torch.Tensor], key_times: Optional[torch.Tensor],
                time_buckets: Optional[torch.Tensor] = None):
        """`time_buckets` ([B, W, W], from `time_bucket_ids`) may be passed in precomputed: they depend only on
        the timestamps, so a stack computes them once for all its layers."""
        if not torch.jit.is_tracing() and width > self.max_seq_len:
            raise ValueError(
                f"sequence width {width} exceeds max_seq_len={self.max_seq_len}; "
                "raise HSTUEncoderConfig.max_seq_len or truncate the sequences"
            )
        bias = None
        if self.position_weights is not None:
            pos = torch.arange(width, device=self.position_weights.device)
            rel = pos.unsqueeze(0) - pos.unsqueeze(1) + self.max_seq_len - 1  # [i, j] -> j - i + N - 1
            bias = self.position_weights[rel].unsqueeze(0)
        if self.time_weights is not None:
            if time_buckets is None and (query_times is None or key_times is None):
                raise ValueError(
                    "this HSTU encoder has time_bias=True but no timestamps were given; pass timestamps "
                    "or build it with HSTUEncoderConfig(time_bias=False)"
                )
            if time_buckets is None:
                time_buckets = time_bucket_ids(query_times, key_times, self.num_time_buckets)
            time_part = bucket_gather(self.time_weights, time_buckets)
            bias = time_part if bias is None else bias + time_part
        return bias


class STULayer(nn.Module):
    """One HSTU layer on jagged tokens; attention on a padded [B, W] view given by `token_mask`."""

    def __init__(self, config: HSTUEncoderConfig):
        super().__init__()
        c = config
        self.config = c
        self.num_heads, self.attention_dim, self.linear_dim = c.num_heads, c.attention_dim, c.linear_dim
        uvqk_dim = 2 * c.num_heads * c.linear_dim + 2 * c.num_heads * c.attention_dim
        self.uvqk = nn.Parameter(torch.empty(c.embedding_dim, uvqk_dim))
        self.output = nn.Linear(c.num_heads * c.linear_dim, c.embedding_dim)
        self.dropout = nn.Dropout(c.linear_dropout)
        self.relative_bias = RelativeBucketedTimeAndPositionBias(
            c.max_seq_len, c.num_time_buckets, c.position_bias, c.time_bias
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.uvqk, mean=0.0, std=0.02)
        nn.init.xavier_uniform_(self.output.weight)
        bound = 1.0 / math.sqrt(self.output.in_features)  # PyTorch's default Linear bias init
        nn.init.uniform_(self.output.bias, -bound, bound)
        self.relative_bias.reset_parameters()

    def forward(
        self,
        x: torch.Tensor,
        token_mask: torch.Tensor,
        lengths: torch.Tensor,
        query_times: Optional[torch.Tensor] = None,
        key_times: Optional[torch.Tensor] = None,
        time_buckets: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """x: [T, D] jagged tokens; token_mask: [B, W] bool; returns [T, D].  `time_buckets` and
        `attention_mask` (the padded path's `valid_attention_mask`) may be passed in, shared by a stack."""
        batch, width = token_mask.shape
        h, dqk, dv = self.num_heads, self.attention_dim, self.linear_dim
        u, v, q, k = self.project(x)

        def padded(t: torch.Tensor, d: int) -> torch.Tensor:
            return t.new_zeros(batch, width, h * d).index_put((token_mask,), t).view(batch, width, h, d)

        rab = self.relative_bias(width, query_times, key_times, time_buckets)
        if resolve_kernel(self.config.kernel, q) == "triton":  # jagged kernels: no padded q/k/v at all
            offsets = F.pad(torch.cumsum(lengths, 0), (1, 0))
            attn = hstu_attention(
                q.view(-1, h, dqk), k.view(-1, h, dqk), v.view(-1, h, dv), offsets, self.config.max_seq_len,
                attn_bias=rab, causal=self.config.causal, kernel="triton",
            ).reshape(-1, h * dv)
        else:
            attn = hstu_attention_reference(
                padded(q, dqk), padded(k, dqk), padded(v, dv), lengths, float(self.config.max_seq_len), rab,
                causal=self.config.causal, mask=attention_mask,
            )
            attn = attn.reshape(batch, width, h * dv)[token_mask]
        return self.finish(x, u, attn)

    # The two pointwise halves around the attention, public so that callers with their own attention inputs
    # (the ranking model's target-aware mask, M-FALCON's KV-cache decoding) run exactly this layer's math.
    def project(self, x: torch.Tensor):
        """x [T, D] -> u, v [T, H*dv] and q, k [T, H*dqk]: SiLU(LayerNorm(x) @ W_uvqk), split u|v|q|k."""
        h, dqk, dv = self.num_heads, self.attention_dim, self.linear_dim
        xn = F.layer_norm(x, (x.shape[-1],), eps=self.config.layer_norm_eps)
        return torch.split(F.silu(xn @ self.uvqk), [h * dv, h * dv, h * dqk, h * dqk], dim=-1)

    def finish(self, x: torch.Tensor, u: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """x [T, D], u and attn [T, H*dv] -> x + Linear_o(Dropout(u * LayerNorm(attn)))."""
        y = u * F.layer_norm(attn, (attn.shape[-1],), eps=self.config.layer_norm_eps)
        return x + self.output(self.dropout(y))


class HSTUEncoder(nn.Module):
    """A stack of STU layers.  Input embedding and output normalisation live outside (see retrieval.py)."""

    def __init__(self, config: HSTUEncoderConfig):
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList(STULayer(config) for _ in range(config.num_blocks))

    # --- jagged (native) -------------------------------------------------------------------------
    def forward_jagged(
        self,
        values: torch.Tensor,
        offsets: torch.Tensor,
        timestamps: Optional[torch.Tensor] = None,
        query_timestamps: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """values [T, D], offsets [B+1]; timestamps [T] event times (same offsets); query_timestamps [B]:
        the time at which the prediction after each sequence's last event is made (the target's timestamp;
        defaults to the last event's time).  Returns [T, D]."""
        lengths = offsets[1:] - offsets[:-1]
        max_len = int(lengths.max()) if lengths.numel() else 0
        # One slot past the longest sequence holds its query time; a sequence of exactly N tokens has no such
        # slot inside the bias table, so its last row reuses its own timestamp, as the reference does.
        if max_len > self.config.max_seq_len:
            raise ValueError(f"a sequence of {max_len} tokens exceeds max_seq_len={self.config.max_seq_len}; "
                             "raise HSTUEncoderConfig.max_seq_len or truncate the sequences")
        width = min(max_len + 1, self.config.max_seq_len)
        token_mask = torch.arange(max_len + 1, device=values.device).unsqueeze(0) < lengths.unsqueeze(1)
        padded_times = None
        if timestamps is not None:
            padded_times = timestamps.new_zeros(lengths.shape[0], max_len + 1).index_put((token_mask,), timestamps)
            if query_timestamps is None:
                last = (lengths - 1).clamp(min=0)
                query_timestamps = padded_times.gather(1, last.unsqueeze(1)).squeeze(1)
            padded_times = padded_times.scatter(1, lengths.unsqueeze(1), query_timestamps.to(padded_times.dtype).unsqueeze(1))
            padded_times = padded_times[:, :width]
        return self._run(values, token_mask[:, :width], lengths, padded_times)

    # --- right-padded ----------------------------------------------------------------------------
    def forward(
        self,
        x: torch.Tensor,
        lengths: Optional[torch.Tensor] = None,
        timestamps: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """x [B, W, D] right-padded; lengths [B] (default: all W); timestamps [B, W]: event times at
        positions < len_b and, at position len_b (when len_b < W), the query time of the last position.
        Returns [B, W, D] with zeros past each sequence's length."""
        batch, width, dim = x.shape
        if lengths is None:
            lengths = torch.full((batch,), width, dtype=torch.long, device=x.device)
        token_mask = torch.arange(width, device=x.device).unsqueeze(0) < lengths.unsqueeze(1)
        out = self._run(x[token_mask], token_mask, lengths, timestamps)
        return x.new_zeros(batch, width, dim).index_put((token_mask,), out)

    def _run(self, values, token_mask, lengths, padded_times):
        query_times = key_times = None
        width = token_mask.shape[1]
        if padded_times is not None:
            # Row i is "the moment position i's prediction is made": the next position's timestamp.
            # The last row has no next slot and reuses its own (the reference does the same).
            next_idx = torch.arange(1, width + 1, device=values.device).clamp(max=width - 1)
            query_times, key_times = padded_times[:, next_idx], padded_times
        time_buckets = None
        if self.config.time_bias and padded_times is not None:
            # Shared by every layer (each gathers its own weights): computed once, not num_blocks times.
            time_buckets = time_bucket_ids(query_times, key_times, self.config.num_time_buckets)
        attention_mask = None
        if resolve_kernel(self.config.kernel, values) != "triton":
            # The padded path's [B, W, W] mask depends on the lengths only: built once, not num_blocks times.
            attention_mask = valid_attention_mask(lengths, width, causal=self.config.causal)
        for layer in self.layers:
            values = layer(values, token_mask, lengths, query_times, key_times, time_buckets, attention_mask)
        return values
