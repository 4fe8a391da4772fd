"""The sparse MLA backward's dq pass for Hopper in Gluon, heads a multiple of 64.

dq[t, h, :] = sum over the token's selected keys of dS[t, h, slot] * kv[key, :] (576 columns),
from the dS that the first pass stored ([rows, H, k padded to 64] bf16). The Triton kernel
(`_sparse_mla_bwd_dq_from_ds_kernel`) runs it at about 280 TFLOP/s at h128 (NOTES.md); it is
one GEMM per gathered 64-key block, so the gathers, not the MMAs, set its pace. One program (one
token, 64 heads) has three warpgroups:

- the producer (4 warps, few registers) gathers key block b (all 576 columns) by cp.async into
  buffer b % 2 together with the block's [64 heads, 64 slots] dS tile;
- WG0 accumulates dq columns 0-255 and the rope columns 512-575 ([64, 256] + [64, 64] fp32),
  WG1 columns 256-511, both with dS as the A operand from shared memory; each keeps one block's
  MMAs in flight and frees the block before it.

Shared memory: two key buffers of 72 KiB and two dS tiles of 8 KiB (160 KiB).
Invalid slots and slots past k read as zero rows (and their dS is zero).
Not run by TRITON_INTERPRET (Gluon has no interpreter); tested on the GPU against PyTorch.
"""

from __future__ import annotations

import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia import hopper
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import mbarrier

from .gluon_fwd import (BLOCK_H, BLOCK_K, D_ROPE, D_V, HALF, O_LAYOUT, S_LAYOUT, _block_rows, _gather_half,
                        _gather_rows)


