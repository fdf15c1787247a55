"""HLLM's user model over item embeddings, and the item side in each mode.

Item representation (what the user model reads at each history position AND what it is compared with):

    r(i) = W t(i)                 frozen / finetune     t(i): the item LM's embedding of item i's text
    r(i) = W t(i) + E[i]          hybrid                E: an ID embedding table (the item's own learned vector)

W is a linear projection from the LM width to the user model's width D (no projection when they are equal).
t comes from `item_text` (a [V, H] table computed once by the item encoder and cached on disk: frozen, hybrid,
and finetune at evaluation) or, while a finetune model trains, from the item LM itself, live, for the items of the
batch (the LM's top layers get gradients).  On a CPU the live LM is the whole cost of a finetune step, so
`item_encoder.live_items_per_step` can cap it: a random subset of the step's distinct items goes through the LM,
the others read the table as last encoded (before training: the pretrained LM's; refreshed before evaluations).
Where the item encoder allows it (`ItemTextEncoder.caches_frozen_layers`), the frozen bottom layers run once per
item, the first time the item is in a step, and are kept ragged (one vector per text token, `frozen_item_states`);
each step then runs only the trained top layers of the step's items.

User model (a causal sequence model over r; `UserModelConfig.kind`):

    x_j  = Dropout(r(i_j) + P[j]) * (j < len)            P: absolute positions
    h    = HSTU(x)        our STU stack (merlin_hstu.encoders.hstu; relative position + time bias)
         | Transformer(LayerNorm(x))  causal layers of the LM's layer type; `init_from_lm` copies the LM's bottom
                          layers, position table and embedding LayerNorm (then D = the LM width, no projection)
    u_j  = h_j / ||h_j||  the user vector after event j, compared by cosine with r(i) / ||r(i)||

`last_user_vector`, `item_vectors`, `topk` and `config.{num_items, encoder.time_bias, inputs}` have the meaning
they have on `merlin_hstu.retrieval.model.HSTURetrievalModel`, so the retrieval evaluation
(`merlin_hstu.retrieval.train.evaluate_model`) and the serving scorer (`merlin_hstu.serving.scorer.build_scorer`)
take an HLLM model as they take an ID model.  `add_items` appends items by their text embeddings: a new item is
ranked without retraining (an ID-free model needs nothing else; a hybrid model gives it a zero ID vector).
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from merlin_hstu.encoders.hstu import HSTUEncoder, HSTUEncoderConfig
from merlin_hstu.hllm.config import HLLMLossConfig, ItemEncoderConfig, UserModelConfig
from merlin_hstu.hllm.losses import LogitScale, batch_negatives, hllm_loss, normalize
from merlin_hstu.retrieval.model import supervision
from merlin_hstu.retrieval.topk import BruteForceTopK, MIPSBruteForceTopK


@dataclass(frozen=True)
class TextInputs:
    """HLLM models read item ids (and times), never event types: the `inputs` a retrieval scorer asks about."""

    actions: str = "none"
    uses_actions: bool = False


@dataclass
class TransformerUserConfig:
    """The `encoder` a scorer asks about for a transformer user model: it has no time bias."""

    embedding_dim: int
    max_seq_len: int
    time_bias: bool = False


@dataclass
class HLLMModelConfig:
    """Everything needed to rebuild an HLLM model (saved next to its weights)."""

    num_items: int  # rows of the item tables: largest encoded id + 1 (row 0 is padding)
    text_dim: int  # the item LM's width H
    mode: str  # frozen | finetune | hybrid
    max_history: int  # history window H_u; positions 0..H_u
    user: UserModelConfig = dataclasses.field(default_factory=UserModelConfig)
    item_encoder: ItemEncoderConfig = dataclasses.field(default_factory=ItemEncoderConfig)
    loss: HLLMLossConfig = dataclasses.field(default_factory=HLLMLossConfig)

    def __post_init__(self) -> None:
        for name in ("user", "item_encoder", "loss"):
            value = getattr(self, name)
            if isinstance(value, dict):
                cls = {"user": UserModelConfig, "item_encoder": ItemEncoderConfig, "loss": HLLMLossConfig}[name]
                setattr(self, name, cls(**value))
        if self.user.init_from_lm and self.user.embedding_dim != self.text_dim:
            raise ValueError(f"user.init_from_lm=True copies the LM's layers, so user.embedding_dim must be the LM "
                             f"width {self.text_dim}, got {self.user.embedding_dim}")

    @property
    def inputs(self) -> TextInputs:
        return TextInputs()

    @property
    def encoder(self):
        """The user encoder's config: `HSTUEncoderConfig` (kind hstu) or `TransformerUserConfig`."""
        u = self.user
        if u.kind == "hstu":
            return HSTUEncoderConfig(embedding_dim=u.embedding_dim, num_blocks=u.num_blocks, num_heads=u.num_heads,
                                     attention_dim=u.embedding_dim // u.num_heads,
                                     linear_dim=u.embedding_dim // u.num_heads, max_seq_len=self.max_history + 1,
                                     linear_dropout=u.dropout, time_bias=u.time_bias)
        return TransformerUserConfig(u.embedding_dim, self.max_history + 1)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "HLLMModelConfig":
        return cls(**d)


