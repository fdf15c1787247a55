"""Transformers4Rec (T4R 23.12, torch API) integration of the HSTU encoder.

T4R builds a sequence model as

    TabularSequenceFeatures (embeddings -> concat -> projection -> masking)  ->  TransformerBlock  ->  task

and looks encoders up by name in `transformer_registry` (HF `PretrainedConfig` + `PreTrainedModel` pairs) and
masking schemes in `masking_registry`.  This module plugs HSTU into those seams:

* `HSTUConfig` / `HSTUModel`: a Hugging Face config/model pair around `merlin_hstu.encoders.hstu.HSTUEncoder`
  (learned absolute position embedding + input dropout + the STU stack).  Registered with `AutoConfig` /
  `AutoModel`, so `save_pretrained` / `from_pretrained` round-trip.
* `T4RecHSTUConfig` (registry key "hstu", no time bias) and `T4RecHSTUTimeConfig` ("hstu-time", time bias on):
  what `tr.TransformerBlock.from_registry(name, d_model, n_head, n_layer, total_seq_length, masking)` builds.
* `HSTUCausalLanguageModeling` ("hstu-clm"): T4R's causal LM masking that also hands the encoder the
  sequence lengths and, when given, the padded event timestamps.
* `SASRecConfig` / `SASRecModel` / `T4RecSASRecConfig` (registry key "sasrec"): the reference's SASRec
  baseline (`merlin_hstu.encoders.sasrec.SASRecEncoder`) behind the same seams, for like-for-like comparisons.
* `HSTUSequenceFeatures`: `TabularSequenceFeatures` that takes the timestamp list column out of the features
  (raw unix times are not a useful dense input) and gives it to the masking, which passes it on as
  `HSTUModel.forward(timestamps=...)`; `TransformerBlock.forward` merges `masking.transformer_arguments`
  into the encoder kwargs, filtered by the encoder's forward signature.

Time alignment (why the timestamps go in unshifted).  T4R's CLM keeps column j = embedding of item j in
every mode (in training the "shift" only masks each last item's column, which has no label), and row i
predicts item i+1.  HSTU wants query time of row i = time of the item row i predicts = t[i+1], and key
time of column j = t[j].  That is exactly what `HSTUEncoder.forward(x, lengths, timestamps=t)` does with
the raw padded event times, so the masking passes them as they are.  Padded positions are filled with the
row's last event time, so at inference the last row (which predicts an unseen item) uses the last event's
time as its query time.

`register()` is the one registration entry point, and it is idempotent.  Importing this module runs it;
`merlin_hstu/__init__.py` arranges for that import as soon as T4R or transformers is imported (see there).
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional, Tuple

import torch
import transformers
from merlin.models.utils.registry import Registry
from merlin.schema import ColumnSchema, Tags
from merlin.schema import Schema as CoreSchema
from merlin.schema.io.tensorflow_metadata import TensorflowMetadata
from merlin_standard_lib import Schema as LegacySchema
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers4rec.config.transformer import T4RecConfig, transformer_registry
from transformers4rec.torch.features.sequence import TabularSequenceFeatures
from transformers4rec.torch.masking import CausalLanguageModeling, masking_registry
from transformers4rec.torch.utils.torch_utils import MappingTransformerMasking

from merlin_hstu.encoders.hstu import HSTUEncoder, HSTUEncoderConfig
from merlin_hstu.encoders.sasrec import SASRecEncoder, SASRecEncoderConfig, positional_table_init
from merlin_hstu.kernels.dispatch import validate_kernel

HSTU_MODEL_TYPE = "hstu"
HSTU_REGISTRY_KEY = "hstu"
HSTU_TIME_REGISTRY_KEY = "hstu-time"
HSTU_MASKING_KEYS = ("hstu-clm", "hstu-causal")
INPUT_SCALES = ("sqrt_d", "none")  # HSTUConfig.input_scale


# ------------------------------------------------------------------------------------------------
# Hugging Face config / model
# ------------------------------------------------------------------------------------------------
class HSTUConfig(PretrainedConfig):
    """Hugging Face configuration of an HSTU encoder.

    The HF names are what T4R reads (`hidden_size` sizes the block output); everything maps 1:1 onto
    `HSTUEncoderConfig` via `encoder_config()`.

    max_position_embeddings is N: the longest padded sequence the model accepts, the size of the absolute
    and relative position tables, and the constant attention normaliser (A = SiLU(qk + rab) / N).  With T4R
    set it to the model's max_sequence_length.  attention_dim / linear_dim are per head and default to
    hidden_size // num_attention_heads.  time_bias=True adds the bucketed time-gap bias and then requires
    `timestamps` at every forward call (in T4R: `HSTUSequenceFeatures` with masking "hstu-clm").
    kernel picks the attention implementation: "pytorch", "triton" or "auto" (Triton for CUDA tensors,
    PyTorch otherwise; see `merlin_hstu.kernels.dispatch`).  It is saved with the config, so a model loaded
    by `from_pretrained` runs the kernel it was saved with.

    input_scale is what the embedded inputs are multiplied by before the position embedding is added:
    "sqrt_d" (default) multiplies by sqrt(hidden_size), as the native model's input stack and the reference do
    (x = E[ids] * sqrt(D) + P); "none" takes T4R's embeddings as they come (what this block did before the
    field existed; a config saved without the field loads with "none", so a saved model computes what it was
    trained to).  Without the scale T4R's N(0, 0.05) items are ~2.5x smaller than the position embedding at D = 64
    and the model trains far worse (docs/t4r.md, "tr.Trainer vs the native loop").
    """

    model_type = HSTU_MODEL_TYPE

    def __init__(
        self,
        hidden_size: int = 64,
        num_hidden_layers: int = 2,
        num_attention_heads: int = 2,
        max_position_embeddings: int = 200,
        attention_dim: Optional[int] = None,
        linear_dim: Optional[int] = None,
        dropout: float = 0.2,
        input_dropout: Optional[float] = None,
        position_bias: bool = True,
        time_bias: bool = False,
        num_time_buckets: int = 128,
        absolute_position_embedding: bool = True,
        layer_norm_eps: float = 1e-6,
        kernel: str = "auto",
        input_scale: str = "sqrt_d",
        **kwargs: Any,
    ):
        validate_kernel(kernel, "HSTUConfig.kernel")
        if input_scale not in INPUT_SCALES:
            raise ValueError(f"HSTUConfig.input_scale must be one of {INPUT_SCALES} (sqrt_d: x * sqrt(hidden_size) "
                             f"as the native model; none: T4R's embeddings unscaled), got {input_scale!r}")
        for name, value in (
            ("hidden_size", hidden_size),
            ("num_hidden_layers", num_hidden_layers),
            ("num_attention_heads", num_attention_heads),
            ("max_position_embeddings", max_position_embeddings),
            ("num_time_buckets", num_time_buckets),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"HSTUConfig.{name} must be a positive int, got {value!r}")
        if (attention_dim is None or linear_dim is None) and hidden_size % num_attention_heads:
            raise ValueError(
                f"HSTUConfig: hidden_size={hidden_size} is not divisible by num_attention_heads="
                f"{num_attention_heads}, so the per-head attention_dim/linear_dim cannot default to "
                "hidden_size // num_attention_heads; pass attention_dim= and linear_dim= explicitly"
            )
        input_dropout = dropout if input_dropout is None else input_dropout
        for name, value in (("dropout", dropout), ("input_dropout", input_dropout)):
            if not 0.0 <= value < 1.0:
                raise ValueError(f"HSTUConfig.{name} must be in [0, 1), got {value}")
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.max_position_embeddings = max_position_embeddings
        self.attention_dim = hidden_size // num_attention_heads if attention_dim is None else attention_dim
        self.linear_dim = hidden_size // num_attention_heads if linear_dim is None else linear_dim
        self.dropout = dropout
        self.input_dropout = input_dropout
        self.position_bias = position_bias
        self.time_bias = time_bias
        self.num_time_buckets = num_time_buckets
        self.absolute_position_embedding = absolute_position_embedding
        self.layer_norm_eps = layer_norm_eps
        self.kernel = kernel
        self.input_scale = input_scale
        super().__init__(**kwargs)

    @classmethod
    def from_dict(cls, config_dict: Dict[str, Any], **kwargs: Any):
        # A config saved before `input_scale` existed was trained without the scale: load it that way.
        if "input_scale" not in config_dict:
            config_dict = {**config_dict, "input_scale": "none"}
        return super().from_dict(config_dict, **kwargs)

    def input_multiplier(self) -> float:
        """The factor the embedded inputs are multiplied by (`input_scale`)."""
        return math.sqrt(self.hidden_size) if getattr(self, "input_scale", "none") == "sqrt_d" else 1.0

    def encoder_config(self) -> HSTUEncoderConfig:
        """The typed config of the wrapped `HSTUEncoder` (validates the per-head dims too)."""
        return HSTUEncoderConfig(
            embedding_dim=self.hidden_size,
            num_blocks=self.num_hidden_layers,
            num_heads=self.num_attention_heads,
            attention_dim=self.attention_dim,
            linear_dim=self.linear_dim,
            max_seq_len=self.max_position_embeddings,
            linear_dropout=self.dropout,
            position_bias=self.position_bias,
            time_bias=self.time_bias,
            num_time_buckets=self.num_time_buckets,
            layer_norm_eps=self.layer_norm_eps,
            causal=True,
            kernel=self.kernel,
        )


class HSTUModel(PreTrainedModel):
    """HSTU encoder as a Hugging Face model: h = STU^L(Dropout(x * s + P[0:W])) on right-padded x [B, W, D].

    s is sqrt(D) (config.input_scale="sqrt_d", the default: the native model's and the reference's input stack)
    or 1 ("none").  P is a learned absolute position table (as in the reference's input preprocessor; T4R hands
    over already-embedded items, so the item table and its initialisation stay in the T4R feature block).
    Causal by construction, so it pairs with T4R's causal LM masking ("clm"/"causal"/"hstu-clm") only.
    """

    config_class = HSTUConfig
    base_model_prefix = "hstu"
    main_input_name = "inputs_embeds"

    def __init__(self, config: HSTUConfig):
        super().__init__(config)
        self.position_embeddings: Optional[nn.Embedding] = None
        if config.absolute_position_embedding:
            self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.input_dropout = nn.Dropout(config.input_dropout)
        self.encoder = HSTUEncoder(config.encoder_config())
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        # The STU layers initialise themselves (reference init); only the position table is ours.
        # xavier_normal_ is what the reference ends up with for HSTU's position table.
        if module is self.position_embeddings:
            nn.init.xavier_normal_(module.weight)

    def _check_time_inputs(self, timestamps: Optional[torch.Tensor]) -> None:
        config = self.config
        if config.time_bias and timestamps is None:
            raise ValueError(
                "HSTUModel was built with time_bias=True but got no timestamps; in T4R use "
                "HSTUSequenceFeatures.from_schema(..., timestamp_column=...) with masking='hstu-clm', "
                "or build the encoder with time_bias=False (registry key 'hstu')"
            )
        if timestamps is not None and not config.time_bias:
            raise ValueError(
                "HSTUModel got timestamps but was built with time_bias=False, so they would be "
                "ignored; build it with time_bias=True (registry key 'hstu-time', or "
                "T4RecHSTUConfig.build(..., time_bias=True))"
            )

    def _check_shapes(self, inputs_embeds: torch.Tensor, timestamps: Optional[torch.Tensor]) -> None:
        config = self.config
        if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != config.hidden_size:
            raise ValueError(
                f"HSTUModel expects inputs_embeds [batch, seq, hidden_size={config.hidden_size}], got "
                f"{tuple(inputs_embeds.shape)}; project the features to hidden_size (T4R: d_output=)"
            )
        width = inputs_embeds.shape[1]
        if width > config.max_position_embeddings:
            raise ValueError(
                f"sequence length {width} exceeds HSTUConfig.max_position_embeddings="
                f"{config.max_position_embeddings}; raise it (T4R: total_seq_length=) or set "
                "max_sequence_length on the T4R model/trainer to truncate"
            )
        if timestamps is not None:
            if timestamps.shape != inputs_embeds.shape[:2]:
                raise ValueError(
                    f"timestamps must be [batch, seq] = {tuple(inputs_embeds.shape[:2])}, got "
                    f"{tuple(timestamps.shape)}"
                )

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        timestamps: Optional[torch.Tensor] = None,
        lengths: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor]:
        """inputs_embeds [B, W, D] right-padded; lengths [B] real positions per row (default: all W);
        timestamps [B, W] event times of the item embedded at each position (query time of row i is
        timestamps[i+1], see `HSTUEncoder.forward`).  Returns (hidden [B, W, D],), zeros past lengths."""
        self._check_time_inputs(timestamps)
        if not torch.jit.is_tracing():  # shape checks would only bake constants (and warn) into a trace
            self._check_shapes(inputs_embeds, timestamps)
        width = inputs_embeds.shape[1]
        scale = self.config.input_multiplier()
        x = inputs_embeds * scale if scale != 1.0 else inputs_embeds
        if self.position_embeddings is not None:
            positions = torch.arange(width, device=x.device)
            x = x + self.position_embeddings(positions).unsqueeze(0)
        x = self.input_dropout(x)
        return (self.encoder(x, lengths=lengths, timestamps=timestamps),)


# ------------------------------------------------------------------------------------------------
# T4R transformer configs (registry "hstu" / "hstu-time")
# ------------------------------------------------------------------------------------------------
class T4RecHSTUConfig(T4RecConfig, HSTUConfig):
    """What `TransformerBlock.from_registry("hstu", ...)` builds: HSTU without the time bias.

    Base order matters: T4R instantiates `MODEL_MAPPING[type(self).__bases__[1]]`, i.e. HSTUModel.
    """

    @classmethod
    def build(
        cls,
        d_model: int,
        n_head: int,
        n_layer: int,
        total_seq_length: int,
        dropout: float = 0.2,
        time_bias: bool = False,
        kernel: str = "auto",
        **kwargs: Any,
    ) -> "T4RecHSTUConfig":
        """T4R's `build` signature plus HSTUConfig's own fields (`kernel`, `attention_dim`, ...) by keyword.

        `TransformerBlock.from_registry` passes only the four sizes, so a non-default kernel goes through
        this method: `tr.TransformerBlock(T4RecHSTUConfig.build(..., kernel="pytorch"), masking=...)`.
        """
        return cls(
            hidden_size=d_model,
            num_attention_heads=n_head,
            num_hidden_layers=n_layer,
            max_position_embeddings=total_seq_length,
            dropout=dropout,
            time_bias=time_bias,
            kernel=kernel,
            **kwargs,
        )


class T4RecHSTUTimeConfig(T4RecConfig, HSTUConfig):
    """`from_registry("hstu-time", ...)`: HSTU with the relative time bias; needs timestamps wired through
    `HSTUSequenceFeatures` + masking "hstu-clm".  (A separate class rather than a subclass of
    T4RecHSTUConfig because T4R reads the HF config class from `__bases__[1]`.)"""

    @classmethod
    def build(
        cls,
        d_model: int,
        n_head: int,
        n_layer: int,
        total_seq_length: int,
        dropout: float = 0.2,
        kernel: str = "auto",
        **kwargs: Any,
    ) -> "T4RecHSTUTimeConfig":
        """As `T4RecHSTUConfig.build`, with time_bias=True unless given."""
        kwargs.setdefault("time_bias", True)
        return cls(
            hidden_size=d_model,
            num_attention_heads=n_head,
            num_hidden_layers=n_layer,
            max_position_embeddings=total_seq_length,
            dropout=dropout,
            kernel=kernel,
            **kwargs,
        )


# ------------------------------------------------------------------------------------------------
# Masking that carries lengths and timestamps to the encoder
# ------------------------------------------------------------------------------------------------
class HSTUCausalLanguageModeling(CausalLanguageModeling):
    """T4R causal LM masking (labels, input masking: unchanged) that also passes the encoder
    `lengths` [B] (non-padding items per row) and, when `HSTUSequenceFeatures` handed them over for this
    batch, `timestamps` [B, L] with padded positions set to the row's last event time.  It keeps the batch's
    `item_ids` [B, L] too: what `GenerativeRetrievalTask(history_negatives=False)` masks out of each softmax.

    The timestamps are handed over per batch (`hand_over_timestamps` right before `forward`) and consumed
    by `forward`, so a batch without timestamps never sees the previous batch's.
    """

    def __init__(
        self,
        hidden_size: int,
        padding_idx: int = 0,
        eval_on_last_item_seq_only: bool = True,
        train_on_last_item_seq_only: bool = False,
        **kwargs: Any,
    ):
        super().__init__(
            hidden_size=hidden_size,
            padding_idx=padding_idx,
            eval_on_last_item_seq_only=eval_on_last_item_seq_only,
            train_on_last_item_seq_only=train_on_last_item_seq_only,
            **kwargs,
        )
        self._incoming_timestamps: Optional[torch.Tensor] = None
        self.timestamps: Optional[torch.Tensor] = None
        self.lengths: Optional[torch.Tensor] = None
        self.item_ids: Optional[torch.Tensor] = None

    def hand_over_timestamps(self, timestamps: torch.Tensor) -> None:
        """Timestamps [B, L] aligned with the item-id sequence of the batch about to be masked."""
        self._incoming_timestamps = timestamps

    def forward(
        self,
        inputs: torch.Tensor,
        item_ids: torch.Tensor,
        training: bool = False,
        testing: bool = False,
    ) -> torch.Tensor:
        timestamps, self._incoming_timestamps = self._incoming_timestamps, None
        real = item_ids != self.padding_idx
        lengths = real.sum(dim=1)
        self.lengths = lengths
        self.item_ids = item_ids
        self.timestamps = None
        if timestamps is not None:
            if not torch.jit.is_tracing() and timestamps.shape != item_ids.shape:
                raise ValueError(
                    f"timestamp sequence shape {tuple(timestamps.shape)} differs from the item-id "
                    f"sequence shape {tuple(item_ids.shape)}; both lists must be padded/truncated to "
                    "the same max_sequence_length (tag both with Tags.LIST)"
                )
            last = (lengths - 1).clamp(min=0).unsqueeze(1)
            self.timestamps = torch.where(real, timestamps, timestamps.gather(1, last))
        return super().forward(inputs, item_ids, training=training, testing=testing)

    def transformer_optional_arguments(self) -> Dict[str, Any]:
        arguments: Dict[str, Any] = {}
        if self.lengths is not None:
            arguments["lengths"] = self.lengths
        if self.timestamps is not None:
            arguments["timestamps"] = self.timestamps
        return arguments


# ------------------------------------------------------------------------------------------------
# Input block that routes the timestamp list to the masking
# ------------------------------------------------------------------------------------------------
def _as_core_schema(schema: Any) -> CoreSchema:
    if isinstance(schema, CoreSchema):
        return schema
    if isinstance(schema, LegacySchema):  # T4R's older schema class; same proto underneath
        return TensorflowMetadata.from_json(schema.to_json()).to_merlin_schema()
    raise TypeError(f"expected a merlin.schema.Schema, got {type(schema).__name__}")


def _check_timestamp_column(schema: CoreSchema, name: str) -> ColumnSchema:
    if name not in schema.column_names:
        raise ValueError(
            f"timestamp_column {name!r} is not in the schema (columns: {schema.column_names}); "
            "add the event-time list column to the schema"
        )
    column = schema[name]
    if not column.is_list or Tags.LIST not in column.tags:
        raise ValueError(
            f"timestamp column {name!r} must be a list column tagged Tags.LIST (is_list={column.is_list}, "
            f"tags={sorted(t.value for t in column.tags)}); the T4R loader only pads LIST-tagged columns, "
            "e.g. schema[name] = schema[name].with_tags([Tags.LIST])"
        )
    if not column.dtype.is_integer:
        raise ValueError(
            f"timestamp column {name!r} has dtype {column.dtype.name}; T4R's Model.forward casts float "
            "inputs to float32 (about 2-minute resolution at unix-epoch scale), which corrupts time "
            "gaps. Store event times as int64 (e.g. unix seconds) and declare dtype int64"
        )
    return column


class HSTUSequenceFeatures(TabularSequenceFeatures):
    """`TabularSequenceFeatures` whose timestamp list column feeds HSTU's time bias instead of the features.

    The column is removed from the feature modules (so raw times are never embedded or projected), kept in
    `.schema` (so `Model.input_schema`, the loader and serving still carry it), and in `forward` handed to
    the "hstu-clm" masking, which passes it on to `HSTUModel(timestamps=...)`.
    """

    def __init__(self, *args: Any, timestamp_column: Optional[str] = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.timestamp_column = timestamp_column

    @classmethod
    def from_schema(  # type: ignore[override]
        cls,
        schema: Any,
        timestamp_column: str,
        masking: Any = "hstu-clm",
        **kwargs: Any,
    ) -> "HSTUSequenceFeatures":
        """Same arguments as `TabularSequenceFeatures.from_schema`, plus `timestamp_column`: the int64
        event-time list aligned with the item-id list.  `masking` must be "hstu-clm" (the default) or an
        `HSTUCausalLanguageModeling` instance."""
        schema = _as_core_schema(schema)
        ts_column = _check_timestamp_column(schema, timestamp_column)
        features_schema = schema.excluding_by_name([timestamp_column])
        output = super().from_schema(features_schema, masking=masking, **kwargs)
        if not isinstance(output.masking, HSTUCausalLanguageModeling):
            raise ValueError(
                f"HSTUSequenceFeatures needs masking='hstu-clm' (HSTUCausalLanguageModeling) to carry "
                f"the timestamps to the encoder, got {type(output.masking).__name__}"
            )
        output.timestamp_column = timestamp_column
        # T4R's schema setter keeps an existing schema; clear it first so Model.input_schema (what the
        # loader and serving read) lists the timestamp column too.
        output.schema = None
        output.schema = features_schema + CoreSchema([ts_column])
        return output

    def forward(
        self, inputs: Dict[str, torch.Tensor], training: bool = False, testing: bool = False, **kwargs: Any
    ) -> torch.Tensor:
        if self.timestamp_column is not None:
            timestamps = inputs.get(self.timestamp_column)
            if timestamps is None:
                hint = "; add it to the batch (it is in model.input_schema)"
                if f"{self.timestamp_column}__values" in inputs:
                    hint = "; it is still ragged: call the tr.Model (which pads) or pad it to [batch, seq]"
                raise ValueError(f"input {self.timestamp_column!r} (event timestamps for HSTU) is missing{hint}")
            if timestamps.is_floating_point():
                raise ValueError(
                    f"input {self.timestamp_column!r} is {timestamps.dtype}; float timestamps lose the "
                    "time gaps (tr.Model casts them to float32), feed int64 event times"
                )
            if not torch.jit.is_tracing() and timestamps.dim() != 2:
                raise ValueError(
                    f"input {self.timestamp_column!r} must be a padded [batch, seq] tensor, got shape "
                    f"{tuple(timestamps.shape)}"
                )
            self.masking.hand_over_timestamps(timestamps)
        return super().forward(inputs, training=training, testing=testing, **kwargs)


# ------------------------------------------------------------------------------------------------
# Registration
# ------------------------------------------------------------------------------------------------
def _register_once(registry: Registry, key: str, value: Any) -> None:
    """Register `value` under `key` unless it already is.  A same-named class left by an
    `importlib.reload` of this module is replaced (Registry has no public overwrite); a foreign entry
    under our key is a real conflict and raises."""
    if key not in registry:
        registry[key] = value
        return
    current = registry.get(key)
    if current is value:
        return
    same_origin = (getattr(current, "__module__", None), getattr(current, "__qualname__", None)) == (
        value.__module__,
        value.__qualname__,
    )
    if not same_origin:
        raise KeyError(
            f"{registry.name} already has {key!r} registered to {current!r}; merlin_hstu cannot register "
            f"{value.__qualname__} under that name"
        )
    registry._registry[key] = value  # stale copy of our own class after a module reload


def _register_auto(model_type: str, config_cls, model_cls) -> None:
    """AutoConfig / AutoModel registration that tolerates re-imports (a stale class is replaced)."""
    if model_type not in CONFIG_MAPPING or CONFIG_MAPPING[model_type] is not config_cls:
        transformers.AutoConfig.register(model_type, config_cls)
    try:
        registered_model = transformers.MODEL_MAPPING[config_cls]
    except KeyError:
        registered_model = None
    if registered_model is not model_cls:
        transformers.AutoModel.register(config_cls, model_cls)


def register() -> None:
    """Register HSTU and the SASRec baseline with Hugging Face Auto classes and T4R's registries.  Idempotent."""
    _register_auto(HSTU_MODEL_TYPE, HSTUConfig, HSTUModel)
    _register_once(transformer_registry, HSTU_REGISTRY_KEY, T4RecHSTUConfig)
    _register_once(transformer_registry, HSTU_TIME_REGISTRY_KEY, T4RecHSTUTimeConfig)
    for key in HSTU_MASKING_KEYS:
        _register_once(masking_registry, key, HSTUCausalLanguageModeling)
    # HSTU is causal: of T4R's built-in maskings only CLM is valid (TransformerBlock checks this list).
    MappingTransformerMasking.HSTUConfig = [CausalLanguageModeling]
    _register_sasrec()