@gluon.jit
def _producer(KV, IDX, DS, idx_row0, ds_row0, stride_ph, stride_kv, TOPK, n_blocks,
              kn, kr, dsb, ready, free):
    """Key block b's rows (two halves of value columns, then the rope columns) and its dS tile into
    buffer b % 2, once both math warpgroups have freed it (block b - 2)."""
    layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
    h = gl.arange(0, BLOCK_H, layout=gl.SliceLayout(1, layout))
    for b in range(n_blocks):
        x = b % 2
        off, ok = _block_rows(IDX, idx_row0, b, TOPK, stride_kv)
        mbarrier.wait(free.index(x), ((b // 2) & 1) ^ 1)  # fresh barriers pass at parity 1
        _gather_rows(dsb.index(x), DS, ds_row0 + h.to(gl.int64) * stride_ph + b * BLOCK_K, h >= 0, BLOCK_K)
        _gather_half(kn, kr, x, KV, off, ok, False)
        _gather_half(kn, kr, x, KV, off, ok, True)
        async_copy.mbarrier_arrive(ready.index(x), increment_count=False)


@gluon.jit
def _store_cols(DQ, dq_row0, stride_qh, acc, col0, LAYOUT: gl.constexpr):
    """dq[t, h0 + i, col0 + c] = acc[i, c] (bf16), straight from the MMA layout."""
    N: gl.constexpr = acc.shape[1]
    heads = gl.arange(0, BLOCK_H, layout=gl.SliceLayout(1, LAYOUT))
    cols = col0 + gl.arange(0, N, layout=gl.SliceLayout(0, LAYOUT))
    gl.store(DQ + dq_row0 + heads.to(gl.int64)[:, None] * stride_qh + cols[None, :], acc.to(DQ.dtype.element_ty),
             cache_modifier=".cs")  # streamed: keep L2 for the keys


@gluon.jit
def _wg0(DQ, dq_row0, stride_qh, n_blocks, kn, kr, dsb, ready, free):
    """dq columns 0-255 and 512-575."""
    acc = gl.zeros([BLOCK_H, HALF], gl.float32, O_LAYOUT)
    acc_r = gl.zeros([BLOCK_H, D_ROPE], gl.float32, S_LAYOUT)
    for b in range(n_blocks):
        x = b % 2
        mbarrier.wait(ready.index(x), (b // 2) & 1)
        acc = hopper.warpgroup_mma(dsb.index(x), kn.index(x).slice(0, HALF, dim=1), acc, is_async=True)
        acc_r = hopper.warpgroup_mma(dsb.index(x), kr.index(x), acc_r, is_async=True)
        acc, acc_r = hopper.warpgroup_mma_wait(2, deps=[acc, acc_r])  # block b - 1's MMAs are done
        if b > 0:
            mbarrier.arrive(free.index(1 - x))
    acc, acc_r = hopper.warpgroup_mma_wait(0, deps=[acc, acc_r])
    _store_cols(DQ, dq_row0, stride_qh, acc, 0, O_LAYOUT)
    _store_cols(DQ, dq_row0, stride_qh, acc_r, D_V, S_LAYOUT)


@gluon.jit
def _wg1(DQ, dq_row0, stride_qh, n_blocks, kn, kr, dsb, ready, free):
    """dq columns 256-511."""
    acc = gl.zeros([BLOCK_H, HALF], gl.float32, O_LAYOUT)
    for b in range(n_blocks):
        x = b % 2
        mbarrier.wait(ready.index(x), (b // 2) & 1)
        acc = hopper.warpgroup_mma(dsb.index(x), kn.index(x).slice(HALF, HALF, dim=1), acc, is_async=True)
        acc = hopper.warpgroup_mma_wait(1, deps=[acc])
        if b > 0:
            mbarrier.arrive(free.index(1 - x))
    acc = hopper.warpgroup_mma_wait(0, deps=[acc])
    _store_cols(DQ, dq_row0, stride_qh, acc, HALF, O_LAYOUT)


@gluon.jit
def _sparse_mla_bwd_dq_ws_kernel(KV, IDX, DS, DQ, H, TOPK, n_blocks, t0,
                                 stride_kv, stride_it, stride_qt, stride_qh, stride_pt, stride_ph):
    """One program = token t = t0 + r of the chunk x 64 heads (head block fastest in the 1-D grid);
    DS is [chunk rows, H, 64 * n_blocks] bf16 (row r)."""
    pid = gl.program_id(0).to(gl.int64)
    hblocks = H // BLOCK_H
    r = pid // hblocks
    h0 = (pid % hblocks) * BLOCK_H
    t = t0 + r

    nv: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
    kn = gl.allocate_shared_memory(gl.bfloat16, [2, BLOCK_K, D_V], nv)
    kr = gl.allocate_shared_memory(gl.bfloat16, [2, BLOCK_K, D_ROPE], nv)
    dsb = gl.allocate_shared_memory(gl.bfloat16, [2, BLOCK_H, BLOCK_K], nv)
    bar: gl.constexpr = mbarrier.MBarrierLayout()
    ready = gl.allocate_shared_memory(gl.int64, [2, 1], bar)
    free = gl.allocate_shared_memory(gl.int64, [2, 1], bar)
    for i in gl.static_range(2):
        mbarrier.init(ready.index(i), count=128)  # one cp.async arrival per producer thread
        mbarrier.init(free.index(i), count=2)     # both math warpgroups read every buffer

    wg_args = (DQ, t * stride_qt + h0 * stride_qh, stride_qh, n_blocks, kn, kr, dsb, ready, free)
    gl.warp_specialize(
        [(_producer, (KV, IDX, DS, t * stride_it, r * stride_pt + h0 * stride_ph, stride_ph, stride_kv, TOPK,
                      n_blocks, kn, kr, dsb, ready, free)),
         (_wg0, wg_args), (_wg1, wg_args)],
        [4, 4], [232, 232])


def sparse_mla_dq_gluon(kv, indices, ds, t0: int, dq) -> None:
    """dq rows t0 .. t0 + ds.shape[0] - 1 ([T, H, 576] bf16, unit stride on the last axis) = dS K,
    from ds [n, H, kp] bf16 (kp = k rounded up to a multiple of 64, zeros past k, as the Gluon first
    pass writes them); kv [L, 576] bf16, indices [T, k] int32."""
    n, H, p_cols = ds.shape
    topk = indices.shape[1]
    if n == 0:
        return
    assert p_cols % BLOCK_K.value == 0 and p_cols >= topk and H % BLOCK_H.value == 0
    _sparse_mla_bwd_dq_ws_kernel[(n * (H // BLOCK_H.value),)](
        kv, indices, ds, dq, H, topk, triton.cdiv(topk, BLOCK_K.value), t0,
        kv.stride(0), indices.stride(0), dq.stride(0), dq.stride(1), ds.stride(0), ds.stride(1), num_warps=4)

