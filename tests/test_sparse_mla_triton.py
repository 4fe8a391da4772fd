"""Triton sparse MLA (forward and backward) against the PyTorch reference.

On CPU (CI) this runs under TRITON_INTERPRET=1 at small shapes; on a GPU at DeepSeek shapes
(D = 512 + 64) with H in {8, 16, 64, 128}. Bounds: fp32 (ieee dots) 1e-5; bf16 1e-2 (the kernel
rounds P and dS to bf16 before the value/gradient products, as flash attention does).
"""

import pytest
import torch

from kernels.sparse_mla import sparse_mla_reference, sparse_mla_triton
from tests.conftest import assert_close, fresh_seed

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
BOUND = {torch.float32: 1e-5, torch.bfloat16: 1e-2}

if GPU:
    SHAPES = [  # T, L, H, d_v, d_rope, k
        (513, 1031, 8, 512, 64, 512), (257, 2049, 16, 512, 64, 2048 + 37), (129, 700, 64, 512, 64, 576),
        (65, 4096, 128, 512, 64, 2048),
    ]
else:
    SHAPES = [(7, 40, 8, 32, 16, 37), (5, 70, 16, 64, 16, 64 + 5), (3, 20, 3, 16, 16, 20)]


def problem(shape, dtype):
    """Fresh random (q, kv, idx, dout) on the CPU for shape (T, L, H, d_v, d_rope, k)."""
    T, L, H, d_v, d_rope, k = shape
    gen = torch.Generator().manual_seed(fresh_seed())
    q, kv, idx = make_inputs(T, L, H, d_v + d_rope, k, dtype, gen)
    return q, kv, idx, torch.randn(T, H, d_v, generator=gen).to(dtype)