# ------------------------------------------------------------------------------------------------
# SASRec baseline (registry "sasrec"; HF model type "sasrec")
# ------------------------------------------------------------------------------------------------
SASREC_MODEL_TYPE = "sasrec"
SASREC_REGISTRY_KEY = "sasrec"


class SASRecConfig(PretrainedConfig):
    """Hugging Face configuration of the reference's SASRec baseline (`merlin_hstu.encoders.sasrec.SASRecEncoder`).

    max_position_embeddings is N, the longest padded sequence accepted and the size of the absolute
    position table; with T4R set it to the model's max_sequence_length.  intermediate_size is the FFN
    width (default: hidden_size, as in every reference config).  dropout covers the attention
    probabilities and both FFN dropouts; input_dropout (default: dropout) follows the position embedding.
    """

    model_type = SASREC_MODEL_TYPE

    def __init__(
        self,
        hidden_size: int = 64,
        num_hidden_layers: int = 2,
        num_attention_heads: int = 1,
        max_position_embeddings: int = 200,
        intermediate_size: Optional[int] = None,
        dropout: float = 0.2,
        input_dropout: Optional[float] = None,
        layer_norm_eps: float = 1e-8,
        **kwargs: Any,
    ):
        intermediate_size = hidden_size if intermediate_size is None else intermediate_size
        input_dropout = dropout if input_dropout is None else input_dropout
        if not 0.0 <= input_dropout < 1.0:
            raise ValueError(f"SASRecConfig.input_dropout must be in [0, 1), got {input_dropout}")
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.max_position_embeddings = max_position_embeddings
        self.intermediate_size = intermediate_size
        self.dropout = dropout
        self.input_dropout = input_dropout
        self.layer_norm_eps = layer_norm_eps
        super().__init__(**kwargs)
        self.encoder_config()  # validates every encoder field, with SASRecEncoderConfig's messages

    def encoder_config(self) -> SASRecEncoderConfig:
        return SASRecEncoderConfig(
            embedding_dim=self.hidden_size,
            num_blocks=self.num_hidden_layers,
            num_heads=self.num_attention_heads,
            ffn_hidden_dim=self.intermediate_size,
            dropout=self.dropout,
            max_seq_len=self.max_position_embeddings,
            layer_norm_eps=self.layer_norm_eps,
        )


