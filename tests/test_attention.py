"""NSMLA attention module: absorbed vs non-absorbed MLA, sparse (k >= L) vs dense, gradients."""

import pytest
import torch
import torch.nn.functional as F

from megatron.core.transformer.spec_utils import build_module

from megatron_ext.config import NSMLAConfig
from megatron_ext.specs import nsmla_attention_spec
from tests.conftest import assert_close, fresh_seed


def tiny_config(**overrides):
    base = dict(
        num_layers=1, hidden_size=64, num_attention_heads=4, q_lora_rank=32, kv_lora_rank=24,
        qk_head_dim=16, qk_pos_emb_head_dim=8, v_head_dim=12, rope_type="rope", index_topk=8,
        use_cpu_initialization=True, attention_dropout=0.0, hidden_dropout=0.0, add_bias_linear=False,
        gated_linear_unit=True, activation_func=F.silu, ffn_hidden_size=128, normalization="RMSNorm",
    )
    base.update(overrides)
    return NSMLAConfig(**base)


def make_attention(config, variant, seed):
    torch.manual_seed(seed)
    return build_module(nsmla_attention_spec(variant), config=config, layer_number=1)


def non_absorbed_reference(module, hidden):
    """Textbook MLA in float64: per-head keys [k_nope ; k_rope] and values from kv_up, causal softmax."""
    q_nope, q_pe, c_kv, k_pe = module.project(hidden)
    S, B, H = q_nope.shape[0], q_nope.shape[1], module.heads
    kv = F.linear(c_kv, module.linear_kv_up_proj.weight).view(S, B, H, -1).double()
    k_nope, v = kv.split([module.qk_nope, module.v_dim], -1)
    q = torch.cat([q_nope, q_pe], -1).double()
    k = torch.cat([k_nope, k_pe.double().expand(-1, -1, H, -1)], -1)
    scores = torch.einsum("sbhd,tbhd->bhst", q, k) * module.softmax_scale
    causal = torch.ones(S, S, dtype=torch.bool).tril()
    probs = torch.softmax(scores.masked_fill(~causal, float("-inf")), -1)
    return torch.einsum("bhst,tbhv->sbhv", probs, v).reshape(S, B, H * module.v_dim)


@pytest.mark.parametrize("q_lora_rank", [32, None])
@pytest.mark.parametrize("rope_type", ["rope", "yarn"])
def test_absorbed_and_dense_match_non_absorbed(single_process, q_lora_rank, rope_type):
    seed = fresh_seed()
    config = tiny_config(q_lora_rank=q_lora_rank, rope_type=rope_type, index_topk=64)
    module = make_attention(config, "nsmla", seed)
    hidden = torch.randn(19, 2, 64)
    ref = non_absorbed_reference(module, hidden)
    parts = module.project(hidden)
    assert_close("absorbed sparse (k >= L)", ref, module.sparse_core(*parts), 1e-5)
    assert_close("dense SDPA", ref, module.dense_core(*parts), 1e-5)


@pytest.mark.parametrize("scoring", ["logit_sum", "prob_sum"])
def test_sparse_with_k_at_least_L_equals_dense_with_gradients(single_process, scoring):
    seed = fresh_seed()
    config = tiny_config(index_topk=23, native_scoring=scoring)
    sparse = make_attention(config, "nsmla", seed)
    dense = make_attention(config, "dense", seed)
    assert sparse.state_dict().keys() == dense.state_dict().keys()
    dense.load_state_dict(sparse.state_dict())
    hidden = torch.randn(23, 3, 64)
    h_s, h_d = hidden.clone().requires_grad_(), hidden.clone().requires_grad_()
    out_s, _ = sparse(h_s)
    out_d, _ = dense(h_d)
    assert_close("output", out_d, out_s, 1e-5)
    grad = torch.randn_like(out_s)
    out_s.backward(grad)
    out_d.backward(grad)
    assert_close("d hidden", h_d.grad, h_s.grad, 1e-5)
    for (name, p_s), (_, p_d) in zip(sparse.named_parameters(), dense.named_parameters()):
        assert_close(f"d {name}", p_d.grad, p_s.grad, 1e-5)


def test_sparse_attention_uses_only_selected_keys(single_process):
    """With k < L the output equals dense attention restricted to the indexer's keys."""
    config = tiny_config(index_topk=5)
    module = make_attention(config, "nsmla", fresh_seed())
    hidden = torch.randn(17, 2, 64)
    parts = module.project(hidden)
    q_abs, kv_abs = module.absorbed_inputs(*parts)
    idx = module.indexer(q_abs, kv_abs, 2, 17)
    assert idx.shape == (34, 5)
    # Sequence b only selects its own causal rows.
    for t in range(34):
        b, s = divmod(t, 17)
        sel = idx[t][idx[t] >= 0]
        assert len(sel) == min(5, s + 1)
        assert ((sel >= b * 17) & (sel <= t)).all()
    # Masked dense attention over exactly those keys.
    scores = torch.einsum("thd,ld->thl", q_abs.double(), kv_abs.double()) * module.softmax_scale
    allowed = torch.zeros(34, 34, dtype=torch.bool)
    rows = torch.arange(34).unsqueeze(1).expand_as(idx)
    allowed[rows[idx >= 0], idx[idx >= 0].long()] = True
    probs = torch.softmax(scores.masked_fill(~allowed.unsqueeze(1), float("-inf")), -1)
    out_lat = torch.einsum("thl,lc->thc", probs, kv_abs.double()[:, : module.kv_rank])
    _, w_uv = module._kv_up_weights()
    ref = torch.einsum("thc,hvc->thv", out_lat, w_uv.double()).reshape(2, 17, -1).transpose(0, 1)
    assert_close("sparse core", ref, module.absorbed_core(q_abs, kv_abs, idx, 17, 2), 1e-5)


