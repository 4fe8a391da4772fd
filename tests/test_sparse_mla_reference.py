"""kernels.sparse_mla reference vs a naive masked dense attention (autograd for the gradients)."""

import pytest
import torch

import kernels.sparse_mla.reference as ref_mod
from kernels.sparse_mla import sparse_mla_reference
from tests.conftest import assert_close, fresh_seed


def naive_sparse_mla(q, kv, indices, scale, d_v):
    """Dense scores over all L keys, masked to the selected set. O(T*L) memory: test sizes only."""
    T, H, D = q.shape
    L = kv.shape[0]
    allowed = torch.zeros(T, L, dtype=torch.bool)
    rows = torch.arange(T).unsqueeze(1).expand_as(indices)
    valid = indices >= 0
    allowed[rows[valid], indices[valid].long()] = True
    scores = torch.einsum("thd,ld->thl", q, kv) * scale
    scores = scores.masked_fill(~allowed.unsqueeze(1), float("-inf"))
    lse = torch.logsumexp(scores, -1)
    probs = torch.softmax(scores, -1).nan_to_num(0.0)
    return torch.einsum("thl,lv->thv", probs, kv[:, :d_v]), lse


def random_indices(T, L, k, gen, invalid_frac=0.2):
    """Duplicate-free indices per row with some -1 entries, and one row with no valid key at all."""
    idx = torch.stack([torch.randperm(L, generator=gen)[:k] for _ in range(T)]).int()
    drop = torch.rand(T, k, generator=gen) < invalid_frac
    idx[drop] = -1
    idx[T // 2] = -1
    return idx


@pytest.mark.parametrize("dtype,bound", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("T,L,H,D,d_v,k", [(37, 53, 3, 24, 16, 11), (20, 20, 8, 40, 32, 20), (5, 70, 1, 9, 8, 64)])
def test_forward_backward_match_naive(T, L, H, D, d_v, k, dtype, bound):
    gen = torch.Generator().manual_seed(fresh_seed())
    q = torch.randn(T, H, D, generator=gen).to(dtype)
    kv = torch.randn(L, D, generator=gen).to(dtype)
    idx = random_indices(T, L, min(k, L), gen)
    scale = D**-0.5
    dout = torch.randn(T, H, d_v, generator=gen)

    q_ref = q.double().requires_grad_()
    kv_ref = kv.double().requires_grad_()
    out_ref, lse_ref = naive_sparse_mla(q_ref, kv_ref, idx, scale, d_v)
    (out_ref * dout.double()).sum().backward()

    q_t = q.clone().requires_grad_()
    kv_t = kv.clone().requires_grad_()
    out, lse = sparse_mla_reference(q_t, kv_t, idx, scale, d_v)
    (out.float() * dout).sum().backward()

    assert out.dtype == dtype and lse.dtype == torch.float32
    assert_close("out", out_ref, out, bound)
    finite = torch.isfinite(lse_ref)
    assert torch.equal(finite, torch.isfinite(lse)), "rows without keys must have lse = -inf"
    assert_close("lse", lse_ref[finite], lse[finite], 1e-5)
    assert torch.all(out[T // 2] == 0), "a row without valid keys must output zeros"
    assert_close("dq", q_ref.grad, q_t.grad, bound)
    assert_close("dkv", kv_ref.grad, kv_t.grad, bound)


def test_chunking_does_not_change_results(monkeypatch):
    gen = torch.Generator().manual_seed(fresh_seed())
    q, kv = torch.randn(41, 4, 16, generator=gen), torch.randn(33, 16, generator=gen)
    idx = random_indices(41, 33, 13, gen)
    full, _ = ref_mod.sparse_mla_fwd_reference(q, kv, idx, 0.25, 8)
    monkeypatch.setattr(ref_mod, "_CHUNK_ELEMENTS", 13 * 16 * 3)  # 3 rows a chunk
    chunked, _ = ref_mod.sparse_mla_fwd_reference(q, kv, idx, 0.25, 8)
    assert_close("chunked out", full, chunked, 1e-6)


def test_bad_inputs_raise_clear_errors():
    q, kv = torch.randn(4, 2, 8), torch.randn(5, 8)
    with pytest.raises(ValueError, match="kv must be"):
        sparse_mla_reference(q, torch.randn(5, 7), torch.zeros(4, 2, dtype=torch.int32))
    with pytest.raises(ValueError, match="indices must be"):
        sparse_mla_reference(q, kv, torch.zeros(3, 2, dtype=torch.int32))
    with pytest.raises(ValueError, match="int32 or int64"):
        sparse_mla_reference(q, kv, torch.zeros(4, 2))
