"""DLRM-HSTU: generative ranking with a target-aware HSTU stack and a multi-task head (reference-hstu.md §4).

One sequence per user, laid out as jagged tokens:

    [ contextual tokens (c) | history tokens (n events, 1 or 2 tokens each) | candidate tokens (m) ]

* Contextual tokens: one per contextual feature (age group, occupation...), E_f[value] * sqrt(D), prepended.
* History tokens (`interleave=False`): E_item[item] * sqrt(D) + W_a a(bitmask), one token per event.
  With `interleave=True` each event is two tokens, the item token E_item[item] * sqrt(D) and then the action
  token W_a a(bitmask).  a(bitmask) = concat_b [bit b set] * E_action[b]: one learned vector per action bit
  (the reference's ActionEncoder), flattened to [num_action_bits * action_embedding_dim].
* Candidate tokens: E_item[candidate] * sqrt(D) + W_a a_unknown, a_unknown a learned "unknown action" vector:
  a candidate's action is what we predict, so it never enters the model.  One token per candidate in both modes.

The STU stack is `merlin_hstu.encoders.stu.STUStack` (research HSTU layers, the same stack retrieval uses) with the
target-aware mask (`num_targets` = m): every candidate attends to the contextual and history tokens and to itself,
never to another candidate, so a candidate's score does not depend on which other candidates are in the batch.
Contextual tokens are a causal prefix by default (every history token sees them; they see only each other);
`contextual_full_attention=True` gives them the reference's rule instead (they also see the whole history,
the kernel's `contextual_seq_len`).  The attention kernel is `DlrmHSTUConfig.kernel`, passed through to the op's
dispatch.

Position and time enter as a relative attention bias (per layer, shared by heads), not as absolute embeddings; it
is the stack's bias with the "own_time" rule (merlin_hstu.encoders.stu):

    rab[i, j] = w_pos[clamp(p_j - p_i, -(N-1), N-1) + N - 1] + w_time[bucket(t_i - t_j)]     (0 if i or j contextual)
    p  = event index: history event e (both of its tokens when interleaved) has p = e; every candidate has
         p = n, one past the last event (the "position 0" of the future: the last event is at distance 1)
    t  = a history token's own event time; a candidate's query time is its candidate timestamp
    bucket(dt) = clamp(floor(ln(max(|dt|, 1)) / 0.301), 0, num_time_buckets)      (stu.time_bucket_ids)

Why relative and why own-time queries: a history token's inputs and bias then depend only on itself and earlier
events, never on candidates or on later events.  So the history's keys and values at every layer can be cached
once and reused for any set of candidates (M-FALCON, `merlin_hstu.ranking.mfalcon`), and new events can be appended by
encoding only the new tokens; both are exact, not approximations.  (Absolute "positions from the end", as the
reference's positional encoder uses, would shift every cached token whenever an event is appended.)

Head: per candidate, features [user, item, contextual...] ([Lc, 2 + c, D]; user = LayerNorm(the candidate's output
token), item = LayerNorm(E_item[candidate]), contextual = LayerNorm(E_f[value])) go to an interaction module:
`interaction="mlp"` (default, the reference's DefaultMultitaskModule) computes
Linear(SwishLayerNorm(Linear(user * item))) -> one logit per binary task, one value per regression task;
`interaction="wukong"` runs `merlin_hstu.encoders.wukong.WukongTower` over all the features and a linear read-out.
Other towers plug in with `register_interaction`.  Loss: `ranking_batch.multitask_loss` (per-task BCE / MSE,
summed with the task weights).

Stochastic length (`stochastic_length_alpha`, `merlin_hstu.ranking.stochastic_length`) subsamples long histories in
training only.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from merlin_hstu.common.embeddings import check_backend, to_torchrec, torchrec_tables
from merlin_hstu.encoders.stu import HSTUEncoderConfig, LayerKVCache, STULayer, STUStack, TokenMeta
from merlin_hstu.kernels.dispatch import validate_kernel
from merlin_hstu.kernels.attention_ops import jagged_to_padded
from merlin_hstu.ranking.batch import RankingBatch, RankingTask, multitask_loss
from merlin_hstu.ranking.stochastic_length import StochasticLength, StochasticLengthConfig


@dataclass
class DlrmHSTUConfig:
    """Sizes and switches of a DLRM-HSTU model (contextual features and tasks are constructor arguments).

    `max_seq_len` is N: the constant attention normaliser (A = SiLU(.)/N), the size of the relative position table
    (2N - 1), and the most tokens one user's sequence may hold (contextual + history tokens + candidates in one
    forward; with M-FALCON: contextual + history tokens + one micro-batch).
    """

    embedding_dim: int = 64
    num_blocks: int = 2
    num_heads: int = 2
    attention_dim: int = 32  # dqk per head
    linear_dim: int = 32  # dv per head
    max_seq_len: int = 512
    action_embedding_dim: int = 8
    num_action_bits: Optional[int] = None  # action bits embedded; None: 1 + the highest bit of the binary tasks
    interleave: bool = False  # two tokens (item, action) per history event instead of their sum
    contextual_full_attention: bool = False  # True: contextual tokens also attend to the whole history
    dropout: float = 0.1  # STU output dropout
    input_dropout: float = 0.1
    position_bias: bool = True
    time_bias: bool = True
    num_time_buckets: int = 128
    multitask_hidden: int = 256
    interaction: str = "mlp"  # see INTERACTIONS
    stochastic_length_alpha: Optional[float] = None  # None: off; else in (1, 2]
    stochastic_length_max_len: Optional[int] = None  # N of the SL formula; None: max_seq_len
    seed: int = 0  # seeds the stochastic-length sampler
    kernel: str = "auto"  # attention kernel: pytorch | triton | auto
    # torch: nn.Embedding tables | torchrec: the item and contextual tables in a torchrec EmbeddingCollection,
    # shardable across processes (merlin_hstu.common.embeddings; same weights and state-dict names either way)
    embeddings: str = "torch"

    def __post_init__(self) -> None:
        check_backend(self.embeddings, "model.embeddings")
        for name in ("embedding_dim", "num_blocks", "num_heads", "attention_dim", "linear_dim", "max_seq_len",
                     "action_embedding_dim", "num_time_buckets", "multitask_hidden"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"DlrmHSTUConfig.{name} must be a positive int, got {value!r}")
        if self.num_action_bits is not None and (not isinstance(self.num_action_bits, int)
                                                 or not 1 <= self.num_action_bits <= 63):
            raise ValueError(f"DlrmHSTUConfig.num_action_bits must be None or an int in [1, 63], "
                             f"got {self.num_action_bits!r}")
        for name in ("dropout", "input_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"DlrmHSTUConfig.{name} must be in [0, 1), got {getattr(self, name)}")
        if self.interaction not in INTERACTIONS:
            raise ValueError(f"DlrmHSTUConfig.interaction must be one of {sorted(INTERACTIONS)}, "
                             f"got {self.interaction!r} (add one with merlin_hstu.ranking.model.register_interaction)")
        if self.stochastic_length_alpha is not None:
            self.stochastic_length_config()  # validates alpha and N
        validate_kernel(self.kernel, "DlrmHSTUConfig.kernel")

    def stochastic_length_config(self) -> Optional[StochasticLengthConfig]:
        if self.stochastic_length_alpha is None:
            return None
        return StochasticLengthConfig(alpha=float(self.stochastic_length_alpha),
                                      max_len=self.stochastic_length_max_len or self.max_seq_len)

    def encoder_config(self) -> HSTUEncoderConfig:
        return HSTUEncoderConfig(
            embedding_dim=self.embedding_dim, num_blocks=self.num_blocks, num_heads=self.num_heads,
            attention_dim=self.attention_dim, linear_dim=self.linear_dim, max_seq_len=self.max_seq_len,
            linear_dropout=self.dropout, position_bias=self.position_bias, time_bias=self.time_bias,
            num_time_buckets=self.num_time_buckets, causal=True, kernel=self.kernel)

    def to_dict(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------------------------------------------------
# Interaction towers (the multi-task head's hook)
# ------------------------------------------------------------------------------------------------------------
class SwishLayerNorm(nn.Module):
    """x * sigmoid(LayerNorm(x)) (the reference's SwishLayerNorm)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(self.norm(x))


class MLPInteraction(nn.Module):
    """[Lc, n, D] features (0 = user, 1 = item, rest contextual) -> [Lc, T]: Linear(SwishLN(Linear(user * item)))."""

    def __init__(self, dim: int, num_tasks: int, num_features: int, config: DlrmHSTUConfig):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, config.multitask_hidden), SwishLayerNorm(config.multitask_hidden),
                                 nn.Linear(config.multitask_hidden, num_tasks))

    def forward(self, features: Tensor) -> Tensor:
        return self.net(features[:, 0] * features[:, 1])