def make_inputs(T, L, H, D, k, dtype, gen):
    q = torch.randn(T, H, D, generator=gen).to(dtype)
    kv = torch.randn(L, D, generator=gen).to(dtype)
    k = min(k, L)
    idx = torch.stack([torch.randperm(L, generator=gen)[:k] for _ in range(T)]).int()
    idx[torch.rand(T, k, generator=gen) < 0.25] = -1  # invalid slots scattered through the row
    idx[T // 2] = -1  # a query with no key at all
    return q, kv, idx


def run(fn, q, kv, idx, scale, d_v, dout):
    q, kv = q.to(DEVICE).clone().requires_grad_(), kv.to(DEVICE).clone().requires_grad_()
    out, lse = fn(q, kv, idx.to(DEVICE), scale, d_v)
    out.backward(dout.to(DEVICE))
    return [x.detach().float().cpu() for x in (out, lse, q.grad, kv.grad)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}-L{}-H{}-dv{}-dr{}-k{}".format(*s))
def test_triton_matches_reference(shape, dtype):
    T, _, _, d_v, _, _ = shape
    q, kv, idx, dout = problem(shape, dtype)
    D = q.shape[-1]
    ref = run(sparse_mla_reference, q, kv, idx, D**-0.5, d_v, dout)
    got = run(sparse_mla_triton, q, kv, idx, D**-0.5, d_v, dout)
    names = ("out", "lse", "dq", "dkv")
    finite = torch.isfinite(ref[1])
    assert torch.equal(finite, torch.isfinite(got[1])), "lse must be -inf exactly for rows without keys"
    assert torch.all(got[0][T // 2] == 0) and torch.all(got[2][T // 2] == 0)
    for name, r, g in zip(names, ref, got):
        if name == "lse":
            r, g = r[finite], g[finite]
        assert_close(name, r, g, 1e-5 if name == "lse" else BOUND[dtype])


def test_triton_rejects_bad_inputs():
    q = torch.randn(4, 2, 48, device=DEVICE)
    kv = torch.randn(9, 48, device=DEVICE)
    idx = torch.zeros(4, 8, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="power of two"):
        sparse_mla_triton(q, kv, idx, None, 24)  # d_v = 24
    with pytest.raises(ValueError, match="share a dtype"):
        sparse_mla_triton(q, kv.half(), idx, None, 32)
    with pytest.raises(ValueError, match="indices must be"):
        sparse_mla_triton(q, kv, idx[:3], None, 32)


def forward_problem(shape, dtype):
    """Random inputs on DEVICE and the Triton forward: (q, kv, idx, dout, out, lse)."""
    from kernels.sparse_mla.triton_impl import sparse_mla_fwd_triton

    q, kv, idx, dout = (x.to(DEVICE) for x in problem(shape, dtype))
    return (q, kv, idx, dout) + tuple(sparse_mla_fwd_triton(q, kv, idx, q.shape[-1] ** -0.5, dout.shape[-1]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_deterministic_backward(monkeypatch, dtype):
    """deterministic=True: dkv summed per key in (token, slot) order, over several token chunks
    (PARTIAL_BYTES shrunk so the chunking runs), bit-identical across runs and within the bound of
    the reference; dq is unchanged by the option."""
    import kernels.sparse_mla.triton_impl as impl

    q, kv, idx, dout, out, lse = forward_problem(SHAPES[1], dtype)
    T, H, D = q.shape
    k, d_v = idx.shape[1], dout.shape[-1]
    monkeypatch.setattr(impl, "PARTIAL_BYTES", max(1, T // 3) * k * D * 4)
    runs = [impl.sparse_mla_bwd_triton(q, kv, idx, D**-0.5, d_v, out, lse, dout, deterministic=True) for _ in range(2)]
    assert torch.equal(runs[0][1], runs[1][1]) and torch.equal(runs[0][0], runs[1][0])
    ref = run(sparse_mla_reference, q.cpu(), kv.cpu(), idx.cpu(), D**-0.5, d_v, dout.cpu())
    assert_close("dkv (deterministic)", ref[3], runs[0][1].float().cpu(), BOUND[dtype])
    assert_close("dq (deterministic)", ref[2], runs[0][0].float().cpu(), BOUND[dtype])


@pytest.mark.parametrize("deterministic", [False, True])
def test_backward_over_token_chunks_and_column_slabs(monkeypatch, deterministic):
    """P/dS buffers shrunk (PDS_BYTES) so that the two backward passes run over several chunks of
    tokens, one of them ragged, and (atomic mode) dkv slabs of one column chunk each: dq and dkv
    still match the reference."""
    import kernels.sparse_mla.triton_impl as impl

    q, kv, idx, dout, out, lse = forward_problem(SHAPES[0], torch.bfloat16)
    T, H, D = q.shape
    k, d_v = idx.shape[1], dout.shape[-1]
    monkeypatch.setattr(impl, "PDS_BYTES", max(1, T // 3 + 1) * H * k * q.element_size())
    monkeypatch.setattr(impl, "DKV_SLAB_BYTES", 1)  # one column chunk per slab
    dq, dkv = impl.sparse_mla_bwd_triton(q, kv, idx, D**-0.5, d_v, out, lse, dout, deterministic=deterministic)
    ref = run(sparse_mla_reference, q.cpu(), kv.cpu(), idx.cpu(), D**-0.5, d_v, dout.cpu())
    assert_close("dq (chunked)", ref[2], dq.float().cpu(), BOUND[torch.bfloat16])
    assert_close("dkv (chunked)", ref[3], dkv.float().cpu(), BOUND[torch.bfloat16])


@pytest.mark.parametrize("separate_dq", [False, True])
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[-1]], ids=lambda s: "T{}-L{}-H{}-dv{}-dr{}-k{}".format(*s))
def test_dq_in_pass_one_or_from_stored_ds(shape, separate_dq):
    """dq accumulated inside pass 1 (config of two entries) or by the separate dq-from-dS kernel
    (a third entry): both match the reference."""
    import kernels.sparse_mla.triton_impl as impl

    q, kv, idx, dout, out, lse = forward_problem(shape, torch.bfloat16)
    H, D, d_v = q.shape[1], q.shape[2], dout.shape[-1]
    pass1, dkv_cfg = impl.default_config(H, True, q.element_size())[:2]
    cfg = (pass1, dkv_cfg) + (((16, 64, 4, 2),) if separate_dq else ())
    dq, dkv = impl.sparse_mla_bwd_triton(q, kv, idx, D**-0.5, d_v, out, lse, dout, cfg)
    ref = run(sparse_mla_reference, q.cpu(), kv.cpu(), idx.cpu(), D**-0.5, d_v, dout.cpu())
    assert_close("dq", ref[2], dq.float().cpu(), BOUND[torch.bfloat16])
    assert_close("dkv", ref[3], dkv.float().cpu(), BOUND[torch.bfloat16])


def test_dkv_column_slabs_follow_the_measured_choices():
    """_slab_cols picks, at the four measured H100 points (kernels/sparse_mla/NOTES.md, fourth
    round), the slab width that measured fastest: 3 chunks of 64 columns at L 32k (h16 and h128),
    one chunk at h16 and L 128k, one slab of all 576 columns at h128 and L 128k; an explicit chunk
    count wins; a dkv that fits the slab budget is one slab."""
    from kernels.sparse_mla.triton_impl import _slab_cols

    assert _slab_cols(32768, 576, 64, 128, 2, None) == 192
    assert _slab_cols(32768, 576, 64, 16, 2, None) == 192
    assert _slab_cols(131072, 576, 64, 16, 2, None) == 64
    assert _slab_cols(131072, 576, 64, 128, 2, None) == 576
    assert _slab_cols(131072, 576, 64, 128, 2, 2) == 128
    assert _slab_cols(4096, 576, 64, 128, 2, None) == 576


def test_gluon_dkv_launch_order_and_targets():
    """gluon_bwd_dkv.slab_launches (the Gluon dK/dV pass's and its traffic probe's launch loop):
    slab by slab, key range by key range; each target is that slab's 192 columns of a row-major
    [L, 576] dkv, or its slab of a slab-major [3, L, 192] one; the window is moved over exactly the
    range's rows of the target before each launch. Host-side only, so it runs on the CPU too."""
    from kernels.sparse_mla.gluon_bwd_dkv import slab_launches

    class Window:
        def __init__(self):
            self.covered = []

        def cover(self, t):
            self.covered.append((t.data_ptr(), t.shape[0]))

    L, range_keys = 70, 32
    bounds = torch.zeros(5, 4, dtype=torch.int32)  # 3 key ranges: [0, 32), [32, 64), [64, 70)
    for dkv, col in ((torch.zeros(L, 576), lambda s: (0, 192 * s)), (torch.zeros(3, L, 192), lambda s: (s, 0))):
        w = Window()
        got = list(slab_launches(dkv, bounds, range_keys, w))
        assert [(s, r) for s, r, _ in got] == [(s, r) for s in range(3) for r in range(3)]
        for (s, r, target), (ptr, rows) in zip(got, w.covered):
            assert target.shape[0] == L and target.stride(0) == dkv.stride(-2)
            assert target.data_ptr() == dkv.data_ptr() + (col(s)[0] * dkv.stride(0) + col(s)[1]) * 4
            assert ptr == target.data_ptr() + r * range_keys * target.stride(0) * 4
            assert rows == min(range_keys, L - r * range_keys)
        assert len(w.covered) == 9
    assert len(list(slab_launches(torch.zeros(L, 576), bounds[:, :2], L))) == 3  # one range, no window


def _hopper() -> bool:
    return GPU and torch.cuda.get_device_capability()[0] == 9


@pytest.mark.skipif(not _hopper(), reason="the Gluon forward needs a Hopper GPU (Gluon has no CPU interpreter)")
@pytest.mark.parametrize("shape", [(37, 1031, 64, 200), (33, 700, 64, 64), (129, 3000, 128, 2048 + 37),
                                   (65, 4096, 128, 2048), (17, 300, 192, 300)],
                         ids=lambda s: "T{}-L{}-H{}-k{}".format(*s))
def test_gluon_forward_matches_reference(shape):
    """The warp-specialised Gluon forward (h64/h128 default) against the fp32 reference: ragged last
    block (k 200, 2085), an odd number of 64-key blocks (its pair's second block all invalid: k 64,
    200, 2085), 25% invalid slots, a row with no key (out 0, lse -inf), 3 head blocks (H 192).
    And sparse_mla_fwd_triton takes this kernel by default for these shapes."""
    from kernels.sparse_mla.gluon_fwd import sparse_mla_fwd_gluon
    from kernels.sparse_mla.reference import sparse_mla_fwd_reference
    from kernels.sparse_mla.triton_impl import sparse_mla_fwd_triton

    T, L, H, k = shape
    q, kv, idx = make_inputs(T, L, H, 576, k, torch.bfloat16, torch.Generator().manual_seed(fresh_seed()))
    q, kv, idx = q.cuda(), kv.cuda(), idx.cuda()
    out, lse = sparse_mla_fwd_gluon(q, kv, idx, 576**-0.5, 512)
    ref_out, ref_lse = sparse_mla_fwd_reference(q.float(), kv.float(), idx, 576**-0.5, 512)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(finite, torch.isfinite(lse)), "lse must be -inf exactly for rows without keys"
    assert torch.all(out[T // 2] == 0)
    assert_close("out", ref_out, out.float(), BOUND[torch.bfloat16])
    assert_close("lse", ref_lse[finite], lse[finite], 1e-5)
    default_out, default_lse = sparse_mla_fwd_triton(q, kv, idx, 576**-0.5, 512)
    assert torch.equal(default_out, out) and torch.equal(default_lse, lse)


@pytest.mark.skipif(not _hopper(), reason="the Gluon backward pass needs a Hopper GPU (Gluon has no CPU interpreter)")
@pytest.mark.parametrize("shape", [(37, 1031, 64, 200), (33, 700, 64, 64), (129, 3000, 128, 2048 + 37),
                                   (17, 300, 192, 300)],
                         ids=lambda s: "T{}-L{}-H{}-k{}".format(*s))
def test_gluon_backward_matches_reference(shape, monkeypatch):
    """The Gluon first pass of the backward (P and dS, gluon_bwd.py) against fp32 PyTorch on the same
    bf16 inputs: ragged last block (k 200, 2085), one block (k 64), 25% invalid slots (P = dS = 0),
    a row with no key, 3 head blocks (H 192), a chunk that starts past token 0, rows padded to whole
    64-slot blocks (zeros past k). Then the whole default backward (Gluon pass 1 and dq pass; Gluon
    dK/dV pass at H 64/128 into a slab-major dkv kept in L2, in one key range or several (slots
    sorted by key), and into the row-major dkv it uses without a persisting L2; Triton's at H 192) and the deterministic one (Triton dK/dV from the
    Gluon pass 1's P/dS) against the reference gradients."""
    from kernels.sparse_mla.gluon_bwd import sparse_mla_pds_gluon
    from kernels.sparse_mla.reference import sparse_mla_fwd_reference
    from kernels.sparse_mla.triton_impl import gluon_pds_for, sparse_mla_bwd_triton

    T, L, H, k = shape
    gen = torch.Generator().manual_seed(fresh_seed())
    q, kv, idx = (x.cuda() for x in make_inputs(T, L, H, 576, k, torch.bfloat16, gen))
    dout = torch.randn(T, H, 512, generator=gen).to(torch.bfloat16).cuda()
    scale = 576**-0.5
    out, lse = sparse_mla_fwd_reference(q.float(), kv.float(), idx, scale, 512)
    out = out.to(torch.bfloat16)
    assert gluon_pds_for(q, kv, 512) is not None
    t0 = T // 3  # tokens t0.. only, as one chunk of a long backward
    kp = -(-k // 64) * 64
    p = torch.full((T - t0, H, kp), float("nan"), dtype=torch.bfloat16, device="cuda")
    ds = torch.full_like(p, float("nan"))
    sparse_mla_pds_gluon(q, kv, idx, out, dout, lse, scale, t0, p, ds)

    keys = kv.float()[idx[t0:].clamp(min=0).long()]  # [n, k, 576]
    ok = (idx[t0:] >= 0)[:, None, :]
    s = torch.einsum("thd,tkd->thk", q[t0:].float(), keys) * scale
    ref_p = torch.where(ok, torch.exp(s - lse[t0:, :, None]), 0.0)
    ref_p = torch.nan_to_num(ref_p, nan=0.0)  # the row with no key: lse -inf
    dp = torch.einsum("thv,tkv->thk", dout[t0:].float(), keys[..., :512])
    delta = (dout[t0:].float() * out[t0:].float()).sum(-1, keepdim=True)
    ref_ds = ref_p * (dp - delta) * scale
    assert torch.all(p[..., k:] == 0) and torch.all(ds[..., k:] == 0)
    p, ds = p[..., :k], ds[..., :k]
    assert torch.all(p[~ok.expand_as(p)] == 0) and torch.all(ds[~ok.expand_as(ds)] == 0)
    assert_close("P", ref_p, p.float(), BOUND[torch.bfloat16])
    assert_close("dS", ref_ds, ds.float(), BOUND[torch.bfloat16])

    ref = run(sparse_mla_reference, q.cpu(), kv.cpu(), idx.cpu(), scale, 512, dout.cpu())
    for deterministic in (False, True):
        dq, dkv = sparse_mla_bwd_triton(q, kv, idx, scale, 512, out, lse, dout, deterministic=deterministic)
        assert_close(f"dq (deterministic={deterministic})", ref[2], dq.float().cpu(), BOUND[torch.bfloat16])
        assert_close(f"dkv (deterministic={deterministic})", ref[3], dkv.float().cpu(), BOUND[torch.bfloat16])
    if H in (64, 128):
        import kernels.sparse_mla.gluon_bwd_dkv as gluon_dkv

        slabs, range_keys = gluon_dkv.dkv_plan(L, kv.device)
        assert slabs is not None and range_keys == L, "small L: one key range of a slab-major dkv"
        # Several key ranges (slots sorted by key, one launch per range), as at L 64k / 128k.
        monkeypatch.setattr(gluon_dkv, "dkv_plan", lambda num_keys, device: (slabs.zero_(), 257))
        dq, dkv = sparse_mla_bwd_triton(q, kv, idx, scale, 512, out, lse, dout)
        assert_close("dq (key ranges)", ref[2], dq.float().cpu(), BOUND[torch.bfloat16])
        assert_close("dkv (key ranges)", ref[3], dkv.float().cpu(), BOUND[torch.bfloat16])
        # No persisting L2: row-major dkv, one range.
        monkeypatch.setattr(gluon_dkv, "dkv_plan", lambda num_keys, device: (None, num_keys))
        _, dkv = sparse_mla_bwd_triton(q, kv, idx, scale, 512, out, lse, dout)
        assert_close("dkv (row-major)", ref[3], dkv.float().cpu(), BOUND[torch.bfloat16])


@pytest.mark.skipif(not _hopper(), reason="the Gluon dq pass needs a Hopper GPU (Gluon has no CPU interpreter)")
@pytest.mark.parametrize("shape", [(129, 3000, 128, 2048 + 37), (40, 900, 256, 300), (9, 70, 128, 64)],
                         ids=lambda s: "T{}-L{}-H{}-k{}".format(*s))
def test_gluon_dq_slabs_match_whole_rows(shape):
    """The 128-head column-slab dq kernel (the default at H 128 and 256) against the 64-head
    whole-row one (bitwise: each dq element sums the same products in the same order) and against
    fp32 dS K, for a chunk of tokens that starts past token 0: ragged last block (k 2085, 300),
    one block (k 64), 25% invalid slots and a row with no key (their dS zero, as pass 1 writes it),
    two 128-head blocks (H 256). Rows outside the chunk stay untouched."""
    from kernels.sparse_mla.gluon_bwd_dq import sparse_mla_dq_gluon

    T, L, H, k = shape
    gen = torch.Generator().manual_seed(fresh_seed())
    _, kv, idx = make_inputs(T, L, H, 576, k, torch.bfloat16, gen)
    kv, idx = kv.cuda(), idx.cuda()
    t0 = T // 3
    kp = -(-k // 64) * 64
    ok = idx[t0:] >= 0
    ds = torch.zeros(T - t0, H, kp)
    ds[..., :k] = torch.randn(T - t0, H, k, generator=gen) * 1e-2 * ok.cpu()[:, None, :]
    ds = ds.to(torch.bfloat16).cuda()
    got = {}
    for slabs in (True, False):
        got[slabs] = torch.full((T, H, 576), float("nan"), dtype=torch.bfloat16, device="cuda")
        sparse_mla_dq_gluon(kv, idx, ds, t0, got[slabs], slabs=slabs)
    assert torch.isnan(got[True][:t0]).all() and not torch.isnan(got[True][t0:]).any()
    assert torch.equal(got[True][t0:], got[False][t0:])
    keys = kv.float()[idx[t0:].clamp(min=0).long()] * ok[..., None]  # [n, k, 576]
    ref = torch.einsum("thk,tkd->thd", ds[..., :k].float(), keys)
    assert_close("dq (slabs)", ref, got[True][t0:].float(), BOUND[torch.bfloat16])


@pytest.mark.skipif(not GPU, reason="needs a CUDA device")
def test_persisting_l2_window_restores_the_device_limit():
    """kernels.l2_persist.persisting_l2 sets the persisting-L2 set-aside only inside its block: the
    device limit reads the same before and after (where the window is available at all)."""
    import ctypes

    from kernels.l2_persist import _cudart, persisting_l2

    rt = _cudart()
    if rt is None:
        pytest.skip("libcudart not found in this process")
    before, inside, after = ctypes.c_size_t(), ctypes.c_size_t(), ctypes.c_size_t()
    rt.cudaDeviceGetLimit(ctypes.byref(before), 0x06)
    with persisting_l2(torch.device("cuda")) as window:
        rt.cudaDeviceGetLimit(ctypes.byref(inside), 0x06)
        if window is not None:
            window.cover(torch.zeros(1024, device="cuda"))
            assert inside.value == window.limit > 0
            # Larger than the largest window the device takes: covered up to that size, and no
            # failed call left behind for torch's next CUDA check to report.
            from kernels.l2_persist import max_window_bytes
            big = torch.zeros(max_window_bytes(torch.cuda.current_device()) + (1 << 20), dtype=torch.uint8,
                              device="cuda")
            window.cover(big)
            big.add_(1)
            torch.cuda.synchronize()
            assert int(big[-1]) == 1
    rt.cudaDeviceGetLimit(ctypes.byref(after), 0x06)
    assert after.value == before.value
