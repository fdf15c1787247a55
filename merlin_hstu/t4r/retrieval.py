"""Generative retrieval as a Transformers4Rec prediction task: `GenerativeRetrievalTask`.

A drop-in replacement for T4R's `NextItemPredictionTask` (merlin-integration.md §2.6, §2.9d) with the retrieval
options of merlin_hstu, each independent of the others:

    loss            sampled_softmax | full_softmax | bce                 (merlin_hstu.retrieval.losses)
    history_negatives  True | False: with the full softmax, False keeps each position's already-seen items
                    out of its softmax (masking "hstu-clm" hands the task the batch's item ids)
    negatives       uniform (over the catalogue) | in_batch, + logq_correction   (merlin_hstu.retrieval.negatives)
    num_negatives   R per supervised position;  temperature tau > 0
    l2_norm         L2-normalise query and item vectors (on: the reference's cosine / tau)
    similarity      dot | mol  (mixture of logits, merlin_hstu.retrieval.similarity; `mol=MoLConfig(...)` sets its shape)

    task = GenerativeRetrievalTask(loss="sampled_softmax", negatives="in_batch", logq_correction=True,
                                   num_negatives=64, temperature=0.05, similarity="mol")
    model = tr.Model(tr.Head(body, task))

Items are scored against the input item-embedding table (weight tying; T4R inserts a projection when the body
width differs from the item embedding width).  What each mode does:

* training (`training=True`): the supervised positions come from the masking (T4R's `masked_targets`, padding
  removed) and the configured loss is computed by merlin_hstu.retrieval.losses - the same code `merlin-hstu train` runs.
  The output dict holds `loss`, `labels` (the positive ids) and `predictions` (the query vectors the loss saw);
* evaluation (`testing=True`): every catalogue item is scored, logits = s / tau, and T4R's cross-entropy and ranking
  metrics run on them unchanged;
* inference: scores [B, V] of every item for the last position (padding and ids below `first_item_id` get -inf),
  or `(scores, ids)` of the top-k with `tr.Model(..., top_k=k)`.  Traceable with `torch.jit.trace`.

Invalid option combinations (e.g. BCE with 128 negatives, logQ with uniform negatives) raise `ValueError` when the
task is constructed.

`GenerativeRetrievalTask.from_configs(loss_config, head_config)` builds the task from the typed configs of a native
run (`ExperimentConfig.train.loss_config()`, `ExperimentConfig.head`). `retrieval_model_from_schema(schema, encoder,
max_sequence_length)` builds the whole `tr.Model` from a session-workflow schema and the native
`HSTUEncoderConfig`. It is what `tr.Trainer` trains in docs/t4r.md and `merlin-hstu bench t4r-vs-native`.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn
from transformers4rec.torch.block.base import Block
from transformers4rec.torch.model.prediction_task import NextItemPredictionTask

from merlin_hstu.common import schema as roles
from merlin_hstu.encoders.hstu import HSTUEncoderConfig
from merlin_hstu.retrieval.losses import RetrievalLossConfig, retrieval_loss
from merlin_hstu.retrieval.model import history_exclusions
from merlin_hstu.retrieval.similarity import MoLConfig, RetrievalHead, RetrievalHeadConfig


class RetrievalOutput(nn.Module):
    """The task's output layer (T4R's `pre`): (x, targets, training, testing) -> (logits, targets), plus the
    training loss.  Holds the retrieval head; the item table is T4R's item embedding (shared, not copied)."""

    def __init__(self, item_embedding_table: nn.Embedding, head: RetrievalHead, loss_config: RetrievalLossConfig,
                 first_item_id: int):
        super().__init__()
        num_items = item_embedding_table.num_embeddings
        if not 0 < first_item_id < num_items:
            raise ValueError(f"first_item_id must be in [1, {num_items}) (ids below it are padding / special rows), "
                             f"got {first_item_id}")
        self.item_embedding_table = item_embedding_table
        self.head = head
        self.loss_config = loss_config
        self.register_buffer("catalogue", torch.arange(first_item_id, num_items), persistent=False)
        rankable = torch.zeros(num_items, dtype=torch.bool)
        rankable[first_item_id:] = True
        self.register_buffer("rankable", rankable, persistent=False)

    def item_vectors(self, item_ids: Optional[Tensor] = None) -> Tensor:
        table = self.item_embedding_table
        return self.head.normalize_items(table.weight if item_ids is None else table(item_ids))

    def forward(self, inputs: Tensor, targets: Optional[Tensor] = None, training: bool = False,
                testing: bool = False, **kwargs):
        """inputs [N, D] body outputs -> scores [N, V] (/ tau in training or testing), targets unchanged."""
        query = self.head.normalize_query(inputs)
        scores = self.head.catalogue_scores(query, self.item_vectors())
        scores = scores.masked_fill(~self.rankable.unsqueeze(0), float("-inf"))
        if training or testing:
            scores = scores / self.loss_config.temperature
        return scores, targets

    def loss(self, inputs: Tensor, positives: Tensor, generator: Optional[torch.Generator] = None,
             seen: Optional[Tensor] = None) -> Tensor:
        """Configured loss of body outputs [P, D] at supervised positions with positive ids [P]; `seen` [P, W]
        each position's already-seen ids (`history_negatives=False`)."""
        return retrieval_loss(self, self.head.normalize_query(inputs), positives, self.catalogue,
                              self.loss_config, generator, seen)


