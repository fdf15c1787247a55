"""Transformers4Rec integration of HSTU (merlin_hstu.t4r.encoders).

The numeric checks compare the T4R model against `plain_hstu` below: an independent, loop-per-sequence
re-implementation of the research HSTU math that takes explicit per-row query times and per-column key times.
"""
from __future__ import annotations

import importlib
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import merlin_hstu
import merlin_hstu.t4r.encoders as t4r
import transformers
import transformers4rec.torch as tr
from merlin.models.utils.registry import Registry
from merlin.schema import ColumnSchema, Schema, Tags
from transformers4rec.config.transformer import transformer_registry
from transformers4rec.torch.masking import MaskedLanguageModeling, masking_registry

DOC = Path(__file__).resolve().parents[1] / "docs" / "t4r.md"
MAX_LEN = 8
D_MODEL = 16
N_ITEMS = 60


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
def list_column(name: str, dtype: str, tags, max_id: int | None = None) -> ColumnSchema:
    properties = {"domain": {"min": 0, "max": max_id, "name": name}} if max_id else {}
    return ColumnSchema(
        name, dtype=dtype, tags=tags, is_list=True, is_ragged=True, dims=(None, (1, MAX_LEN)),
        properties=properties,
    )


def small_schema(ts_dtype: str = "int64", ts_tags=(Tags.LIST, Tags.TIME, Tags.CONTINUOUS)) -> Schema:
    return Schema(
        [
            list_column("item_id-list", "int64", [Tags.ITEM, Tags.ID, Tags.CATEGORICAL, Tags.LIST], N_ITEMS - 1),
            list_column("timestamp-list", ts_dtype, list(ts_tags)),
        ]
    )


def build_model(
    time_bias: bool = True, masking: str = "hstu-clm", with_timestamps: bool = True, eval_last_only: bool = True,
    seed: int = 0,
):
    """items (+ timestamps) -> d_output projection -> masking -> HSTU -> next-item task (weight tied)."""
    torch.manual_seed(seed)
    common = dict(
        max_sequence_length=MAX_LEN, embedding_dim_default=D_MODEL, d_output=D_MODEL, masking=masking,
        eval_on_last_item_seq_only=eval_last_only,
    )
    if with_timestamps:
        inputs = t4r.HSTUSequenceFeatures.from_schema(small_schema(), timestamp_column="timestamp-list", **common)
    else:
        items_only = small_schema().excluding_by_name(["timestamp-list"])
        inputs = tr.TabularSequenceFeatures.from_schema(items_only, **common)
    config = t4r.T4RecHSTUConfig.build(D_MODEL, 2, 2, MAX_LEN, dropout=0.0, time_bias=time_bias)
    encoder = tr.TransformerBlock(config, masking=inputs.masking)
    body = tr.SequentialBlock(inputs, encoder)
    return tr.Model(tr.Head(body, tr.NextItemPredictionTask(weight_tying=True)))


def padded_batch(lengths, seed: int = 1):
    """Right-padded batch; item ids are distinct within a row (so an id identifies its position) and
    time gaps span seconds to weeks (so many time buckets are used)."""
    g = torch.Generator().manual_seed(seed)
    items = torch.zeros(len(lengths), MAX_LEN, dtype=torch.long)
    times = torch.zeros(len(lengths), MAX_LEN, dtype=torch.long)
    for b, n in enumerate(lengths):
        items[b, :n] = torch.randperm(N_ITEMS - 1, generator=g)[:n] + 1
        gaps = (10 ** (torch.rand(n, generator=g) * 6)).long()  # 1 s .. ~12 days
        times[b, :n] = 1_700_000_000 + gaps.cumsum(0)
    return {"item_id-list": items, "timestamp-list": times}


def time_bucket(gap: torch.Tensor, num_buckets: int) -> torch.Tensor:
    gap = gap.to(torch.float64).abs().clamp(min=1.0)
    return torch.clamp(torch.floor(torch.log(gap) / 0.301), 0, num_buckets).long()


def plain_hstu(model: t4r.HSTUModel, x, lengths, query_times, key_times):
    """Research HSTU, one sequence at a time: x [B, W, D] -> [B, W, D] (rows >= len left at zero)."""
    cfg = model.config
    n = cfg.max_position_embeddings
    h, dqk, dv = cfg.num_attention_heads, cfg.attention_dim, cfg.linear_dim
    out = torch.zeros_like(x)
    for b in range(x.shape[0]):
        length = int(lengths[b])
        z = x[b, :length] * math.sqrt(cfg.hidden_size) ** (cfg.input_scale == "sqrt_d") \
            + model.position_embeddings.weight[:length]
        for layer in model.encoder.layers:
            zn = F.layer_norm(z, (z.shape[-1],), eps=cfg.layer_norm_eps)
            proj = F.silu(zn @ layer.uvqk)
            u, v = proj[:, : h * dv], proj[:, h * dv : 2 * h * dv]
            q, k = proj[:, 2 * h * dv : 2 * h * dv + h * dqk], proj[:, 2 * h * dv + h * dqk :]
            i = torch.arange(length).unsqueeze(1)
            j = torch.arange(length).unsqueeze(0)
            bias = layer.relative_bias.position_weights[j - i + n - 1]
            if cfg.time_bias:
                gaps = query_times[b, :length].unsqueeze(1) - key_times[b, :length].unsqueeze(0)
                bias = bias + layer.relative_bias.time_weights[time_bucket(gaps, cfg.num_time_buckets)]
            heads = []
            for head in range(h):
                qh, kh = q[:, head * dqk : (head + 1) * dqk], k[:, head * dqk : (head + 1) * dqk]
                vh = v[:, head * dv : (head + 1) * dv]
                scores = F.silu(qh @ kh.T + bias) / n
                heads.append(torch.tril(scores) @ vh)
            attn = F.layer_norm(torch.cat(heads, dim=-1), (h * dv,), eps=cfg.layer_norm_eps)
            z = z + layer.output(u * attn)
        out[b, :length] = z
    return out


