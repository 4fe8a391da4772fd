"""Sparse MLA forward for Hopper in Gluon (Triton's explicit-layout dialect), 64 or 128 heads.

Why a second forward: the Triton kernel (`triton_impl._sparse_mla_fwd_kernel`) holds a
[64, 512] fp32 accumulator in 8 warps that also gather the keys, spills, and never overlaps the
gathers with the MMAs (278 TFLOP/s at h128; NOTES.md). Here one program (one token, 64 heads) has
three warpgroups with their own roles and register budgets:

- the producer (4 warps, few registers) gathers 64-key blocks of latent kv by cp.async into two
  shared-memory buffers and signals their arrival on mbarriers;
- WG0 computes the scores of the even blocks, WG1 those of the odd blocks (S = Q K^T over all
  576 columns, Q from shared memory), and each keeps half of the output: WG0 value columns
  0-255, WG1 256-511 ([64, 256] fp32 each).

Per pair of blocks (2j in buffer 0, 2j+1 in buffer 1), so that both halves of the output share
one running max m:
  WG0: S0, m0 = max(m, rowmax S0) -> published
  WG1: S1, m1 = max(m0, rowmax S1) -> published; P1 = exp2(S1 - m1); O_R = O_R*exp2(m - m1) + P1 V1_R,
       P1 stored to shared memory
  WG0: once m1 is there, P0 = exp2(S0 - m1), stored to shared memory;
       O_L = O_L*exp2(m - m1) + P0 V0_L + P1 V1_L
  WG1: O_R += P0 V0_R
WG0 waits for the pair's maximum before its exponentials, so that P0 and its accumulator are scaled
once. (Before, WG0 went on at m0 and rescaled both to m1 afterwards: 1-4.5% slower at h64/h128,
NOTES.md seventeenth round.)
P0 goes into the rope columns of its key buffer (its scores are done with them, and V only reads
columns 0-511), P1 into an 8 KB buffer of its own: 230,864 bytes of shared memory, Q 72 KiB + two
key buffers of 72 KiB + P1 + row statistics and barriers. Each key buffer is two halves (value
columns 0-255; 256-511 with the rope columns) with their own ready/free mbarriers, refilled in
the order they free up (`_producer`).
The running max starts at -1e30 instead of -inf so that blocks with no valid key give exp2(-inf) = 0
rather than NaN; rows with no key at all end with l = 0 and are written as 0 (lse -inf), as in the
reference.

Not run by TRITON_INTERPRET (Gluon has no interpreter): its tests run on the GPU only, against the
PyTorch reference; the CPU path and CI keep the Triton kernel.
"""

from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia import hopper
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import mbarrier

from kernels.gluon_compat import cp_async as _cp_async, sync_warps as _sync_warps

# Shapes as constexpr for the kernels; the host code reads their .value.
BLOCK_H = gl.constexpr(64)   # heads per program (one wgmma M)
BLOCK_K = gl.constexpr(64)   # keys per block
D_V = gl.constexpr(512)      # value / latent columns
D_ROPE = gl.constexpr(64)    # rope columns (D = 576)
HALF = gl.constexpr(256)     # value columns per math warpgroup
_NEG_BIG = gl.constexpr(-1.0e30)
# Register layouts of a math warpgroup: the scores [64 heads, 64 keys] (wgmma N 64), its half of
# the output [64, 256] (N 256), and per-head row statistics (m, l) in the scores' layout.
S_LAYOUT = gl.constexpr(gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 64, 16]))
O_LAYOUT = gl.constexpr(gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 256, 16]))
ROW_S = gl.constexpr(gl.SliceLayout(1, S_LAYOUT.value))
# Shared-memory layout of every wgmma operand tile here (Q, keys, P): 128-byte swizzled bf16 rows.
NV_SMEM = gl.constexpr(gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2))


