"""SASRec baseline encoder (merlin_hstu.encoders.sasrec) and its Transformers4Rec registration ("sasrec").

Numeric checks compare against `plain_sasrec` below: an independent, one-sequence-at-a-time implementation
of the reference's block (reference-hstu.md §1.5) with hand-written layer norm, per-head attention with an
explicit softmax over j <= i, and the conv-1 FFN as matrix products.  It reads only the weights.
"""
from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

import merlin_hstu
from merlin_hstu.encoders.sasrec import SASRecEncoder, SASRecEncoderConfig, positional_table_init

ATOL = 1e-6


# ------------------------------------------------------------------------------------------------
# the plain reference implementation
# ------------------------------------------------------------------------------------------------
def plain_layer_norm(v: torch.Tensor, eps: float) -> torch.Tensor:
    mean = v.sum(-1, keepdim=True) / v.shape[-1]
    var = ((v - mean) ** 2).sum(-1, keepdim=True) / v.shape[-1]
    return (v - mean) / torch.sqrt(var + eps)


def plain_attention(q_in, kv_in, w_in, b_in, w_out, b_out, num_heads):
    """Causal multi-head attention of one sequence, query rows q_in [L, D], keys/values from kv_in [L, D]."""
    length, dim = q_in.shape
    dh = dim // num_heads
    wq, wk, wv = w_in[:dim], w_in[dim : 2 * dim], w_in[2 * dim :]
    bq, bk, bv = b_in[:dim], b_in[dim : 2 * dim], b_in[2 * dim :]
    q, k, v = q_in @ wq.T + bq, kv_in @ wk.T + bk, kv_in @ wv.T + bv
    out = torch.zeros_like(q)
    for h in range(num_heads):
        cols = slice(h * dh, (h + 1) * dh)
        for i in range(length):
            scores = torch.stack([(q[i, cols] * k[j, cols]).sum() / math.sqrt(dh) for j in range(i + 1)])
            weights = torch.exp(scores - scores.max())
            weights = weights / weights.sum()
            out[i, cols] = sum(weights[j] * v[j, cols] for j in range(i + 1))
    return out @ w_out.T + b_out


