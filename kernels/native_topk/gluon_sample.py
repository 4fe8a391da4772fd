"""prob_sum's two sample passes in Gluon, on the main pass's warp-specialised skeleton
(gluon_prob_sum.py): kv read by TMA through a strided descriptor (every key_step-th key), the
per-token head sums as in the main pass, then
- stats mode: per token n, sum, sum of squares, max over the sampled causal keys -> STATS [R, 4];
- counts mode: per token the count of sampled causal keys >= each of J thresholds TH [R, J] -> CNT
  [R, J] int32;
then `_sample_aim_kernel` (Triton) turns them into the grid / write threshold with triton_impl's own
`_sample_grid` and `_aim`, as the Triton sample passes' epilogues do.

Heads: SAMPLE_HEADS (H 8's counts spill 200 bytes: its 16 tokens a program x 16 thresholds).
The Gluon kernel does not run under TRITON_INTERPRET (Gluon has no interpreter): tested on the GPU
against the Triton passes (tests/test_native_topk_gluon.py). `_sample_aim_kernel` is plain Triton and
is tested on the CPU too (tests/test_native_topk_triton.py)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier

from kernels.gluon_compat import sync_warps as _sync_warps
from kernels.native_topk import gluon_prob_sum as g
from kernels.native_topk.triton_impl import _aim, _sample_grid

BM, BN = g.BM, g.BN
J = 16
SAMPLE_HEADS = (16, 32, 64, 128)
# counts: [tokens, J thresholds, keys] with the J thresholds in each thread's registers, so that a
# tile's [tokens, keys] head sums are its dim-1 slice (S3) and the thresholds its dim-2 slice (THL).
CNT3 = gl.constexpr(gl.BlockedLayout([1, J, 4], [1, 1, 32], [4, 1, 1], [2, 1, 0]))
S3 = gl.constexpr(gl.SliceLayout(1, CNT3.value))   # [tokens, keys]
THL = gl.constexpr(gl.SliceLayout(2, CNT3.value))  # [tokens, J]


@gluon.jit
def _sample_math(W: gl.constexpr, q_s, k_s, ready, free, q_bar, vec_s, cnt_s, x_bar, LSE2, TH, OUT, CNT, n_rows,
                 r0, tok0, L, q_offset, scale_log2, key_step, n_tiles):
    """Math warpgroup W: sampled tiles W, W + 2, ...; stats (cnt_s [TPB, 1]) or counts (cnt_s [TPB, J])."""
    TPB: gl.constexpr = vec_s.shape[1]
    NJ: gl.constexpr = cnt_s.shape[1]
    H: gl.constexpr = BM // TPB
    lse2, slot, ok, n_tok = g._block_tokens(LSE2, n_rows, r0, tok0, L, q_offset, TPB)
    s_max = gl.full([TPB], float("-inf"), gl.float32, g.TOK)
    s_n = gl.zeros([TPB], gl.float32, g.TOK)
    s_sum = gl.zeros([TPB], gl.float32, g.TOK)
    s_sq = gl.zeros([TPB], gl.float32, g.TOK)
    slot_t = r0 // H + gl.arange(0, TPB, layout=gl.SliceLayout(1, THL))
    jj = gl.arange(0, NJ, layout=gl.SliceLayout(0, THL))
    th = gl.load(TH + slot_t[:, None] * NJ + jj[None, :], mask=(slot_t < n_rows // H)[:, None] & (jj >= 0)[None, :],
                 other=float("inf"))
    counts = gl.zeros([TPB, NJ], gl.int32, THL)
    bits = 0
    mbarrier.wait(q_bar, 0)
    for t in range(W, n_tiles, 2):
        acc, bits = g._tile_scores(W, t, bits, q_s, k_s, ready, free)
        p = gl.exp2(acc * scale_log2 - lse2[:, None])
        tot = g._head_sum(p, TPB, H)
        keys = (t * BN + gl.arange(0, BN, layout=g.KEY)) * key_step
        valid = keys[None, :] < n_tok[:, None]
        s = gl.where(valid, tot, float("-inf"))
        if NJ == 1:
            s_max = gl.maximum(s_max, gl.max(s, 1))
            v = gl.where(valid, tot, 0.0)
            s_n += gl.sum(valid.to(gl.float32), 1)
            s_sum += gl.sum(v, 1)
            s_sq += gl.sum(v * v, 1)
        else:
            s3 = gl.convert_layout(s, S3)
            counts += gl.sum((gl.expand_dims(s3, 1) >= gl.expand_dims(th, 2)).to(gl.int32), 2)
    if W == 1:
        if NJ == 1:
            vec_s.index(0).store(s_n)
            vec_s.index(1).store(s_sum)
            vec_s.index(2).store(s_sq)
            vec_s.index(3).store(s_max)
        else:
            cnt_s.store(counts)
        _sync_warps()
        mbarrier.arrive(x_bar)
    else:
        mbarrier.wait(x_bar, 0)
        if NJ == 1:
            s_n += vec_s.index(0).load(g.TOK)
            s_sum += vec_s.index(1).load(g.TOK)
            s_sq += vec_s.index(2).load(g.TOK)
            s_max = gl.maximum(s_max, vec_s.index(3).load(g.TOK))
            gl.store(OUT + slot * 4, s_n, mask=ok)
            gl.store(OUT + slot * 4 + 1, s_sum, mask=ok)
            gl.store(OUT + slot * 4 + 2, s_sq, mask=ok)
            gl.store(OUT + slot * 4 + 3, s_max, mask=ok)
        else:
            counts += cnt_s.load(THL)
            gl.store(CNT + slot_t[:, None] * NJ + jj[None, :], counts,
                     mask=(slot_t < n_rows // H)[:, None] & (jj >= 0)[None, :])


@gluon.jit
def _sample_math0(q_s, k_s, ready, free, q_bar, vec_s, cnt_s, x_bar, LSE2, TH, OUT, CNT, n_rows, r0, tok0, L,
                  q_offset, scale_log2, key_step, n_tiles):
    _sample_math(0, q_s, k_s, ready, free, q_bar, vec_s, cnt_s, x_bar, LSE2, TH, OUT, CNT, n_rows, r0, tok0, L,
                 q_offset, scale_log2, key_step, n_tiles)


@gluon.jit
def _sample_math1(q_s, k_s, ready, free, q_bar, vec_s, cnt_s, x_bar, LSE2, TH, OUT, CNT, n_rows, r0, tok0, L,
                  q_offset, scale_log2, key_step, n_tiles):
    _sample_math(1, q_s, k_s, ready, free, q_bar, vec_s, cnt_s, x_bar, LSE2, TH, OUT, CNT, n_rows, r0, tok0, L,
                 q_offset, scale_log2, key_step, n_tiles)


@gluon.jit
def _sample_ws_kernel(q_desc, kv_desc, LSE2, TH, OUT, CNT, n_rows, q_row_base, tok0, L, q_offset, scale_log2,
                      key_step, H: gl.constexpr, NJ: gl.constexpr, NC: gl.constexpr, STAGES: gl.constexpr):
    """One program = 128 rows of q viewed [T * H, D]; kv_desc covers every key_step-th key."""
    r0, n_tiles, _ = g._block_bounds(n_rows, tok0, H, L, q_offset, key_step)
    q_s, k_s, ready, free, q_bar = g._ring(q_desc, kv_desc, NC, STAGES)
    TPB: gl.constexpr = BM // H
    flat: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, order=[0])
    # Per-token (n, sum, sum of squares, max) of WG1 for WG0 [4, TPB]; its counts [TPB, NJ] (NJ 1: stats mode).
    vec_s = gl.allocate_shared_memory(gl.float32, [4, TPB], flat)
    cnt_s = gl.allocate_shared_memory(gl.int32, [TPB, NJ], gl.SwizzledSharedLayout(1, 1, 1, order=[1, 0]))
    x_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    mbarrier.init(x_bar, count=1)
    math_args = (q_s, k_s, ready, free, q_bar, vec_s, cnt_s, x_bar, LSE2, TH, OUT, CNT, n_rows, r0, tok0, L,
                 q_offset, scale_log2, key_step, n_tiles)
    gl.warp_specialize(
        [(g._loader, (q_desc, kv_desc, q_s, k_s, ready, free, q_bar, (q_row_base + r0).to(gl.int32), n_tiles)),
         (_sample_math0, math_args), (_sample_math1, math_args)],
        [4, 4], [g.MATH_REGS, g.MATH_REGS])


@triton.jit
def _sample_aim_kernel(STATS, CNT, TH, AIM_TH, AIM_W, R, L, q_offset, row_base, key_step, target,
                       COUNTS: tl.constexpr, J_: tl.constexpr, GRID: tl.constexpr, BLOCK: tl.constexpr):
    """The sample passes' threshold arithmetic (triton_impl `_sample_grid` / `_aim`) over BLOCK slots."""
    slots = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = slots < R
    n_keys = tl.where(ok, tl.minimum(row_base + slots + q_offset + 1, L), 0)
    if COUNTS:
        jj = tl.arange(0, J_)[None, :]
        counts = tl.load(CNT + slots[:, None] * J_ + jj, mask=ok[:, None], other=0)
        th = tl.load(TH + slots[:, None] * J_ + jj, mask=ok[:, None], other=0.0)
        tw, th_m = _aim(counts, th, n_keys, key_step, target, J_, GRID)
        tl.store(AIM_TH + slots[:, None] * GRID + tl.arange(0, GRID)[None, :], th_m, mask=ok[:, None])
        tl.store(AIM_W + slots, tw, mask=ok)
    else:
        s_n = tl.load(STATS + slots * 4, mask=ok, other=0.0)
        s_sum = tl.load(STATS + slots * 4 + 1, mask=ok, other=0.0)
        s_sq = tl.load(STATS + slots * 4 + 2, mask=ok, other=0.0)
        s_max = tl.load(STATS + slots * 4 + 3, mask=ok, other=0.0)
        grid, std = _sample_grid(s_n, s_sum, s_sq, s_max, n_keys, target, GRID)
        tl.store(AIM_TH + slots[:, None] * GRID + tl.arange(0, GRID)[None, :], grid, mask=ok[:, None])
        tl.store(AIM_W + slots, std, mask=ok)