@gluon.jit
def _gather_rows(dst, SRC, row_off, row_ok, COLS: gl.constexpr):
    """cp.async SRC[row_off[r] + c] -> dst[r, c] for c < COLS (rows not ok are zero-filled).
    row_off, row_ok: [64] in the producer's row layout (element offsets, int64)."""
    layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
    cols = gl.arange(0, COLS, layout=gl.SliceLayout(0, layout))
    ptrs = SRC + row_off[:, None] + cols[None, :]
    mask = row_ok[:, None] & (cols[None, :] < COLS)
    _cp_async(dst, ptrs, mask=mask)


@gluon.jit
def _block_rows(IDX, idx_row0, block, TOPK, stride_kv):
    """Row offsets (int64 elements) and validity of a key block's 64 slots, producer layout."""
    layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
    slots = block * BLOCK_K + gl.arange(0, BLOCK_K, layout=gl.SliceLayout(1, layout))
    idx = gl.load(IDX + idx_row0 + slots, mask=slots < TOPK, other=-1)
    ok = idx >= 0
    return gl.where(ok, idx, 0).to(gl.int64) * stride_kv, ok


@gluon.jit
def _load_q(Q, q_row0, stride_qh, q_n, q_r, q_bar):
    """cp.async the program's 64 query rows (value and rope columns) into q_n, q_r; q_bar gets one
    arrival per producer thread when they land."""
    layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
    r = gl.arange(0, BLOCK_K, layout=gl.SliceLayout(1, layout))
    q_off = q_row0 + r.to(gl.int64) * stride_qh
    _gather_rows(q_n, Q, q_off, r >= 0, D_V)
    _gather_rows(q_r, Q + D_V, q_off, r >= 0, D_ROPE)
    async_copy.mbarrier_arrive(q_bar, increment_count=False)


@gluon.jit
def _gather_half(kn, kr, x, KV, off, ok, R: gl.constexpr):
    """Gather one half of a key block into buffer x of (kn [2, 64, 512], kr [2, 64, 64]): L = value
    columns 0-255, R = columns 256-511 and the rope columns (`_block_rows` gives off, ok)."""
    if R:
        _gather_rows(kn.index(x).slice(HALF, HALF, dim=1), KV + HALF, off, ok, HALF)
        _gather_rows(kr.index(x), KV + D_V, off, ok, D_ROPE)
    else:
        _gather_rows(kn.index(x).slice(0, HALF, dim=1), KV, off, ok, HALF)


@gluon.jit
def _refill_half(kn, kr, x, KV, off, ok, R: gl.constexpr, free, ready, ph):
    """A producer's step for one half of key buffer x: wait until its readers have freed it (free
    at parity ph), gather it (`_gather_half`), and have its cp.asyncs arrive on ready."""
    mbarrier.wait(free.index(x), ph)
    _gather_half(kn, kr, x, KV, off, ok, R)
    async_copy.mbarrier_arrive(ready.index(x), increment_count=False)


@gluon.jit
def _producer(Q, KV, IDX, q_row0, stride_qh, stride_kv, idx_row0, TOPK, n_pairs,
              q_n, q_r, kn, kr, ready_l, ready_r, free_l, free_r, q_bar):
    """4 warps: Q once, then for each pair j of key blocks (2j into buffer e = j % 2, 2j+1 into
    o = 1 - e) four half-buffer gathers, L = value columns 0-255, R = columns 256-511 and the rope
    columns, in the order their buffers free up in the pair before: L of o and R of e early (their
    last readers are the first MMAs of that pair), L of e and R of o late. Slots past TOPK read as
    invalid and are zero-filled."""
    _load_q(Q, q_row0, stride_qh, q_n, q_r, q_bar)
    for j in range(n_pairs):
        e = j % 2
        o = 1 - e
        ph = (j & 1) ^ 1  # fresh barriers pass at parity 1 (pair 0)
        off_e, ok_e = _block_rows(IDX, idx_row0, 2 * j, TOPK, stride_kv)
        off_o, ok_o = _block_rows(IDX, idx_row0, 2 * j + 1, TOPK, stride_kv)
        _refill_half(kn, kr, o, KV, off_o, ok_o, False, free_l, ready_l, ph)
        _refill_half(kn, kr, e, KV, off_e, ok_e, True, free_r, ready_r, ph)
        _refill_half(kn, kr, e, KV, off_e, ok_e, False, free_l, ready_l, ph)
        _refill_half(kn, kr, o, KV, off_o, ok_o, True, free_r, ready_r, ph)


