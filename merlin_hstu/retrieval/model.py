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

Event types (actions) as inputs (`RetrievalInputsConfig`, the config's `inputs` section; `actions` [B, W] are the
encoded action ids aligned with `ids`, 0 at positions >= len):

    none        the formulas above (the default; the model has no action table and draws no extra random numbers)
    concat      x = [E[ids] ; A[actions]] * sqrt(D) + P[position]         E is D - d_a wide, A is d_a wide
                the reference's rated-input preprocessor (reference-hstu.md §1.3).  The encoder runs at width D;
                the query vector is the first D - d_a coordinates of its output (the item part of the residual
                stream), so it is compared with D - d_a wide item vectors and the head needs no projection.
    interleave  tokens [E[i_0], A[a_0], E[i_1], A[a_1], ...] * sqrt(D) + P[token slot]   A is D wide
                the reference's combined item-and-rating preprocessor: 2 len tokens, both tokens of event j at
                t_j, the query time (target time) in both slots after them.  The workflow's `interleaved-list`
                column holds exactly these tokens (action token = action id + K); `load_processed` reads it.
                The query vector of event j is the encoder output at token 2j + 1, event j's ACTION token: it is
                the last token of event j, so it has seen items and actions of events 0..j and nothing of event
                j + 1 (the causal mask), and with the next-event time rule its query time is t_{j+1}, the time
                item j + 1 arrives.  Item j + 1 is revealed right after that token, so that token predicts it
                (the item token 2j would not know a_j).  Positions, supervision and top-K then stay per event.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from merlin_hstu.common import schema as roles
from merlin_hstu.common.embeddings import check_backend, jagged_to_padded, padded_to_jagged, to_torchrec, torchrec_tables
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



ACTION_INPUTS = ("none", "concat", "interleave")


@dataclass
class RetrievalInputsConfig:
    """How event types (actions) enter a retrieval model: the `inputs` config section (module docstring).

    actions: "none" (default: actions are not read), "concat" (item ++ action embedding per position) or
    "interleave" (item and action tokens alternate).  action_embedding_dim: d_a, the action part of the model
    width D with "concat" (1 <= d_a < D; the item embedding gets D - d_a); it must stay 0 otherwise ("interleave"
    action tokens are D wide like item tokens)."""

    actions: str = "none"
    action_embedding_dim: int = 0

    def __post_init__(self) -> None:
        if self.actions not in ACTION_INPUTS:
            raise ValueError(f"inputs.actions must be one of {list(ACTION_INPUTS)}, got {self.actions!r}")
        dim = self.action_embedding_dim
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 0:
            raise ValueError(f"inputs.action_embedding_dim must be an int >= 0, got {dim!r}")
        if self.actions == "concat" and dim == 0:
            raise ValueError("inputs.actions=concat needs inputs.action_embedding_dim >= 1 (the action part of the "
                             "model width; the item embedding gets model.embedding_dim minus it), e.g. "
                             "--set inputs.action_embedding_dim=8")
        if self.actions != "concat" and dim != 0:
            raise ValueError(f"inputs.action_embedding_dim={dim} is read only with inputs.actions=concat (got "
                             f"inputs.actions={self.actions!r}); set inputs.actions=concat or leave the dim at 0")

    @property
    def uses_actions(self) -> bool:
        return self.actions != "none"

    def item_dim(self, model_dim: int) -> int:
        """Width of the item embedding (and of query and item vectors) in a model of width `model_dim`."""
        if self.actions == "concat" and self.action_embedding_dim >= model_dim:
            raise ValueError(f"inputs.action_embedding_dim={self.action_embedding_dim} must be < "
                             f"model.embedding_dim={model_dim}: the item embedding is the rest of the width")
        return model_dim - self.action_embedding_dim

    def tokens_per_event(self) -> int:
        return 2 if self.actions == "interleave" else 1

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class RetrievalModelConfig:
    """Everything needed to rebuild a retrieval model (saved next to its weights)."""

    num_items: int  # embedding rows: max encoded item id + 1 (row 0 is padding)
    encoder: HSTUEncoderConfig | SASRecEncoderConfig
    input_dropout: float = 0.2
    head: RetrievalHeadConfig = field(default_factory=RetrievalHeadConfig)
    inputs: RetrievalInputsConfig = field(default_factory=RetrievalInputsConfig)
    num_actions: int = 0  # action embedding rows: max encoded action id + 1 (row 0 is padding); 0 without actions
    # torch: nn.Embedding tables | torchrec: the item (and action) tables in one torchrec EmbeddingCollection,
    # shardable across processes (merlin_hstu.common.embeddings). A training choice: the weights and their state-dict
    # names are the same either way, so it is not saved with the model (a loaded run has plain tables).
    embeddings: str = "torch"

    def __post_init__(self) -> None:
        check_backend(self.embeddings, "model.embeddings")
        if isinstance(self.inputs, dict):
            self.inputs = RetrievalInputsConfig(**self.inputs)
        self.inputs.item_dim(self.encoder.embedding_dim)  # checks d_a < D
        if self.inputs.uses_actions and self.num_actions < 2:
            raise ValueError(f"inputs.actions={self.inputs.actions!r} needs num_actions >= 2 (action embedding rows: "
                             f"largest encoded action id + 1), got {self.num_actions}; build the model from data "
                             "with actions (SequenceTable.actions)")
        if not self.inputs.uses_actions and self.num_actions:
            raise ValueError(f"num_actions={self.num_actions} without an action input (inputs.actions='none')")

    def to_dict(self) -> dict:
        kind = "sasrec" if isinstance(self.encoder, SASRecEncoderConfig) else "hstu"
        d = {"num_items": self.num_items, "input_dropout": self.input_dropout,
             "encoder_type": kind, "encoder": self.encoder.to_dict(), "head": self.head.to_dict()}
        if self.inputs.uses_actions:  # action-free models keep the dict (and saved files) they always had
            d.update(inputs=self.inputs.to_dict(), num_actions=self.num_actions)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "RetrievalModelConfig":
        enc_cls = SASRecEncoderConfig if d.get("encoder_type") == "sasrec" else HSTUEncoderConfig
        # Runs saved before the head existed are dot-product / L2 models: the default head; runs saved before
        # action inputs existed read no actions.
        return cls(num_items=int(d["num_items"]), input_dropout=float(d["input_dropout"]),
                   encoder=enc_cls(**d["encoder"]), head=RetrievalHeadConfig.from_dict(d.get("head")),
                   inputs=RetrievalInputsConfig(**(d.get("inputs") or {})), num_actions=int(d.get("num_actions", 0)))


