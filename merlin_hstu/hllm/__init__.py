"""HLLM (arXiv 2409.12740): items encoded from their text by a pretrained language model, users modelled by a causal
model over those item embeddings.  See docs/hllm.md.

    from merlin_hstu.hllm import HLLMConfig, prepare_dataset, load_hllm_data, train_hllm
    data = load_hllm_data(prepare_dataset("ml-1m-prefix", cache_root="runs/bench/cache"))
    result = train_hllm(data, HLLMConfig().with_overrides(["train.mode=hybrid", "train.epochs=3"]))

Files (the same names as the other task packages):

    config.py        HLLMConfig: item_encoder, user, loss, train (mode frozen | finetune | hybrid), data
    item_encoder.py  ItemTextEncoder: prompt + text + learnable item token -> pooled LM hidden state (offline MiniLM)
    cache.py         EmbeddingCache: item embeddings on disk, keyed by the encoder's fingerprint and the text hash
    model.py         HLLMModel: item side per mode, user model (our STU stack or a causal Transformer), add_items
    losses.py        cosine x learnable scale, in-batch + sampled negatives, false negatives masked
    train.py         train_hllm through the one loop (merlin_hstu.train.loop.fit), the retrieval evaluation
    data.py          item-text recipes (ML-1M, ML latest-small, ...), cold-start protocol
    serving.py       export with the item table precomputed; new items by their text, without retraining
    t4r.py           the text item table as a Transformers4Rec block

Names load lazily: `import merlin_hstu.hllm` imports neither transformers nor NVTabular.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "HLLMConfig": "config",
    "ItemEncoderConfig": "config",
    "UserModelConfig": "config",
    "HLLMLossConfig": "config",
    "HLLMTrainConfig": "config",
    "HLLMDataConfig": "config",
    "ItemTextEncoder": "item_encoder",
    "pretrained_path": "item_encoder",
    "EmbeddingCache": "cache",
    "HLLMModel": "model",
    "HLLMModelConfig": "model",
    "hllm_loss": "losses",
    "train_hllm": "train",
    "HLLMResult": "train",
    "save_model": "train",
    "load_model": "train",
    "prepare_dataset": "data",
    "prepare_item_text": "data",
    "load_hllm_data": "data",
    "HLLMData": "data",
    "cold_start_split": "data",
    "cold_eval_samples": "data",
    "export_hllm_repository": "serving",
    "add_items_by_text": "serving",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"merlin_hstu.hllm.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'merlin_hstu.hllm' has no attribute {name!r}")