class SASRecModel(PreTrainedModel):
    """SASRec as a Hugging Face model: h = SASRec^L(Dropout(x + P[0:W]) * valid) on right-padded x [B, W, D].

    As in the reference's input preprocessor, P is a learned absolute position table (truncated normal,
    std sqrt(1/D)) and positions past each length are zeroed before the first block when `lengths` is given.
    The item embedding (and the reference's sqrt(D) scale) stays in the T4R feature block.  Causal, so it
    pairs with T4R's causal LM masking ("clm"/"causal", or "hstu-clm", which also passes lengths).
    """

    config_class = SASRecConfig
    base_model_prefix = "sasrec"
    main_input_name = "inputs_embeds"

    def __init__(self, config: SASRecConfig):
        super().__init__(config)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.input_dropout = nn.Dropout(config.input_dropout)
        self.encoder = SASRecEncoder(config.encoder_config())
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        # The encoder initialises itself (reference init); only the position table is ours.
        if module is self.position_embeddings:
            positional_table_init(module.weight)

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        lengths: Optional[torch.Tensor] = None,
        timestamps: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor]:
        """inputs_embeds [B, W, D] right-padded; lengths [B] (default: all W).  Returns (hidden [B, W, D],),
        zero past lengths.  `timestamps` is in the signature only so that T4R hands them over and they can
        be refused: SASRec has no time signal, so accepting them would ignore them silently."""
        if timestamps is not None:
            raise ValueError(
                "SASRecModel got timestamps, but SASRec has no time bias and would ignore them; use "
                "TabularSequenceFeatures (not HSTUSequenceFeatures) with SASRec, or the 'hstu-time' encoder"
            )
        config = self.config
        width = inputs_embeds.shape[1]
        if not torch.jit.is_tracing():  # shape checks would only bake constants (and warn) into a trace
            if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != config.hidden_size:
                raise ValueError(
                    f"SASRecModel expects inputs_embeds [batch, seq, hidden_size={config.hidden_size}], got "
                    f"{tuple(inputs_embeds.shape)}; project the features to hidden_size (T4R: d_output=)"
                )
            if width > config.max_position_embeddings:
                raise ValueError(
                    f"sequence length {width} exceeds SASRecConfig.max_position_embeddings="
                    f"{config.max_position_embeddings}; raise it (T4R: total_seq_length=) or set "
                    "max_sequence_length on the T4R model/trainer to truncate"
                )
        positions = torch.arange(width, device=inputs_embeds.device)
        x = self.input_dropout(inputs_embeds + self.position_embeddings(positions).unsqueeze(0))
        if lengths is not None:
            x = x * (positions.unsqueeze(0) < lengths.unsqueeze(1)).unsqueeze(-1).to(x.dtype)
        return (self.encoder(x, lengths=lengths),)