def test_indexer_gets_no_gradient_and_every_weight_does(single_process):
    config = tiny_config(index_topk=6)
    module = make_attention(config, "nsmla", fresh_seed())
    assert sum(p.numel() for p in module.indexer.parameters()) == 0, "the native indexer has no parameters"
    hidden = torch.randn(21, 2, 64, requires_grad=True)
    parts = module.project(hidden)
    q_abs, kv_abs = module.absorbed_inputs(*parts)
    assert q_abs.requires_grad and kv_abs.requires_grad
    idx = module.indexer(q_abs, kv_abs, 2, 21)
    assert not idx.requires_grad and idx.grad_fn is None
    # The same indices given as a constant produce the same gradients: nothing flows through selection.
    out, _ = module(hidden)
    out.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters()}
    for n, g in grads.items():
        assert g.abs().sum() > 0, f"no gradient reached {n}"
    module.zero_grad()
    module.indexer.forward = lambda *a, **k: idx
    out2, _ = module(hidden)
    out2.square().sum().backward()
    for n, p in module.named_parameters():
        assert torch.equal(grads[n], p.grad), n


def test_recall_is_exact_for_prob_sum(single_process):
    config = tiny_config(index_topk=4, native_scoring="prob_sum", recall_sample_rows=8)
    module = make_attention(config, "nsmla", fresh_seed())
    module.monitor_recall = True
    module(torch.randn(30, 1, 64))
    recall, mass = module.last_recall
    assert float(recall) == 1.0, "prob_sum selects the exact dense-attention top-k"
    assert 0.0 < float(mass) <= 1.0 + 1e-6
    config = tiny_config(index_topk=4, native_scoring="logit_sum", recall_sample_rows=8)
    module = make_attention(config, "nsmla", fresh_seed())
    module.monitor_recall = True
    module(torch.randn(30, 1, 64))
    recall, mass = module.last_recall
    assert 0.0 <= float(recall) <= 1.0 and 0.0 < float(mass) <= 1.0 + 1e-6


def test_triton_backend_matches_reference_backend(single_process):
    """Same weights, same input: the Triton sparse attention reproduces the reference layer, gradients too.
    (Interpreter on CPU, so power-of-two latent dims: kv_lora 32, rope 16.)"""
    seed = fresh_seed()
    device = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: Triton's interpreter
    outs = {}
    for backend in ("reference", "triton"):
        config = tiny_config(kv_lora_rank=32, qk_pos_emb_head_dim=16, index_topk=6, kernel_backend=backend)
        module = make_attention(config, "nsmla", seed).to(device)
        hidden = torch.randn(13, 2, 64, generator=torch.Generator().manual_seed(seed)).to(device).requires_grad_()
        out, _ = module(hidden)
        out.square().sum().backward()
        outs[backend] = (module.state_dict(), out.detach(), hidden.grad, {n: p.grad for n, p in module.named_parameters()})
    (sd_r, out_r, dh_r, g_r), (sd_t, out_t, dh_t, g_t) = outs["reference"], outs["triton"]
    assert sd_r.keys() == sd_t.keys(), "state_dict keys must not depend on the kernel backend"
    assert_close("output", out_r, out_t, 1e-5)
    assert_close("d hidden", dh_r, dh_t, 1e-5)
    for name in g_r:
        assert_close(f"d {name}", g_r[name], g_t[name], 1e-5)


def test_auto_backend_keeps_reference_topk_on_short_sequences():
    """auto: Triton attention on CUDA when the latent sizes suit it; the Triton top-k only from
    TRITON_TOPK_MIN_KEYS keys on; an explicit backend is taken as given."""
    from megatron_ext.config import TRITON_TOPK_MIN_KEYS

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    auto = tiny_config(kv_lora_rank=32, qk_pos_emb_head_dim=16)
    assert auto.backend_for(cuda) == "triton" and auto.backend_for(cpu) == "reference"
    assert auto.indexer_backend_for(cuda, TRITON_TOPK_MIN_KEYS - 1) == "reference"
    assert auto.indexer_backend_for(cuda, TRITON_TOPK_MIN_KEYS) == "triton"
    assert auto.indexer_backend_for(cpu, TRITON_TOPK_MIN_KEYS) == "reference"
    odd = tiny_config()  # kv_lora_rank 24: not a power of two
    assert odd.indexer_backend_for(cuda, TRITON_TOPK_MIN_KEYS) == "reference"
    forced = tiny_config(kv_lora_rank=32, qk_pos_emb_head_dim=16, kernel_backend="triton")
    assert forced.indexer_backend_for(cuda, 16) == "triton"
