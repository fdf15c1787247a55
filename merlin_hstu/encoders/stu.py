"""The STU (Sequential Transduction Unit) layer and stack shared by retrieval HSTU, DLRM-HSTU and M-FALCON.

One STU layer on jagged tokens x [T, D] (reference-hstu.md §1.4):

    xn         = LayerNorm(x)                                    no affine, eps 1e-6
    u, v, q, k = split(SiLU(xn @ W_uvqk))                        one bias-free projection
    A          = SiLU(q k^T + rab) / N  * valid                  N = max_seq_len, a constant
    y          = u * LayerNorm(A v)                              no affine, over all heads together
    x_out      = x + Linear_o(Dropout(y))

`valid` is the attention-mask spec: causal, `num_targets` (target-aware candidates: each sees the history and
itself, never another candidate) and `contextual_seq_len` (a prefix that sees and is seen by the whole history);
the op's docstring (merlin_hstu.kernels.attention_ops) has the rules.

rab is a per-layer relative bias, gathered from each layer's own tables at indices shared by all layers:

    rab[b,i,j] = (w_pos[clamp(p_j - p_i, -(N-1), N-1) + N - 1] + w_time[bucket(tq_i - t_j)]) * keep[b,i,j]
    bucket(dt) = clamp(floor(ln(max(|dt|, 1)) / 0.301), 0, num_time_buckets)

with p a per-token position, t a token's event time, tq the time row i's prediction is made, and keep False
where the query or the key is a contextual token.  Two rules give tq (`QUERY_TIME_RULES`):

    "next_event"  retrieval HSTU: p = the slot index; tq_i = t_{i+1}, the next event's timestamp (the last slot
                  of a padded view reuses its own); slot len_b holds the query time of the last event
    "own_time"    DLRM-HSTU / M-FALCON: p = the event index given per token; tq_i = t_i, each token's own time
                  (a candidate's time is its query time); contextual tokens get zero bias

`STUStack` runs the layers over one batch and does the per-forward work once for all of them: the bias indices
(positions, time buckets, the contextual keep mask) and the attention plan (the resolved kernel and, on the
padded PyTorch path, the [B, W, W] validity mask; `merlin_hstu.kernels.attention_ops.plan_hstu_attention`).
Its `cached_forward` encodes R new tokens of one sequence against a per-layer KV cache (M-FALCON's prefill,
scoring and update): rows are independent sums (no softmax), so the new rows equal the full forward's rows.

The kernel is never chosen here: the configured name (`HSTUEncoderConfig.kernel`) goes to the attention ops,
whose dispatch (`merlin_hstu.kernels.dispatch`) decides.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from merlin_hstu.kernels.bucket_gather import bucket_gather
from merlin_hstu.kernels.dispatch import validate_kernel
from merlin_hstu.kernels.attention_ops import (
    HSTUAttentionPlan,
    group_bias,
    hstu_attention_rows,
    hstu_attention_with_plan,
    plan_hstu_attention,
)

TIME_BUCKET_DIVISOR = 0.301  # log-time buckets are ln(dt) / 0.301 wide (about log2 steps)
QUERY_TIME_RULES = ("next_event", "own_time")


@dataclass
class HSTUEncoderConfig:
    """Typed configuration of an STU stack (the retrieval HSTU encoder's, and DLRM-HSTU's through
    `DlrmHSTUConfig.encoder_config`).

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


# ------------------------------------------------------------------------------------------------------------
# The relative position + time bias
# ------------------------------------------------------------------------------------------------------------
# Rows of the [B, R, W] time-bucket computation done at once on a CPU: a ~4 MB float64 block that stays in cache
# (one pass over a fresh [B, R, W] float64 tensor per op costs ~4x as much: page faults and memory traffic).
_TIME_BUCKET_BLOCK_ELEMENTS = 1 << 19