class WukongInteraction(nn.Module):
    """[Lc, n, D] -> WukongTower -> flatten -> Linear -> [Lc, T] (merlin_hstu.encoders.wukong, default WukongConfig)."""

    def __init__(self, dim: int, num_tasks: int, num_features: int, config: DlrmHSTUConfig):
        super().__init__()
        from merlin_hstu.encoders.wukong import WukongTower

        self.tower = WukongTower(num_features, dim)
        self.readout = nn.Linear(self.tower.output_features * dim, num_tasks)

    def forward(self, features: Tensor) -> Tensor:
        return self.readout(self.tower(features).flatten(1))


InteractionFactory = Callable[[int, int, int, DlrmHSTUConfig], nn.Module]
INTERACTIONS: Dict[str, InteractionFactory] = {"mlp": MLPInteraction, "wukong": WukongInteraction}


def register_interaction(name: str, factory: InteractionFactory) -> None:
    """Add an interaction tower: factory(dim, num_tasks, num_features, config) -> module mapping [Lc, n, D] to
    [Lc, num_tasks]; then DlrmHSTUConfig(interaction=name) uses it."""
    INTERACTIONS[name] = factory


# ------------------------------------------------------------------------------------------------------------
# The sequence layout (TokenMeta, the per-token bias inputs, is merlin_hstu.encoders.stu's)
# ------------------------------------------------------------------------------------------------------------
@dataclass
class SequenceLayout:
    """A batch laid out as one jagged sequence per user: [contextual (c) | history tokens | candidates (m_b)]."""

    tokens: Tensor  # [S, D] input tokens, rows one after another
    meta: TokenMeta  # [S] per-token event index, time, contextual flag
    offsets: Tensor  # [B+1]
    lengths: Tensor  # [B] = c + tokens_per_event * n_b + m_b
    num_targets: Tensor  # [B] = m_b, the candidates at the end of each row
    candidate_index: Tensor  # [Lc] each candidate's token index in `tokens`, in batch candidate order
    contextual_values: Tensor  # [B, c] encoded contextual values


