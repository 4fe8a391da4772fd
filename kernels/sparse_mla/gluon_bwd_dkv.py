"""The sparse MLA backward's dK/dV pass for Hopper in Gluon, 64 or 128 heads.

After the first pass has stored P and dS ([rows, H, k padded to 64] bf16), every (token, selected
key) pair adds dkv[key, :] += dS[:, slot]^T q[token] + P[:, slot]^T dO[token] (the second term on
the value columns only): per token and 64-key block a GEMM over the heads, [64 keys, H] x
[H, columns], then fp32 atomic adds into the selected dkv rows. The Triton kernel
(`_sparse_mla_bwd_dkv_kernel`) runs one program per (token, key block), re-reads the token's q and
dO for each, and never overlaps its MMAs with its atomics. Here one program handles one token, one
slab of 192 columns and one run of the token's slots, with three warpgroups:

- the producer (4 warps, few registers) loads the token's q and dO slabs once ([H, 192] each, in
  three [H, 64] chunks; dO zero past column 511), then the P and dS tiles ([H, 64 slots] each) of
  the run's key blocks into four buffers;
- WG0 takes the even blocks of the run, WG1 the odd ones: dKV[64 keys, 192] = dS^T q + P^T dO by
  wgmma (A = the P / dS tile read transposed from shared memory, K = heads; three 64-column
  accumulators), then relaxed fp32 atomic adds of the slots within the run whose index is valid,
  each chunk staged through the block's freed buffer so that a warp adds whole 256-byte row pieces.
  While one warpgroup's adds drain, the other's MMAs run.

One launch per slab and key range (`sparse_mla_dkv_gluon`), so that all programs add into the same
rows and columns of dkv at a time: with a persisting L2 set-aside (`dkv_plan`) dkv is slab-major
[3, L, 192] and the range (at most the set-aside: 42,666 keys on an H100) is kept in L2 while the
P/dS stream passes by; a range is a run of slots once each row's slots are sorted by key
(`slot_bounds`). Without one, dkv is [L, 576] and the run is all of the token's slots.
Shared memory at H 128: q and dO slabs 96 KiB + four P/dS buffers of 32 KiB + barriers.
Not run by TRITON_INTERPRET (Gluon has no interpreter); tested on the GPU against PyTorch.
"""

from __future__ import annotations

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia import hopper
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import mbarrier

from kernels.gluon_compat import cp_async as _cp_async, reinterpret as _reinterpret, sync_warps as _sync_warps

from .gluon_fwd import BLOCK_K, D_V

# Head counts it takes (at the Gluon forward's other shapes): the q and dO slabs of all heads live
# in shared memory.
HEADS = (64, 128)
SLAB = gl.constexpr(192)   # columns per launch: 3 chunks of 64 (slab 2: 384-575)
CHUNK = gl.constexpr(64)   # columns per accumulator (wgmma N 64)
D = gl.constexpr(576)
ACC = gl.constexpr(gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 64, 16]))
# A chunk re-laid for the atomic adds (through a 16 KB shared staging buffer): each thread 8 rows x
# 4 consecutive columns, so one warp instruction adds 2 rows x 256 contiguous bytes instead of the
# wgmma layout's 8 rows x 32 bytes (half the add throughput measured with the latter).
ADD = gl.constexpr(gl.BlockedLayout([8, 4], [2, 16], [4, 1], [1, 0]))
NBUF = gl.constexpr(4)      # P/dS buffers (blocks in flight: two computing, two loading)
STAGE = gl.constexpr(gl.SwizzledSharedLayout(4, 1, 8, order=[1, 0]))


