"""Triton sparse MLA (absorbed form): forward and backward kernels and their launchers.

Math as in README.md and reference.py. One program handles one query token and a block of
BLOCK_H heads: since every head attends over the same selected latent keys, a key tile gathered
once serves all heads of the block, and the tile's first D_V columns double as the values.

The backward runs in two passes per chunk of tokens: the dq kernel recomputes P and dS once, keeps
dq in registers and stores P and dS; the dkv kernel reads them back and reduces dK/dV over all
heads with MMAs, adding into dkv one column slab at a time so that the atomic adds hit L2. From 64
heads on, dq has its own kernel that reads dS back instead of accumulating in pass 1.

The softmax runs in base 2 (exp2) with the scale folded into log2(e); lse is returned in natural
log units, as the reference. Under TRITON_INTERPRET=1 (CPU, used by CI) bf16 tl.dot is not
reliable, so operands are cast to fp32 first (DOT_FP32).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.l2_persist import persisting_l2
from kernels.triton_utils import LOG2E, dot as _dot, interpreting as _interpreting


@triton.jit
def _load_tile(KV, safe_idx, valid, col0, stride_kv, COLS: tl.constexpr):
    """Gather kv[safe_idx, col0:col0+COLS] -> [BLOCK_K, COLS]; invalid rows read as 0."""
    cols = col0 + tl.arange(0, COLS)
    return tl.load(KV + safe_idx[:, None] * stride_kv + cols[None, :], mask=valid[:, None], other=0.0)


@triton.jit
def _load_key_block(IDX, KV, t, slots, TOPK, stride_it, stride_kv, D_V: tl.constexpr, D_ROPE: tl.constexpr):
    """Token t's key slots -> (valid [BLOCK_K], safe row ids, k_nope [BLOCK_K, D_V], k_pe [BLOCK_K, D_ROPE])."""
    idx = tl.load(IDX + t * stride_it + slots, mask=slots < TOPK, other=-1)
    valid = idx >= 0
    safe = tl.where(valid, idx, 0)
    return valid, safe, _load_tile(KV, safe, valid, 0, stride_kv, D_V), _load_tile(KV, safe, valid, D_V, stride_kv, D_ROPE)


@triton.jit
def _load_q(Q, t, heads, h_ok, stride_qt, stride_qh, D_V: tl.constexpr, D_ROPE: tl.constexpr):
    """Token t's queries for `heads`: q_nope [BLOCK_H, D_V], q_pe [BLOCK_H, D_ROPE]."""
    q_row = Q + t * stride_qt + heads[:, None] * stride_qh
    q_nope = tl.load(q_row + tl.arange(0, D_V)[None, :], mask=h_ok[:, None], other=0.0)
    q_pe = tl.load(q_row + D_V + tl.arange(0, D_ROPE)[None, :], mask=h_ok[:, None], other=0.0)
    return q_nope, q_pe


@triton.jit
def _token_and_block(blocks_per_token, pid):
    """(token row, block within the token) of program `pid` (int64) on a 1-D grid of rows x blocks.
    The block is the fastest axis, so one token's programs run together and share its gathered keys
    (or its q/dO) in L2; 1-D because a grid's second axis stops at 65535. int64 because
    t * stride_qt passes 2^31 at T*H*D >= 2^31."""
    return pid // blocks_per_token, pid % blocks_per_token


@triton.jit
def _program_heads(H, BLOCK_H: tl.constexpr):
    """This program's (row within the launch, head ids [BLOCK_H], which of them are < H), head block
    fastest (`_token_and_block`)."""
    r, hb = _token_and_block(tl.cdiv(H, BLOCK_H), tl.program_id(0).to(tl.int64))
    heads = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    return r, heads, heads < H


@triton.jit
def _pds_tile(r, heads, h_ok, slots, TOPK, stride_pt, stride_ph):
    """Offsets and mask of the [heads, slots] tile of row r in the P / dS buffers [n, H, TOPK]."""
    return r * stride_pt + heads[:, None] * stride_ph + slots[None, :], h_ok[:, None] & (slots < TOPK)[None, :]