def plain_sasrec(encoder: SASRecEncoder, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """x [B, W, D] -> [B, W, D]; each row computed on its first len_b positions only, zeros elsewhere."""
    cfg = encoder.config
    out = torch.zeros_like(x)
    for b in range(x.shape[0]):
        n = int(lengths[b])
        if n == 0:
            continue
        z = x[b, :n]
        for block in encoder.blocks:
            mha, ffn = block.attention, block.feed_forward
            q = plain_layer_norm(z, cfg.layer_norm_eps)
            a = plain_attention(
                q, z, mha.in_proj_weight, mha.in_proj_bias, mha.out_proj.weight, mha.out_proj.bias, cfg.num_heads
            )
            y = plain_layer_norm(q + a, cfg.layer_norm_eps)
            hidden = torch.relu(y @ ffn.conv1.weight[:, :, 0].T + ffn.conv1.bias)
            z = y + hidden @ ffn.conv2.weight[:, :, 0].T + ffn.conv2.bias
        out[b, :n] = z
    return out


def make_encoder(seed: int = 0, randomize_biases: bool = True, **overrides) -> SASRecEncoder:
    """Float64 encoder in eval mode (dropout off).  Biases are randomised so the parity tests exercise them
    (the reference init leaves the MHA biases at zero)."""
    torch.manual_seed(seed)
    encoder = SASRecEncoder(SASRecEncoderConfig(**overrides)).double().eval()
    if randomize_biases:
        with torch.no_grad():
            for name, param in encoder.named_parameters():
                if name.endswith("bias"):
                    param.normal_(0.0, 0.3)
    return encoder


# ------------------------------------------------------------------------------------------------
# parity with the plain implementation
# ------------------------------------------------------------------------------------------------
def test_one_block_matches_plain():
    encoder = make_encoder(num_blocks=1, embedding_dim=8, num_heads=2, ffn_hidden_dim=12, max_seq_len=9)
    x = torch.randn(4, 9, 8, dtype=torch.float64)
    lengths = torch.tensor([9, 5, 1, 7])
    with torch.no_grad():
        out = encoder(x, lengths)
    torch.testing.assert_close(out, plain_sasrec(encoder, x, lengths), rtol=0, atol=ATOL)


def test_two_block_stack_with_reference_sizes_matches_plain():
    # D = 50, one head, FFN 50: the reference's ML-1M SASRec; width below max_seq_len (211) is accepted.
    encoder = make_encoder(seed=1)
    assert encoder.config.num_blocks == 2
    x = torch.randn(3, 12, 50, dtype=torch.float64)
    lengths = torch.tensor([12, 6, 3])
    with torch.no_grad():
        out = encoder(x, lengths)
    torch.testing.assert_close(out, plain_sasrec(encoder, x, lengths), rtol=0, atol=ATOL)


def test_multihead_attention_module_equals_plain_attention():
    """nn.MultiheadAttention(q, x, x, causal mask): in-projection with bias, softmax(qk/sqrt(dh)), out-projection."""
    encoder = make_encoder(seed=2, num_blocks=1, embedding_dim=12, num_heads=3, max_seq_len=7)
    mha = encoder.blocks[0].attention
    q_in, kv_in = torch.randn(7, 12, dtype=torch.float64), torch.randn(7, 12, dtype=torch.float64)
    causal = torch.triu(torch.ones(7, 7, dtype=torch.bool), diagonal=1)
    with torch.no_grad():
        got, _ = mha(q_in[None], kv_in[None], kv_in[None], attn_mask=causal, need_weights=False)
        expected = plain_attention(
            q_in, kv_in, mha.in_proj_weight, mha.in_proj_bias, mha.out_proj.weight, mha.out_proj.bias, 3
        )
    torch.testing.assert_close(got[0], expected, rtol=0, atol=ATOL)


# ------------------------------------------------------------------------------------------------
# causality, padding, batch composition, timestamps
# ------------------------------------------------------------------------------------------------
def test_causality():
    encoder = make_encoder(seed=3, embedding_dim=16, num_heads=2, ffn_hidden_dim=16, max_seq_len=10)
    x = torch.randn(2, 10, 16, dtype=torch.float64)
    k = 4
    changed = x.clone()
    changed[:, k] += torch.randn(2, 16, dtype=torch.float64)
    with torch.no_grad():
        base, after = encoder(x), encoder(changed)
    torch.testing.assert_close(after[:, :k], base[:, :k], rtol=0, atol=0)
    assert (after[:, k:] - base[:, k:]).abs().amin(dim=-1).min() > 0  # every later row changes


def test_padded_rows_are_zero_and_padding_content_is_ignored():
    encoder = make_encoder(seed=4, embedding_dim=16, num_heads=2, ffn_hidden_dim=8, max_seq_len=10)
    lengths = torch.tensor([10, 4, 0, 1])
    x = torch.randn(4, 10, 16, dtype=torch.float64)
    garbage = x.clone()
    real = torch.arange(10).unsqueeze(0) < lengths.unsqueeze(1)
    garbage[~real] = torch.randn(int((~real).sum()), 16, dtype=torch.float64) * 100
    with torch.no_grad():
        out, out_garbage = encoder(x, lengths), encoder(garbage, lengths)
    assert out[~real].abs().max() == 0 and out_garbage[~real].abs().max() == 0
    assert out[real].abs().amin(dim=-1).min() > 0
    torch.testing.assert_close(out_garbage, out, rtol=0, atol=ATOL)


def test_invariant_to_batch_composition_and_width():
    config = SASRecEncoderConfig(embedding_dim=16, num_heads=4, ffn_hidden_dim=32, max_seq_len=20)
    encoder = SASRecEncoder(config).eval()
    lengths = [7, 3, 11, 1]
    g = torch.Generator().manual_seed(5)
    seqs = [torch.randn(n, 16, generator=g) for n in lengths]
    x = torch.zeros(4, 20, 16)  # padded to max_seq_len, wider than the longest sequence
    for b, s in enumerate(seqs):
        x[b, : len(s)] = s
    with torch.no_grad():
        batched = encoder(x, torch.tensor(lengths))
        for b, s in enumerate(seqs):
            alone = encoder(s.unsqueeze(0), torch.tensor([len(s)]))[0]
            torch.testing.assert_close(batched[b, : len(s)], alone, rtol=1e-5, atol=1e-5)
        # a different batch mix (reordered, one row dropped) gives the same rows
        subset = encoder(x[[2, 0]], torch.tensor([lengths[2], lengths[0]]))
        torch.testing.assert_close(subset, batched[[2, 0]], rtol=1e-5, atol=1e-5)


def test_timestamps_are_ignored_and_lengths_default_to_full_width():
    encoder = make_encoder(seed=6, embedding_dim=8, num_heads=1, ffn_hidden_dim=8, max_seq_len=6)
    x = torch.randn(2, 6, 8, dtype=torch.float64)
    times = torch.randint(0, 10**9, (2, 6))
    with torch.no_grad():
        plain = encoder(x)
        torch.testing.assert_close(encoder(x, timestamps=times), plain, rtol=0, atol=0)
        torch.testing.assert_close(encoder(x, torch.tensor([6, 6]), times), plain, rtol=0, atol=0)
    torch.testing.assert_close(plain, plain_sasrec(encoder, x, torch.tensor([6, 6])), rtol=0, atol=ATOL)


def test_dropout_is_active_in_training_only():
    encoder = SASRecEncoder(SASRecEncoderConfig(embedding_dim=16, num_heads=2, dropout=0.5, max_seq_len=8))
    x = torch.randn(3, 8, 16)
    lengths = torch.tensor([8, 5, 2])
    encoder.train()
    a, b = encoder(x, lengths), encoder(x, lengths)
    assert (a - b).abs().max() > 1e-3
    a.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in encoder.parameters())
    encoder.eval()
    with torch.no_grad():
        torch.testing.assert_close(encoder(x, lengths), encoder(x, lengths), rtol=0, atol=0)
    no_dropout = SASRecEncoder(SASRecEncoderConfig(embedding_dim=16, num_heads=2, dropout=0.0, max_seq_len=8))
    with torch.no_grad():
        torch.testing.assert_close(no_dropout.train()(x, lengths), no_dropout.eval()(x, lengths), rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# init, sizes, errors
# ------------------------------------------------------------------------------------------------
def test_reference_parameter_count_has_no_layer_norm_parameters():
    # reference ML-1M SASRec: 238,800 parameters = 3953*50 item rows + 211*50 positions + this encoder
    encoder = SASRecEncoder(SASRecEncoderConfig())
    assert sum(p.numel() for p in encoder.parameters()) == 238_800 - 3953 * 50 - 211 * 50
    assert not any("norm" in name for name, _ in encoder.named_parameters())


def test_init_statistics():
    dim, ffn = 128, 256
    encoder = SASRecEncoder(SASRecEncoderConfig(embedding_dim=dim, num_heads=2, ffn_hidden_dim=ffn, num_blocks=2))
    for block in encoder.blocks:
        mha, feed = block.attention, block.feed_forward
        # xavier_normal_: std = sqrt(2 / (fan_in + fan_out)); in_proj is [3D, D], conv kernels [out, in, 1]
        for weight, fan_in, fan_out in (
            (mha.in_proj_weight, dim, 3 * dim),
            (mha.out_proj.weight, dim, dim),
            (feed.conv1.weight, dim, ffn),
            (feed.conv2.weight, ffn, dim),
        ):
            expected = math.sqrt(2.0 / (fan_in + fan_out))
            assert abs(weight.std().item() / expected - 1) < 0.05, (weight.shape, weight.std().item(), expected)
            assert abs(weight.mean().item()) < 0.1 * expected
        assert mha.in_proj_bias.abs().max() == 0 and mha.out_proj.bias.abs().max() == 0
        for conv, fan_in in ((feed.conv1, dim), (feed.conv2, ffn)):
            bound = 1.0 / math.sqrt(fan_in)  # PyTorch default: U(-bound, bound), std bound/sqrt(3)
            assert conv.bias.abs().max() <= bound
            assert abs(conv.bias.std().item() / (bound / math.sqrt(3)) - 1) < 0.25


def test_positional_table_init_is_truncated_normal_sqrt_1_over_d():
    assert SASRecEncoder.position_init == "truncated_normal"
    dim = 50
    torch.manual_seed(0)
    table = positional_table_init(torch.empty(4000, dim))
    sigma = math.sqrt(1.0 / dim)
    # standard normal cut at +-2: variance 1 - 2*2*phi(2) / (2*Phi(2) - 1)
    phi2 = math.exp(-2.0) / math.sqrt(2 * math.pi)
    mass = math.erf(2.0 / math.sqrt(2.0))
    expected_std = sigma * math.sqrt(1 - 4 * phi2 / mass)
    assert table.abs().max() <= 2 * sigma
    assert abs(table.std().item() / expected_std - 1) < 0.01
    assert abs(table.mean().item()) < 0.01 * sigma
    assert table.abs().max() > 1.95 * sigma  # the tails are really there, up to the cut
    same = SASRecEncoder.init_positional_table(torch.empty(4000, dim))
    assert abs(same.std().item() / expected_std - 1) < 0.01


def test_config_and_input_errors():
    with pytest.raises(ValueError, match="embedding_dim=10 is not divisible by num_heads=3"):
        SASRecEncoderConfig(embedding_dim=10, num_heads=3)
    with pytest.raises(ValueError, match="dropout must be in"):
        SASRecEncoderConfig(dropout=1.0)
    with pytest.raises(ValueError, match="num_blocks must be a positive int"):
        SASRecEncoderConfig(num_blocks=0)
    with pytest.raises(ValueError, match="layer_norm_eps must be > 0"):
        SASRecEncoderConfig(layer_norm_eps=0.0)
    config = SASRecEncoderConfig(embedding_dim=8, max_seq_len=5)
    assert SASRecEncoderConfig(**config.to_dict()) == config
    encoder = SASRecEncoder(config)
    with pytest.raises(ValueError, match="exceeds max_seq_len=5"):
        encoder(torch.randn(2, 6, 8))
    with pytest.raises(ValueError, match="embedding_dim=8"):
        encoder(torch.randn(2, 5, 7))
    with pytest.raises(ValueError, match=r"lengths must be \[batch\]"):
        encoder(torch.randn(2, 5, 8), torch.tensor([5, 5, 5]))


# ------------------------------------------------------------------------------------------------
# Transformers4Rec block "sasrec"
# ------------------------------------------------------------------------------------------------
T4R_MAX_LEN = 20
T4R_D_MODEL = 32


@pytest.fixture(scope="module")
def t4r_data():
    """T4R's packaged session data: the merlin-core schema of item_id/list + category/list and padded
    [sessions, T4R_MAX_LEN] tensors (truncated to the first T4R_MAX_LEN events)."""
    from merlin.schema.io.tensorflow_metadata import TensorflowMetadata
    from transformers4rec.data import tabular_sequence_testing_data as data

    columns = ["item_id/list", "category/list"]
    schema = TensorflowMetadata.from_json(data.schema.to_json()).to_merlin_schema().select_by_name(columns)
    frame = pd.read_parquet(data.path, columns=columns)
    tensors = {}
    for name in columns:
        padded = torch.zeros(len(frame), T4R_MAX_LEN, dtype=torch.long)
        for row, values in enumerate(frame[name]):
            values = torch.tensor(list(values[:T4R_MAX_LEN]), dtype=torch.long)
            padded[row, : len(values)] = values
        tensors[name] = padded
    return schema, tensors


def build_t4r_model(schema, masking: str = "causal", seed: int = 0):
    import transformers4rec.torch as tr

    torch.manual_seed(seed)
    inputs = tr.TabularSequenceFeatures.from_schema(
        schema, max_sequence_length=T4R_MAX_LEN, d_output=T4R_D_MODEL, masking=masking,
    )
    encoder = tr.TransformerBlock.from_registry(
        "sasrec", d_model=T4R_D_MODEL, n_head=2, n_layer=2, total_seq_length=T4R_MAX_LEN, masking=inputs.masking
    )
    return tr.Model(tr.Head(tr.SequentialBlock(inputs, encoder), tr.NextItemPredictionTask(weight_tying=True)))


def batch_of(tensors, rows):
    return {name: value[rows] for name, value in tensors.items()}


def test_t4r_registration_and_block():
    import transformers
    import transformers4rec.torch as tr
    from transformers4rec.config.transformer import transformer_registry
    from transformers4rec.torch.masking import MaskedLanguageModeling

    import merlin_hstu.t4r.encoders as t4r

    def snapshot():
        return (
            transformer_registry["sasrec"],
            transformers.AutoConfig.for_model("sasrec").__class__,
            transformers.MODEL_MAPPING[t4r.SASRecConfig],
            transformer_registry["hstu"],
        )

    expected = (t4r.T4RecSASRecConfig, t4r.SASRecConfig, t4r.SASRecModel, t4r.T4RecHSTUConfig)
    assert snapshot() == expected
    t4r.register()
    merlin_hstu.register()
    assert snapshot() == expected

    block = tr.TransformerBlock.from_registry("sasrec", d_model=16, n_head=2, n_layer=3, total_seq_length=12)
    model = block.transformer
    assert isinstance(model, t4r.SASRecModel)
    assert len(model.encoder.blocks) == 3 and model.config.intermediate_size == 16
    assert model.encoder.config.max_seq_len == 12 and model.position_embeddings.num_embeddings == 12
    # position table keeps the SASRec init (truncated normal, cut at 2 * sqrt(1/D))
    assert model.position_embeddings.weight.abs().max() <= 2 * math.sqrt(1 / 16)
    with pytest.raises(ValueError, match="not supported"):
        tr.TransformerBlock.from_registry(
            "sasrec", d_model=16, n_head=2, n_layer=1, total_seq_length=12,
            masking=MaskedLanguageModeling(hidden_size=16),
        )


def test_t4r_model_forward_equals_plain_sasrec_with_positions(tmp_path):
    import transformers

    import merlin_hstu.t4r.encoders as t4r

    torch.manual_seed(0)
    config = t4r.SASRecConfig(hidden_size=8, num_attention_heads=2, num_hidden_layers=2,
                              max_position_embeddings=6, intermediate_size=12)
    model = t4r.SASRecModel(config).double().eval()
    x = torch.randn(3, 6, 8, dtype=torch.float64)
    lengths = torch.tensor([6, 2, 4])
    with torch.no_grad():
        out = model(x, lengths=lengths)[0]
        expected = plain_sasrec(model.encoder, x + model.position_embeddings.weight, lengths)
    torch.testing.assert_close(out, expected, rtol=0, atol=ATOL)
    with pytest.raises(ValueError, match="SASRec has no time bias"):
        model(x, timestamps=torch.zeros(3, 6, dtype=torch.long))
    with pytest.raises(ValueError, match="exceeds SASRecConfig.max_position_embeddings=6"):
        model(torch.randn(3, 7, 8, dtype=torch.float64))
    # Hugging Face round trip through the Auto classes
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModel.from_pretrained(tmp_path).double().eval()
    assert type(loaded) is t4r.SASRecModel and loaded.config.intermediate_size == 12
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, lengths=lengths)[0], out, rtol=0, atol=0)