class GenerativeRetrievalTask(NextItemPredictionTask):
    """Next-item generative retrieval with selectable loss, negatives, normalisation and similarity.

    Arguments (see the module docstring): loss, negatives, num_negatives, temperature, logq_correction, l2_norm,
    similarity, mol (MoLConfig or dict; default: the RAILS ML-1M shape), mi_loss_weight (MoL's aux loss),
    history_negatives (full softmax: False leaves each position's already-seen items out of its softmax),
    query_norm ("l2" | "layer_norm" | "none"; overrides l2_norm for the query side), first_item_id (smallest
    real item id: negatives, the full softmax and recommendations use ids >= it; default padding_idx + 1; use 3
    for NVTabular Categorify's 0 pad / 1 null / 2 OOV), topk_chunk_size (items scored at a time when scoring the
    catalogue without gradients; 0: automatic), plus NextItemPredictionTask's metrics, task_name and task_block.
    """

    def __init__(
        self,
        loss: str = "sampled_softmax",
        negatives: str = "uniform",
        num_negatives: int = 128,
        temperature: float = 0.05,
        logq_correction: bool = False,
        l2_norm: bool = True,
        similarity: str = "dot",
        mol: Optional[Union[MoLConfig, dict]] = None,
        mi_loss_weight: float = 0.0,
        history_negatives: bool = True,
        query_norm: Optional[str] = None,
        first_item_id: Optional[int] = None,
        topk_chunk_size: int = 0,
        metrics=NextItemPredictionTask.DEFAULT_METRICS,
        task_name: str = "next-item",
        task_block=None,
    ):
        # Both configs validate here, so a bad combination fails at construction, not at the first batch.
        loss_config = RetrievalLossConfig(num_negatives=num_negatives, temperature=temperature, loss=loss,
                                               negatives=negatives, logq_correction=logq_correction,
                                               mi_loss_weight=mi_loss_weight, history_negatives=history_negatives)
        head_config = RetrievalHeadConfig(similarity=similarity,
                                          query_norm=query_norm or ("l2" if l2_norm else "none"),
                                          item_norm="l2" if l2_norm else "none",
                                          mol=mol if mol is not None else MoLConfig(),
                                          topk_chunk_size=topk_chunk_size)
        if mi_loss_weight and similarity != "mol":
            raise ValueError(f"mi_loss_weight={mi_loss_weight} weighs MoL's gate loss; similarity={similarity!r} "
                             "has no gates: set similarity='mol' or mi_loss_weight=0")
        if first_item_id is not None and (isinstance(first_item_id, bool) or int(first_item_id) < 1):
            raise ValueError(f"first_item_id must be an int >= 1, got {first_item_id!r}")
        super().__init__(metrics=metrics, task_block=task_block, task_name=task_name, weight_tying=True)
        self.loss_config, self.head_config, self.first_item_id = loss_config, head_config, first_item_id

    @classmethod
    def from_configs(cls, loss: RetrievalLossConfig, head: Optional[RetrievalHeadConfig] = None,
                     **kwargs) -> "GenerativeRetrievalTask":
        """The task with a native run's objective (`train.loss_config()`) and head (`ExperimentConfig.head`);
        `kwargs` are the other constructor arguments (first_item_id, metrics, task_name, task_block)."""
        head = head or RetrievalHeadConfig()
        return cls(loss=loss.loss, negatives=loss.negatives, num_negatives=loss.num_negatives,
                   temperature=loss.temperature, logq_correction=loss.logq_correction,
                   mi_loss_weight=loss.mi_loss_weight, history_negatives=loss.history_negatives,
                   l2_norm=head.item_norm == "l2", query_norm=head.query_norm,
                   similarity=head.similarity, mol=head.mol, topk_chunk_size=head.topk_chunk_size, **kwargs)

    def build(self, body, input_size, device=None, inputs=None, task_block=None, pre=None):
        super().build(body, input_size, device=device, inputs=inputs, task_block=task_block, pre=pre)
        if not self.loss_config.history_negatives and not hasattr(self.masking, "item_ids"):
            raise ValueError(f"history_negatives=False needs each batch's item ids from the masking, and masking "
                             f"{type(self.masking).__name__} keeps none: build the inputs with masking='hstu-clm' "
                             "(retrieval_model_from_schema does) or set history_negatives=True")
        table = self.item_embedding_table
        dim = table.weight.shape[1]  # weight tying: T4R projects the body output to the item width if needed
        head = RetrievalHead(self.head_config, dim, dim)
        first = self.first_item_id if self.first_item_id is not None else self.padding_idx + 1
        self.pre = Block(RetrievalOutput(table, head, self.loss_config, first), [-1, self.target_dim])
        if device:
            self.pre.to(device)

    @property
    def output(self) -> RetrievalOutput:
        return self.pre.module

    def forward(self, inputs, targets=None, training=False, testing=False, top_k=None, **kwargs):
        if not training:  # evaluation and inference: T4R's own path over our full-catalogue logits
            return super().forward(inputs, targets=targets, training=training, testing=testing, top_k=top_k,
                                   **kwargs)
        x = inputs[0] if isinstance(inputs, (tuple, list)) else inputs
        x = x.float()
        if self.task_block:
            x = self.task_block(x)
        labels = self.masking.masked_targets
        supervised = labels != self.padding_idx
        x = self.remove_pad_3d(x, supervised.flatten())
        positives = labels[supervised].long()
        item_ids = getattr(self.masking, "item_ids", None)  # kept by "hstu-clm"; `build` checked it is there
        loss = self.output.loss(x, positives, seen=history_exclusions(self.loss_config, item_ids, supervised))
        return {"loss": loss, "labels": positives, "predictions": self.output.head.normalize_query(x).detach()}

    def _get_name(self) -> str:
        return "GenerativeRetrievalTask"