class T4RecSASRecConfig(T4RecConfig, SASRecConfig):
    """What `TransformerBlock.from_registry("sasrec", ...)` builds (T4R reads the HF config from
    `__bases__[1]`, i.e. SASRecConfig -> SASRecModel)."""

    @classmethod
    def build(
        cls,
        d_model: int,
        n_head: int,
        n_layer: int,
        total_seq_length: int,
        dropout: float = 0.2,
        **kwargs: Any,
    ) -> "T4RecSASRecConfig":
        return cls(
            hidden_size=d_model,
            num_attention_heads=n_head,
            num_hidden_layers=n_layer,
            max_position_embeddings=total_seq_length,
            dropout=dropout,
            **kwargs,
        )


def _register_sasrec() -> None:
    """Register SASRec with the Hugging Face Auto classes and T4R's transformer registry.  Idempotent."""
    _register_auto(SASREC_MODEL_TYPE, SASRecConfig, SASRecModel)
    _register_once(transformer_registry, SASREC_REGISTRY_KEY, T4RecSASRecConfig)
    # SASRec is causal: of T4R's built-in maskings only CLM is valid.
    MappingTransformerMasking.SASRecConfig = [CausalLanguageModeling]


__all__ = [
    "HSTUConfig",
    "HSTUModel",
    "T4RecHSTUConfig",
    "T4RecHSTUTimeConfig",
    "HSTUCausalLanguageModeling",
    "HSTUSequenceFeatures",
    "SASRecConfig",
    "SASRecModel",
    "T4RecSASRecConfig",
    "GenerativeRetrievalTask",
    "register",
]

# The generative-retrieval task (losses, negatives, MoL) lives in its own module; T4R has no task registry, so it
# is used by instance and re-exported here beside the encoders.
from merlin_hstu.t4r.retrieval import GenerativeRetrievalTask  # noqa: E402

# Importing this module registers (idempotent); `import merlin_hstu` arranges for this import to happen as soon
# as transformers4rec.torch or transformers is imported (see merlin_hstu/__init__.py).
register()