def sample_pass_gluon(q, kv, lse2, row_base, n_tokens, q_offset, scale_log2, key_step, th=None):
    """Stats (th None): STATS [R, 4] fp32 (n, sum, sum of squares, max); counts at th [R, J]: CNT [R, J] int32."""
    T, H, D = q.shape
    R = n_tokens
    dev = q.device
    n_rows = R * H
    q_desc = g.TensorDescriptor.from_tensor(q.reshape(T * H, D), [BM.value, g.DC.value], g.SMEM)
    kv_desc = g.TensorDescriptor(kv, [triton.cdiv(kv.shape[0], key_step), D], [key_step * kv.stride(0), 1],
                                 [BN.value, g.DC.value], g.SMEM)
    nj = 1 if th is None else th.shape[1]
    # Each mode writes one of out / cnt; the other is a one-element placeholder for its pointer.
    out = torch.empty((R, 4) if th is None else (1,), dtype=torch.float32, device=dev)
    cnt = torch.empty((1,) if th is None else (R, nj), dtype=torch.int32, device=dev)
    th_arg = th.contiguous() if th is not None else out
    _sample_ws_kernel[(triton.cdiv(n_rows, BM.value),)](
        q_desc, kv_desc, lse2, th_arg, out, cnt, n_rows, row_base * H, row_base, kv.shape[0], q_offset, scale_log2,
        key_step, H=H, NJ=nj, NC=D // g.DC.value, STAGES=g.STAGES_DEFAULT, num_warps=4)
    return out if th is None else cnt


def first_thresholds_gluon(q, kv, lse2, row_base, n_tokens, q_offset, scale_log2, target, stats_step, sample_step,
                           grid_n=16):
    """The driver's `_first_thresholds` by these passes: (main grid [R, 16], tw [R], std [R])."""
    R, dev = n_tokens, q.device
    stats = sample_pass_gluon(q, kv, lse2, row_base, n_tokens, q_offset, scale_log2, stats_step)
    grid, std = torch.empty(R, grid_n, device=dev), torch.empty(R, device=dev)
    blk = 64
    # Stats mode reads only STATS: `stats` also fills the unused CNT and TH pointers.
    _sample_aim_kernel[(triton.cdiv(R, blk),)](stats, stats, stats, grid, std, R, kv.shape[0], q_offset, row_base,
                                               stats_step, float(target), COUNTS=False, J_=grid_n, GRID=grid_n,
                                               BLOCK=blk)
    cnt = sample_pass_gluon(q, kv, lse2, row_base, n_tokens, q_offset, scale_log2, sample_step, th=grid)
    main, tw = torch.empty(R, grid_n, device=dev), torch.empty(R, device=dev)
    _sample_aim_kernel[(triton.cdiv(R, blk),)](stats, cnt, grid, main, tw, R, kv.shape[0], q_offset, row_base,
                                               sample_step, float(target), COUNTS=True, J_=grid_n, GRID=grid_n,
                                               BLOCK=blk)
    return main, tw, std