def _additive_mask(allowed: Tensor, dtype: torch.dtype) -> Tensor:
    """bool [B, W, W] (row may attend to column) -> the additive [B, 1, W, W] mask BERT-style layers take."""
    return (~allowed).unsqueeze(1).to(dtype) * torch.finfo(dtype).min


class CausalTransformer(nn.Module):
    """Causal Transformer layers of a BERT-style LM over [B, W, D] inputs (positions >= len are padding)."""

    def __init__(self, config: HLLMModelConfig, lm_backbone: Optional[nn.Module] = None):
        super().__init__()
        from transformers import BertConfig
        from transformers.models.bert.modeling_bert import BertLayer

        u = config.user
        width = config.max_history + 1
        if u.init_from_lm:
            if lm_backbone is None:
                raise ValueError("user.init_from_lm=True needs the item LM (pass lm_backbone)")
            from merlin_hstu.hllm.item_encoder import BIDIRECTIONAL_TYPES, transformer_layers

            if lm_backbone.config.model_type not in BIDIRECTIONAL_TYPES:
                raise ValueError(f"user.init_from_lm copies BERT-style encoder layers; {lm_backbone.config.model_type}"
                                 " layers are not supported: use user.kind=hstu")
            layers = transformer_layers(lm_backbone)
            if u.num_blocks > len(layers):
                raise ValueError(f"user.num_blocks={u.num_blocks} but the LM has only {len(layers)} layers to copy")
            self.layers = nn.ModuleList(copy.deepcopy(layers[i]) for i in range(u.num_blocks))
            embeddings = lm_backbone.embeddings
            if width > embeddings.position_embeddings.num_embeddings:
                raise ValueError(f"history window {config.max_history} + 1 exceeds the LM's "
                                 f"{embeddings.position_embeddings.num_embeddings} positions")
            self.position_embedding = nn.Embedding(width, u.embedding_dim)
            self.position_embedding.weight.data.copy_(embeddings.position_embeddings.weight.data[:width])
            self.layer_norm = copy.deepcopy(embeddings.LayerNorm)
        else:
            bert = BertConfig(hidden_size=u.embedding_dim, num_attention_heads=u.num_heads,
                              intermediate_size=4 * u.embedding_dim, hidden_dropout_prob=u.dropout,
                              attention_probs_dropout_prob=u.dropout, num_hidden_layers=u.num_blocks)
            self.layers = nn.ModuleList(BertLayer(bert) for _ in range(u.num_blocks))
            for layer in self.layers:
                layer.apply(lambda m: _bert_init(m, bert.initializer_range))
            self.position_embedding = nn.Embedding(width, u.embedding_dim)
            nn.init.normal_(self.position_embedding.weight, std=bert.initializer_range)
            self.layer_norm = nn.LayerNorm(u.embedding_dim, eps=1e-12)
        self.requires_grad_(True)  # copied LM layers are trainable here, whatever the item encoder froze

    def forward(self, x: Tensor, lengths: Tensor, timestamps: Optional[Tensor] = None) -> Tensor:
        width = x.shape[1]
        positions = torch.arange(width, device=x.device)
        real = positions.unsqueeze(0) < lengths.unsqueeze(1)
        causal = positions.unsqueeze(0) <= positions.unsqueeze(1)  # [W, W]: row i sees columns j <= i
        allowed = causal.unsqueeze(0) & real.unsqueeze(1)
        allowed = allowed | torch.eye(width, dtype=torch.bool, device=x.device).unsqueeze(0)  # no empty rows
        mask = _additive_mask(allowed, x.dtype)
        h = self.layer_norm(x + self.position_embedding(positions))
        for layer in self.layers:
            h = layer(h, attention_mask=mask)[0]
        return h * real.unsqueeze(-1).to(h.dtype)