@gluon.jit
def _scores_half(q_n, q_r, kn_s, kr_s, s, HALF_R: gl.constexpr, FIRST: gl.constexpr):
    """Issue S (+)= Q K^T over the L columns (0-255) or the R ones (256-511 and rope), async."""
    if HALF_R:
        s = hopper.warpgroup_mma(q_n.slice(HALF, HALF, dim=1), kn_s.slice(HALF, HALF, dim=1).permute((1, 0)), s,
                                 use_acc=not FIRST, is_async=True)
        s = hopper.warpgroup_mma(q_r, kr_s.permute((1, 0)), s, is_async=True)
    else:
        s = hopper.warpgroup_mma(q_n.slice(0, HALF, dim=1), kn_s.slice(0, HALF, dim=1).permute((1, 0)), s,
                                 use_acc=not FIRST, is_async=True)
    return s


@gluon.jit
def _scores(q_n, q_r, kn_s, kr_s, ready_first, ready_second, ph, R_FIRST: gl.constexpr,
            IDX, idx_row0, block, TOPK, scale_log2):
    """S = (Q K^T) * scale_log2 for one key block, the half that arrives first issued first; -inf
    where the slot is past TOPK or its index is -1: [64 heads, 64 keys] fp32, S wgmma layout."""
    s = gl.zeros([BLOCK_H, BLOCK_K], gl.float32, S_LAYOUT)
    mbarrier.wait(ready_first, ph)
    s = _scores_half(q_n, q_r, kn_s, kr_s, s, R_FIRST, True)
    mbarrier.wait(ready_second, ph)
    s = _scores_half(q_n, q_r, kn_s, kr_s, s, not R_FIRST, False)
    slots = block * BLOCK_K + gl.arange(0, BLOCK_K, layout=gl.SliceLayout(0, S_LAYOUT))
    idx = gl.load(IDX + idx_row0 + slots, mask=slots < TOPK, other=-1)
    s = hopper.warpgroup_mma_wait(0, deps=[s])
    return gl.where((idx >= 0)[None, :], s * scale_log2, float("-inf"))


@gluon.jit
def _rows_to_o(x):
    return gl.convert_layout(x, gl.SliceLayout(1, O_LAYOUT))[:, None]


@gluon.jit
def _as_a_operand(p):
    return gl.convert_layout(p, gl.DotOperandLayout(operand_index=0, parent=O_LAYOUT, k_width=2))


@gluon.jit
def _start(q_bar):
    """A math warpgroup's state before its first block: running max, row sums, its output half;
    returned once Q has landed."""
    m = gl.full([BLOCK_H], _NEG_BIG, gl.float32, ROW_S)
    l = gl.zeros([BLOCK_H], gl.float32, ROW_S)
    o = gl.zeros([BLOCK_H, HALF], gl.float32, O_LAYOUT)
    mbarrier.wait(q_bar, 0)
    return m, l, o


@gluon.jit
def _softmax_step(s, m, m_new, l, o):
    """Online softmax from running max m to m_new (>= m): P = exp2(s - m_new) in bf16 (only the
    bf16 copy stays live across the value MMA; the fp32 one spilled), l and o rescaled, l += rowsum P."""
    p = gl.exp2(s - m_new[:, None])
    alpha = gl.exp2(m - m_new)
    return p.to(gl.bfloat16), l * alpha + gl.sum(p, 1), o * _rows_to_o(alpha)


