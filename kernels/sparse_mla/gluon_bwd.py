"""The sparse MLA backward's first pass (P and dS) for Hopper in Gluon, heads a multiple of 64.

The backward (triton_impl.sparse_mla_bwd_triton) recomputes, per token and head, the
probabilities P = exp(S * scale - lse) and the score gradients dS = P * (dP - delta) * scale with
S = q K^T (576 columns), dP = dO K_nope^T (512 columns) and delta = rowsum(dO * O), stores both in
bf16 ([rows, H, k], rows padded to whole 64-slot blocks with zeros) and hands them to the dq and
dK/dV passes. This pass is two GEMMs per gathered
key block and no accumulator across blocks; the Triton version runs it at about 210 TFLOP/s at
h128 (NOTES.md). Here one program (one token, 64 heads) has three warpgroups, as the Gluon forward:

- the producer (4 warps, few registers) gathers 64-key blocks of latent kv by cp.async into two
  shared-memory buffers, each in halves (value columns 0-255; 256-511 with the rope columns) with
  their own ready/free mbarriers, and Q once;
- WG0 computes S = Q K^T (Q from shared memory), P, stores P to global memory and passes it
  (bf16) to WG1 through an 8 KB shared buffer;
- WG1 holds dO in registers (the A operand of its wgmma: 128 registers a thread), computes
  dP = dO K_nope^T for the same block, then dS from P and stores it.

Shared memory: Q 72 KiB + two key buffers of 72 KiB + P 8 KiB + barriers (229,792 of the
232,448 bytes a block may have), so dO could not also live there.

Rows with no key have lse = -inf: P = exp2(-inf) = 0 there and so is dS, as in the reference.
Not run by TRITON_INTERPRET (Gluon has no interpreter); tested on the GPU against PyTorch.
"""

from __future__ import annotations

import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia import hopper
from triton.experimental.gluon.language.nvidia.hopper import mbarrier

from kernels.gluon_compat import sync_warps as _sync_warps

from .gluon_fwd import (BLOCK_H, BLOCK_K, HALF, NV_SMEM, S_LAYOUT, ROW_S, _block_rows, _load_q, _refill_half,
                        _scores_half, _token_buffers)

# dO as the register A operand of dP = dO K_nope^T (wgmma m64n64, k in steps of 16).
DO_LAYOUT = gl.constexpr(gl.DotOperandLayout(operand_index=0, parent=S_LAYOUT.value, k_width=2))