def _bert_init(module: nn.Module, std: float) -> None:
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class HLLMModel(nn.Module):
    """Item side (text table, projection, optional ID table, optional live item LM) + user model + logit scale."""

    def __init__(self, config: HLLMModelConfig, item_text: Tensor, item_encoder=None,
                 item_tokens: Optional[tuple] = None):
        super().__init__()
        if tuple(item_text.shape) != (config.num_items, config.text_dim):
            raise ValueError(f"item_text must be [num_items={config.num_items}, text_dim={config.text_dim}], got "
                             f"{tuple(item_text.shape)}")
        self.config = config
        dim = config.user.embedding_dim
        self.register_buffer("item_text", item_text.detach().float().clone())
        self.project = nn.Linear(config.text_dim, dim) if config.text_dim != dim else nn.Identity()
        self.id_embedding = None
        if config.mode == "hybrid":
            self.id_embedding = nn.Embedding(config.num_items, dim, padding_idx=0)
            nn.init.trunc_normal_(self.id_embedding.weight, std=0.02, a=-0.04, b=0.04)
        self.item_encoder = None
        if config.mode == "finetune":
            if item_encoder is None or item_tokens is None:
                raise ValueError("mode finetune trains the item LM: pass item_encoder and item_tokens (token ids "
                                 "[num_items, T], lengths [num_items])")
            self.item_encoder = item_encoder
            self.item_encoder.set_trainable(config.item_encoder.trainable_layers)
            ids, lengths = item_tokens
            self.register_buffer("item_token_ids", ids.long().clone())
            self.register_buffer("item_token_lengths", lengths.long().clone())
        self._frozen = None  # frozen_item_states: (trainable layers, states [tokens, H], start [num_items], -1: none)
        self.input_dropout = nn.Dropout(config.user.dropout)
        if config.user.kind == "hstu":
            self.position_embedding = nn.Embedding(config.max_history + 1, dim)
            nn.init.xavier_normal_(self.position_embedding.weight)
            self.encoder = HSTUEncoder(config.encoder)
        else:
            self.position_embedding = None  # the transformer holds its own (copied from the LM or fresh)
            self.encoder = CausalTransformer(config, item_encoder.backbone if item_encoder is not None else None)
        self.logit_scale = LogitScale(config.loss.initial_temperature, config.loss.max_logit_scale)

    # --- item side -----------------------------------------------------------------------------------
    @property
    def live_items(self) -> bool:
        """True while a finetune model trains: item text embeddings come from the LM, with gradients."""
        return self.item_encoder is not None and self.training

    def text_embeddings(self, ids: Tensor) -> Tensor:
        """t(ids) [..., H]: the table, or the live LM for the distinct ids (finetune, training)."""
        if not self.live_items:
            return self.item_text[ids]
        distinct, inverse = torch.unique(ids, return_inverse=True)
        live = (distinct != 0).nonzero().squeeze(1)
        cap = self.config.item_encoder.live_items_per_step
        if cap and live.numel() > cap:  # a random subset goes through the LM; the rest reads the table
            live = live[torch.randperm(live.numel(), device=live.device)[:cap]]
        out = self.item_text[distinct].clone()
        if live.numel():
            rows = distinct[live]
            lengths = self.item_token_lengths[rows]
            if self.item_encoder.caches_frozen_layers():
                encoded = self.item_encoder.forward_from_frozen(self.frozen_item_states(rows), lengths)
            else:
                encoded = self.item_encoder(self.item_token_ids[rows], lengths)
            out = out.index_put((live,), encoded.to(out.dtype))
        return out[inverse]

    @torch.no_grad()
    def encode_from_frozen(self, rows: Tensor) -> Tensor:
        """t(rows) [n, H] with the LM's current weights, in eval mode, from the frozen-layer states: what
        `ItemTextEncoder.encode` gives for the same texts (to float rounding) at k / L of its LM work."""
        encoder = self.item_encoder
        was_training = encoder.training
        encoder.eval()
        try:
            out = torch.zeros(rows.numel(), encoder.hidden_size, device=rows.device)
            order = torch.argsort(self.item_token_lengths[rows])
            for chunk in order.split(self.config.item_encoder.batch_size):
                ids = rows[chunk]
                out[chunk] = encoder.forward_from_frozen(self.frozen_item_states(ids),
                                                         self.item_token_lengths[ids]).float()
            return out
        finally:
            encoder.train(was_training)

    @torch.no_grad()
    def frozen_item_states(self, rows: Tensor) -> Tensor:
        """The item LM's frozen-layer output for items `rows`, right-padded: [n, max length, H].  Each item's is
        computed the first time it is asked for (batches of item_encoder.batch_size) and kept ragged, one vector
        per text token: the frozen layers never change, so neither do these (another `trainable_layers` starts
        afresh).  Only items that are asked for are computed: id spaces with gaps cost nothing."""
        k = self.item_encoder.trainable_layers
        if self._frozen is None or self._frozen[0] != k:
            width = self.item_encoder.hidden_size
            self._frozen = (k, self.item_text.new_zeros(0, width),
                            torch.full((len(self.item_token_lengths),), -1, dtype=torch.long, device=rows.device))
        _, flat, start = self._frozen
        missing = torch.unique(rows[start[rows] < 0])
        if missing.numel():
            missing = missing[torch.argsort(self.item_token_lengths[missing])]  # similar lengths: little padding
            lengths = self.item_token_lengths[missing]
            offsets = flat.shape[0] + torch.cumsum(lengths, 0) - lengths
            pieces = [flat]
            for chunk in torch.arange(missing.numel(), device=rows.device).split(self.config.item_encoder.batch_size):
                states = self.item_encoder.frozen_states(self.item_token_ids[missing[chunk]], lengths[chunk])
                valid = torch.arange(states.shape[1], device=states.device) < lengths[chunk].unsqueeze(1)
                pieces.append(states[valid].float())  # item by item, its tokens in order: the offsets' layout
            flat = torch.cat(pieces)
            start[missing] = offsets
            self._frozen = (k, flat, start)
        lengths = self.item_token_lengths[rows]
        positions = torch.arange(int(lengths.max()) if rows.numel() else 0, device=flat.device)
        valid = positions.unsqueeze(0) < lengths.unsqueeze(1)
        index = torch.where(valid, start[rows].unsqueeze(1) + positions, 0)
        return flat[index] * valid.unsqueeze(-1)

    def item_representation(self, ids: Tensor) -> Tensor:
        """r(ids) [..., D] (module docstring)."""
        r = self.project(self.text_embeddings(ids))
        if self.id_embedding is not None:
            r = r + self.id_embedding(ids)
        return r

    def item_vectors(self, item_ids: Optional[Tensor] = None) -> Tensor:
        """r / ||r|| of `item_ids` (None: every row of the table) [.., D]."""
        if item_ids is None:
            item_ids = torch.arange(self.config.num_items, device=self.item_text.device)
        return normalize(self.item_representation(item_ids))

    @torch.no_grad()
    def topk(self, rankable: Optional[Tensor] = None, chunk_size: Optional[int] = None) -> BruteForceTopK:
        """Brute-force cosine top-K over the current item table (merlin_hstu.retrieval.topk)."""
        was_training = self.training
        self.eval()
        try:
            return MIPSBruteForceTopK(self.item_vectors().detach(), chunk_size or 65536, rankable)
        finally:
            self.train(was_training)

    # --- user side ------------------------------------------------------------------------------------
    def _encode(self, tokens: Tensor, lengths: Tensor, timestamps: Optional[Tensor]) -> Tensor:
        width = tokens.shape[1]
        if width > self.config.max_history + 1:
            raise ValueError(f"batch width {width} exceeds the history window + 1 = {self.config.max_history + 1}")
        positions = torch.arange(width, device=tokens.device)
        real = (positions.unsqueeze(0) < lengths.unsqueeze(1)).unsqueeze(-1).to(tokens.dtype)
        if self.position_embedding is not None:
            tokens = tokens + self.position_embedding(positions)
        x = self.input_dropout(tokens) * real
        uses_time = self.config.user.kind == "hstu" and self.config.user.time_bias
        if uses_time and timestamps is None:
            raise ValueError("this HLLM user model has the time bias on (user.time_bias): pass timestamps, or build "
                             "it with user.time_bias=false for data without them")
        h = self.encoder(x, lengths, timestamps if uses_time else None)
        return normalize(h)

    def user_vectors(self, ids: Tensor, lengths: Tensor, timestamps: Optional[Tensor] = None,
                     actions: Optional[Tensor] = None) -> Tensor:
        """ids [B, W] (positions >= len ignored), lengths [B], timestamps [B, W] -> user vectors [B, W, D]."""
        return self._encode(self.item_representation(ids), lengths, timestamps)

    def last_user_vector(self, ids: Tensor, lengths: Tensor, timestamps: Optional[Tensor] = None,
                         actions: Optional[Tensor] = None) -> Tensor:
        """The user vector after the last history event: [B, D]."""
        u = self.user_vectors(ids, lengths, timestamps)
        return u[torch.arange(u.shape[0], device=u.device), (lengths - 1).clamp(min=0)]

    def score_all_items(self, ids, lengths, timestamps=None, actions=None) -> Tensor:
        """Cosine of each user's last vector with every item row: [B, num_items]."""
        return self.last_user_vector(ids, lengths, timestamps) @ self.item_vectors().T

    # --- training -------------------------------------------------------------------------------------
    def training_loss(self, batch: dict, pool: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        """Every history position predicts the next item (the last real one the target), HLLM's loss
        (merlin_hstu.hllm.losses) with the batch's distinct positives and R uniform draws from `pool` as negatives.
        The item LM (finetune) runs once over the distinct items of the batch and its negatives."""
        ids, lengths = batch["ids"], batch["lengths"]
        supervised, labels = supervision(ids, lengths)
        positives = labels[supervised]
        loss_cfg = self.config.loss
        negatives = batch_negatives(positives, pool, loss_cfg.num_negatives, loss_cfg.in_batch_negatives, generator)
        everything = torch.cat([ids.flatten(), negatives])
        distinct, inverse = torch.unique(everything, return_inverse=True)
        table = self.item_representation(distinct)  # [U, D]: one LM pass per distinct item
        tokens = table[inverse[:ids.numel()]].view(*ids.shape, -1)
        user = self._encode(tokens, lengths, batch.get("timestamps"))
        label_rows = torch.searchsorted(distinct, positives)
        negative_rows = inverse[ids.numel():]
        return hllm_loss(user[supervised], positives, table[label_rows], negatives, table[negative_rows],
                         self.logit_scale(), loss_cfg.false_negative_threshold)

    # --- catalogue changes ------------------------------------------------------------------------------
    @torch.no_grad()
    def set_item_text(self, item_text: Tensor) -> None:
        """Replace the text table (e.g. refreshed after fine-tuning), same shape."""
        if item_text.shape != self.item_text.shape:
            raise ValueError(f"item_text must keep the shape {tuple(self.item_text.shape)}, got {tuple(item_text.shape)}")
        self.item_text.copy_(item_text.to(self.item_text))

    @torch.no_grad()
    def add_items(self, text_embeddings: Tensor, token_ids: Optional[Tensor] = None,
                  token_lengths: Optional[Tensor] = None) -> Tensor:
        """Append items by their text embeddings [n, H] (from the same item encoder); returns their new ids
        (num_items .. num_items + n - 1).  No weight is trained: a hybrid model gives them a zero ID vector."""
        text_embeddings = torch.as_tensor(text_embeddings, dtype=torch.float32)
        if text_embeddings.dim() != 2 or text_embeddings.shape[1] != self.config.text_dim:
            raise ValueError(f"new item embeddings must be [n, {self.config.text_dim}], got "
                             f"{tuple(text_embeddings.shape)}; encode their text with this model's item encoder")
        n, first = text_embeddings.shape[0], self.config.num_items
        device = self.item_text.device
        self.item_text = torch.cat([self.item_text, text_embeddings.to(device)])
        if self.id_embedding is not None:
            old = self.id_embedding
            grown = nn.Embedding(first + n, old.embedding_dim, padding_idx=0).to(device)
            grown.weight.data.zero_()
            grown.weight.data[:first] = old.weight.data
            self.id_embedding = grown
        if self.item_encoder is not None:
            if token_ids is None or token_lengths is None:
                raise ValueError("a finetune model keeps every item's tokens: pass token_ids and token_lengths "
                                 "(ItemTextEncoder.tokenize) of the new items")
            width = max(self.item_token_ids.shape[1], token_ids.shape[1])
            pad = self.item_encoder.tokenizer.pad_token_id or 0

            def widen(t: Tensor) -> Tensor:
                return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=pad)

            self.item_token_ids = torch.cat([widen(self.item_token_ids), widen(token_ids.to(device))])
            self.item_token_lengths = torch.cat([self.item_token_lengths, token_lengths.to(device)])
            if self._frozen is not None:  # the new items' frozen states are computed when first asked for
                k, flat, start = self._frozen
                self._frozen = (k, flat, torch.cat([start, start.new_full((n,), -1)]))
        self.config = dataclasses.replace(self.config, num_items=first + n)
        return torch.arange(first, first + n)