@gluon.jit
def _epilogue(o, l, m, W: gl.constexpr, lbuf, l_bar, OUT, LSE, out_row0, stride_oh, lse_row0):
    """Sum the two halves' l, write out[:, W*256:(W+1)*256] and (WG0) lse."""
    lbuf.index(W).store(l)
    _sync_warps()
    mbarrier.arrive(l_bar.index(W))
    mbarrier.wait(l_bar.index(1 - W), 0)
    l = l + lbuf.index(1 - W).load(ROW_S)
    has = l > 0
    inv = gl.where(has, 1.0 / gl.where(has, l, 1.0), 0.0)
    out = o * _rows_to_o(inv)
    heads = gl.arange(0, BLOCK_H, layout=gl.SliceLayout(1, O_LAYOUT))
    cols = W * HALF + gl.arange(0, HALF, layout=gl.SliceLayout(0, O_LAYOUT))
    # Streamed (evict-first) stores: the output is not read again here, the gathered keys are.
    gl.store(OUT + out_row0 + heads.to(gl.int64)[:, None] * stride_oh + cols[None, :], out.to(OUT.dtype.element_ty),
             cache_modifier=".cs")
    if W == 0:
        lse = gl.where(has, (m + gl.log2(gl.where(has, l, 1.0))) * 0.6931471805599453, float("-inf"))
        gl.store(LSE + lse_row0 + gl.arange(0, BLOCK_H, layout=ROW_S), lse)


@gluon.jit
def _wg0(IDX, OUT, LSE, idx_row0, out_row0, stride_oh, lse_row0, TOPK, n_pairs, scale_log2,
         q_n, q_r, kn, kr, sp1, mx, lbuf, ready_l, ready_r, free_l, free_r, q_bar, m_bar, p_bar, p1_free, l_bar):
    """Scores of the even blocks (R half first: it frees up first), output columns 0-255."""
    m, l, o = _start(q_bar)
    for j in range(n_pairs):
        ph = j & 1
        e = j % 2       # buffer of block 2j (this warpgroup's scores)
        b1 = 1 - e      # buffer of block 2j + 1
        s = _scores(q_n, q_r, kn.index(e), kr.index(e), ready_r.index(e), ready_l.index(e), ph, True,
                    IDX, idx_row0, 2 * j, TOPK, scale_log2)
        m0 = gl.maximum(m, gl.max(s, 1))
        mx.index(0).store(m0)
        _sync_warps()
        mbarrier.arrive(m_bar.index(0))
        # The pair's maximum (WG1's) before the exponentials: P0 and O_L are scaled once.
        mbarrier.wait(m_bar.index(1), ph)
        m1 = mx.index(1).load(ROW_S)
        p, l, o = _softmax_step(s, m, m1, l, o)
        o = hopper.warpgroup_mma(_as_a_operand(p), kn.index(e).slice(0, HALF, dim=1), o, is_async=True)
        # P0 into its key buffer's rope columns (its scores are done with them; WG1 frees that half
        # after reading P0), while P0 V0_L runs.
        kr.index(e).store(p)
        hopper.fence_async_shared()
        _sync_warps()
        mbarrier.arrive(p_bar.index(0))
        o = hopper.warpgroup_mma_wait(0, deps=[o])
        mbarrier.arrive(free_l.index(e))
        m = m1
        mbarrier.wait(p_bar.index(1), ph)
        o = hopper.warpgroup_mma(sp1, kn.index(b1).slice(0, HALF, dim=1), o, is_async=True)
        o = hopper.warpgroup_mma_wait(0, deps=[o])
        mbarrier.arrive(free_l.index(b1))
        mbarrier.arrive(p1_free)
    _epilogue(o, l, m, 0, lbuf, l_bar, OUT, LSE, out_row0, stride_oh, lse_row0)