@triton.jit
def _sparse_mla_fwd_kernel(
    Q, KV, IDX, OUT, LSE,
    scale_log2, H, TOPK,
    stride_qt, stride_qh, stride_kv, stride_it, stride_ot, stride_oh, stride_lt,
    D_V: tl.constexpr, D_ROPE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
):
    t, heads, h_ok = _program_heads(H, BLOCK_H)
    q_nope, q_pe = _load_q(Q, t, heads, h_ok, stride_qt, stride_qh, D_V, D_ROPE)

    m = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, D_V], tl.float32)
    for start in range(0, TOPK, BLOCK_K):
        slots = start + tl.arange(0, BLOCK_K)
        # k_nope [BLOCK_K, D_V] doubles as the values.
        valid, safe, k_nope, k_pe = _load_key_block(IDX, KV, t, slots, TOPK, stride_it, stride_kv, D_V, D_ROPE)
        s = _dot(q_nope, tl.trans(k_nope), DOT_FP32, PRECISION) + _dot(q_pe, tl.trans(k_pe), DOT_FP32, PRECISION)
        s = tl.where(valid[None, :], s * scale_log2, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no valid key so far
        alpha = tl.exp2(m - m_use)
        p = tl.exp2(s - m_use[:, None])
        l = l * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p.to(k_nope.dtype), k_nope, DOT_FP32, PRECISION)
        m = m_new
    has_key = l > 0
    out = acc / tl.where(has_key, l, 1.0)[:, None]
    lse = tl.where(has_key, (m + tl.log2(tl.where(has_key, l, 1.0))) / 1.4426950408889634, float("-inf"))
    o_ptr = OUT + t * stride_ot + heads[:, None] * stride_oh + tl.arange(0, D_V)[None, :]
    tl.store(o_ptr, out.to(OUT.dtype.element_ty), mask=h_ok[:, None])
    tl.store(LSE + t * stride_lt + heads, lse, mask=h_ok)