def body_and_inputs(model):
    body = model.heads[0].body
    return body, body[0], body[1].transformer


def params_snapshot(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def python_blocks(markdown: str):
    return re.findall(r"```python\n(.*?)```", markdown, flags=re.S)


# ------------------------------------------------------------------------------------------------
# registration
# ------------------------------------------------------------------------------------------------
def test_registration_after_import_and_idempotent():
    def snapshot():
        return (
            transformer_registry["hstu"],
            transformer_registry["hstu-time"],
            masking_registry["hstu-clm"],
            masking_registry["hstu-causal"],
            transformers.AutoConfig.for_model("hstu").__class__,
            transformers.MODEL_MAPPING[t4r.HSTUConfig],
        )

    expected = (
        t4r.T4RecHSTUConfig,
        t4r.T4RecHSTUTimeConfig,
        t4r.HSTUCausalLanguageModeling,
        t4r.HSTUCausalLanguageModeling,
        t4r.HSTUConfig,
        t4r.HSTUModel,
    )
    assert snapshot() == expected
    t4r.register()
    t4r.register()
    importlib.reload(merlin_hstu)
    assert snapshot() == expected
    assert merlin_hstu.HSTUModel is t4r.HSTUModel
    # the T4R masking compatibility table: HSTU is causal-only among T4R's built-in maskings
    from transformers4rec.torch.masking import CausalLanguageModeling
    from transformers4rec.torch.utils.torch_utils import MappingTransformerMasking

    assert MappingTransformerMasking.HSTUConfig == [CausalLanguageModeling]


def test_register_once_replaces_stale_reload_copy_and_rejects_foreign():
    registry = Registry("scratch")

    class Encoder:  # noqa: D401 - stand-ins for registry values
        pass

    t4r._register_once(registry, "k", Encoder)
    t4r._register_once(registry, "k", Encoder)
    assert list(registry) == ["k"] and registry["k"] is Encoder

    stale = type("Encoder", (), {"__module__": Encoder.__module__, "__qualname__": Encoder.__qualname__})
    registry._registry["k"] = stale  # what a module reload leaves behind
    t4r._register_once(registry, "k", Encoder)
    assert registry["k"] is Encoder

    class Foreign:
        pass

    with pytest.raises(KeyError, match="already has 'k' registered"):
        t4r._register_once(registry, "k", Foreign)


def test_from_registry_builds_hstu_and_rejects_non_causal_masking():
    inputs = tr.TabularSequenceFeatures.from_schema(
        small_schema().excluding_by_name(["timestamp-list"]),
        max_sequence_length=MAX_LEN, d_output=D_MODEL, masking="causal",
    )
    block = tr.TransformerBlock.from_registry(
        "hstu", d_model=D_MODEL, n_head=2, n_layer=3, total_seq_length=MAX_LEN, masking=inputs.masking
    )
    hstu = block.transformer
    assert isinstance(hstu, t4r.HSTUModel)
    config = hstu.config
    assert (config.hidden_size, config.num_attention_heads, config.num_hidden_layers) == (D_MODEL, 2, 3)
    assert hstu.config.max_position_embeddings == MAX_LEN and hstu.config.attention_dim == D_MODEL // 2
    assert not hstu.config.time_bias and len(hstu.encoder.layers) == 3
    assert block.forward_output_size(torch.Size([4, MAX_LEN, D_MODEL])) == torch.Size([4, MAX_LEN, D_MODEL])

    timed = tr.TransformerBlock.from_registry(
        "hstu-time", d_model=D_MODEL, n_head=2, n_layer=1, total_seq_length=MAX_LEN
    )
    assert timed.transformer.config.time_bias

    with pytest.raises(ValueError, match="not supported"):
        tr.TransformerBlock.from_registry(
            "hstu", d_model=D_MODEL, n_head=2, n_layer=1, total_seq_length=MAX_LEN,
            masking=MaskedLanguageModeling(hidden_size=D_MODEL),
        )


# ------------------------------------------------------------------------------------------------
# Hugging Face round trip
# ------------------------------------------------------------------------------------------------
def test_auto_config_and_model_round_trip(tmp_path):
    torch.manual_seed(0)
    config = t4r.HSTUConfig(
        hidden_size=12, num_attention_heads=3, num_hidden_layers=2, max_position_embeddings=10,
        attention_dim=5, linear_dim=6, dropout=0.1, time_bias=True, num_time_buckets=32,
    )
    model = t4r.HSTUModel(config).eval()
    model.save_pretrained(tmp_path)

    loaded_config = transformers.AutoConfig.from_pretrained(tmp_path)
    assert type(loaded_config) is t4r.HSTUConfig
    for field in ("hidden_size", "num_attention_heads", "attention_dim", "linear_dim", "dropout", "input_dropout",
                  "time_bias", "num_time_buckets", "max_position_embeddings"):
        assert getattr(loaded_config, field) == getattr(config, field), field
    loaded = transformers.AutoModel.from_pretrained(tmp_path).eval()
    assert type(loaded) is t4r.HSTUModel

    x = torch.randn(3, 7, 12)
    times = torch.randint(0, 10**6, (3, 7)).sort(dim=1).values
    lengths = torch.tensor([7, 4, 1])
    expected = model(x, timestamps=times, lengths=lengths)[0]
    torch.testing.assert_close(loaded(x, timestamps=times, lengths=lengths)[0], expected, rtol=0, atol=0)
    assert expected[1, 4:].abs().max() == 0 and expected[1, :4].abs().min() > 0

    # a T4R-built encoder saves as model_type "hstu" and loads back through AutoModel
    block = tr.TransformerBlock.from_registry("hstu", d_model=8, n_head=2, n_layer=1, total_seq_length=6)
    block.transformer.save_pretrained(tmp_path / "t4r")
    assert type(transformers.AutoModel.from_pretrained(tmp_path / "t4r")) is t4r.HSTUModel


def test_config_and_model_errors():
    with pytest.raises(ValueError, match="not divisible by num_attention_heads"):
        t4r.HSTUConfig(hidden_size=10, num_attention_heads=3)
    with pytest.raises(ValueError, match="num_hidden_layers must be a positive int"):
        t4r.HSTUConfig(num_hidden_layers=0)
    with pytest.raises(ValueError, match="dropout must be in"):
        t4r.HSTUConfig(dropout=1.0)

    small = dict(hidden_size=8, num_attention_heads=2, max_position_embeddings=5)
    timed = t4r.HSTUModel(t4r.HSTUConfig(**small, time_bias=True))
    plain = t4r.HSTUModel(t4r.HSTUConfig(**small))
    x = torch.randn(2, 5, 8)
    with pytest.raises(ValueError, match="time_bias=True but got no timestamps"):
        timed(x)
    with pytest.raises(ValueError, match="built with time_bias=False"):
        plain(x, timestamps=torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="exceeds HSTUConfig.max_position_embeddings=5"):
        plain(torch.randn(2, 6, 8))
    with pytest.raises(ValueError, match="hidden_size=8"):
        plain(torch.randn(2, 5, 7))
    with pytest.raises(ValueError, match=r"timestamps must be \[batch, seq\]"):
        timed(x, timestamps=torch.zeros(2, 4, dtype=torch.long))


def test_kernel_switch_reaches_the_encoder_and_survives_save_load(tmp_path, one_thread):
    from merlin_hstu.kernels.dispatch import use_kernel

    assert t4r.HSTUConfig().kernel == "auto" and t4r.HSTUConfig().encoder_config().kernel == "auto"
    for build in (t4r.T4RecHSTUConfig.build, t4r.T4RecHSTUTimeConfig.build):
        torch.manual_seed(0)
        block = tr.TransformerBlock(build(D_MODEL, 2, 2, MAX_LEN, dropout=0.0, kernel="pytorch"))
        hstu = block.transformer.eval()
        assert type(hstu) is t4r.HSTUModel and hstu.config.kernel == "pytorch"
        # what STULayer.forward hands resolve_kernel is its layer config's kernel
        assert [layer.config.kernel for layer in hstu.encoder.layers] == ["pytorch", "pytorch"]

        hstu.save_pretrained(tmp_path / build.__qualname__)
        loaded = transformers.AutoModel.from_pretrained(tmp_path / build.__qualname__).eval()
        assert loaded.config.kernel == "pytorch" and loaded.encoder.config.kernel == "pytorch"

        # An explicit kernel beats the global default: under use_kernel("triton") this CPU model still runs the
        # PyTorch path, bit for bit (a kernel left at "auto" would try Triton on CPU tensors here).
        x = torch.randn(2, MAX_LEN, D_MODEL)
        times = torch.arange(MAX_LEN).repeat(2, 1) * 3600 if hstu.config.time_bias else None
        lengths = torch.tensor([MAX_LEN, 3])
        expected = hstu(x, timestamps=times, lengths=lengths)[0]
        with use_kernel("triton"):
            got = loaded(x, timestamps=times, lengths=lengths)[0]
        torch.testing.assert_close(got, expected, rtol=0, atol=0)

    kernel_error = r"HSTUConfig\.kernel must be one of 'pytorch', 'triton', 'auto', got 'cuda'"
    with pytest.raises(ValueError, match=kernel_error):
        t4r.T4RecHSTUConfig.build(D_MODEL, 2, 2, MAX_LEN, kernel="cuda")
    with pytest.raises(ValueError, match=kernel_error):
        t4r.T4RecHSTUTimeConfig.build(D_MODEL, 2, 2, MAX_LEN, kernel="cuda")
    with pytest.raises(ValueError, match=kernel_error):
        t4r.HSTUConfig(kernel="cuda")


# ------------------------------------------------------------------------------------------------
# HSTUSequenceFeatures: schema handling and errors
# ------------------------------------------------------------------------------------------------
def test_sequence_features_route_timestamps_out_of_the_features():
    model = build_model()
    _, inputs, _ = body_and_inputs(model)
    # the timestamp list is tagged CONTINUOUS but must not become a dense feature...
    assert "continuous_module" not in inputs.to_merge
    # ...while the model's input contract (loader, serving) still carries it
    assert set(model.input_schema.column_names) == {"item_id-list", "timestamp-list"}
    assert isinstance(inputs.masking, t4r.HSTUCausalLanguageModeling)


def test_sequence_features_errors():
    def make(schema, timestamp_column="timestamp-list", **kwargs):
        kwargs = dict(dict(max_sequence_length=MAX_LEN, d_output=D_MODEL), **kwargs)
        return t4r.HSTUSequenceFeatures.from_schema(schema, timestamp_column=timestamp_column, **kwargs)

    with pytest.raises(ValueError, match="'event_time' is not in the schema"):
        make(small_schema(), timestamp_column="event_time")
    with pytest.raises(ValueError, match="'timestamp-list' has dtype float64.*int64"):
        make(small_schema(ts_dtype="float64"))
    with pytest.raises(ValueError, match="'timestamp-list' must be a list column tagged Tags.LIST"):
        make(small_schema(ts_tags=(Tags.TIME,)))
    with pytest.raises(ValueError, match="needs masking='hstu-clm'"):
        make(small_schema(), masking="causal")

    # T4R's legacy (merlin_standard_lib) schemas are accepted too: converted, then checked the same way
    from transformers4rec.data import tabular_sequence_testing_data

    with pytest.raises(ValueError, match="'ts/list' is not in the schema .*'item_id/list'"):
        make(tabular_sequence_testing_data.schema, timestamp_column="ts/list")

    model = build_model().eval()
    batch = padded_batch([3, 5])
    with pytest.raises(ValueError, match="input 'timestamp-list' .* is missing"):
        model({"item_id-list": batch["item_id-list"]})
    with pytest.raises(ValueError, match="'timestamp-list' is torch.float32.*int64"):
        model({"item_id-list": batch["item_id-list"], "timestamp-list": batch["timestamp-list"].double()})
    with pytest.raises(ValueError, match="differs from the item-id sequence shape"):
        short_times = batch["timestamp-list"][:, :4]
        model.heads[0].body({"item_id-list": batch["item_id-list"], "timestamp-list": short_times})


# ------------------------------------------------------------------------------------------------
# time alignment against the plain implementation, in T4R's three modes
# ------------------------------------------------------------------------------------------------
def semantic_times(batch, predicted, columns_items):
    """Query time of row i = timestamp of the item row i predicts (looked up by its id); key time of column
    j = timestamp of the item embedded at column j.  Rows predicting padding and columns holding no item
    (mask embedding) get time 0: only rows T4R never reads can see them."""
    items, times = batch["item_id-list"], batch["timestamp-list"]
    query = torch.zeros_like(times)
    key = torch.zeros_like(times)
    for b in range(items.shape[0]):
        time_of = {int(item): int(t) for item, t in zip(items[b], times[b]) if item != 0}
        for i in range(items.shape[1]):
            if int(predicted[b, i]) in time_of:
                query[b, i] = time_of[int(predicted[b, i])]
            if int(columns_items[b, i]) in time_of:
                key[b, i] = time_of[int(columns_items[b, i])]
    return query, key


def embedded_items(masked_x, unmasked_x, items):
    """Which item sits at each column of the masked input: match against the unmasked embeddings."""
    found = torch.zeros_like(items)
    for b in range(items.shape[0]):
        for j in range(items.shape[1]):
            hits = [jj for jj in range(items.shape[1]) if torch.equal(masked_x[b, j], unmasked_x[b, jj])]
            if hits and items[b, hits[0]] != 0:
                found[b, j] = items[b, hits[0]]
    return found


@pytest.mark.parametrize("mode", ["training", "testing"])
def test_time_alignment_matches_plain_hstu_in_train_and_eval(mode):
    model = build_model().eval()  # eval(): no dropout; the T4R mode comes from the flags
    body, inputs, hstu = body_and_inputs(model)
    batch = padded_batch([8, 5, 2, 6])
    flags = {"training": mode == "training", "testing": mode == "testing"}
    with torch.no_grad():
        unmasked = inputs(dict(batch))  # inference mode: column j = item j
        masked = inputs(dict(batch), **flags)
        labels = inputs.masking.masked_targets.clone()
        out = body(dict(batch), **flags)
    # What each row predicts under CLM (also the rows eval does not score: deeper layers read their states).
    predicted = inputs.masking.predict_all(batch["item_id-list"]).targets
    supervised = labels != 0
    assert torch.equal(labels[supervised], predicted[supervised])
    lengths = (batch["item_id-list"] != 0).sum(1)
    query, key = semantic_times(batch, predicted, embedded_items(masked, unmasked, batch["item_id-list"]))
    expected = plain_hstu(hstu, masked, lengths, query, key)

    if mode == "testing":  # eval_on_last_item_seq_only: only the row before the last item is scored
        assert supervised.sum(1).tolist() == [1, 1, 1, 1]
        assert supervised[torch.arange(4), lengths - 2].all()
    else:
        assert supervised.sum(1).tolist() == (lengths - 1).tolist()
    torch.testing.assert_close(out[supervised], expected[supervised], rtol=1e-5, atol=1e-5)
    # the query time really is the label's timestamp (not the row's own, not a neighbour's)
    rows, cols = supervised.nonzero(as_tuple=True)
    assert torch.equal(query[rows, cols], batch["timestamp-list"][rows, cols + 1])


def test_time_alignment_at_inference_uses_last_event_time():
    model = build_model().eval()
    body, inputs, hstu = body_and_inputs(model)
    batch = padded_batch([8, 5, 2, 6], seed=3)
    with torch.no_grad():
        x = inputs(dict(batch))
        out = body(dict(batch))
        logits = model(dict(batch))
    items, times = batch["item_id-list"], batch["timestamp-list"]
    lengths = (items != 0).sum(1)
    last = lengths - 1
    # key j = t[j]; query i = t[i+1], and for the last real row (the one T4R reads) the last event time
    query = torch.zeros_like(times)
    for b in range(4):
        for i in range(int(lengths[b])):
            query[b, i] = times[b, i + 1] if i + 1 < lengths[b] else times[b, last[b]]
    expected = plain_hstu(hstu, x, lengths, query, times)
    rows = torch.arange(4)
    torch.testing.assert_close(out[rows, last], expected[rows, last], rtol=1e-5, atol=1e-5)
    real = items != 0
    torch.testing.assert_close(out[real], expected[real], rtol=1e-5, atol=1e-5)
    # the task reads exactly that row: logits = h_last @ W_item^T
    task = model.heads[0].prediction_task_dict["next-item"]
    torch.testing.assert_close(logits, task.pre(out[rows, last])[0], rtol=1e-5, atol=1e-5)


def test_timestamps_change_outputs_only_through_gaps():
    model = build_model().eval()
    batch = padded_batch([6, 4, 7])
    times = batch["timestamp-list"]
    stretched = dict(batch, **{"timestamp-list": times[:, :1] + (times - times[:, :1]) * 50})
    offset = dict(batch, **{"timestamp-list": times + 123_456})
    with torch.no_grad():
        base = model(dict(batch))
        assert (model(stretched) - base).abs().max() > 1e-4
        # only gaps enter the bias: a constant offset changes nothing
        torch.testing.assert_close(model(offset), base, rtol=0, atol=0)


def test_lengths_route_equals_plain_causal_masking_and_unused_timestamps_raise():
    """'hstu' with T4R's plain "causal" masking (full padded width) equals "hstu-clm" (which passes
    lengths) at every row T4R reads, for the same weights."""
    batch = padded_batch([6, 4, 7, 2])
    items_only = {"item_id-list": batch["item_id-list"]}
    causal = build_model(time_bias=False, masking="causal", with_timestamps=False, seed=5).eval()
    with_lengths = build_model(time_bias=False, masking="hstu-clm", with_timestamps=False, seed=6).eval()
    with_lengths.load_state_dict(causal.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(with_lengths(dict(items_only)), causal(dict(items_only)), rtol=1e-5, atol=1e-5)
        a = with_lengths(dict(items_only), testing=True)
        b = causal(dict(items_only), testing=True)
        torch.testing.assert_close(a["predictions"], b["predictions"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a["loss"], b["loss"], rtol=1e-5, atol=1e-5)
    # timestamps wired to an encoder without time bias would be silently unused: refuse
    no_time_bias = build_model(time_bias=False, masking="hstu-clm", with_timestamps=True).eval()
    with pytest.raises(ValueError, match="built with time_bias=False"):
        no_time_bias(dict(batch))


def test_causality_through_the_t4r_model():
    model = build_model(eval_last_only=False).eval()
    batch = padded_batch([8, 8, 8], seed=7)
    k = 5
    changed = {key: value.clone() for key, value in batch.items()}
    for b in range(3):  # replace item k by an id the row does not contain yet
        unused = sorted(set(range(1, N_ITEMS)) - set(batch["item_id-list"][b].tolist()))
        changed["item_id-list"][b, k] = unused[0]
    later_time = {key: value.clone() for key, value in batch.items()}
    later_time["timestamp-list"][:, k + 1 :] += 10_000_000
    with torch.no_grad():
        # testing mode with predict-all labels: one logits row per (sequence, position < len-1)
        base = model(dict(batch), testing=True)["predictions"].view(3, MAX_LEN - 1, -1)
        item_changed = model(changed, testing=True)["predictions"].view(3, MAX_LEN - 1, -1)
        time_changed = model(later_time, testing=True)["predictions"].view(3, MAX_LEN - 1, -1)
    # rows before k never see item k (row k-1 predicts it, so its label differs, not its logits)
    torch.testing.assert_close(item_changed[:, :k], base[:, :k], rtol=0, atol=0)
    assert (item_changed[:, k:] - base[:, k:]).abs().max() > 1e-6
    # row i uses timestamps 0..i+1 (t[i+1] is the predicted item's time): rows < k unchanged, row k changes
    torch.testing.assert_close(time_changed[:, :k], base[:, :k], rtol=0, atol=0)
    assert (time_changed[:, k] - base[:, k]).abs().max() > 1e-6


# ------------------------------------------------------------------------------------------------
# training, tracing
# ------------------------------------------------------------------------------------------------
def test_training_reduces_loss_on_a_fixed_batch():
    model = build_model()
    model.train()
    batch = padded_batch([8, 7, 6, 8, 5, 8], seed=11)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = model(dict(batch), training=True)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    time_weights = model.heads[0].body[1].transformer.encoder.layers[0].relative_bias.time_weights
    assert time_weights.grad is not None and time_weights.grad.abs().sum() > 0
    assert math.isfinite(losses[-1]) and losses[-1] < 0.5 * losses[0]


def ragged(batch):
    """Padded dict -> the Merlin loader / serving layout (values + offsets)."""
    out = {}
    for name, padded in batch.items():
        mask = batch["item_id-list"] != 0
        lengths = mask.sum(1)
        out[f"{name}__values"] = padded[mask]
        out[f"{name}__offsets"] = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    return out


def test_jit_trace_matches_eager():
    model = build_model().eval()
    example = ragged(padded_batch([3, 7, 5], seed=2))
    with torch.no_grad():
        traced = torch.jit.trace(model, (example,), strict=True)
        for lengths, seed in (([3, 7, 5], 2), ([2, 4], 4), ([8, 1, 6, 8], 5)):
            batch = ragged(padded_batch(lengths, seed=seed))
            eager = model(batch)
            torch.testing.assert_close(traced(batch), eager, rtol=1e-6, atol=1e-6)
            assert eager.shape == (len(lengths), N_ITEMS)


# ------------------------------------------------------------------------------------------------
# the user guide's snippet, run as written: T4R Trainer on T4R's packaged sessions
# ------------------------------------------------------------------------------------------------
def test_doc_snippet_trains_and_evaluates(tmp_path, monkeypatch):
    blocks = python_blocks(DOC.read_text())
    assert len(blocks) >= 2, "docs/t4r.md lost its runnable snippets"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(blocks[0], f"{DOC}:build", "exec"), namespace)
    model = namespace["model"]
    encoder = model.heads[0].body[1].transformer
    assert isinstance(encoder, t4r.HSTUModel) and encoder.config.time_bias
    before = params_snapshot(model)

    exec(compile(blocks[1], f"{DOC}:train", "exec"), namespace)
    assert math.isfinite(namespace["train_output"].training_loss)
    after = dict(model.named_parameters())
    changed = [name for name, value in before.items() if not torch.equal(value, after[name].detach())]
    assert any("time_weights" in name for name in changed), changed
    assert any("uvqk" in name for name in changed), changed
    metrics = namespace["metrics"]
    for key in ("ndcg_at_10", "recall_at_10", "avg_precision_at_10"):
        value = metrics[f"eval_/next-item/{key}"]
        assert 0.0 <= value <= 1.0, (key, value)
    assert math.isfinite(metrics["eval_/loss"])


def test_doc_hugging_face_snippet():
    blocks = python_blocks(DOC.read_text())
    assert len(blocks) == 3, "docs/t4r.md: expected the build, train and Hugging Face snippets"
    namespace: dict = {"merlin_hstu": merlin_hstu}
    exec(compile(blocks[2], f"{DOC}:hf", "exec"), namespace)
    same, hstu = namespace["same"], namespace["hstu"]
    assert type(same) is t4r.HSTUModel and same.config.model_type == "hstu" and same.config.time_bias
    x = torch.randn(2, 20, 32)
    times = torch.arange(40).view(2, 20) * 1000
    with torch.no_grad():
        torch.testing.assert_close(same.eval()(x, timestamps=times)[0], hstu.eval()(x, timestamps=times)[0])


# ------------------------------------------------------------------------------------------------
# generative retrieval task (merlin_hstu.t4r.retrieval)
# ------------------------------------------------------------------------------------------------
SMALL_MOL = dict(query_hidden_dim=16, component_dim=8, gate_query_hidden_dim=8, gate_item_hidden_dim=8,
                 gate_logits_hidden_dim=8, item_dropout=0.0, gate_dropout=0.0)


def build_retrieval_model(seed: int = 0, **options):
    torch.manual_seed(seed)
    inputs = t4r.HSTUSequenceFeatures.from_schema(
        small_schema(), timestamp_column="timestamp-list", max_sequence_length=MAX_LEN,
        embedding_dim_default=D_MODEL, d_output=D_MODEL, masking="hstu-clm")
    config = t4r.T4RecHSTUConfig.build(D_MODEL, 2, 2, MAX_LEN, dropout=0.0, time_bias=True)
    body = tr.SequentialBlock(inputs, tr.TransformerBlock(config, masking=inputs.masking))
    return tr.Model(tr.Head(body, merlin_hstu.GenerativeRetrievalTask(**options)))


RETRIEVAL_OPTIONS = [
    dict(num_negatives=16),
    dict(num_negatives=16, negatives="in_batch", logq_correction=True),
    dict(loss="full_softmax", l2_norm=False, temperature=1.0),
    dict(loss="bce", num_negatives=1, temperature=1.0),
    dict(num_negatives=16, similarity="mol", query_norm="layer_norm", l2_norm=False, temperature=1.0,
         mol=SMALL_MOL, mi_loss_weight=0.001),
]


@pytest.mark.parametrize("options", RETRIEVAL_OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()
                                                                            if k != "mol"))
def test_retrieval_task_trains_with_every_option(options):
    model = build_retrieval_model(**options).train()
    batch = padded_batch([8, 7, 6, 8, 5, 8], seed=11)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        torch.manual_seed(5)  # the same negatives every step: one fixed problem
        loss = model(dict(batch), training=True)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses) and losses[-1] < 0.7 * losses[0], losses


