"""Native indexer top-k vs brute force over the full [T, L] score matrix, both scoring modes."""

import pytest
import torch

import kernels.native_topk.reference as ref_mod
from kernels.native_topk import native_topk_reference
from tests.conftest import fresh_seed


def brute_force_scores(q, kv, mode, scale, q_offset):
    """Full [T, L] scores, one head at a time (the definition, no algebraic shortcut)."""
    T, H, _ = q.shape
    L = kv.shape[0]
    causal = torch.arange(L).unsqueeze(0) <= (torch.arange(T) + q_offset).unsqueeze(1)
    total = torch.zeros(T, L, dtype=torch.float64)
    for h in range(H):
        logits = q[:, h].double() @ kv.double().t()
        if mode == "logit_sum":
            total += logits
        else:
            total += torch.softmax((logits * scale).masked_fill(~causal, float("-inf")), -1)
    return total.masked_fill(~causal, float("-inf"))


@pytest.mark.parametrize("mode", ["logit_sum", "prob_sum"])
@pytest.mark.parametrize("T,L,H,D,k,offset", [(29, 29, 4, 12, 7, 0), (17, 50, 3, 20, 9, 33), (40, 40, 2, 8, 64, 0)])
def test_topk_sets_equal_brute_force(mode, T, L, H, D, k, offset):
    gen = torch.Generator().manual_seed(fresh_seed())
    q, kv = torch.randn(T, H, D, generator=gen), torch.randn(L, D, generator=gen)
    idx = native_topk_reference(q, kv, k, mode, scale=D**-0.5, q_offset=offset)
    scores = brute_force_scores(q, kv, mode, D**-0.5, offset)
    assert idx.shape == (T, k) and idx.dtype == torch.int32
    for t in range(T):
        n_causal = min(offset + t + 1, L)
        want = min(k, n_causal)
        row = idx[t]
        assert (row[want:] == -1).all(), f"row {t}: expected -1 padding after {want} keys"
        chosen = row[:want].long()
        assert (chosen >= 0).all() and len(set(chosen.tolist())) == want
        exact = torch.topk(scores[t], want).indices
        assert set(chosen.tolist()) == set(exact.tolist()), f"row {t}: selected set differs"
        # Best first.
        assert (scores[t][chosen][:-1] >= scores[t][chosen][1:]).all()


def test_ties_keep_lower_index():
    # Every key scores the same, exactly: small integers sum without rounding in any order.
    kv = torch.ones(10, 4)
    q = torch.randint(-3, 4, (10, 2, 4)).float()
    idx = native_topk_reference(q, kv, 3, "logit_sum")
    for t in range(10):
        want = list(range(min(3, t + 1)))
        assert idx[t, : len(want)].tolist() == want


@pytest.mark.parametrize("mode", ["logit_sum", "prob_sum"])
def test_chunking_does_not_change_selection(monkeypatch, mode):
    gen = torch.Generator().manual_seed(fresh_seed())
    q, kv = torch.randn(45, 3, 16, generator=gen), torch.randn(45, 16, generator=gen)
    full = native_topk_reference(q, kv, 8, mode, 0.25)
    monkeypatch.setattr(ref_mod, "_CHUNK_ELEMENTS", 45 * 3 * 4)
    assert torch.equal(full, native_topk_reference(q, kv, 8, mode, 0.25))


def test_no_autograd_and_bad_inputs():
    q = torch.randn(6, 2, 4, requires_grad=True)
    kv = torch.randn(6, 4, requires_grad=True)
    idx = native_topk_reference(q, kv, 2)
    assert not idx.requires_grad and idx.grad_fn is None
    with pytest.raises(ValueError, match="topk must be > 0"):
        native_topk_reference(q, kv, 0)
    with pytest.raises(ValueError, match="scoring mode"):
        native_topk_reference(q, kv, 2, "max")