@gluon.jit
def _load_rows(dst, SRC, row0, stride_r, col0, COL_LIM: gl.constexpr, COLS: gl.constexpr, ROWS: gl.constexpr):
    """cp.async SRC[row0 + i * stride_r + col0 + c] -> dst[i, c] for i < ROWS, c < COLS, 64 rows at a
    time (the producer's register budget); columns col0 + c >= COL_LIM are zero-filled (COL_LIM 0:
    no column mask; cp.async moves 16 bytes at a time only where the mask is uniform over them)."""
    if COLS >= 64:
        layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
    else:
        layout: gl.constexpr = gl.BlockedLayout([1, 8], [8, 4], [4, 1], [1, 0])
    i = gl.arange(0, 64, layout=gl.SliceLayout(1, layout))
    cols = col0 + gl.arange(0, COLS, layout=gl.SliceLayout(0, layout))
    for c in gl.static_range(ROWS // 64):
        rows = row0 + (c * 64 + i).to(gl.int64) * stride_r
        if COL_LIM > 0:
            mask = (i >= 0)[:, None] & (cols < COL_LIM)[None, :]
        else:
            mask = (i >= 0)[:, None] & (cols >= 0)[None, :]
        _cp_async(dst.slice(c * 64, 64, dim=0), SRC + rows[:, None] + cols[None, :], mask=mask)


@gluon.jit
def _producer(Q, DO, P, DS, q_row0, do_row0, stride_qh, stride_oh, p_row0, stride_ph, BOUNDS, bound0,
              c0, qs, dos, pds, ready, free, qd_bar, HP: gl.constexpr):
    """q and dO slabs once (dO zero past column 511), then the P and dS tiles of the i-th key block
    of the program's slot range into rows 0..HP-1 and HP..2HP-1 of buffer i % NBUF, once the
    warpgroup that used it NBUF blocks earlier has freed it. The P/dS rows are padded to whole
    64-slot blocks, zeros past TOPK (written by the Gluon first pass), so the tiles need no column
    mask."""
    _, _, b0, n_blocks = _slot_blocks(BOUNDS, bound0)
    for i in gl.static_range(3):
        _load_rows(qs.index(i), Q, q_row0, stride_qh, c0 + i * CHUNK, D, CHUNK, HP)
        _load_rows(dos.index(i), DO, do_row0, stride_oh, c0 + i * CHUNK, D_V, CHUNK, HP)
    async_copy.mbarrier_arrive(qd_bar, increment_count=False)
    for i in range(n_blocks):
        x = i % NBUF
        mbarrier.wait(free.index(x), ((i // NBUF) & 1) ^ 1)  # fresh barriers pass at parity 1
        buf = pds.index(x)
        _load_rows(buf.slice(0, HP, dim=0), P, p_row0, stride_ph, (b0 + i) * BLOCK_K, 0, BLOCK_K, HP)
        _load_rows(buf.slice(HP, HP, dim=0), DS, p_row0, stride_ph, (b0 + i) * BLOCK_K, 0, BLOCK_K, HP)
        async_copy.mbarrier_arrive(ready.index(x), increment_count=False)


@gluon.jit
def _slot_blocks(BOUNDS, bound0):
    """The program's run of slots lo .. hi - 1 (BOUNDS[bound0], BOUNDS[bound0 + 1]), the first 64-slot
    block that covers it and the number of blocks: (lo, hi, b0, n_blocks)."""
    lo = gl.load(BOUNDS + bound0)
    hi = gl.load(BOUNDS + bound0 + 1)
    b0 = lo // BLOCK_K
    return lo, hi, b0, gl.where(hi > lo, (hi + BLOCK_K - 1) // BLOCK_K - b0, 0)


@gluon.jit
def _chunk(ds_t, p_t, qs, dos, I: gl.constexpr):
    """Issue columns 64 I .. 64 I + 63 of the slab: dS^T q + P^T dO, async (dO is zeros past column
    511: one wasted MMA in 18, kept so the warpgroups need no slab-dependent code)."""
    acc = hopper.warpgroup_mma(ds_t, qs.index(I), gl.zeros([BLOCK_K, CHUNK], gl.float32, ACC),
                               use_acc=False, is_async=True)
    return hopper.warpgroup_mma(p_t, dos.index(I), acc, is_async=True)


@gluon.jit
def _add_chunk(DKV, key_off, ok, acc, col0, stage):
    """dkv[key, col0 + c] += acc[i, c] (relaxed fp32 atomics) for the rows i whose key is valid, the
    chunk passed through `stage` into the ADD layout. key_off, ok: [64] in ADD's row slice."""
    stage.store(acc)
    _sync_warps()
    vals = stage.load(ADD)
    _sync_warps()  # all reads done before the next chunk overwrites the stage
    cols = col0 + gl.arange(0, CHUNK, layout=gl.SliceLayout(0, ADD))
    mask = ok[:, None] & (cols >= 0)[None, :]
    gl.atomic_add(DKV + key_off[:, None] + cols[None, :], vals, mask=mask, sem="relaxed")


@gluon.jit
def _wg(W: gl.constexpr, IDX, DKV, idx_row0, stride_dkv, BOUNDS, bound0, qs, dos, pds, ready, free, qd_bar):
    """Key blocks W, W + 2, ... of the program's slot range: the block's dK/dV slab by wgmma (three
    64-column chunks), then the atomic adds of the slots within the range, staged through the
    block's own P/dS buffer (its MMAs are done with it), then the buffer freed for the producer."""
    HP: gl.constexpr = qs.shape[1]
    lo, hi, b0, n_blocks = _slot_blocks(BOUNDS, bound0)
    mbarrier.wait(qd_bar, 0)
    for i in range(W, n_blocks, 2):
        b = b0 + i
        x = i % NBUF
        mbarrier.wait(ready.index(x), (i // NBUF) & 1)
        buf = pds.index(x)
        p_t = buf.slice(0, HP, dim=0).permute((1, 0))  # [64 keys, H]
        ds_t = buf.slice(HP, HP, dim=0).permute((1, 0))
        a0 = _chunk(ds_t, p_t, qs, dos, 0)
        a1 = _chunk(ds_t, p_t, qs, dos, 1)
        a2 = _chunk(ds_t, p_t, qs, dos, 2)
        slots = b * BLOCK_K + gl.arange(0, BLOCK_K, layout=gl.SliceLayout(1, ADD))
        idx = gl.load(IDX + idx_row0 + slots, mask=(slots >= lo) & (slots < hi), other=-1)
        ok = idx >= 0
        key_off = gl.where(ok, idx, 0).to(gl.int64) * stride_dkv
        a0, a1, a2 = hopper.warpgroup_mma_wait(0, deps=[a0, a1, a2])
        # The buffer's 2 x HP x 64 bf16 as fp32 [HP, 64]; its first 64 rows hold one chunk.
        stage = _reinterpret(buf, gl.float32, [HP, CHUNK], STAGE).slice(0, BLOCK_K, dim=0)
        _sync_warps()  # every warp's MMAs have read the buffer before any overwrites it
        _add_chunk(DKV, key_off, ok, a0, 0, stage)
        _add_chunk(DKV, key_off, ok, a1, CHUNK, stage)
        _add_chunk(DKV, key_off, ok, a2, 2 * CHUNK, stage)
        mbarrier.arrive(free.index(x))


@gluon.jit
def _wg0(IDX, DKV, idx_row0, stride_dkv, BOUNDS, bound0, qs, dos, pds, ready, free, qd_bar):
    _wg(0, IDX, DKV, idx_row0, stride_dkv, BOUNDS, bound0, qs, dos, pds, ready, free, qd_bar)


@gluon.jit
def _wg1(IDX, DKV, idx_row0, stride_dkv, BOUNDS, bound0, qs, dos, pds, ready, free, qd_bar):
    _wg(1, IDX, DKV, idx_row0, stride_dkv, BOUNDS, bound0, qs, dos, pds, ready, free, qd_bar)


@gluon.jit
def _sparse_mla_bwd_dkv_ws_kernel(Q, DO, IDX, P, DS, DKV, BOUNDS, rng, t0,
                                  stride_qt, stride_qh, stride_it, stride_ot, stride_oh, stride_pt, stride_ph,
                                  stride_dkv, stride_bt, HP: gl.constexpr, SLAB_I: gl.constexpr):
    """One program = token t = t0 + r of the chunk (r = program id), all HP heads, columns
    [c0, c0 + 192) with c0 = 192 * SLAB_I, the token's slots BOUNDS[t, rng] .. BOUNDS[t, rng + 1] - 1
    (those whose keys lie in key range rng). P and DS are [chunk rows, HP, k padded to 64] bf16 (row r)."""
    r = gl.program_id(0).to(gl.int64)
    t = t0 + r
    c0 = SLAB_I * SLAB
    tile: gl.constexpr = gl.NVMMASharedLayout.get_default_for([HP, BLOCK_K], gl.bfloat16)
    # H 128: q and dO slabs (three [H, 64] chunks each) 48 + 48 KiB, P/dS buffers 4 x 32 KiB: 224 KiB.
    qs = gl.allocate_shared_memory(gl.bfloat16, [3, HP, CHUNK], tile)
    dos = gl.allocate_shared_memory(gl.bfloat16, [3, HP, CHUNK], tile)
    pds = gl.allocate_shared_memory(gl.bfloat16, [NBUF, 2 * HP, BLOCK_K], tile)
    bar: gl.constexpr = mbarrier.MBarrierLayout()
    ready = gl.allocate_shared_memory(gl.int64, [NBUF, 1], bar)
    free = gl.allocate_shared_memory(gl.int64, [NBUF, 1], bar)
    qd_bar = gl.allocate_shared_memory(gl.int64, [1], bar)
    for i in gl.static_range(NBUF):
        mbarrier.init(ready.index(i), count=128)  # one cp.async arrival per producer thread
        mbarrier.init(free.index(i), count=1)     # the warpgroup that used it
    mbarrier.init(qd_bar, count=128)

    bound0 = t * stride_bt + rng
    # DKV points at this launch's first column (host side), so the warpgroups add at columns 0-191.
    wg_args = (IDX, DKV, t * stride_it, stride_dkv, BOUNDS, bound0, qs, dos, pds, ready, free, qd_bar)
    gl.warp_specialize(
        [(_producer, (Q, DO, P, DS, t * stride_qt, t * stride_ot, stride_qh, stride_oh, r * stride_pt, stride_ph,
                      BOUNDS, bound0, c0, qs, dos, pds, ready, free, qd_bar, HP)),
         (_wg0, wg_args), (_wg1, wg_args)],
        [4, 4], [232, 232])



def dkv_plan(num_keys: int, device: torch.device):
    """How the dK/dV pass adds into dkv: (slab-major buffer [3, num_keys, 192] fp32 zeroed, keys per
    range) where the device has a persisting L2 set-aside (kernels/l2_persist.py), so that each
    launch adds into one key range of one slab that fits it (H100 32.7 MB: 42,666 keys a range;
    L 32k is one range, 64k two, 128k four); else (None, num_keys): row-major dkv, one range, no
    window."""
    from kernels.l2_persist import max_persisting_bytes

    index = device.index if device.index is not None else torch.cuda.current_device()
    range_keys = max_persisting_bytes(index) // (SLAB.value * 4)
    if range_keys < BLOCK_K.value:
        return None, num_keys
    slabs = torch.zeros(D.value // SLAB.value, num_keys, SLAB.value, dtype=torch.float32, device=device)
    return slabs, min(num_keys, range_keys)


def slot_bounds(indices: torch.Tensor, num_keys: int, range_keys: int) -> torch.Tensor:
    """[T, R + 1] int32: token t's slots whose keys lie in range r (keys r * range_keys ..) are
    bounds[t, r] .. bounds[t, r + 1] - 1. With several ranges `indices` must be sorted within each
    row (-1 first); with one range the bounds are all the slots, any order."""
    T, k = indices.shape
    n_ranges = -(-num_keys // range_keys)
    if n_ranges == 1:
        return torch.tensor([[0, k]], dtype=torch.int32, device=indices.device).expand(T, 2)
    starts = torch.arange(n_ranges + 1, device=indices.device, dtype=indices.dtype) * range_keys
    starts[-1] = num_keys
    return torch.searchsorted(indices, starts.expand(T, -1).contiguous()).to(torch.int32)


def dkv_from_slabs(slabs: torch.Tensor) -> torch.Tensor:
    """[3, L, 192] slab-major -> [L, 576] (a copy)."""
    return slabs.permute(1, 0, 2).reshape(slabs.shape[1], D.value)


def sparse_mla_dkv_gluon(q, dout, indices, p, ds, t0: int, dkv, bounds=None, range_keys=None, window=None) -> None:
    """dkv += the dK/dV of tokens t0 .. t0 + p.shape[0] - 1, from their P and dS [n, H, kp] (bf16;
    kp = k rounded up to a multiple of 64, zeros past k, as the Gluon first pass writes them).
    dkv: [L, 576] fp32 (one range), or slab-major [3, L, 192] (`dkv_plan`) added into one slab and
    key range (`slot_bounds`, range_keys keys each) per launch, the range kept in L2 by `window`
    (kernels.l2_persist.persisting_l2) when given.
    q [T, H, 576], dout [T, H, 512] bf16 (unit stride on the last axis), indices [T, k] int32."""
    n, H, p_cols = p.shape
    topk = indices.shape[1]
    if n == 0:
        return
    assert p.stride() == ds.stride() and dkv.dtype == torch.float32 and p_cols % BLOCK_K.value == 0 and p_cols >= topk
    num_keys = dkv.shape[-2]
    range_keys = range_keys or num_keys
    if bounds is None:
        bounds = slot_bounds(indices, num_keys, range_keys)
    for slab, rng, target in slab_launches(dkv, bounds, range_keys, window):
        _sparse_mla_bwd_dkv_ws_kernel[(n,)](
            q, dout, indices, p, ds, target, bounds, rng, t0,
            q.stride(0), q.stride(1), indices.stride(0), dout.stride(0), dout.stride(1), p.stride(0),
            p.stride(1), target.stride(0), bounds.stride(0), HP=H, SLAB_I=slab, num_warps=4)


def slab_launches(dkv: torch.Tensor, bounds: torch.Tensor, range_keys: int, window=None):
    """The pass's launch order: all tokens for one 192-column slab and key range, then the next.
    Yields (slab, key range, target), target = that slab's [L, 192]-column view of dkv ([L, 576] or
    slab-major [3, L, 192]), with `window` moved over the range's rows first when given.
    (benchmarks/roofline_dkv.py makes the same launches with its traffic kernel.)"""
    for slab in range(D.value // SLAB.value):
        for rng in range(bounds.shape[1] - 1):
            target = dkv[:, SLAB.value * slab:] if dkv.dim() == 2 else dkv[slab]
            if window is not None:
                window.cover(target[rng * range_keys:(rng + 1) * range_keys])
            yield slab, rng, target
