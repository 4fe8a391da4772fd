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

With 128 heads or a multiple (`_sparse_mla_bwd_dq_slab_ws_kernel`) that layout gathers every key
row twice per token, once per 64-head program. There one program is (token, 128 heads, a
192-column slab of 3): it gathers only its slab of each selected row (128 + 64 columns) and the
[128, 64] dS tile, four stages of 40 KiB (160 KiB); WG0 takes heads 0-63, WG1 heads 64-127, each
a [64, 192] fp32 accumulator. Bytes a token at h128, k 2048: 3.8 MB instead of 5.1; the pass went
from about 4.2 to 3.3-3.8 ms at L 32k (NOTES.md, seventeenth round), with bitwise the same dq.
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

from .gluon_fwd import (BLOCK_H, BLOCK_K, D_ROPE, D_V, HALF, NV_SMEM, O_LAYOUT, S_LAYOUT, _block_rows,
                        _gather_half, _gather_rows)


# The slab kernel: 192 columns a program, held as a 128- and a 64-column tile (Gluon's buffers take
# power-of-two shapes), and their accumulators' MMA layouts (the 64-column one is S_LAYOUT).
SLAB = gl.constexpr(192)
SLAB_A = gl.constexpr(128)
SLAB_STAGES = gl.constexpr(4)
ACC_A_LAYOUT = gl.constexpr(gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 128, 16]))


@gluon.jit
def _gather_ds_tile(dst, DS, ds_row0, stride_ph, b):
    """cp.async the [64 heads, 64 slots] dS tile of key block b (heads from ds_row0) into dst."""
    layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
    h = gl.arange(0, BLOCK_H, layout=gl.SliceLayout(1, layout))
    _gather_rows(dst, DS, ds_row0 + h.to(gl.int64) * stride_ph + b * BLOCK_K, h >= 0, BLOCK_K)