def first_item_id(schema, item_column: str) -> int:
    """Smallest real item id of a workflow's item column: 1 for raw ids (`item_encoding="raw"`), else
    Categorify's first value id (0 pad, 1 null, 2 OOV)."""
    from merlin_hstu.workflows.ops import ITEM_ENCODING_PROPERTY

    raw = schema[item_column].properties.get(ITEM_ENCODING_PROPERTY) == "raw"
    return 1 if raw else roles.FIRST_REAL_ID


INPUT_STACKS = ("native", "t4r")


def retrieval_model_from_schema(schema, encoder: HSTUEncoderConfig, max_sequence_length: int,
                                task: Optional[GenerativeRetrievalTask] = None, input_dropout: float = 0.2,
                                features: Sequence[str] = (), input_stack: str = "native"):
    """A T4R next-item model for a session-workflow schema (its schema.pbtxt, or a split's).

        inputs  HSTUSequenceFeatures (time bias on: the schema's timestamp list goes to the encoder) or
                TabularSequenceFeatures: the item list embedded at encoder.embedding_dim, plus `features`
                (other list columns of the schema, concatenated and projected to embedding_dim), masking "hstu-clm"
        body    HSTUModel with `encoder`'s sizes, biases, dropout and kernel; its normaliser N is encoder.max_seq_len
        head    `task` (default: GenerativeRetrievalTask()), first_item_id from the schema when the task has none

    `max_sequence_length` is the padded width T4R's loader and `tr.Model` use, at most encoder.max_seq_len.
    With `retrieval_trainer_splits` it is `TrainerSplits.max_sequence_length` (H + 1).

    `input_stack` is how items enter the encoder:

        native  x = E[ids] * sqrt(D) + P, E initialised as the native model's table (truncated normal, std 0.02,
                `merlin_hstu.retrieval.model.item_table_init`): the native retrieval model's input stack, so the
                same weights give the same loss (the default; without it the Trainer trains far worse)
        t4r     x = E[ids] + P with T4R's own table initialisation (normal, std 0.05): T4R's stock feature block
    """
    import transformers4rec.torch as tr

    from merlin_hstu.retrieval.model import item_table_init
    from merlin_hstu.t4r.encoders import HSTUSequenceFeatures, T4RecHSTUConfig, _as_core_schema

    if input_stack not in INPUT_STACKS:
        raise ValueError(f"input_stack must be one of {INPUT_STACKS} (native: E * sqrt(D) with the native item "
                         f"table init; t4r: T4R's stock embeddings), got {input_stack!r}")
    core = _as_core_schema(schema)
    if not encoder.causal:
        raise ValueError("retrieval_model_from_schema needs a causal encoder (HSTUEncoderConfig.causal=True): T4R's "
                         "causal masking trains every position on the next item")
    if max_sequence_length > encoder.max_seq_len:
        raise ValueError(f"max_sequence_length={max_sequence_length} exceeds encoder.max_seq_len="
                         f"{encoder.max_seq_len} (the encoder's N); raise model.max_seq_len or shorten the lists")
    item = roles.item_list_column(core)
    timestamps = roles.timestamp_list_column(core) if encoder.time_bias else None
    if encoder.time_bias and timestamps is None:
        raise ValueError(f"encoder.time_bias=True needs a timestamp list column, and the schema has none "
                         f"(columns: {core.column_names}); preprocess with timestamps or set time_bias=False")
    unknown = [f for f in features if f not in core.column_names]
    if unknown:
        raise ValueError(f"features {unknown} are not in the schema (columns: {core.column_names})")
    names = [item, *[f for f in features if f != item]]
    dim = encoder.embedding_dim
    common = dict(max_sequence_length=max_sequence_length, embedding_dim_default=dim, embedding_dims={item: dim},
                  masking="hstu-clm")
    if input_stack == "native":
        common["embeddings_initializers"] = {item: item_table_init}
    if len(names) > 1:
        common["d_output"] = dim  # the concatenated features are wider than the encoder
    if timestamps is not None:
        inputs = HSTUSequenceFeatures.from_schema(core.select_by_name(names + [timestamps]),
                                                  timestamp_column=timestamps, **common)
    else:
        inputs = tr.TabularSequenceFeatures.from_schema(core.select_by_name(names), **common)
    config = T4RecHSTUConfig.build(
        dim, encoder.num_heads, encoder.num_blocks, encoder.max_seq_len, dropout=encoder.linear_dropout,
        time_bias=encoder.time_bias, kernel=encoder.kernel, attention_dim=encoder.attention_dim,
        linear_dim=encoder.linear_dim, input_dropout=input_dropout, position_bias=encoder.position_bias,
        num_time_buckets=encoder.num_time_buckets, layer_norm_eps=encoder.layer_norm_eps,
        input_scale="sqrt_d" if input_stack == "native" else "none")
    body = tr.SequentialBlock(inputs, tr.TransformerBlock(config, masking=inputs.masking))
    task = task if task is not None else GenerativeRetrievalTask()
    if task.first_item_id is None:
        task.first_item_id = first_item_id(core, item)
    return tr.Model(tr.Head(body, task), max_sequence_length=max_sequence_length)


__all__ = ["GenerativeRetrievalTask", "RetrievalOutput", "INPUT_STACKS", "first_item_id",
           "retrieval_model_from_schema"]