def test_retrieval_task_full_softmax_matches_a_plain_loop_on_the_clm_targets():
    model = build_retrieval_model(loss="full_softmax", temperature=0.5).train()
    lengths = [8, 3, 6]
    batch = padded_batch(lengths, seed=3)
    out = model(dict(batch), training=True)
    # CLM: position i predicts item i + 1, padding never a label
    want_labels = [int(v) for b, n in enumerate(lengths) for v in batch["item_id-list"][b, 1:n]]
    assert out["labels"].tolist() == want_labels
    table = model.heads[0].prediction_task_dict["next-item"].item_embedding_table.weight.detach().double()
    items = table / table.norm(dim=-1, keepdim=True).clamp(min=1e-6)
    total = 0.0
    for u, y in zip(out["predictions"].double(), want_labels):
        logits = [float(u @ items[j]) / 0.5 for j in range(1, N_ITEMS)]  # every id but padding 0
        m = max(logits)
        total += m + math.log(sum(math.exp(v - m) for v in logits)) - logits[y - 1]
    assert out["loss"].item() == pytest.approx(total / len(want_labels), rel=1e-5)


def test_retrieval_task_without_history_negatives_matches_a_plain_loop():
    """history_negatives=False: position i's softmax leaves out the ids its row showed it (0..i), except its
    own positive, which the plain loop keeps even when it was seen before (row 0 repeats an item)."""
    model = build_retrieval_model(loss="full_softmax", temperature=0.5, history_negatives=False).train()
    lengths = [8, 3, 6]
    batch = padded_batch(lengths, seed=3)
    batch["item_id-list"][0, 5] = batch["item_id-list"][0, 1]  # position 4's positive was seen at position 1
    ids = batch["item_id-list"]
    out = model(dict(batch), training=True)
    targets = [(b, i, int(ids[b, i + 1])) for b, n in enumerate(lengths) for i in range(n - 1)]
    assert out["labels"].tolist() == [y for _, _, y in targets]
    table = model.heads[0].prediction_task_dict["next-item"].item_embedding_table.weight.detach().double()
    items = table / table.norm(dim=-1, keepdim=True).clamp(min=1e-6)
    total = everything = 0.0
    for u, (b, i, y) in zip(out["predictions"].double(), targets):
        seen = set(ids[b, :i + 1].tolist()) - {y}
        logits = {j: float(u @ items[j]) / 0.5 for j in range(1, N_ITEMS)}
        kept = [v for j, v in logits.items() if j not in seen]
        total += math.log(sum(math.exp(v) for v in kept)) - logits[y]
        everything += math.log(sum(math.exp(v) for v in logits.values())) - logits[y]
    assert out["loss"].item() == pytest.approx(total / len(targets), rel=1e-5)
    assert total < everything - 1e-3  # the seen items did leave the softmax