def test_t4r_trains_on_packaged_sessions_and_lengths_route_matches_causal(t4r_data):
    schema, tensors = t4r_data
    model = build_t4r_model(schema)
    encoder = model.heads[0].body[1].transformer
    before = {name: p.detach().clone() for name, p in encoder.named_parameters()}
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    losses = []
    for step in range(4):
        loss = model(batch_of(tensors, slice(64 * step, 64 * (step + 1))), training=True)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses), losses
    changed = [n for n, p in encoder.named_parameters() if not torch.equal(before[n], p.detach())]
    assert any("attention.in_proj_weight" in n for n in changed) and any("conv2" in n for n in changed)
    assert "position_embeddings.weight" in changed

    # "hstu-clm" masking also hands over lengths (zeroing padded rows); the rows T4R reads are unchanged
    with_lengths = build_t4r_model(schema, masking="hstu-clm", seed=1)
    with_lengths.load_state_dict(model.state_dict())
    model.eval(), with_lengths.eval()
    batch = batch_of(tensors, slice(300, 340))
    with torch.no_grad():
        torch.testing.assert_close(with_lengths(dict(batch)), model(dict(batch)), rtol=1e-5, atol=1e-5)
        a, b = with_lengths(dict(batch), testing=True), model(dict(batch), testing=True)
        torch.testing.assert_close(a["loss"], b["loss"], rtol=1e-5, atol=1e-5)


def test_t4r_jit_trace_matches_eager(t4r_data):
    schema, tensors = t4r_data
    model = build_t4r_model(schema, seed=2).eval()
    with torch.no_grad():
        traced = torch.jit.trace(model, (batch_of(tensors, slice(0, 8)),), strict=True)
        for rows in (slice(0, 8), slice(100, 132), slice(500, 503)):
            batch = batch_of(tensors, rows)
            eager = model(batch)
            torch.testing.assert_close(traced(batch), eager, rtol=1e-6, atol=1e-6)
            assert eager.shape[0] == rows.stop - rows.start
