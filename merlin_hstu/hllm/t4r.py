"""HLLM in Transformers4Rec: the precomputed text embeddings as T4R's item table.

    item_text = encode_item_table(ItemTextEncoder(), data.texts, cache)      # [num_items, H], merlin_hstu.hllm.train
    model = hllm_t4r_model(schema, item_text, max_sequence_length=H + 1)     # a tr.Model, trains with tr.Trainer

The body is the session workflow's item list embedded by T4R's own `TabularSequenceFeatures` (masking "hstu-clm"),
whose item table is replaced by the text table (`load_text_item_table`, frozen by default: HLLM's frozen mode in
T4R), followed by the STU stack registered with T4R ("hstu": `merlin_hstu.t4r.encoders`) at the LM's width; the
head is `GenerativeRetrievalTask`, whose weight tying scores every item against the same text table (cosine / tau,
the project's retrieval losses).  So the item side of training, evaluation and inference is the language model's
text embedding, and a T4R model exports like any other (merlin_hstu.serving).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from merlin_hstu.encoders.hstu import HSTUEncoderConfig


def t4r_item_table(model_or_inputs) -> nn.Embedding:
    """The item embedding table of a tr.Model or of its TabularSequenceFeatures."""
    inputs = model_or_inputs
    heads = getattr(model_or_inputs, "heads", None)
    if heads is not None:
        inputs = heads[0].body.inputs
    table = getattr(inputs, "item_embedding_table", None)
    if not isinstance(table, nn.Embedding):
        raise TypeError(f"{type(model_or_inputs).__name__} has no T4R item embedding table (expected a tr.Model whose "
                        "body starts with TabularSequenceFeatures, or the features block itself)")
    return table


@torch.no_grad()
def load_text_item_table(model_or_inputs, item_text: Tensor, trainable: bool = False) -> nn.Embedding:
    """Write the text embeddings [num_items, H] into T4R's item table (frozen unless `trainable`)."""
    table = t4r_item_table(model_or_inputs)
    item_text = torch.as_tensor(item_text, dtype=table.weight.dtype)
    if tuple(item_text.shape) != tuple(table.weight.shape):
        raise ValueError(f"text table {tuple(item_text.shape)} does not fit T4R's item table "
                         f"{tuple(table.weight.shape)}: rows must be the schema's item ids (int_domain.max + 1) and "
                         "the width the item encoder's (build the model with embedding_dim = the LM width)")
    table.weight.copy_(item_text)
    table.weight.requires_grad_(trainable)
    return table


def hllm_t4r_model(schema, item_text: Tensor, max_sequence_length: int,
                   encoder: Optional[HSTUEncoderConfig] = None, task=None, trainable_items: bool = False):
    """A tr.Model over a session-workflow schema whose item table is `item_text` (module docstring).  `encoder`:
    the STU stack's sizes (its embedding_dim is set to the text width H); `task`: a GenerativeRetrievalTask."""
    import dataclasses

    from merlin_hstu.t4r.retrieval import retrieval_model_from_schema

    width = int(item_text.shape[1])
    encoder = encoder or HSTUEncoderConfig(num_blocks=2, num_heads=4, max_seq_len=max(max_sequence_length, 2))
    encoder = dataclasses.replace(encoder, embedding_dim=width, attention_dim=width // encoder.num_heads,
                                  linear_dim=width // encoder.num_heads)
    model = retrieval_model_from_schema(schema, encoder, max_sequence_length, task=task)
    load_text_item_table(model, item_text, trainable=trainable_items)
    return model