def test_retrieval_task_history_negatives_needs_the_hstu_masking():
    with pytest.raises(ValueError, match="history_negatives"):
        merlin_hstu.GenerativeRetrievalTask(history_negatives=False)  # the sampled softmax: refused
    torch.manual_seed(0)
    items_only = small_schema().excluding_by_name(["timestamp-list"])
    inputs = tr.TabularSequenceFeatures.from_schema(items_only, max_sequence_length=MAX_LEN,
                                                    embedding_dim_default=D_MODEL, d_output=D_MODEL,
                                                    masking="causal")
    config = t4r.T4RecHSTUConfig.build(D_MODEL, 2, 2, MAX_LEN, dropout=0.0, time_bias=False)
    body = tr.SequentialBlock(inputs, tr.TransformerBlock(config, masking=inputs.masking))
    task = merlin_hstu.GenerativeRetrievalTask(loss="full_softmax", history_negatives=False)
    with pytest.raises(ValueError, match="masking='hstu-clm'"):  # at construction, not at the first batch
        tr.Model(tr.Head(body, task))


def test_retrieval_task_evaluation_inference_top_k_and_trace():
    model = build_retrieval_model(similarity="mol", query_norm="layer_norm", l2_norm=False, temperature=1.0,
                                  mol=SMALL_MOL, topk_chunk_size=16).eval()  # 60 items: 4 chunks
    batch = padded_batch([3, 7, 5], seed=2)
    with torch.no_grad():
        evaluated = model(dict(batch), testing=True)
        # evaluation scores the last item of each session (eval_on_last_item_seq_only) against every item
        assert evaluated["predictions"].shape == (3, N_ITEMS) and math.isfinite(evaluated["loss"].item())
        scores = model(dict(batch))
        assert scores.shape == (3, N_ITEMS) and torch.isinf(scores[:, 0]).all()  # padding is never recommended
        model.top_k = 5
        top_scores, top_ids = model(dict(batch))
        assert torch.equal(top_ids, torch.topk(scores, 5).indices)
        model.top_k = None
        example = ragged(batch)
        traced = torch.jit.trace(model, (example,), strict=True)
        for lengths, seed in (([3, 7, 5], 2), ([2, 4], 4), ([8, 1, 6, 8], 5)):
            ragged_batch = ragged(padded_batch(lengths, seed=seed))
            torch.testing.assert_close(traced(ragged_batch), model(ragged_batch), rtol=1e-5, atol=1e-5)