@gluon.jit
def _wg1(IDX, OUT, LSE, idx_row0, out_row0, stride_oh, lse_row0, TOPK, n_pairs, scale_log2,
         q_n, q_r, kn, kr, sp1, mx, lbuf, ready_l, ready_r, free_l, free_r, q_bar, m_bar, p_bar, p1_free, l_bar):
    """Scores of the odd blocks (L half first), output columns 256-511."""
    m, l, o = _start(q_bar)
    for j in range(n_pairs):
        ph = j & 1
        e = j % 2       # buffer of block 2j
        b1 = 1 - e      # buffer of block 2j + 1 (this warpgroup's scores)
        s = _scores(q_n, q_r, kn.index(b1), kr.index(b1), ready_l.index(b1), ready_r.index(b1), ph, False,
                    IDX, idx_row0, 2 * j + 1, TOPK, scale_log2)
        mbarrier.wait(m_bar.index(0), ph)
        m1 = gl.maximum(mx.index(0).load(ROW_S), gl.max(s, 1))
        mx.index(1).store(m1)
        _sync_warps()
        mbarrier.arrive(m_bar.index(1))
        p, l, o = _softmax_step(s, m, m1, l, o)
        o = hopper.warpgroup_mma(_as_a_operand(p), kn.index(b1).slice(HALF, HALF, dim=1), o, is_async=True)
        mbarrier.wait(p1_free, ph ^ 1)  # WG0 has read the previous pair's P1
        sp1.store(p)
        hopper.fence_async_shared()
        _sync_warps()
        mbarrier.arrive(p_bar.index(1))
        m = m1
        mbarrier.wait(p_bar.index(0), ph)
        o = hopper.warpgroup_mma(kr.index(e), kn.index(e).slice(HALF, HALF, dim=1), o, is_async=True)
        hopper.warpgroup_mma_wait(1, deps=[o])  # P1 V1_R done: R of block 2j+1 is free
        mbarrier.arrive(free_r.index(b1))
        o = hopper.warpgroup_mma_wait(0, deps=[o])
        mbarrier.arrive(free_r.index(e))
    _epilogue(o, l, m, 1, lbuf, l_bar, OUT, LSE, out_row0, stride_oh, lse_row0)


@gluon.jit
def _token_buffers(FREE_COUNT: gl.constexpr):
    """The shared memory that the forward and the backward's pass 1 both hold for one token and 64
    heads: Q (value and rope columns), two key buffers of 64 rows in halves (L, R), each half's
    ready barrier (one cp.async arrival per producer thread) and free barrier (FREE_COUNT reader
    warpgroups, one arrival each), and Q's barrier."""
    q_n = gl.allocate_shared_memory(gl.bfloat16, [BLOCK_H, D_V], NV_SMEM)
    q_r = gl.allocate_shared_memory(gl.bfloat16, [BLOCK_H, D_ROPE], NV_SMEM)
    kn = gl.allocate_shared_memory(gl.bfloat16, [2, BLOCK_K, D_V], NV_SMEM)
    kr = gl.allocate_shared_memory(gl.bfloat16, [2, BLOCK_K, D_ROPE], NV_SMEM)
    bar: gl.constexpr = mbarrier.MBarrierLayout()
    ready_l = gl.allocate_shared_memory(gl.int64, [2, 1], bar)
    ready_r = gl.allocate_shared_memory(gl.int64, [2, 1], bar)
    free_l = gl.allocate_shared_memory(gl.int64, [2, 1], bar)
    free_r = gl.allocate_shared_memory(gl.int64, [2, 1], bar)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], bar)
    for i in gl.static_range(2):
        mbarrier.init(ready_l.index(i), count=128)
        mbarrier.init(ready_r.index(i), count=128)
        mbarrier.init(free_l.index(i), count=FREE_COUNT)
        mbarrier.init(free_r.index(i), count=FREE_COUNT)
    mbarrier.init(q_bar, count=128)
    return q_n, q_r, kn, kr, ready_l, ready_r, free_l, free_r, q_bar