def item_table_init(weight: torch.Tensor) -> torch.Tensor:
    """The item table's initialisation: truncated normal, std 0.02, cut at +-2 std (row 0 included; padding rows
    get no gradient).  Also what `merlin_hstu.t4r.retrieval.retrieval_model_from_schema` gives T4R's item table."""
    with torch.no_grad():
        return nn.init.trunc_normal_(weight, std=0.02, a=-0.04, b=0.04)


class HSTURetrievalModel(nn.Module):
    def __init__(self, config: RetrievalModelConfig):
        super().__init__()
        self.config = config
        dim = config.encoder.embedding_dim
        item_dim = config.inputs.item_dim(dim)  # D, or D - d_a with concatenated action embeddings
        self.item_embedding = nn.Embedding(config.num_items, item_dim, padding_idx=0)
        self.position_embedding = nn.Embedding(config.encoder.max_seq_len, dim)
        self.input_dropout = nn.Dropout(config.input_dropout)
        self.encoder = ENCODERS[type(config.encoder)](config.encoder)
        # A dot-product head has no parameters (and draws no random numbers): existing models are unchanged.
        self.head = RetrievalHead(config.head, item_dim, item_dim)
        # Created last, and only when actions are read: action-free models draw exactly the numbers they always did.
        self.action_embedding = None
        if config.inputs.uses_actions:
            action_dim = config.inputs.action_embedding_dim if config.inputs.actions == "concat" else dim
            self.action_embedding = nn.Embedding(config.num_actions, action_dim, padding_idx=0)
        self.reset_parameters()
        if config.embeddings == "torchrec":  # the same weights, moved into one EmbeddingCollection
            tables = {"item_embedding": roles.ROLE_ITEM}  # table -> its torchrec feature, named by role
            if self.action_embedding is not None:
                tables["action_embedding"] = roles.ROLE_ACTION
            to_torchrec(self, tables)

    def _embed_real_positions(self, features: dict, lengths: torch.Tensor) -> dict:
        """torchrec tables: {feature: ids [B, W]} -> {feature: [B, W, d]}, looking up only positions < len (one
        KeyedJaggedTensor; fbgemm's dense_to_jagged / jagged_to_padded_dense around it); zeros after len, where the
        nn.Embedding path's values are masked out before the encoder."""
        width = next(iter(features.values())).shape[1]
        out = torchrec_tables(self).lookup({f: padded_to_jagged(v, lengths) for f, v in features.items()})
        return {f: jagged_to_padded(out[f], lengths, width) for f in features}

    def reset_parameters(self) -> None:
        item_table_init(self.item_embedding.weight)
        # The input preprocessor's own tables (positions, actions): the reference initialises them with a
        # truncated normal of std sqrt(1/D) (D the full width), which its HSTU then overwrites with xavier_normal_.
        for table in (self.position_embedding, self.action_embedding):
            if table is None:
                continue
            if isinstance(self.encoder, HSTUEncoder):
                nn.init.xavier_normal_(table.weight)
            else:  # SASRec keeps the preprocessor's truncated normal, std sqrt(1/D)
                positional_table_init(table.weight, self.config.encoder.embedding_dim)

    # --- encoding ----------------------------------------------------------------------------------
    def user_vectors(self, ids: torch.Tensor, lengths: torch.Tensor, timestamps: Optional[torch.Tensor] = None,
                     actions: Optional[torch.Tensor] = None):
        """ids [B, W] (positions >= len are ignored, position len may hold the target), lengths [B],
        timestamps [B, W] (event times, the target's time at position len), actions [B, W] (encoded action ids
        aligned with ids; required when the model reads actions, ignored otherwise) -> query vectors [B, W, D]
        per event (L2-normalised with the default head; D - d_a wide with concatenated actions)."""
        mode = self.config.inputs.actions
        if mode != "none" and actions is None:
            raise ValueError(f"this model reads actions (inputs.actions={mode!r}): pass actions [B, W] aligned with "
                             "ids (the batch's 'actions'; load the data with load_processed(path, actions=...))")
        if mode == "none":  # the reference's plain preprocessor, operation for operation
            items = (self.item_embedding(ids) if torchrec_tables(self) is None
                     else self._embed_real_positions({roles.ROLE_ITEM: ids}, lengths)[roles.ROLE_ITEM])
            tokens = items * math.sqrt(self.item_embedding.embedding_dim)
            token_lengths = lengths
        else:
            tokens, token_lengths, timestamps = self._action_tokens(ids, lengths, timestamps, actions)
        width = tokens.shape[1]
        if width > self.config.encoder.max_seq_len:
            raise ValueError(f"batch width {width} exceeds encoder.max_seq_len={self.config.encoder.max_seq_len}"
                             + (" (interleaved: 2 tokens per event)" if mode == "interleave" else ""))
        positions = torch.arange(width, device=ids.device)
        real = positions.unsqueeze(0) < token_lengths.unsqueeze(1)
        x = tokens + self.position_embedding(positions)
        x = self.input_dropout(x) * real.unsqueeze(-1).to(x.dtype)
        h = self.encoder(x, token_lengths, timestamps if getattr(self.config.encoder, "time_bias", False) else None)
        if mode == "interleave":
            h = h[:, 1::2]  # event j <- its action token 2j + 1 (module docstring)
        elif mode == "concat":
            h = h[..., :self.item_embedding.embedding_dim]  # the item part of the width
        return self.head.normalize_query(h)

    def _action_tokens(self, ids, lengths, timestamps, actions):
        """The scaled input tokens [B, T, D] of an action-reading model, their lengths [B] and times [B, T]."""
        if actions.shape != ids.shape:
            raise ValueError(f"actions {tuple(actions.shape)} must be aligned with ids {tuple(ids.shape)}")
        scale = math.sqrt(self.config.encoder.embedding_dim)
        if torchrec_tables(self) is None:
            items, kinds = self.item_embedding(ids), self.action_embedding(actions)
        else:
            looked_up = self._embed_real_positions({roles.ROLE_ITEM: ids, roles.ROLE_ACTION: actions}, lengths)
            items, kinds = looked_up[roles.ROLE_ITEM], looked_up[roles.ROLE_ACTION]
        if self.config.inputs.actions == "concat":
            return torch.cat([items, kinds], dim=-1) * scale, lengths, timestamps
        batch, width, dim = items.shape
        tokens = torch.stack([items, kinds], dim=2).reshape(batch, 2 * width, dim) * scale
        # Both tokens of event j at t_j; slots 2 len and 2 len + 1 hold the query time (the target's time).
        times = None if timestamps is None else timestamps.repeat_interleave(2, dim=1)
        return tokens, 2 * lengths, times

    def last_user_vector(self, ids, lengths, timestamps=None, actions=None) -> torch.Tensor:
        """The query vector at the last real position (predicts the item after the history): [B, D]."""
        u = self.user_vectors(ids, lengths, timestamps, actions)
        return u[torch.arange(u.shape[0], device=u.device), (lengths - 1).clamp(min=0)]

    def item_vectors(self, item_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        weight = self.item_embedding.weight if item_ids is None else self.item_embedding(item_ids)
        return self.head.normalize_items(weight)

    @torch.no_grad()
    def topk(self, rankable: Optional[torch.Tensor] = None, chunk_size: Optional[int] = None) -> BruteForceTopK:
        """A brute-force top-K module over the current item table (MIPS, or MoL for a MoL head)."""
        return build_topk(self.head, self.item_vectors().detach(), rankable, chunk_size)

    def score_all_items(self, ids, lengths, timestamps=None, actions=None) -> torch.Tensor:
        """Similarity of each user's query vector with every catalogue row: [B, num_items] (cosine by default)."""
        query = self.last_user_vector(ids, lengths, timestamps, actions)
        if not self.head.is_mol:  # one matmul; the top-K module computes the same in chunks
            return query @ self.item_vectors().T
        return self.topk().scores(query)


def next_item_training_loss(model, batch: dict, negative_pool, config: RetrievalLossConfig, generator=None):
    """Every history position i predicts ids[i+1]; the last real position predicts the target at ids[len].
    `negative_pool` is the catalogue: what uniform negatives and the full softmax range over."""
    user = model.user_vectors(batch["ids"], batch["lengths"], batch.get("timestamps"), batch.get("actions"))
    supervised, labels = supervision(batch["ids"], batch["lengths"])
    seen = history_exclusions(config, batch["ids"], supervised)
    return retrieval_loss(model, user[supervised], labels[supervised], negative_pool, config, generator, seen)


def seen_before(ids: torch.Tensor, supervised: torch.Tensor) -> torch.Tensor:
    """[P, W]: for each supervised position (row-major, as `user[supervised]` orders them) at column i of its row,
    the ids 0..i of that row, the items the query there has seen; later columns 0."""
    rows, columns = supervised.nonzero(as_tuple=True)
    later = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0) > columns.unsqueeze(1)
    return ids[rows].masked_fill(later, 0)