class DlrmHSTU(nn.Module):
    """DLRM-HSTU ranking model; `forward(batch) -> [Lc, T]` (logits for binary tasks, values for regression)."""

    def __init__(self, config: DlrmHSTUConfig, num_items: int, contextual_cardinalities: Dict[str, int],
                 tasks: Sequence[RankingTask]):
        super().__init__()
        if isinstance(num_items, bool) or not isinstance(num_items, int) or num_items < 2:
            raise ValueError(f"DlrmHSTU: num_items must be an int >= 2 (max encoded item id + 1), got {num_items!r}")
        self.tasks: Tuple[RankingTask, ...] = tuple(tasks)
        if not self.tasks:
            raise ValueError("DlrmHSTU: tasks must name at least one RankingTask")
        for name, card in contextual_cardinalities.items():
            if not name.isidentifier() or isinstance(card, bool) or not isinstance(card, int) or card < 1:
                raise ValueError(f"DlrmHSTU: contextual feature {name!r} needs an identifier name and a positive int "
                                 f"cardinality (max encoded value + 1), got {card!r}")
        self.config = config
        self.num_items = num_items
        self.contextual_names: Tuple[str, ...] = tuple(contextual_cardinalities)
        self.contextual_cardinalities = dict(contextual_cardinalities)
        bits = [t.bit for t in self.tasks if t.kind == "binary"]
        self.num_action_bits = config.num_action_bits or (max(bits) + 1 if bits else 1)
        d, a = config.embedding_dim, config.action_embedding_dim
        self.item_embedding = nn.Embedding(num_items, d, padding_idx=0)
        self.action_embedding = nn.Parameter(torch.empty(self.num_action_bits, a))
        self.unknown_action = nn.Parameter(torch.empty(self.num_action_bits * a))
        self.action_projection = nn.Linear(self.num_action_bits * a, d)
        self.contextual_embeddings = nn.ModuleDict(
            {name: nn.Embedding(card, d) for name, card in contextual_cardinalities.items()})
        self.input_dropout = nn.Dropout(config.input_dropout)
        self.encoder = STUStack(config.encoder_config())
        self.user_norm = nn.LayerNorm(d)
        self.item_norm = nn.LayerNorm(d)
        self.contextual_norm = nn.LayerNorm(d)
        self.interaction = INTERACTIONS[config.interaction](d, len(self.tasks), 2 + len(self.contextual_names), config)
        sl = config.stochastic_length_config()
        self.stochastic_length = StochasticLength(sl, seed=config.seed) if sl is not None else None
        self.reset_parameters()
        if config.embeddings == "torchrec":  # the same weights, moved into one EmbeddingCollection
            to_torchrec(self, {"item_embedding": "item",
                               **{f"contextual_embeddings.{name}": f"contextual_{name}"
                                  for name in self.contextual_names}},
                        containers=("contextual_embeddings",) if self.contextual_names else ())

    @property
    def _device(self) -> torch.device:
        return self.action_embedding.device

    def reset_parameters(self) -> None:
        nn.init.trunc_normal_(self.item_embedding.weight, std=0.02, a=-0.04, b=0.04)
        for emb in self.contextual_embeddings.values():
            nn.init.trunc_normal_(emb.weight, std=0.02, a=-0.04, b=0.04)
        nn.init.normal_(self.action_embedding, std=0.1)
        nn.init.normal_(self.unknown_action, std=0.1)

    @property
    def layers(self) -> Sequence[STULayer]:
        """The stack's layers (their parameters, e.g. for inspection or re-initialisation)."""
        return self.encoder.layers

    @property
    def contextual_seq_len(self) -> int:
        """The attention op's contextual prefix: the contextual tokens when they see the whole history, else 0."""
        return self.num_contextual if self.config.contextual_full_attention else 0

    @property
    def num_contextual(self) -> int:
        return len(self.contextual_names)

    @property
    def tokens_per_event(self) -> int:
        return 2 if self.config.interleave else 1

    # --- embeddings (shared by the full forward and the KV-cache path) ------------------------------------
    def _check_item_ids(self, ids: Tensor, field: str) -> None:
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.num_items):
            raise ValueError(f"{field} holds ids outside [0, {self.num_items}); build DlrmHSTU with num_items = the "
                             "largest encoded item id + 1")

    def contextual_values(self, contextual: Dict[str, Tensor], batch_size: int) -> Tensor:
        """{name: [B]} -> [B, c] int64 in the model's feature order, validated."""
        columns = []
        for name in self.contextual_names:
            if name not in contextual:
                raise ValueError(f"contextual feature {name!r} is missing from the batch (it has "
                                 f"{sorted(contextual)}); the model was built with {list(self.contextual_names)}")
            value = torch.as_tensor(contextual[name]).reshape(-1).long()
            if value.numel() != batch_size:
                raise ValueError(f"contextual[{name!r}] has {value.numel()} values; expected {batch_size}")
            card = self.contextual_cardinalities[name]
            if value.numel() and (int(value.min()) < 0 or int(value.max()) >= card):
                raise ValueError(f"contextual[{name!r}] holds values outside [0, {card}); raise its cardinality")
            columns.append(value)
        device = self._device
        if not columns:
            return torch.zeros(batch_size, 0, dtype=torch.long, device=device)
        return torch.stack(columns, dim=1).to(device)

    def contextual_vectors(self, values: Tensor) -> Tensor:
        """[B, c] encoded values -> [B, c, D] raw embeddings E_f[value]."""
        if not self.contextual_names:
            return self.action_embedding.new_zeros(values.shape[0], 0, self.config.embedding_dim)
        tables = torchrec_tables(self)
        if tables is not None:  # one KeyedJaggedTensor for every contextual feature
            out = tables.lookup({f"contextual_{name}": values[:, f] for f, name in enumerate(self.contextual_names)})
            return torch.stack([out[f"contextual_{name}"] for name in self.contextual_names], dim=1)
        return torch.stack([self.contextual_embeddings[name](values[:, f])
                            for f, name in enumerate(self.contextual_names)], dim=1)

    def action_vectors(self, actions: Tensor) -> Tensor:
        """[L] bitmasks -> [L, bits * a]: concat over bits of [bit set] * E_action[bit]."""
        # bit b of a (non-negative) mask is floor(mask / 2^b) mod 2; written arithmetically because ONNX has no
        # bitwise AND on integers
        powers = 2 ** torch.arange(self.num_action_bits, device=actions.device)
        present = (torch.div(actions.long().unsqueeze(1), powers, rounding_mode="floor") % 2).to(
            self.action_embedding.dtype)  # [L, bits]
        return (present.unsqueeze(2) * self.action_embedding).flatten(1)

    def history_tokens(self, item_ids: Tensor, actions: Tensor) -> Tensor:
        """[n] events -> [n * tokens_per_event, D] in sequence order (item then action token when interleaved)."""
        item = self.item_embedding(item_ids) * math.sqrt(self.config.embedding_dim)
        action = self.action_projection(self.action_vectors(actions))
        if not self.config.interleave:
            return item + action
        return torch.stack([item, action], dim=1).reshape(-1, item.shape[-1])

    def candidate_tokens(self, item_ids: Tensor) -> Tensor:
        item = self.item_embedding(item_ids) * math.sqrt(self.config.embedding_dim)
        return item + self.action_projection(self.unknown_action)

    def contextual_tokens(self, values: Tensor) -> Tensor:
        """[B, c] -> [B, c, D] token inputs."""
        return self.contextual_vectors(values) * math.sqrt(self.config.embedding_dim)

    # --- head -------------------------------------------------------------------------------------------
    def head(self, user: Tensor, candidate_item_ids: Tensor, contextual_vectors: Tensor) -> Tensor:
        """user [Lc, D] (candidate output tokens), ids [Lc], contextual_vectors [Lc, c, D] -> [Lc, T]."""
        item = self.item_norm(self.item_embedding(candidate_item_ids))
        features = torch.cat([self.user_norm(user).unsqueeze(1), item.unsqueeze(1),
                              self.contextual_norm(contextual_vectors)], dim=1)
        return self.interaction(features)

    # --- full forward -----------------------------------------------------------------------------------
    def sequence_layout(self, batch: RankingBatch) -> "SequenceLayout":
        """Lay every row out as [contextual | history | candidates] jagged tokens (see SequenceLayout)."""
        device = self._device
        b, c, per = batch.batch_size, self.num_contextual, self.tokens_per_event
        hist_len = batch.history_lengths.long().to(device)
        num_cand = batch.num_candidates.long().to(device)
        lengths = c + per * hist_len + num_cand
        offsets = F.pad(torch.cumsum(lengths, 0), (1, 0))
        starts = offsets[:-1]
        rows = torch.arange(b, device=device)
        # Destination of each token inside the flat jagged sequence.
        ctx_dest = (starts.unsqueeze(1) + torch.arange(c, device=device)).reshape(-1)
        event_row = torch.repeat_interleave(rows, hist_len)
        event_start = F.pad(torch.cumsum(hist_len, 0), (1, 0))[event_row]
        event_index = torch.arange(event_row.numel(), device=device) - event_start
        hist_dest = ((starts[event_row] + c + per * event_index).unsqueeze(1)
                     + torch.arange(per, device=device)).reshape(-1)
        cand_row = torch.repeat_interleave(rows, num_cand)
        cand_index = torch.arange(cand_row.numel(), device=device) - F.pad(torch.cumsum(num_cand, 0), (1, 0))[cand_row]
        cand_dest = starts[cand_row] + c + per * hist_len[cand_row] + cand_index

        ctx_values = self.contextual_values(batch.contextual, b)
        self._check_item_ids(batch.history_item_ids, "RankingBatch.history_item_ids")
        self._check_item_ids(batch.candidate_item_ids, "RankingBatch.candidate_item_ids")
        pieces = [self.contextual_tokens(ctx_values).reshape(-1, self.config.embedding_dim),
                  self.history_tokens(batch.history_item_ids.to(device), batch.history_actions.to(device)),
                  self.candidate_tokens(batch.candidate_item_ids.to(device))]
        dest = torch.cat([ctx_dest, hist_dest, cand_dest])
        order = torch.empty_like(dest)
        order[dest] = torch.arange(dest.numel(), device=device)
        x = torch.cat(pieces)[order]

        hist_time = batch.history_timestamps.to(device).long()
        position = torch.cat([torch.zeros_like(ctx_dest), event_index.repeat_interleave(per), hist_len[cand_row]])
        time = torch.cat([torch.zeros_like(ctx_dest), hist_time.repeat_interleave(per),
                          batch.candidate_timestamps.to(device).long()])
        contextual = torch.cat([torch.ones_like(ctx_dest, dtype=torch.bool),
                                torch.zeros(hist_dest.numel() + cand_dest.numel(), dtype=torch.bool, device=device)])
        meta = TokenMeta(position[order], time[order], contextual[order])
        return SequenceLayout(x, meta, offsets, lengths, num_cand, cand_dest, ctx_values)

    def encode(self, batch: RankingBatch) -> Tensor:
        """The candidates' output tokens [Lc, D] (before the head's LayerNorm), in batch candidate order."""
        layout = self.sequence_layout(batch)
        return self.encode_layout(layout)[layout.candidate_index]

    def encode_layout(self, layout: "SequenceLayout") -> Tensor:
        """Run the STU stack over a layout's tokens with the target-aware mask: [S, D] output tokens."""
        cfg = self.config
        longest = int(layout.lengths.max()) if layout.lengths.numel() else 0
        if longest > cfg.max_seq_len:
            raise ValueError(f"a user's sequence has {longest} tokens (contextual + history tokens + candidates) but "
                             f"DlrmHSTUConfig.max_seq_len={cfg.max_seq_len}; raise max_seq_len, send fewer candidates "
                             "per forward (M-FALCON micro-batches) or truncate the histories")
        token_mask = torch.arange(longest, device=layout.tokens.device).unsqueeze(0) < layout.lengths.unsqueeze(1)
        meta = layout.meta
        padded = TokenMeta(*(jagged_to_padded(t, token_mask) for t in (meta.position, meta.time, meta.contextual)))
        bias = self.encoder.bias_index(padded, rule="own_time")
        return self.encoder(self.input_dropout(layout.tokens), token_mask, layout.lengths, bias,
                            num_targets=layout.num_targets, contextual_seq_len=self.contextual_seq_len)

    def new_kv_cache(self) -> List[LayerKVCache]:
        """Empty per-layer KV caches for one user (max_seq_len slots each, the embeddings' device and dtype)."""
        weight = self.action_embedding
        return self.encoder.new_cache(device=weight.device, dtype=weight.dtype)

    def encode_cached(self, tokens: Tensor, meta: TokenMeta, cached_meta: TokenMeta, cache: Sequence[LayerKVCache],
                      num_targets: int = 0, append: bool = False) -> Tensor:
        """R new tokens [R, D] of one user (metadata `meta` [R]) against a KV cache of the user's tokens (metadata
        `cached_meta` [S]; from `new_kv_cache`): [R, D] output tokens, equal to the full forward's rows
        (merlin_hstu.ranking.mfalcon).  The last `num_targets` tokens are candidates; append=True caches the
        new tokens' K, V.  No input dropout: for inference (eval mode)."""
        total = cached_meta.position.numel() + tokens.shape[0]
        if total > self.config.max_seq_len:
            raise ValueError(f"{cached_meta.position.numel()} cached tokens + {tokens.shape[0]} new tokens exceed "
                             f"DlrmHSTUConfig.max_seq_len={self.config.max_seq_len}; use a smaller micro_batch or "
                             "raise max_seq_len")
        key = cached_meta.cat(meta)
        bias = self.encoder.bias_index(key[None], rule="own_time", query=meta[None])
        return self.encoder.cached_forward(tokens, cache, bias, num_targets=num_targets,
                                           contextual_seq_len=self.contextual_seq_len, append=append)

    def forward(self, batch: RankingBatch) -> Tensor:
        if self.training and self.stochastic_length is not None:
            batch = self.stochastic_length(batch)
        layout = self.sequence_layout(batch)
        user = self.encode_layout(layout)[layout.candidate_index]
        ctx = self.contextual_vectors(layout.contextual_values)[torch.repeat_interleave(
            torch.arange(batch.batch_size, device=user.device), layout.num_targets)]
        return self.head(user, batch.candidate_item_ids.to(user.device), ctx)

    def loss(self, batch: RankingBatch, sample_weight: Optional[Tensor] = None):
        """(total, {task: loss}) via ranking_batch.multitask_loss; the batch's tasks must be the model's."""
        if tuple(t.name for t in batch.tasks) != tuple(t.name for t in self.tasks):
            raise ValueError(f"the batch's tasks {[t.name for t in batch.tasks]} differ from the model's "
                             f"{[t.name for t in self.tasks]}; build the model with the workflow's tasks")
        return multitask_loss(self(batch), batch.labels.to(self._device), self.tasks,
                              sample_weight)


def build_dlrm_hstu(dataset, overrides: Optional[dict] = None) -> DlrmHSTU:
    """A DlrmHSTU sized for `dataset` (a RankingDataset: items, contextual features, tasks, action bits);
    `overrides` are DlrmHSTUConfig fields (unknown ones are errors naming the valid fields)."""
    values = {"num_action_bits": dataset.num_action_bits, **(overrides or {})}
    known = {f.name for f in dataclasses.fields(DlrmHSTUConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown dlrm-hstu (DlrmHSTUConfig) option(s) {unknown}; valid: {sorted(known)}")
    config = DlrmHSTUConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
    return DlrmHSTU(config, dataset.num_items, dataset.contextual_cardinalities, dataset.tasks)