@gluon.jit
def _producer(Q, KV, IDX, q_row0, stride_qh, stride_kv, idx_row0, TOPK, n_blocks,
              q_n, q_r, kn, kr, ready_l, ready_r, free_l, free_r, q_bar):
    """4 warps: Q once, then key block b into buffer b % 2, its L half (columns 0-255) as soon as
    both math warpgroups have freed that half of block b - 2, then its R half (256-511 + rope)."""
    _load_q(Q, q_row0, stride_qh, q_n, q_r, q_bar)
    for b in range(n_blocks):
        x = b % 2
        ph = ((b // 2) & 1) ^ 1  # fresh barriers pass at parity 1 (first use of each buffer)
        off, ok = _block_rows(IDX, idx_row0, b, TOPK, stride_kv)
        _refill_half(kn, kr, x, KV, off, ok, False, free_l, ready_l, ph)
        _refill_half(kn, kr, x, KV, off, ok, True, free_r, ready_r, ph)


@gluon.jit
def _tile_offsets(b, stride_ph):
    """Element offsets (int32, relative to the program's first head of its row) of key block b's
    [64 heads, 64 slots] tile in the P / dS buffers, S layout; and the slots themselves. No mask:
    the buffers' rows hold whole blocks (the host checks), so the stores are 4-byte pairs."""
    heads = gl.arange(0, BLOCK_H, layout=ROW_S)
    slots = b * BLOCK_K + gl.arange(0, BLOCK_K, layout=gl.SliceLayout(0, S_LAYOUT))
    return heads[:, None] * stride_ph + slots[None, :], slots


@gluon.jit
def _wg_scores(IDX, LSE, P, idx_row0, lse_row0, p_row0, stride_ph, TOPK, n_blocks, scale_log2,
               q_n, q_r, kn, kr, p_smem, ready_l, ready_r, free_l, free_r, q_bar, p_ready, p_free):
    """WG0: S = Q K^T per key block, P = exp2(S * scale_log2 - lse2) (0 on invalid slots), P to
    global memory and to WG1."""
    lse = gl.load(LSE + lse_row0 + gl.arange(0, BLOCK_H, layout=ROW_S))
    lse2 = gl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    mbarrier.wait(q_bar, 0)
    for b in range(n_blocks):
        x = b % 2
        ph = (b // 2) & 1
        s = gl.zeros([BLOCK_H, BLOCK_K], gl.float32, S_LAYOUT)
        mbarrier.wait(ready_l.index(x), ph)
        s = _scores_half(q_n, q_r, kn.index(x), kr.index(x), s, False, True)
        mbarrier.wait(ready_r.index(x), ph)
        s = _scores_half(q_n, q_r, kn.index(x), kr.index(x), s, True, False)
        offs, slots = _tile_offsets(b, stride_ph)
        idx = gl.load(IDX + idx_row0 + slots, mask=slots < TOPK, other=-1)
        hopper.warpgroup_mma_wait(2, deps=[s])
        mbarrier.arrive(free_l.index(x))
        s = hopper.warpgroup_mma_wait(0, deps=[s])
        mbarrier.arrive(free_r.index(x))
        p = gl.where((idx >= 0)[None, :], gl.exp2(s * scale_log2 - lse2[:, None]), 0.0).to(gl.bfloat16)
        gl.store(P + p_row0 + offs, p, cache_modifier=".cs")  # streamed: keep L2 for the keys
        mbarrier.wait(p_free, (b & 1) ^ 1)  # WG1 has read the previous block's P
        p_smem.store(p)
        _sync_warps()
        mbarrier.arrive(p_ready)


@gluon.jit
def _load_rows(X, row0, stride_h, col0):
    """X[row0 + h * stride_h + col0 + c] for 64 heads h and 256 columns c, in dO's register layout."""
    heads = gl.arange(0, BLOCK_H, layout=gl.SliceLayout(1, DO_LAYOUT))
    cols = col0 + gl.arange(0, HALF, layout=gl.SliceLayout(0, DO_LAYOUT))
    return gl.load(X + row0 + heads.to(gl.int64)[:, None] * stride_h + cols[None, :], eviction_policy="evict_first")


@gluon.jit
def _wg_grads(O, DO, DS, o_row0, stride_oh, p_row0, stride_ph, n_blocks, scale,
              kn, p_smem, ready_l, ready_r, free_l, free_r, p_ready, p_free):
    """WG1: dO in registers, delta = rowsum(dO * O); per key block dP = dO K_nope^T and
    dS = P * (dP - delta) * scale to global memory."""
    do_l = _load_rows(DO, o_row0, stride_oh, 0)
    do_r = _load_rows(DO, o_row0, stride_oh, HALF)
    # One half of O at a time: dO (128 registers) and all of O would not fit beside each other.
    delta = gl.sum(do_l.to(gl.float32) * _load_rows(O, o_row0, stride_oh, 0).to(gl.float32), 1)
    delta += gl.sum(do_r.to(gl.float32) * _load_rows(O, o_row0, stride_oh, HALF).to(gl.float32), 1)
    delta = gl.convert_layout(delta, ROW_S)
    for b in range(n_blocks):
        x = b % 2
        ph = (b // 2) & 1
        dp = gl.zeros([BLOCK_H, BLOCK_K], gl.float32, S_LAYOUT)
        mbarrier.wait(ready_l.index(x), ph)
        dp = hopper.warpgroup_mma(do_l, kn.index(x).slice(0, HALF, dim=1).permute((1, 0)), dp,
                                  use_acc=False, is_async=True)
        mbarrier.wait(ready_r.index(x), ph)
        dp = hopper.warpgroup_mma(do_r, kn.index(x).slice(HALF, HALF, dim=1).permute((1, 0)), dp, is_async=True)
        offs, slots = _tile_offsets(b, stride_ph)
        hopper.warpgroup_mma_wait(1, deps=[dp])
        mbarrier.arrive(free_l.index(x))
        dp = hopper.warpgroup_mma_wait(0, deps=[dp])
        mbarrier.arrive(free_r.index(x))
        mbarrier.wait(p_ready, b & 1)
        p = p_smem.load(S_LAYOUT)
        _sync_warps()
        mbarrier.arrive(p_free)
        ds = p.to(gl.float32) * (dp - delta[:, None]) * scale
        gl.store(DS + p_row0 + offs, ds.to(gl.bfloat16), cache_modifier=".cs")


@gluon.jit
def _sparse_mla_bwd_pds_ws_kernel(Q, KV, IDX, O, DO, LSE, P, DS, scale, scale_log2, H, TOPK, n_blocks, t0,
                                  stride_qt, stride_qh, stride_kv, stride_it, stride_ot, stride_oh, stride_lt,
                                  stride_pt, stride_ph):
    """One program = one token t = t0 + r of the chunk x 64 heads (head block fastest in the 1-D grid);
    P and DS are [chunk rows, H, 64 * n_blocks] bf16, written at row r, every slot (slots past TOPK
    get zeros, so that the later passes read whole blocks with no column mask)."""
    pid = gl.program_id(0).to(gl.int64)
    hblocks = H // BLOCK_H
    r = pid // hblocks
    h0 = (pid % hblocks) * BLOCK_H
    t = t0 + r
    q_row0 = t * stride_qt + h0 * stride_qh
    o_row0 = t * stride_ot + h0 * stride_oh
    idx_row0 = t * stride_it
    lse_row0 = t * stride_lt + h0
    p_row0 = r * stride_pt + h0 * stride_ph

    q_n, q_r, kn, kr, ready_l, ready_r, free_l, free_r, q_bar = _token_buffers(2)  # both warpgroups read both halves
    p_smem = gl.allocate_shared_memory(gl.bfloat16, [BLOCK_H, BLOCK_K], NV_SMEM)
    bar: gl.constexpr = mbarrier.MBarrierLayout()
    p_ready = gl.allocate_shared_memory(gl.int64, [1], bar)
    p_free = gl.allocate_shared_memory(gl.int64, [1], bar)
    mbarrier.init(p_ready, count=1)
    mbarrier.init(p_free, count=1)

    gl.warp_specialize(
        [(_producer, (Q, KV, IDX, q_row0, stride_qh, stride_kv, idx_row0, TOPK, n_blocks,
                      q_n, q_r, kn, kr, ready_l, ready_r, free_l, free_r, q_bar)),
         (_wg_scores, (IDX, LSE, P, idx_row0, lse_row0, p_row0, stride_ph, TOPK, n_blocks, scale_log2,
                       q_n, q_r, kn, kr, p_smem, ready_l, ready_r, free_l, free_r, q_bar, p_ready, p_free)),
         (_wg_grads, (O, DO, DS, o_row0, stride_oh, p_row0, stride_ph, n_blocks, scale,
                      kn, p_smem, ready_l, ready_r, free_l, free_r, p_ready, p_free))],
        [4, 4], [232, 232])


def sparse_mla_pds_gluon(q, kv, indices, out, dout, lse, scale: float, t0: int, p, ds) -> None:
    """Pass 1 of the backward for tokens t0 .. t0 + p.shape[0] - 1: fills p and ds [n, H, kp] (bf16,
    kp = k rounded up to a multiple of 64; slots k .. kp - 1 get zeros).
    q [T, H, 576], kv [L, 576], out/dout [T, H, 512] (bf16, unit stride on the last axis),
    indices [T, k] int32, lse [T, H] fp32 (natural log, -inf for rows without keys)."""
    n, H, p_cols = p.shape
    topk = indices.shape[1]
    n_blocks = triton.cdiv(topk, BLOCK_K.value)
    if n == 0:
        return
    assert out.stride() == dout.stride() and p.stride() == ds.stride() and p_cols == n_blocks * BLOCK_K.value
    grid = (n * (H // BLOCK_H.value),)
    _sparse_mla_bwd_pds_ws_kernel[grid](
        q, kv, indices, out, dout, lse, p, ds, scale, scale * 1.4426950408889634, H, topk, n_blocks, t0,
        q.stride(0), q.stride(1), kv.stride(0), indices.stride(0), out.stride(0), out.stride(1), lse.stride(0),
        p.stride(0), p.stride(1), num_warps=4)