def time_bucket_ids(query_times: Tensor, key_times: Tensor, num_buckets: int) -> Tensor:
    """Bucket of |query_time[i] - key_time[j]|: clamp(floor(ln(max(|dt|, 1)) / 0.301), 0, num_buckets).

    query_times: [B or 1, R]; key_times: [B or 1, W] -> [B, R, W] int64.  Differences are taken in float64 so unix
    timestamps keep second precision.  Eager calls run the formula in place over blocks of rows (same operations,
    same bits as the one-expression form a traced graph records); the result is detached (indices, no gradient).
    """
    if torch.jit.is_tracing():
        dt = (query_times.to(torch.float64).unsqueeze(2) - key_times.to(torch.float64).unsqueeze(1)).abs()
        buckets = torch.log(dt.clamp(min=1.0)) / TIME_BUCKET_DIVISOR
        return buckets.long().clamp(0, num_buckets).detach()
    batch = max(query_times.shape[0], key_times.shape[0])
    rows, width = query_times.shape[1], key_times.shape[1]
    query = query_times.detach().to(torch.float64).expand(batch, rows)
    key = key_times.detach().to(torch.float64).expand(batch, width)
    out = torch.empty(batch, rows, width, dtype=torch.long, device=query.device)
    block = batch if query.device.type != "cpu" else max(1, _TIME_BUCKET_BLOCK_ELEMENTS // max(rows * width, 1))
    buffer = torch.empty(min(block, batch), rows, width, dtype=torch.float64, device=query.device)
    for start in range(0, batch, block):
        stop = min(start + block, batch)
        dt = torch.sub(query[start:stop].unsqueeze(2), key[start:stop].unsqueeze(1), out=buffer[: stop - start])
        dt.abs_().clamp_(min=1.0).log_().div_(TIME_BUCKET_DIVISOR)
        out[start:stop].copy_(dt)  # float -> int64 truncates, = floor for these non-negative values
    return out.clamp_(0, num_buckets)


def _cat_optional(a: Optional[Tensor], b: Optional[Tensor], dim: int) -> Optional[Tensor]:
    if (a is None) != (b is None):
        raise ValueError("TokenMeta.cat: both sides must have the same fields set")
    return None if a is None else torch.cat([a, b], dim=dim)


@dataclass
class TokenMeta:
    """Per-token bias inputs, flat [S] or padded [B or 1, W]: position, time (unix s), contextual flag.

    `time` None: no timestamps (only valid with the time bias off); `contextual` None: no contextual tokens."""

    position: Tensor
    time: Optional[Tensor] = None
    contextual: Optional[Tensor] = None

    def cat(self, other: "TokenMeta", dim: int = 0) -> "TokenMeta":
        return TokenMeta(torch.cat([self.position, other.position], dim=dim),
                         _cat_optional(self.time, other.time, dim),
                         _cat_optional(self.contextual, other.contextual, dim))

    def __getitem__(self, index) -> "TokenMeta":
        return TokenMeta(self.position[index], None if self.time is None else self.time[index],
                         None if self.contextual is None else self.contextual[index])


@dataclass
class BiasIndex:
    """Where every layer's bias gathers from, computed once per forward (`RelativeBucketedTimeAndPositionBias.index`).

    Shapes [B or 1, R, W] for R query rows against W keys; a field is None when its part of the bias is off."""

    relative_position: Optional[Tensor]  # rows of position_weights: clamp(p_j - p_i, -(N-1), N-1) + N - 1
    time_bucket: Optional[Tensor]  # rows of time_weights: bucket(tq_i - t_j)
    keep: Optional[Tensor] = None  # bool, False where the query or the key is contextual; None: keep all

    def for_group(self, group) -> "BiasIndex":
        """The index cut to one length group of an attention plan (its rows unless shared, its width), so a
        layer gathers only the bias that group attends with."""
        def cut(t: Optional[Tensor]) -> Optional[Tensor]:
            return None if t is None else group_bias(t, group)

        return BiasIndex(cut(self.relative_position), cut(self.time_bucket), cut(self.keep))


class RelativeBucketedTimeAndPositionBias(nn.Module):
    """rab[b,i,j] = (w_pos[clamp(p_j - p_i, -(N-1), N-1) + N - 1] + w_time[bucket(tq_i - t_j)]) * keep[b,i,j].

    Two halves: `index` (a classmethod: it depends on the tokens and the config, not on a layer's weights, so a
    stack computes it once for all its layers, with one of the two query-time rules of the module docstring)
    and `forward(index)`, which gathers this layer's own tables at it.
    """

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

    @classmethod
    def index(cls, config: HSTUEncoderConfig, key: TokenMeta, *, rule: str, rows: Optional[Tensor] = None,
              query: Optional[TokenMeta] = None) -> Optional[BiasIndex]:
        """Gather indices of rab [B or 1, R, W] for the query rows against the W keys `key` ([B or 1, W] each).

        The query tokens are the keys at slots `rows` ([R], default all W), or `query` ([B or 1, R], "own_time"
        only: explicit per-row metadata, e.g. candidates scored against a cache).  rule "next_event" replaces the
        query times by the next slot's key time (the last slot keeps its own); "own_time" keeps them.
        Returns None when both the position and the time bias are off.
        """
        if rule not in QUERY_TIME_RULES:
            raise ValueError(f"relative bias rule must be one of {QUERY_TIME_RULES}, got {rule!r}")
        if not (config.position_bias or config.time_bias):
            return None
        width = key.position.shape[-1]
        if query is None:
            query = key if rows is None else key[:, rows]
        elif rule == "next_event" or rows is not None:
            raise ValueError("relative bias index: explicit query metadata goes with rule='own_time' and no rows")
        if rule == "next_event" and key.time is not None:
            slots = torch.arange(width, device=key.time.device) if rows is None else rows
            query = TokenMeta(query.position, key.time[:, (slots + 1).clamp(max=width - 1)], query.contextual)
        n = config.max_seq_len
        relative = None
        if config.position_bias:
            relative = (key.position.unsqueeze(-2) - query.position.unsqueeze(-1)).clamp(-(n - 1), n - 1) + (n - 1)
        buckets = None
        if config.time_bias:
            if key.time is None or query.time is None:
                raise ValueError("this HSTU encoder has time_bias=True but no timestamps were given; pass "
                                 "timestamps or build it with HSTUEncoderConfig(time_bias=False)")
            buckets = time_bucket_ids(query.time, key.time, config.num_time_buckets)
        keep = None
        if key.contextual is not None and query.contextual is not None:
            keep = ~(query.contextual.unsqueeze(-1) | key.contextual.unsqueeze(-2))
        return BiasIndex(relative, buckets, keep)

    def forward(self, index: Optional[BiasIndex]) -> Optional[Tensor]:
        """This layer's rab [B or 1, R, W] at `index` (None: no bias)."""
        if index is None:
            return None
        bias = None
        if self.position_weights is not None:
            bias = self.position_weights[index.relative_position]
        if self.time_weights is not None:
            part = bucket_gather(self.time_weights, index.time_bucket)
            bias = part if bias is None else bias + part
        if bias is not None and index.keep is not None:
            bias = bias * index.keep.to(bias.dtype)
        return bias


# ------------------------------------------------------------------------------------------------------------
# The layer
# ------------------------------------------------------------------------------------------------------------
@dataclass
class LayerKVCache:
    """One layer's keys and values of the `length` cached tokens of one sequence.

    Head-major buffers of max_seq_len slots ([H, N, d]), so that neither appending nor a pass's temporary tokens
    copy the cache: new K, V are written into the slots after the cached ones and the attention reads a
    [1, S + R, H, d] view (head-major memory is what its einsum wants, so no copy there either).  Slots at or
    past `length` are scratch, overwritten by the next pass."""

    keys: Tensor  # [H, N, dqk]
    values: Tensor  # [H, N, dv]
    length: int = 0


class STULayer(nn.Module):
    """One HSTU layer on jagged tokens (module docstring).  Parameter names (`uvqk`, `output.weight`,
    `output.bias`, `relative_bias.position_weights`, `relative_bias.time_weights`) are those of saved models."""

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
        x: Tensor,
        token_mask: Tensor,
        lengths: Tensor,
        query_times: Optional[Tensor] = None,
        key_times: Optional[Tensor] = None,
        *,
        num_targets: Optional[Tensor] = None,
        contextual_seq_len: int = 0,
        bias: Optional[BiasIndex] = None,
        plan: Optional[HSTUAttentionPlan] = None,
    ) -> Tensor:
        """x: [T, D] jagged tokens, sequence b the next lengths[b] rows; token_mask [B, W]: their padded view
        (W >= the longest); returns [T, D].

        Mask spec: causal (`config.causal`), `num_targets` [B], `contextual_seq_len`.  Bias: `bias`, the indices a
        stack computed once for all its layers (`STUStack.bias_index`); standalone, explicit per-row query times
        and per-slot key times [B, W] instead (positions are the slots).  `plan`: the stack's attention plan for
        this batch and mask spec (`plan_hstu_attention`); built here when not given.
        """
        if bias is None:
            positions = torch.arange(token_mask.shape[1], device=x.device).unsqueeze(0)
            bias = RelativeBucketedTimeAndPositionBias.index(
                self.config, TokenMeta(positions, key_times), rule="own_time", query=TokenMeta(positions, query_times))
        if plan is None:
            plan = plan_hstu_attention(lengths, self.config.max_seq_len, token_mask=token_mask,
                                       causal=self.config.causal, num_targets=num_targets,
                                       contextual_seq_len=contextual_seq_len, kernel=self.config.kernel, like=(x,))
        h, dqk, dv = self.num_heads, self.attention_dim, self.linear_dim
        u, v, q, k = self.project(x)
        if isinstance(bias, list):  # the stack cut the index per length group once for all layers
            rab = [self.relative_bias(index) for index in bias]
        elif plan.groups is not None and bias is not None:  # gather each length group's bias only
            rab = [self.relative_bias(bias.for_group(group)) for group in plan.groups]
        else:
            rab = self.relative_bias(bias)
        attn = hstu_attention_with_plan(q.view(-1, h, dqk), k.view(-1, h, dqk), v.view(-1, h, dv), plan, rab)
        return self.finish(x, u, attn.reshape(-1, h * dv))

    def cached_forward(
        self,
        x: Tensor,
        cache: LayerKVCache,
        bias: Optional[BiasIndex],
        *,
        num_targets: int = 0,
        contextual_seq_len: int = 0,
        append: bool = False,
    ) -> Tensor:
        """Encode R new tokens x [R, D] of one sequence that follow the cache's S tokens; returns [R, D].

        Their queries attend to [cached K ; their own K] with rows S..S+R-1 of the mask the whole sequence would
        get (causal from the config; the last `num_targets` new tokens are candidates; `contextual_seq_len`).
        `bias`: indices of those rows against the S + R keys ([1, R, W], W >= S + R: columns past the keys, e.g.
        retrieval's query-time slot, are ignored).  append=True keeps their K, V in the cache (its length grows by
        R); otherwise their slots are scratch.  Inference only: the cache is written in place.
        """
        h, dqk, dv = self.num_heads, self.attention_dim, self.linear_dim
        start, total = cache.length, cache.length + x.shape[0]
        if total > cache.keys.shape[1]:
            raise ValueError(f"{start} cached tokens + {x.shape[0]} new tokens exceed the cache's "
                             f"{cache.keys.shape[1]} slots (HSTUEncoderConfig.max_seq_len)")
        u, v, q, k = self.project(x)
        cache.keys[:, start:total] = k.reshape(-1, h, dqk).transpose(0, 1)
        cache.values[:, start:total] = v.reshape(-1, h, dv).transpose(0, 1)
        keys = cache.keys[:, :total].transpose(0, 1).unsqueeze(0)  # [1, S + R, H, dqk] view
        values = cache.values[:, :total].transpose(0, 1).unsqueeze(0)
        targets = torch.tensor([num_targets], device=x.device) if num_targets else None
        rab = self.relative_bias(bias)
        if rab is not None and rab.shape[-1] != total:
            rab = rab[..., :total]
        attn = hstu_attention_rows(
            q.reshape(1, -1, h, dqk), keys, values, torch.arange(start, total, device=x.device),
            torch.tensor([total], device=x.device), float(self.config.max_seq_len), rab,
            causal=self.config.causal, num_targets=targets, contextual_seq_len=contextual_seq_len,
            kernel=self.config.kernel)
        if append:
            cache.length = total
        return self.finish(x, u, attn.reshape(-1, h * dv))

    # The two pointwise halves around the attention, shared by forward and cached_forward.
    def project(self, x: Tensor):
        """x [T, D] -> u, v [T, H*dv] and q, k [T, H*dqk]: SiLU(LayerNorm(x) @ W_uvqk), split u|v|q|k."""
        h, dqk, dv = self.num_heads, self.attention_dim, self.linear_dim
        xn = F.layer_norm(x, (self.config.embedding_dim,), eps=self.config.layer_norm_eps)  # an int: ONNX-exportable
        return torch.split(F.silu(xn @ self.uvqk), [h * dv, h * dv, h * dqk, h * dqk], dim=-1)

    def finish(self, x: Tensor, u: Tensor, attn: Tensor) -> Tensor:
        """x [T, D], u and attn [T, H*dv] -> x + Linear_o(Dropout(u * LayerNorm(attn)))."""
        y = u * F.layer_norm(attn, (self.num_heads * self.linear_dim,), eps=self.config.layer_norm_eps)
        return x + self.output(self.dropout(y))


