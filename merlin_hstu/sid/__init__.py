"""Semantic IDs: items as short tuples of codebook tokens, and generative retrieval that decodes them (TIGER, arXiv
2305.05065) with our STU stack.  See docs/semantic_ids.md.

    from merlin_hstu.sid import fit_tokenizer, TokenizerConfig, load_sid_config, train_sid
    sids = fit_tokenizer(item_ids, embeddings, TokenizerConfig(method="rq-kmeans", levels=3, codebook_size=256))
    print(format_statistics(sids.stats))                       # codebook usage, collisions, reconstruction error
    result = train_sid(table, sids, load_sid_config("sid-hstu-amazon"))

Files (the same names as the other task packages):

    config.py      SIDConfig: tokenizer, model (the decoder's STU stack), decode, train (the one loop), data
    tokenizer.py   RQ-KMeans and RQ-VAE over an item embedding matrix, the de-duplicating final level, statistics,
                   SemanticIds (codes + token layout, saved as a directory)
    embeddings.py  where the item embeddings come from: a trained ID model, item text (HLLM encoder), a file
    model.py       SIDDecoder: the STU stack as an autoregressive decoder over semantic-ID tokens
    decode.py      the trie of valid tuples, constrained beam search (KV-cached or recomputed), exhaustive scoring
    train.py       training / evaluation through merlin_hstu.train.loop.fit, run directories, recommend_sid

The NVTabular step that maps item ids to tokens is merlin_hstu.workflows.semantic_ids; the export of the beam search
as a Triton repository is merlin_hstu.serving.sid; the benchmark commands are `merlin-hstu bench amazon`, `bench sid`
and `bench sid-decode` (merlin_hstu.bench.sid).

Names load lazily: `import merlin_hstu.sid` imports neither NVTabular nor the model code.
"""
from __future__ import annotations

import importlib

SID_TASK = "sid"  # the task of a semantic-ID run (run.json, model.pt); `merlin-hstu export` routes on it

_EXPORTS = {
    "TokenizerConfig": "tokenizer",
    "SemanticIds": "tokenizer",
    "fit_tokenizer": "tokenizer",
    "format_statistics": "tokenizer",
    "code_statistics": "tokenizer",
    "kmeans": "tokenizer",
    "SIDConfig": "config",
    "load_sid_config": "config",
    "SIDDecoder": "model",
    "SIDModelConfig": "model",
    "next_token_loss": "model",
    "item_token_sequences": "model",
    "SemanticIdTrie": "decode",
    "beam_search": "decode",
    "exhaustive_scores": "decode",
    "beam_ranks": "decode",
    "train_sid": "train",
    "evaluate_sid": "train",
    "save_sid_run": "train",
    "load_sid_run": "train",
    "recommend_sid": "train",
    "collaborative_embeddings": "embeddings",
    "text_embeddings": "embeddings",
    "file_embeddings": "embeddings",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"merlin_hstu.sid.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'merlin_hstu.sid' has no attribute {name!r}")