@gluon.jit
def _producer(KV, IDX, DS, idx_row0, ds_row0, stride_ph, stride_kv, TOPK, n_blocks,
              kn, kr, dsb, ready, free):
    """Key block b's rows (two halves of value columns, then the rope columns) and its dS tile into
    buffer b % 2, once both math warpgroups have freed it (block b - 2)."""
    for b in range(n_blocks):
        x = b % 2
        off, ok = _block_rows(IDX, idx_row0, b, TOPK, stride_kv)
        mbarrier.wait(free.index(x), ((b // 2) & 1) ^ 1)  # fresh barriers pass at parity 1
        _gather_ds_tile(dsb.index(x), DS, ds_row0, stride_ph, b)
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

    kn = gl.allocate_shared_memory(gl.bfloat16, [2, BLOCK_K, D_V], NV_SMEM)
    kr = gl.allocate_shared_memory(gl.bfloat16, [2, BLOCK_K, D_ROPE], NV_SMEM)
    dsb = gl.allocate_shared_memory(gl.bfloat16, [2, BLOCK_H, BLOCK_K], NV_SMEM)
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


@gluon.jit
def _slab_producer(KV, IDX, DS, idx_row0, ds_row0, col0, stride_ph, stride_kv, TOPK, n_blocks,
                   ka, kb, dsb, ready, free):
    """Key block b's slab (columns col0 .. col0 + 127 into ka, the next 64 into kb) and its two
    [64 heads, 64 slots] dS tiles (dsb 2x and 2x + 1) into stage x = b % SLAB_STAGES, once both
    math warpgroups have freed it (block b - SLAB_STAGES)."""
    for b in range(n_blocks):
        x = b % SLAB_STAGES
        off, ok = _block_rows(IDX, idx_row0, b, TOPK, stride_kv)
        mbarrier.wait(free.index(x), ((b // SLAB_STAGES) & 1) ^ 1)  # fresh barriers pass at parity 1
        _gather_ds_tile(dsb.index(2 * x), DS, ds_row0, stride_ph, b)
        _gather_ds_tile(dsb.index(2 * x + 1), DS, ds_row0 + BLOCK_H * stride_ph, stride_ph, b)
        _gather_rows(ka.index(x), KV + col0, off, ok, SLAB_A)
        _gather_rows(kb.index(x), KV + col0 + SLAB_A, off, ok, SLAB - SLAB_A)
        async_copy.mbarrier_arrive(ready.index(x), increment_count=False)


@gluon.jit
def _slab_wg(DQ, dq_row0, stride_qh, n_blocks, ka, kb, dsb, ready, free, W: gl.constexpr):
    """dq of heads 64W .. 64W + 63 over the program's slab: the sum over key blocks of
    dS[those heads, 64 slots] K[64 keys, slab], as [64, 128] + [64, 64] fp32; dq_row0 is the
    program's first head and column."""
    acc_a = gl.zeros([BLOCK_H, SLAB_A], gl.float32, ACC_A_LAYOUT)
    acc_b = gl.zeros([BLOCK_H, SLAB - SLAB_A], gl.float32, S_LAYOUT)
    for b in range(n_blocks):
        x = b % SLAB_STAGES
        mbarrier.wait(ready.index(x), (b // SLAB_STAGES) & 1)
        acc_a = hopper.warpgroup_mma(dsb.index(2 * x + W), ka.index(x), acc_a, is_async=True)
        acc_b = hopper.warpgroup_mma(dsb.index(2 * x + W), kb.index(x), acc_b, is_async=True)
        acc_a, acc_b = hopper.warpgroup_mma_wait(2, deps=[acc_a, acc_b])  # block b - 1's MMAs are done
        if b > 0:
            mbarrier.arrive(free.index((b - 1) % SLAB_STAGES))
    acc_a, acc_b = hopper.warpgroup_mma_wait(0, deps=[acc_a, acc_b])
    row0 = dq_row0 + W * BLOCK_H * stride_qh
    _store_cols(DQ, row0, stride_qh, acc_a, 0, ACC_A_LAYOUT)
    _store_cols(DQ, row0, stride_qh, acc_b, SLAB_A, S_LAYOUT)


# warp_specialize passes no constexpr arguments: one entry per head half.
@gluon.jit
def _slab_wg0(DQ, dq_row0, stride_qh, n_blocks, ka, kb, dsb, ready, free):
    _slab_wg(DQ, dq_row0, stride_qh, n_blocks, ka, kb, dsb, ready, free, 0)


@gluon.jit
def _slab_wg1(DQ, dq_row0, stride_qh, n_blocks, ka, kb, dsb, ready, free):
    _slab_wg(DQ, dq_row0, stride_qh, n_blocks, ka, kb, dsb, ready, free, 1)


@gluon.jit
def _sparse_mla_bwd_dq_slab_ws_kernel(KV, IDX, DS, DQ, H, TOPK, n_blocks, t0,
                                      stride_kv, stride_it, stride_qt, stride_qh, stride_pt, stride_ph):
    """One program = token t = t0 + r of the chunk x 128 heads x one 192-column slab (the slab
    fastest, then the head block, in the 1-D grid: a token's programs run together and between them
    read each selected row once); DS is [chunk rows, H, 64 * n_blocks] bf16 (row r)."""
    pid = gl.program_id(0).to(gl.int64)
    n_slabs: gl.constexpr = (D_V + D_ROPE) // SLAB
    per_token = (H // (2 * BLOCK_H)) * n_slabs
    r = pid // per_token
    h0 = (pid % per_token) // n_slabs * (2 * BLOCK_H)
    col0 = (pid % n_slabs) * SLAB
    t = t0 + r

    ka = gl.allocate_shared_memory(gl.bfloat16, [SLAB_STAGES, BLOCK_K, SLAB_A], NV_SMEM)
    kb = gl.allocate_shared_memory(gl.bfloat16, [SLAB_STAGES, BLOCK_K, SLAB - SLAB_A], NV_SMEM)
    dsb = gl.allocate_shared_memory(gl.bfloat16, [2 * SLAB_STAGES, BLOCK_H, BLOCK_K], NV_SMEM)
    bar: gl.constexpr = mbarrier.MBarrierLayout()
    ready = gl.allocate_shared_memory(gl.int64, [SLAB_STAGES, 1], bar)
    free = gl.allocate_shared_memory(gl.int64, [SLAB_STAGES, 1], bar)
    for i in gl.static_range(SLAB_STAGES):
        mbarrier.init(ready.index(i), count=128)  # one cp.async arrival per producer thread
        mbarrier.init(free.index(i), count=2)     # both math warpgroups read every stage

    wg_args = (DQ, t * stride_qt + h0 * stride_qh + col0, stride_qh, n_blocks, ka, kb, dsb, ready, free)
    gl.warp_specialize(
        [(_slab_producer, (KV, IDX, DS, t * stride_it, r * stride_pt + h0 * stride_ph, col0, stride_ph, stride_kv,
                           TOPK, n_blocks, ka, kb, dsb, ready, free)),
         (_slab_wg0, wg_args), (_slab_wg1, wg_args)],
        [4, 4], [232, 232])


def sparse_mla_dq_gluon(kv, indices, ds, t0: int, dq, slabs: bool | None = None) -> None:
    """dq rows t0 .. t0 + ds.shape[0] - 1 ([T, H, 576] bf16, unit stride on the last axis) = dS K,
    from ds [n, H, kp] bf16 (kp = k rounded up to a multiple of 64, zeros past k, as the Gluon first
    pass writes them); kv [L, 576] bf16, indices [T, k] int32. slabs: the 128-head column-slab
    kernel (default where H is a multiple of 128) or the 64-head whole-row one."""
    n, H, p_cols = ds.shape
    topk = indices.shape[1]
    if n == 0:
        return
    assert p_cols % BLOCK_K.value == 0 and p_cols >= topk and H % BLOCK_H.value == 0
    if slabs is None:
        slabs = H % (2 * BLOCK_H.value) == 0
    assert not slabs or H % (2 * BLOCK_H.value) == 0, "the slab kernel takes heads in blocks of 128"
    args = (kv, indices, ds, dq, H, topk, triton.cdiv(topk, BLOCK_K.value), t0,
            kv.stride(0), indices.stride(0), dq.stride(0), dq.stride(1), ds.stride(0), ds.stride(1))
    if slabs:
        n_slabs = (D_V.value + D_ROPE.value) // SLAB.value
        _sparse_mla_bwd_dq_slab_ws_kernel[(n * (H // (2 * BLOCK_H.value)) * n_slabs,)](*args, num_warps=4)
    else:
        _sparse_mla_bwd_dq_ws_kernel[(n * (H // BLOCK_H.value),)](*args, num_warps=4)