# ------------------------------------------------------------------------------------------------------------
# The stack
# ------------------------------------------------------------------------------------------------------------
class STUStack(nn.Module):
    """`num_blocks` STU layers and the per-forward work they share.  Input embedding, dropout and output
    normalisation live with the models (retrieval: merlin_hstu.encoders.hstu.HSTUEncoder, a subclass;
    ranking: merlin_hstu.ranking.model.DlrmHSTU; cached scoring: merlin_hstu.ranking.mfalcon)."""

    def __init__(self, config: HSTUEncoderConfig):
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList(STULayer(config) for _ in range(config.num_blocks))

    def bias_index(self, key: TokenMeta, *, rule: str, rows: Optional[Tensor] = None,
                   query: Optional[TokenMeta] = None) -> Optional[BiasIndex]:
        """The bias indices of this stack's config (`RelativeBucketedTimeAndPositionBias.index`)."""
        return RelativeBucketedTimeAndPositionBias.index(self.config, key, rule=rule, rows=rows, query=query)

    def forward(self, values: Tensor, token_mask: Tensor, lengths: Tensor, bias: Optional[BiasIndex] = None, *,
                num_targets: Optional[Tensor] = None, contextual_seq_len: int = 0) -> Tensor:
        """Run every layer over jagged tokens values [T, D] (sequence b the next lengths[b] rows; token_mask
        [B, W] their padded view, W <= max_seq_len) -> [T, D].  `bias`: from `bias_index` over the [B, W] view."""
        width = token_mask.shape[1]
        if not torch.jit.is_tracing() and width > self.config.max_seq_len:
            raise ValueError(f"sequence width {width} exceeds max_seq_len={self.config.max_seq_len}; "
                             "raise HSTUEncoderConfig.max_seq_len or truncate the sequences")
        # Built once for all layers: the resolved kernel and, on the padded path, the [B, W, W] mask.
        plan = plan_hstu_attention(lengths, self.config.max_seq_len, token_mask=token_mask,
                                   causal=self.config.causal, num_targets=num_targets,
                                   contextual_seq_len=contextual_seq_len, kernel=self.config.kernel, like=(values,))
        if plan.groups is not None and bias is not None:
            bias = [bias.for_group(group) for group in plan.groups]  # cut once, gathered by every layer
        for layer in self.layers:
            values = layer(values, token_mask, lengths, bias=bias, plan=plan)
        return values

    # --- cached decoding ----------------------------------------------------------------------------------
    def new_cache(self, device=None, dtype: Optional[torch.dtype] = None) -> List[LayerKVCache]:
        """Empty per-layer KV caches of max_seq_len slots for one sequence."""
        c = self.config
        return [LayerKVCache(torch.zeros(c.num_heads, c.max_seq_len, c.attention_dim, device=device, dtype=dtype),
                             torch.zeros(c.num_heads, c.max_seq_len, c.linear_dim, device=device, dtype=dtype))
                for _ in self.layers]

    def cached_forward(self, x: Tensor, cache: Sequence[LayerKVCache], bias: Optional[BiasIndex], *,
                       num_targets: int = 0, contextual_seq_len: int = 0, append: bool = False) -> Tensor:
        """`STULayer.cached_forward` through every layer: R new tokens x [R, D] of one sequence against the
        per-layer caches (`new_cache`); `bias` [1, R, S + R] from `bias_index(..., rows=S..S+R-1)` or with the
        new tokens' own `query` metadata.  Returns [R, D]; append=True keeps their K, V in every layer."""
        if len(cache) != len(self.layers) or len({c.length for c in cache}) > 1:
            raise ValueError(f"STUStack.cached_forward: needs one cache per layer ({len(self.layers)}), all of "
                             "one length; build them with new_cache()")
        for layer, layer_cache in zip(self.layers, cache):
            x = layer.cached_forward(x, layer_cache, bias, num_targets=num_targets,
                                     contextual_seq_len=contextual_seq_len, append=append)
        return x