def test_retrieval_task_rejects_invalid_combinations_at_construction():
    with pytest.raises(ValueError, match="num_negatives=1 and temperature=1.0"):
        merlin_hstu.GenerativeRetrievalTask(loss="bce")
    with pytest.raises(ValueError, match="in-batch negatives"):
        merlin_hstu.GenerativeRetrievalTask(logq_correction=True)
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        merlin_hstu.GenerativeRetrievalTask(temperature=0)
    with pytest.raises(ValueError, match="similarity must be one of"):
        merlin_hstu.GenerativeRetrievalTask(similarity="cosine")
    with pytest.raises(ValueError, match="has no gates"):
        merlin_hstu.GenerativeRetrievalTask(mi_loss_weight=0.1)


def test_retrieval_doc_snippets_run():
    """docs/retrieval.md: the Python snippets work as written (with `model`/`batch`/`table` and `body` supplied)."""
    import numpy as np

    from merlin_hstu.retrieval.data import LeaveOneOut, SequenceTable
    from merlin_hstu.encoders.hstu import HSTUEncoderConfig
    from merlin_hstu.retrieval.model import HSTURetrievalModel, RetrievalModelConfig

    blocks = python_blocks((DOC.parent / "retrieval.md").read_text())
    assert len(blocks) == 2, "docs/retrieval.md: expected the loss snippet and the T4R snippet"
    rng = np.random.default_rng(0)
    table = SequenceTable([rng.integers(3, 40, size=int(n)) for n in rng.integers(4, 12, size=20)], None,
                          np.arange(20), 40)
    split = LeaveOneOut(table, max_history=10)
    model = HSTURetrievalModel(RetrievalModelConfig(40, HSTUEncoderConfig(embedding_dim=8, num_blocks=1, num_heads=1,
                                                                           attention_dim=8, linear_dim=8,
                                                                           max_seq_len=12, time_bias=False)))
    namespace = {"model": model, "batch": next(split.batches(split.train, 8)), "table": table}
    exec(compile(blocks[0], "docs/retrieval.md:loss", "exec"), namespace)
    assert math.isfinite(namespace["loss"].item())

    torch.manual_seed(0)
    inputs = t4r.HSTUSequenceFeatures.from_schema(
        small_schema(), timestamp_column="timestamp-list", max_sequence_length=MAX_LEN,
        embedding_dim_default=D_MODEL, d_output=D_MODEL, masking="hstu-clm")
    encoder = tr.TransformerBlock(t4r.T4RecHSTUConfig.build(D_MODEL, 2, 2, MAX_LEN, time_bias=True),
                                  masking=inputs.masking)
    namespace = {"body": tr.SequentialBlock(inputs, encoder)}
    exec(compile(blocks[1], "docs/retrieval.md:t4r", "exec"), namespace)
    out = namespace["model"](padded_batch([8, 5, 7], seed=1), training=True)
    assert math.isfinite(out["loss"].item())
    assert namespace["task"].output.head.is_mol