@gluon.jit
def _sparse_mla_fwd_ws_kernel(Q, KV, IDX, OUT, LSE, scale_log2, H, TOPK, n_pairs,
                              stride_qt, stride_qh, stride_kv, stride_it, stride_ot, stride_oh, stride_lt):
    """One program = one token x 64 heads (head block fastest in the 1-D grid, so a token's head
    blocks run together and its gathered rows stay in L2); n_pairs = pairs of 64-key blocks."""
    pid = gl.program_id(0).to(gl.int64)
    hblocks = H // BLOCK_H
    t = pid // hblocks
    h0 = (pid % hblocks) * BLOCK_H
    q_row0 = t * stride_qt + h0 * stride_qh
    idx_row0 = t * stride_it
    out_row0 = t * stride_ot + h0 * stride_oh
    lse_row0 = t * stride_lt + h0

    flat: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, order=[0])
    # 230,864 bytes of the 232,448 a block may have (227 KiB).
    q_n, q_r, kn, kr, ready_l, ready_r, free_l, free_r, q_bar = _token_buffers(1)  # one reader per half
    sp1 = gl.allocate_shared_memory(gl.bfloat16, [BLOCK_H, BLOCK_K], NV_SMEM)
    mx = gl.allocate_shared_memory(gl.float32, [2, BLOCK_H], flat)
    lbuf = gl.allocate_shared_memory(gl.float32, [2, BLOCK_H], flat)
    bar: gl.constexpr = mbarrier.MBarrierLayout()
    m_bar = gl.allocate_shared_memory(gl.int64, [2, 1], bar)
    p_bar = gl.allocate_shared_memory(gl.int64, [2, 1], bar)
    l_bar = gl.allocate_shared_memory(gl.int64, [2, 1], bar)
    p1_free = gl.allocate_shared_memory(gl.int64, [1], bar)
    for i in gl.static_range(2):
        mbarrier.init(m_bar.index(i), count=1)
        mbarrier.init(p_bar.index(i), count=1)
        mbarrier.init(l_bar.index(i), count=1)
    mbarrier.init(p1_free, count=1)

    math_args = (IDX, OUT, LSE, idx_row0, out_row0, stride_oh, lse_row0, TOPK, n_pairs, scale_log2,
                 q_n, q_r, kn, kr, sp1, mx, lbuf, ready_l, ready_r, free_l, free_r, q_bar, m_bar, p_bar, p1_free,
                 l_bar)
    gl.warp_specialize(
        [(_producer, (Q, KV, IDX, q_row0, stride_qh, stride_kv, idx_row0, TOPK, n_pairs,
                      q_n, q_r, kn, kr, ready_l, ready_r, free_l, free_r, q_bar)),
         (_wg0, math_args), (_wg1, math_args)],
        # Registers a thread: WG0 208, WG1 248 (the producer is left 48). Of the twelve splits timed,
        # this and 208 / 240 were the fastest: 1.4-4.5% faster than 224 / 232, which was 2-4.7%
        # faster than 232 / 232 (NOTES.md, eighteenth round).
        [4, 4], [208, 248])


def gluon_fwd_supported(q: torch.Tensor, kv: torch.Tensor, d_v: int) -> bool:
    """Shapes this kernel takes: bf16, D = 576, d_v = 512, heads a multiple of 64, on a Hopper GPU
    (wgmma, setmaxnreg; 230 KB of shared memory a block)."""
    return (q.is_cuda and q.dtype == torch.bfloat16 and kv.dtype == torch.bfloat16
            and q.shape[-1] == D_V.value + D_ROPE.value and d_v == D_V.value and q.shape[1] % BLOCK_H.value == 0
            and torch.cuda.get_device_capability(q.device)[0] == 9)


def sparse_mla_fwd_gluon(q, kv, indices, scale: float, d_v: int = 512):
    """q [T, H, 576] bf16, kv [L, 576] bf16, indices [T, k] int32 (-1 = none) -> out [T, H, 512]
    (q's dtype), lse [T, H] fp32 (natural log; -inf where a row has no key)."""
    T, H, _ = q.shape
    topk = indices.shape[1]
    out = torch.empty((T, H, d_v), device=q.device, dtype=q.dtype)
    lse = torch.empty((T, H), device=q.device, dtype=torch.float32)
    if T == 0:
        return out, lse
    # The kernel indexes q, kv, indices and out with unit stride on their last axis.
    q, kv, indices = q.contiguous(), kv.contiguous(), indices.contiguous().to(torch.int32)
    n_pairs = triton.cdiv(topk, 2 * BLOCK_K.value)
    grid = (T * (H // BLOCK_H.value),)
    _sparse_mla_fwd_ws_kernel[grid](
        q, kv, indices, out, lse, scale * 1.4426950408889634, H, topk, n_pairs,
        q.stride(0), q.stride(1), kv.stride(0), indices.stride(0), out.stride(0), out.stride(1), lse.stride(0),
        num_warps=4)
    return out, lse