def history_exclusions(config: RetrievalLossConfig, ids: torch.Tensor,
                       supervised: torch.Tensor) -> Optional[torch.Tensor]:
    """What `retrieval_loss(..., seen=)` takes for `config`: None when history items stay negatives
    (`history_negatives=True`, the default), else `seen_before(ids, supervised)`."""
    return None if config.history_negatives else seen_before(ids, supervised)


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
    reads_actions = model.config.inputs.uses_actions
    if reads_actions and getattr(table, "actions", None) is None:
        raise ValueError(f"this model reads actions (inputs.actions={model.config.inputs.actions!r}) but the table "
                         "has none; load it with load_processed(path, actions=...)")
    actions = torch.zeros(len(rows), width, dtype=torch.long) if reads_actions else None
    for i, (r, h) in enumerate(zip(rows, histories)):
        ids[i, : len(h)] = torch.as_tensor(h.copy())
        if timestamps is not None:
            times = table.timestamps[r][-max_history:]
            timestamps[i, : len(h)] = torch.as_tensor(times.copy())
            timestamps[i, len(h)] = int(times[-1])
        if actions is not None:
            actions[i, : len(h)] = torch.as_tensor(table.actions[r][-max_history:].copy())
    device = model.item_embedding.weight.device
    ids, lengths = ids.to(device), lengths.to(device)
    timestamps = timestamps.to(device) if timestamps is not None else None
    actions = actions.to(device) if actions is not None else None
    topk = model.topk(rankable_from_invalid(model.config.num_items, table.non_candidate_ids).to(device))
    history = ids.masked_fill(torch.arange(width, device=device).unsqueeze(0) >= lengths.unsqueeze(1), -1)
    _, top = topk(model.last_user_vector(ids, lengths, timestamps, actions), k, exclude=history)
    return top.cpu().tolist()