@triton.jit
def _load_head_rows(Q, O, DO, LSE, t, heads, h_ok, stride_qt, stride_qh, stride_dot, stride_doh, stride_lt,
                    D_V: tl.constexpr, D_ROPE: tl.constexpr):
    """One token's q (nope, rope), dO, lse (base 2; +inf where the row had no key) and
    delta = rowsum(dO * O) (fp32) for `heads`. O and dO share strides."""
    q_nope, q_pe = _load_q(Q, t, heads, h_ok, stride_qt, stride_qh, D_V, D_ROPE)
    o_off = t * stride_dot + heads[:, None] * stride_doh + tl.arange(0, D_V)[None, :]
    do = tl.load(DO + o_off, mask=h_ok[:, None], other=0.0)
    o = tl.load(O + o_off, mask=h_ok[:, None], other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    lse = tl.load(LSE + t * stride_lt + heads, mask=h_ok, other=float("inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    return q_nope, q_pe, do, lse2, delta


@triton.jit
def _sparse_mla_bwd_dq_kernel(
    Q, KV, IDX, O, DO, LSE, DQ, P, DS,
    scale, scale_log2, H, TOPK, t0,
    stride_qt, stride_qh, stride_kv, stride_it, stride_dot, stride_doh, stride_lt, stride_pt, stride_ph,
    D_V: tl.constexpr, D_ROPE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr, WITH_DQ: tl.constexpr,
):
    """Pass 1 of the backward, for one token t = t0 + r of the chunk and BLOCK_H heads: a loop over
    its key blocks that recomputes P from lse, forms dS = P * (dP - delta) * scale and stores P and
    dS (in q's dtype, as the dots use them) into P, DS [n, H, TOPK] (row t - t0), so that pass 2
    gets dK/dV without recomputing the scores. WITH_DQ: also accumulate dq = dS K in registers;
    without it `_sparse_mla_bwd_dq_from_ds_kernel` computes dq afterwards, and this loop, free of the
    [BLOCK_H, D] fp32 accumulator, has room for more key-tile stages. The head block is the
    fastest grid axis (`_program_heads`)."""
    r, heads, h_ok = _program_heads(H, BLOCK_H)
    t = t0 + r
    q_nope, q_pe, do, lse2, delta = _load_head_rows(Q, O, DO, LSE, t, heads, h_ok, stride_qt, stride_qh,
                                                    stride_dot, stride_doh, stride_lt, D_V, D_ROPE)
    dq_nope = tl.zeros([BLOCK_H, D_V], tl.float32)
    dq_pe = tl.zeros([BLOCK_H, D_ROPE], tl.float32)
    for start in range(0, TOPK, BLOCK_K):
        slots = start + tl.arange(0, BLOCK_K)
        valid, safe, k_nope, k_pe = _load_key_block(IDX, KV, t, slots, TOPK, stride_it, stride_kv, D_V, D_ROPE)
        s = _dot(q_nope, tl.trans(k_nope), DOT_FP32, PRECISION) + _dot(q_pe, tl.trans(k_pe), DOT_FP32, PRECISION)
        p = tl.exp2(s * scale_log2 - lse2[:, None])
        p = tl.where(valid[None, :] & h_ok[:, None], p, 0.0)
        dp = _dot(do, tl.trans(k_nope), DOT_FP32, PRECISION)
        ds = (p * (dp - delta[:, None]) * scale).to(k_nope.dtype)
        if WITH_DQ:
            dq_nope += _dot(ds, k_nope, DOT_FP32, PRECISION)
            dq_pe += _dot(ds, k_pe, DOT_FP32, PRECISION)
        pds, in_row = _pds_tile(r, heads, h_ok, slots, TOPK, stride_pt, stride_ph)
        tl.store(P + pds, p.to(P.dtype.element_ty), mask=in_row)
        tl.store(DS + pds, ds, mask=in_row)
    if WITH_DQ:
        _store_dq(DQ, t, heads, h_ok, dq_nope, dq_pe, stride_qt, stride_qh, D_V, D_ROPE)


@triton.jit
def _store_dq(DQ, t, heads, h_ok, dq_nope, dq_pe, stride_qt, stride_qh, D_V: tl.constexpr, D_ROPE: tl.constexpr):
    """dq_nope [BLOCK_H, D_V] and dq_pe [BLOCK_H, D_ROPE] (fp32) -> token t's rows of dq."""
    dq_row = DQ + t * stride_qt + heads[:, None] * stride_qh
    tl.store(dq_row + tl.arange(0, D_V)[None, :], dq_nope.to(DQ.dtype.element_ty), mask=h_ok[:, None])
    tl.store(dq_row + D_V + tl.arange(0, D_ROPE)[None, :], dq_pe.to(DQ.dtype.element_ty), mask=h_ok[:, None])


@triton.jit
def _sparse_mla_bwd_dq_from_ds_kernel(
    KV, IDX, DS, DQ,
    H, TOPK, t0,
    stride_qt, stride_qh, stride_kv, stride_it, stride_pt, stride_ph,
    D_V: tl.constexpr, D_ROPE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
):
    """dq = dS K for one token t = t0 + r and BLOCK_H heads, from the dS that pass 1 stored: the
    forward's loop shape (gathered key tiles, one [BLOCK_H, D] fp32 accumulator) with one GEMM."""
    r, heads, h_ok = _program_heads(H, BLOCK_H)
    t = t0 + r
    dq_nope = tl.zeros([BLOCK_H, D_V], tl.float32)
    dq_pe = tl.zeros([BLOCK_H, D_ROPE], tl.float32)
    for start in range(0, TOPK, BLOCK_K):
        slots = start + tl.arange(0, BLOCK_K)
        valid, safe, k_nope, k_pe = _load_key_block(IDX, KV, t, slots, TOPK, stride_it, stride_kv, D_V, D_ROPE)
        pds, in_row = _pds_tile(r, heads, h_ok, slots, TOPK, stride_pt, stride_ph)
        ds = tl.load(DS + pds, mask=in_row, other=0.0)
        dq_nope += _dot(ds, k_nope, DOT_FP32, PRECISION)
        dq_pe += _dot(ds, k_pe, DOT_FP32, PRECISION)
    _store_dq(DQ, t, heads, h_ok, dq_nope, dq_pe, stride_qt, stride_qh, D_V, D_ROPE)


@triton.jit
def _sparse_mla_bwd_dkv_kernel(
    Q, DO, IDX, P, DS, DKV,
    H, TOPK, t0, n_rows, slab_cols,
    stride_qt, stride_qh, stride_it, stride_dot, stride_doh, stride_pt, stride_ph, stride_dkv,
    D_V: tl.constexpr, D: tl.constexpr, H_PAD: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr, PARTIALS: tl.constexpr,
):
    """Pass 2: dK/dV of one token's key block in one column slab, summed over all heads by the MMAs:
    [BLOCK_K, H] x [H, BLOCK_C] per column chunk, with P^T and dS^T read back from pass 1. Then one
    relaxed fp32 atomic add per (token, key, column) into dkv [L, D], or, with PARTIALS, a plain
    store of the rows into DKV = partials [n_rows, TOPK, D] (row t - t0) for `_dkv_segment_sum_kernel`.

    Grid order, slowest first: column slab (slab_cols columns), token row, key block. All programs of
    one slab run before the next slab starts, so the dkv columns they add into can stay in L2
    (random keys spread the adds over all of dkv); and one token's key blocks run together and
    share its q/dO in L2."""
    kblocks = tl.cdiv(TOPK, BLOCK_K)
    pid = tl.program_id(0).to(tl.int64)
    slab = pid // (n_rows * kblocks)
    r, kb = _token_and_block(kblocks, pid % (n_rows * kblocks))
    t = t0 + r
    slots = kb * BLOCK_K + tl.arange(0, BLOCK_K)
    in_row = slots < TOPK
    heads = tl.arange(0, H_PAD)
    h_ok = heads < H
    pds, m = _pds_tile(r, heads, h_ok, slots, TOPK, stride_pt, stride_ph)
    p_t = tl.trans(tl.load(P + pds, mask=m, other=0.0))  # [BLOCK_K, H_PAD]
    ds_t = tl.trans(tl.load(DS + pds, mask=m, other=0.0))
    q_row = Q + t * stride_qt + heads[:, None] * stride_qh
    do_row = DO + t * stride_dot + heads[:, None] * stride_doh
    if PARTIALS:
        rows = DKV + (r * TOPK + slots)[:, None] * stride_dkv
        row_ok = in_row
    else:
        idx = tl.load(IDX + t * stride_it + slots, mask=in_row, other=-1)
        row_ok = idx >= 0
        rows = DKV + tl.where(row_ok, idx, 0).to(tl.int64)[:, None] * stride_dkv
    c_lo = slab * slab_cols
    for c0 in range(c_lo, tl.minimum(c_lo + slab_cols, D), BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        acc = _dot(ds_t, tl.load(q_row + cols[None, :], mask=h_ok[:, None], other=0.0), DOT_FP32, PRECISION)
        # Value columns also get P^T dO; the rope chunks load dO as zeros (a small wasted MMA that
        # keeps one loop for all columns).
        do = tl.load(do_row + cols[None, :], mask=h_ok[:, None] & (cols < D_V)[None, :], other=0.0)
        acc += _dot(p_t, do, DOT_FP32, PRECISION)
        if PARTIALS:
            tl.store(rows + cols[None, :], acc, mask=row_ok[:, None])
        else:
            # Relaxed ordering: the adds only need to be atomic, not ordered with other memory traffic.
            tl.atomic_add(rows + cols[None, :], acc, mask=row_ok[:, None], sem="relaxed")


@triton.jit
def _dkv_segment_sum_kernel(PART, ORDER, PTR, DKV, stride_part, stride_dkv, D: tl.constexpr, DP: tl.constexpr):
    """dkv[j] += sum of the partial rows of key j, in the order ORDER lists them (deterministic).
    ORDER [n] holds flat (token, slot) row numbers of PART sorted by key; key j owns
    ORDER[PTR[j]:PTR[j+1]]."""
    j = tl.program_id(0)
    cols = tl.arange(0, DP)
    acc = tl.zeros([DP], tl.float32)
    for e in range(tl.load(PTR + j), tl.load(PTR + j + 1)):
        r = tl.load(ORDER + e)
        acc += tl.load(PART + r * stride_part + cols, mask=cols < D, other=0.0)
    row = DKV + j * stride_dkv + cols
    tl.store(row, tl.load(row, mask=cols < D, other=0.0) + acc, mask=cols < D)


def check_triton_inputs(q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, d_v: int) -> None:
    """Shape/dtype/device checks with messages that say what would be valid."""
    from .reference import _check_inputs

    _check_inputs(q, kv, indices, d_v)
    if not (q.is_cuda or _interpreting()):
        raise ValueError("sparse_mla (triton): tensors must be on a CUDA device (or set TRITON_INTERPRET=1)")
    if q.dtype not in (torch.bfloat16, torch.float16, torch.float32) or kv.dtype != q.dtype:
        raise ValueError(f"sparse_mla (triton): q and kv must share a dtype among bf16/fp16/fp32, got {q.dtype}, {kv.dtype}")
    d_rope = q.shape[-1] - d_v
    for name, n in (("d_v", d_v), ("D - d_v", d_rope)):
        if n < 16 or n & (n - 1):
            raise ValueError(f"sparse_mla (triton): {name} must be a power of two >= 16, got {n} (DeepSeek: 512 and 64)")


def default_config(heads: int, backward: bool, elem_bytes: int = 2):
    """Forward: (BLOCK_H, BLOCK_K, num_warps, num_stages). Backward: that tuple for the dq kernel (pass
    1), (BLOCK_K, BLOCK_C, num_warps, num_stages) for the dkv kernel (pass 2) and, where dq gets its
    own pass from the stored dS, a third tuple like the first for `_sparse_mla_bwd_dq_from_ds_kernel`. 16-bit inputs: the
    best of `benchmarks/bench_sparse_mla.py --sweep` on an H100. fp32 tiles are twice as large, so
    fp32 takes 32-key tiles and one stage to fit the 227 KB of shared memory a block may use."""
    block_h = _head_block(heads)
    if not backward:
        if elem_bytes > 2:
            return (block_h, 32, 8, 1)
        return (block_h, 64, 8, 2) if block_h > 16 else (16, 64, 4, 2)
    if elem_bytes > 2:
        return (min(block_h, 32), 32, 8, 1), (32, 32, 4, 1)
    if block_h >= 64:  # dq from the stored dS in its own pass: 29.1 against 30.9 ms at h128 (NOTES)
        return (64, 32, 4, 2), (64, 64, 4, 2), (64, 64, 8, 2)
    return (16, 64, 4, 2), (64, 64, 4, 2)


def _head_block(heads: int) -> int:
    """Heads per program: the head count rounded up to a power of two, within [16, 64]."""
    return min(max(16, triton.next_power_of_2(heads)), 64)


def gluon_forward_for(q, kv, d_v: int):
    """The Gluon forward module (gluon_fwd.py) if it takes these inputs, else None: under the
    interpreter (Gluon has none), with a Triton that has no Gluon, or shapes it does not take."""
    if _interpreting():
        return None
    try:
        from . import gluon_fwd
    except ImportError:
        return None
    return gluon_fwd if gluon_fwd.gluon_fwd_supported(q, kv, d_v) else None


def gluon_pds_for(q, kv, d_v: int):
    """The Gluon module of the backward's first pass (gluon_bwd.py) if it takes these inputs, else
    None (same rules as `gluon_forward_for`)."""
    if gluon_forward_for(q, kv, d_v) is None:
        return None
    from . import gluon_bwd

    return gluon_bwd


def gluon_dkv_for(q, kv, d_v: int):
    """The Gluon module of the backward's dK/dV pass (gluon_bwd_dkv.py) if it takes these inputs,
    else None: the Gluon forward's shapes at 64 or 128 heads (gluon_bwd_dkv.HEADS)."""
    if gluon_forward_for(q, kv, d_v) is None:
        return None
    from . import gluon_bwd_dkv

    return gluon_bwd_dkv if q.shape[1] in gluon_bwd_dkv.HEADS else None


def sparse_mla_fwd_triton(q, kv, indices, scale: float, d_v: int, config=None):
    """q [T, H, D], kv [L, D], indices [T, k] int32 -> out [T, H, d_v] (q.dtype), lse [T, H] fp32.

    With config None, shapes the Gluon kernel takes (bf16, D 576, d_v 512, heads a multiple of 64,
    Hopper) run there (gluon_fwd.py: warp-specialised, 1.7x this file's kernel at h128); 'gluon'
    asks for it and fails where it cannot run; a tuple runs this file's kernel with that
    (BLOCK_H, BLOCK_K, num_warps, num_stages) (benchmark sweeps)."""
    check_triton_inputs(q, kv, indices, d_v)
    q, kv, indices = q.contiguous(), kv.contiguous(), indices.contiguous().to(torch.int32)
    if config is None or config == "gluon":
        gluon = gluon_forward_for(q, kv, d_v)
        if gluon is not None:
            return gluon.sparse_mla_fwd_gluon(q, kv, indices, scale, d_v)
        if config == "gluon":
            raise ValueError("sparse_mla (triton): config 'gluon' needs a Hopper GPU, Triton with Gluon, bf16 q/kv, "
                             f"D 576, d_v 512 and heads a multiple of 64; got {q.dtype} q {tuple(q.shape)}, d_v {d_v}, "
                             f"on {q.device}")
    T, H, D = q.shape
    out = torch.empty(T, H, d_v, dtype=q.dtype, device=q.device)
    lse = torch.empty(T, H, dtype=torch.float32, device=q.device)
    block_h, block_k, warps, stages = config or default_config(H, False, q.element_size())
    grid = (triton.cdiv(H, block_h) * T,)
    _sparse_mla_fwd_kernel[grid](
        q, kv, indices, out, lse, scale * LOG2E, H, indices.shape[1],
        q.stride(0), q.stride(1), kv.stride(0), indices.stride(0), out.stride(0), out.stride(1), lse.stride(0),
        D_V=d_v, D_ROPE=D - d_v, BLOCK_H=block_h, BLOCK_K=block_k,
        DOT_FP32=_interpreting(), PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=warps, num_stages=stages,
    )
    return out, lse


# fp32 dkv bytes one column slab of the dkv kernel's atomic adds may span (about half of an H100's
# 50 MB L2), unless the config names the chunks per slab.
DKV_SLAB_BYTES = 24 << 20


def _slab_cols(num_keys: int, D: int, block_c: int, heads: int, elem_bytes: int, chunks: int | None) -> int:
    """Columns per slab of the dkv kernel: `chunks` column chunks if given, else as many as
    DKV_SLAB_BYTES allows (at least one). Every slab re-reads P and dS (2 * heads * elem_bytes per
    token and slot) to save L2 misses on the atomic adds (D * 4 bytes per token and slot). When the
    L2-sized slabs would re-read more than 1.5x those bytes, one slab of all columns is used instead:
    on an H100 at T 4096, k 2048 (kernels/sparse_mla/NOTES.md) 3 slabs won at H 128 and L 32k,
    9 slabs lost to one at H 128 and L 128k, and 9 won at H 16 and L 128k."""
    if chunks is None:
        chunks = max(1, DKV_SLAB_BYTES // (num_keys * block_c * 4))
        slabs = triton.cdiv(D, min(D, chunks * block_c))
        if slabs * 2 * heads * elem_bytes > 1.5 * D * 4:
            return D
    return min(D, chunks * block_c)


# Bytes of fp32 partial dK/dV rows one deterministic chunk of tokens may hold.
PARTIAL_BYTES = 1 << 31
# Bytes of each of the P and dS buffers that pass 1 writes and pass 2 reads, per chunk of tokens.
PDS_BYTES = 1 << 30


def sparse_mla_bwd_triton(q, kv, indices, scale: float, d_v: int, out, lse, dout, config=None,
                          deterministic: bool | None = None):
    """Returns dq [T, H, D] (q.dtype) and dkv [L, D] (kv.dtype, accumulated in fp32).

    Two passes per chunk of tokens: the dq kernel also stores P and dS [chunk, H, k] (q.dtype; at
    most PDS_BYTES each, or k rounded up to 64 slots a row on the Gluon path), and the dkv kernel turns them into dK/dV with all heads reduced by its
    MMAs, so the scores are computed once and no kernel re-reads q/dO per key block with a full
    recompute. With a third config entry, dq comes from its own kernel over the stored dS instead
    of pass 1's registers. dkv: by default fp32 atomic adds, so the summation order, and the last
    bits, may vary between runs. deterministic=True (None: follow torch.are_deterministic_algorithms_enabled())
    instead stores each (token, slot) row and sums every key's rows in (token, slot) order:
    bit-identical across runs, at the cost of writing and reading T*k*D*4 bytes.
    `config` is ((BLOCK_H, BLOCK_K, warps, stages) for pass 1, (BLOCK_K, BLOCK_C, warps, stages[,
    column chunks per slab]) for dkv[, (BLOCK_H, BLOCK_K, warps, stages) for the separate dq pass]).
    With config None, at the Gluon forward's shapes the passes run in the Gluon kernels instead
    (gluon_bwd.py: P and dS; gluon_bwd_dq.py: dq; gluon_bwd_dkv.py: dK/dV at 64 or 128 heads and
    not for the deterministic sum, into a dkv kept in L2 one slab and key range at a time)."""
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    q, kv, indices = q.contiguous(), kv.contiguous(), indices.contiguous().to(torch.int32)
    dout, out, lse = dout.contiguous(), out.contiguous(), lse.contiguous()
    T, H, D = q.shape
    topk = indices.shape[1]
    dq = torch.empty_like(q)
    cfg = config or default_config(H, True, q.element_size())
    (block_h, block_k, warps, stages), dkv_cfg = cfg[:2]
    dq_cfg = cfg[2] if len(cfg) > 2 else None  # a separate dq pass, or dq inside pass 1
    dkv_block_k, block_c, dkv_warps, dkv_stages = dkv_cfg[:4]
    block_c = min(block_c, d_v, D - d_v)  # a column chunk lies within the values or within the rope part
    slab_cols = D if deterministic else _slab_cols(kv.shape[0], D, block_c, H, q.element_size(),
                                                        dkv_cfg[4] if len(dkv_cfg) > 4 else None)
    slabs = triton.cdiv(D, slab_cols)
    dot_opts = dict(DOT_FP32=_interpreting(), PRECISION="ieee" if q.dtype == torch.float32 else "tf32")
    chunk = max(1, PDS_BYTES // (H * topk * q.element_size()))
    if deterministic:
        chunk = min(chunk, max(1, PARTIAL_BYTES // (topk * D * 4)))
    keys = torch.arange(kv.shape[0] + 1, device=kv.device) if deterministic else None  # segment bounds
    # Pass 1 (P, dS) in the warp-specialised Gluon kernel where it runs and dq has its own pass;
    # an explicit config keeps the Triton kernel (benchmark sweeps).
    gluon_pds = gluon_pds_for(q, kv, d_v) if config is None and dq_cfg is not None else None
    # Then dq and, where it takes the shapes and the adds may be atomic, dK/dV in Gluon too; these
    # read whole 64-slot tiles of P/dS, so with the Gluon pass 1 their rows are padded to a multiple
    # of 64 slots (it writes zeros past k).
    if gluon_pds is not None:
        from . import gluon_bwd_dq as gluon_dq
    gluon_dkv = gluon_dkv_for(q, kv, d_v) if gluon_pds is not None and not deterministic else None
    p_cols = triton.cdiv(topk, 64) * 64 if gluon_pds is not None else topk
    # The Gluon dK/dV pass adds into a slab-major dkv, one slab and key range at a time kept in L2,
    # where the device has a persisting L2 set-aside (gluon_bwd_dkv.dkv_plan). With several key
    # ranges each row's slots are put in key order first (the gradients do not depend on the order):
    # a range is then a run of slots.
    dkv_slabs, range_keys = gluon_dkv.dkv_plan(kv.shape[0], kv.device) if gluon_dkv is not None else (None, None)
    dkv = torch.zeros(kv.shape, dtype=torch.float32, device=kv.device) if dkv_slabs is None else None
    if dkv_slabs is not None:
        if range_keys < kv.shape[0]:
            indices = torch.sort(indices, dim=1).values
        bounds = gluon_dkv.slot_bounds(indices, kv.shape[0], range_keys)

    def dkv_pass(t0: int, n: int, p: torch.Tensor, ds: torch.Tensor) -> None:
        target = torch.empty(n * topk, D, dtype=torch.float32, device=kv.device) if deterministic else dkv
        _sparse_mla_bwd_dkv_kernel[(slabs * n * triton.cdiv(topk, dkv_block_k),)](
            q, dout, indices, p, ds, target, H, topk, t0, n, slab_cols,
            q.stride(0), q.stride(1), indices.stride(0), dout.stride(0), dout.stride(1), p.stride(0), p.stride(1),
            target.stride(0), D_V=d_v, D=D, H_PAD=max(16, triton.next_power_of_2(H)), BLOCK_K=dkv_block_k,
            BLOCK_C=block_c, PARTIALS=deterministic, num_warps=dkv_warps, num_stages=dkv_stages, **dot_opts,
        )
        if deterministic:
            # Stable sort: a key's rows stay in (token, slot) order; -1 slots sort first and are skipped.
            sorted_keys, order = torch.sort(indices[t0 : t0 + n].reshape(-1).long(), stable=True)
            ptr = torch.searchsorted(sorted_keys, keys)
            _dkv_segment_sum_kernel[(kv.shape[0],)](target, order, ptr, dkv, target.stride(0), dkv.stride(0),
                                                    D=D, DP=triton.next_power_of_2(D), num_warps=4)

    for t0 in range(0, T, chunk):
        n = min(T, t0 + chunk) - t0
        p = torch.empty(n, H, p_cols, dtype=q.dtype, device=q.device)
        ds = torch.empty_like(p)
        if gluon_pds is not None:
            gluon_pds.sparse_mla_pds_gluon(q, kv, indices, out, dout, lse, scale, t0, p, ds)
            gluon_dq.sparse_mla_dq_gluon(kv, indices, ds, t0, dq)
        else:
            _sparse_mla_bwd_dq_kernel[(triton.cdiv(H, block_h) * n,)](
                q, kv, indices, out, dout, lse, dq, p, ds, scale, scale * LOG2E, H, topk, t0,
                q.stride(0), q.stride(1), kv.stride(0), indices.stride(0), dout.stride(0), dout.stride(1),
                lse.stride(0), p.stride(0), p.stride(1),
                D_V=d_v, D_ROPE=D - d_v, BLOCK_H=block_h, BLOCK_K=block_k, num_warps=warps, num_stages=stages,
                WITH_DQ=dq_cfg is None, **dot_opts,
            )
            if dq_cfg is not None:
                dq_bh, dq_bk, dq_warps, dq_stages = dq_cfg
                _sparse_mla_bwd_dq_from_ds_kernel[(triton.cdiv(H, dq_bh) * n,)](
                    kv, indices, ds, dq, H, topk, t0, q.stride(0), q.stride(1), kv.stride(0), indices.stride(0),
                    ds.stride(0), ds.stride(1), D_V=d_v, D_ROPE=D - d_v, BLOCK_H=dq_bh, BLOCK_K=dq_bk,
                    num_warps=dq_warps, num_stages=dq_stages, **dot_opts,
                )
        if dkv_slabs is not None:
            with persisting_l2(kv.device) as window:
                gluon_dkv.sparse_mla_dkv_gluon(q, dout, indices, p, ds, t0, dkv_slabs, bounds, range_keys, window)
        elif gluon_dkv is not None:
            gluon_dkv.sparse_mla_dkv_gluon(q, dout, indices, p, ds, t0, dkv)
        else:
            dkv_pass(t0, n, p, ds)
    if dkv_slabs is not None:
        dkv = gluon_dkv.dkv_from_slabs(dkv_slabs)
    return dq, dkv.to(kv.dtype)
