"""The memory-lean training ops equal the plain formulas, values and gradients (float64)."""
from __future__ import annotations

import pytest
import torch

from merlin_hstu.kernels import gathered_logits as gathered_module
from merlin_hstu.kernels.gathered_logits import gathered_logits
from merlin_hstu.kernels.pointwise_attention import pointwise_attention


def plain_attention(q, k, v, mask, normalizer, bias, alpha):
    """O[b,i,h] = sum_j SiLU(alpha <q_i, k_j> + bias_ij) * mask_ij / N * v_j, written as loops over b and h."""
    out = torch.zeros(q.shape[0], q.shape[1], q.shape[2], v.shape[3], dtype=q.dtype)
    for b in range(q.shape[0]):
        for h in range(q.shape[2]):
            s = alpha * q[b, :, h] @ k[b, :, h].T
            if bias is not None:
                s = s + bias[b if bias.shape[0] > 1 else 0]
            w = s * torch.sigmoid(s) * mask[b].to(s.dtype) / normalizer
            out[b, :, h] = w @ v[b, :, h]
    return out


@pytest.mark.parametrize("bias_rows", [0, 1, 3])  # no bias, one bias shared by the batch, one per sequence
@pytest.mark.parametrize("alpha", [1.0, 0.25])
@pytest.mark.parametrize("h", [1, 2])  # one head: the mask is applied to S; more: folded into the bias
def test_pointwise_attention_matches_plain_formula_and_gradients(bias_rows, alpha, h):
    torch.manual_seed(bias_rows)
    b, r, w = 3, 5, 6
    q = torch.randn(b, r, h, 4, dtype=torch.float64, requires_grad=True)
    k = torch.randn(b, w, h, 4, dtype=torch.float64, requires_grad=True)
    v = torch.randn(b, w, h, 3, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(bias_rows, r, w, dtype=torch.float64, requires_grad=True) if bias_rows else None
    mask = torch.rand(b, r, w) > 0.4
    mask[0, 1] = False  # a row that sees nothing is exactly zero
    inputs = [t for t in (q, k, v, bias) if t is not None]
    lean = pointwise_attention(q, k, v, mask, 7.0, bias, alpha)
    plain = plain_attention(q, k, v, mask, 7.0, bias, alpha)
    torch.testing.assert_close(lean, plain, rtol=0, atol=1e-12)
    assert torch.count_nonzero(lean[0, 1]) == 0
    grad = torch.randn_like(lean)
    for got, want in zip(torch.autograd.grad(lean, inputs, grad), torch.autograd.grad(plain, inputs, grad)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


def test_pointwise_attention_rejects_float_mask():
    q = torch.randn(1, 2, 1, 2)
    with pytest.raises(ValueError, match="mask must be a bool"):
        pointwise_attention(q, q, q, torch.ones(1, 2, 2), 2.0)


def test_encoder_training_path_uses_lean_attention_with_unchanged_gradients():
    """The reference op takes the lean path only when gradients are needed; both paths agree."""
    from merlin_hstu.kernels import hstu_attention_reference

    torch.manual_seed(0)
    q, k = torch.randn(2, 5, 2, 4, dtype=torch.float64), torch.randn(2, 5, 2, 4, dtype=torch.float64)
    v = torch.randn(2, 5, 2, 3, dtype=torch.float64)
    lengths = torch.tensor([5, 3])
    with torch.no_grad():
        expected = hstu_attention_reference(q, k, v, lengths, 9.0)
    q.requires_grad_(True)
    out = hstu_attention_reference(q, k, v, lengths, 9.0)
    assert out.grad_fn is not None and "PointwiseAttention" in type(out.grad_fn).__name__
    torch.testing.assert_close(out.detach(), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("method", ["dense", "sparse"])
@pytest.mark.parametrize("chunk_elements", [30, 10_000])  # several row chunks, one chunk (dense path)
def test_gathered_logits_equal_dense_gather(monkeypatch, chunk_elements, method):
    monkeypatch.setattr(gathered_module, "CHUNK_ELEMENTS", chunk_elements)
    torch.manual_seed(1)
    user = torch.randn(23, 4, dtype=torch.float64, requires_grad=True)
    table = torch.randn(9, 4, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, 9, (23, 5))
    ids[0] = 3  # repeated ids in one row accumulate their gradients
    ids[1] = torch.tensor([8, 2, 8, 0, 2])  # unsorted, repeated, row 0 of the table
    got = gathered_logits(user, table, ids, method=method)
    # independent: one dot product per (p, c)
    want = torch.stack([torch.stack([user[p] @ table[ids[p, c]] for c in range(5)]) for p in range(23)])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    grad = torch.randn_like(got)
    for a, b in zip(torch.autograd.grad(got, [user, table], grad), torch.autograd.grad(want, [user, table], grad)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_gathered_logits_sparse_path_at_training_shape_in_float32():
    # The path training takes on a CPU (auto -> sparse for float32): a catalogue wider than int16 keys would
    # allow is covered too (int32 sort keys), against the dense path.
    torch.manual_seed(4)
    for items in (50, 40_000):
        user = torch.randn(300, 8, requires_grad=True)
        table = torch.randn(items, 8, requires_grad=True)
        ids = torch.randint(0, items, (300, 17))
        assert gathered_module._sparse_path(user, table)
        sparse = gathered_logits(user, table, ids)
        dense = gathered_logits(user, table, ids, method="dense")
        torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-5)
        grad = torch.randn_like(sparse)
        for a, b in zip(torch.autograd.grad(sparse, [user, table], grad),
                        torch.autograd.grad(dense, [user, table], grad)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)
    # more entries per row than the catalogue has items (possible with a tiny catalogue): still exact
    user, table, ids = torch.randn(30, 8, dtype=torch.float64), torch.randn(6, 8, dtype=torch.float64), \
        torch.randint(0, 6, (30, 9))
    want = torch.einsum("pd,pcd->pc", user, table[ids])
    torch.testing.assert_close(gathered_logits(user, table, ids, method="sparse"), want, rtol=0, atol=1e-12)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast keeps the dense path (bf16 matmuls)
        assert not gathered_module._sparse_path(user, table)


def test_gathered_logits_explains_bad_shapes():
    with pytest.raises(ValueError, match="ids must be an int64"):
        gathered_logits(torch.randn(3, 2), torch.randn(4, 2), torch.zeros(3, 2, dtype=torch.int32))
    with pytest.raises(ValueError, match="one D"):
        gathered_logits(torch.randn(3, 2), torch.randn(4, 5), torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="method must be"):
        gathered_logits(torch.randn(3, 2), torch.randn(4, 2), torch.zeros(3, 2, dtype=torch.long), method="csr")


def test_bucket_gather_equals_plain_indexing_values_and_gradients():
    from merlin_hstu.kernels.bucket_gather import bucket_gather

    torch.manual_seed(2)
    weights = torch.randn(7, dtype=torch.float64, requires_grad=True)
    buckets = torch.randint(0, 7, (3, 5, 5))
    buckets[0, 0] = 6  # one bin hit many times accumulates
    got = bucket_gather(weights, buckets)
    want = torch.stack([weights[int(i)] for i in buckets.reshape(-1)]).reshape(3, 5, 5)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    grad = torch.randn_like(got)
    (g_got,) = torch.autograd.grad(got, weights, grad)
    g_want = torch.zeros(7, dtype=torch.float64)
    for i, g in zip(buckets.reshape(-1).tolist(), grad.reshape(-1).tolist()):
        g_want[i] += g
    torch.testing.assert_close(g_got, g_want, rtol=0, atol=1e-12)


def test_bucket_gather_rejects_bad_inputs():
    from merlin_hstu.kernels.bucket_gather import bucket_gather

    with pytest.raises(ValueError, match="buckets must be int64"):
        bucket_gather(torch.randn(4), torch.zeros(2, dtype=torch.int32))
    with pytest.raises(ValueError, match="weights must be 1-D"):
        bucket_gather(torch.randn(4, 1), torch.zeros(2, dtype=torch.long))


def test_bucket_gather_traces_to_plain_ops():
    """A traced (served) graph holds `take`, not the Python Function, so torch.jit.save accepts it."""
    import io

    from merlin_hstu.kernels.bucket_gather import bucket_gather

    class Bias(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weights = torch.nn.Parameter(torch.randn(5))

        def forward(self, buckets):
            return bucket_gather(self.weights, buckets)

    module = Bias()
    traced = torch.jit.trace(module, torch.randint(0, 5, (2, 3)))
    torch.jit.save(traced, io.BytesIO())
    buckets = torch.randint(0, 5, (4, 2))
    torch.testing.assert_close(traced(buckets), module.weights.detach()[buckets])
