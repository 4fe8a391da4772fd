"""Triton sparse MLA (absorbed form): forward and backward kernels and their launchers.

Math as in README.md and reference.py. One program handles one query token and a block of
BLOCK_H heads: since every head attends over the same selected latent keys, a key tile gathered
once serves all heads of the block, and the tile's first D_V columns double as the values.

The softmax runs in base 2 (exp2) with the scale folded into log2(e); lse is returned in natural
log units, as the reference. Under TRITON_INTERPRET=1 (CPU, used by CI) bf16 tl.dot is not
reliable, so operands are cast to fp32 first (DOT_FP32).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

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
def _sparse_mla_fwd_kernel(
    Q, KV, IDX, OUT, LSE,
    scale_log2, H, TOPK,
    stride_qt, stride_qh, stride_kv, stride_it, stride_ot, stride_oh, stride_lt,
    D_V: tl.constexpr, D_ROPE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)  # t * stride_qt passes 2^31 at T*H*D >= 2^31
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = heads < H
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
def _load_head_rows(Q, DO, LSE, DELTA, t, heads, h_ok, stride_qt, stride_qh, stride_dot, stride_doh, stride_lt,
                    D_V: tl.constexpr, D_ROPE: tl.constexpr):
    """One token's q (nope, rope), dO, lse (base 2; +inf where the row had no key) and delta for `heads`."""
    q_nope, q_pe = _load_q(Q, t, heads, h_ok, stride_qt, stride_qh, D_V, D_ROPE)
    do = tl.load(DO + t * stride_dot + heads[:, None] * stride_doh + tl.arange(0, D_V)[None, :],
                 mask=h_ok[:, None], other=0.0)
    lse = tl.load(LSE + t * stride_lt + heads, mask=h_ok, other=float("inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    delta = tl.load(DELTA + t * stride_lt + heads, mask=h_ok, other=0.0)
    return q_nope, q_pe, do, lse2, delta


@triton.jit
def _probs_and_dscores(q_nope, q_pe, do, lse2, delta, k_nope, k_pe, valid, h_ok, scale, scale_log2,
                       DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    """P [BLOCK_H, BLOCK_K] recomputed from lse, and dS, the gradient of the unscaled logits q.k."""
    s = _dot(q_nope, tl.trans(k_nope), DOT_FP32, PRECISION) + _dot(q_pe, tl.trans(k_pe), DOT_FP32, PRECISION)
    p = tl.exp2(s * scale_log2 - lse2[:, None])
    p = tl.where(valid[None, :] & h_ok[:, None], p, 0.0)
    dp = _dot(do, tl.trans(k_nope), DOT_FP32, PRECISION)
    return p, p * (dp - delta[:, None]) * scale


@triton.jit
def _sparse_mla_bwd_dq_kernel(
    Q, KV, IDX, DO, LSE, DELTA, DQ, DKV,
    scale, scale_log2, H, TOPK,
    stride_qt, stride_qh, stride_kv, stride_it, stride_dot, stride_doh, stride_lt, stride_dkv,
    D_V: tl.constexpr, D_ROPE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr, FUSE_DKV: tl.constexpr,
):
    """dq for one token and BLOCK_H heads: a loop over its key blocks. With FUSE_DKV the same loop
    also adds this head block's dK/dV of each key block into dkv [L, D] (fp32, relaxed atomics):
    q, dO and P are already at hand, at the price of H/BLOCK_H atomic adds per (token, key,
    column) instead of the one of `_sparse_mla_bwd_dkv_kernel`."""
    t = tl.program_id(0).to(tl.int64)  # t * stride_qt passes 2^31 at T*H*D >= 2^31
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = heads < H
    q_nope, q_pe, do, lse2, delta = _load_head_rows(Q, DO, LSE, DELTA, t, heads, h_ok, stride_qt, stride_qh,
                                                    stride_dot, stride_doh, stride_lt, D_V, D_ROPE)
    dq_nope = tl.zeros([BLOCK_H, D_V], tl.float32)
    dq_pe = tl.zeros([BLOCK_H, D_ROPE], tl.float32)
    for start in range(0, TOPK, BLOCK_K):
        slots = start + tl.arange(0, BLOCK_K)
        valid, safe, k_nope, k_pe = _load_key_block(IDX, KV, t, slots, TOPK, stride_it, stride_kv, D_V, D_ROPE)
        p, ds = _probs_and_dscores(q_nope, q_pe, do, lse2, delta, k_nope, k_pe, valid, h_ok, scale, scale_log2,
                                   DOT_FP32, PRECISION)
        ds_lo = ds.to(k_nope.dtype)
        dq_nope += _dot(ds_lo, k_nope, DOT_FP32, PRECISION)
        dq_pe += _dot(ds_lo, k_pe, DOT_FP32, PRECISION)
        if FUSE_DKV:
            ds_t = tl.trans(ds_lo)
            dk_nope = _dot(ds_t, q_nope, DOT_FP32, PRECISION) + _dot(tl.trans(p.to(do.dtype)), do, DOT_FP32, PRECISION)
            dk_pe = _dot(ds_t, q_pe, DOT_FP32, PRECISION)
            rows = DKV + safe[:, None] * stride_dkv
            tl.atomic_add(rows + tl.arange(0, D_V)[None, :], dk_nope, mask=valid[:, None], sem="relaxed")
            tl.atomic_add(rows + D_V + tl.arange(0, D_ROPE)[None, :], dk_pe, mask=valid[:, None], sem="relaxed")
    dq_row = DQ + t * stride_qt + heads[:, None] * stride_qh
    tl.store(dq_row + tl.arange(0, D_V)[None, :], dq_nope.to(DQ.dtype.element_ty), mask=h_ok[:, None])
    tl.store(dq_row + D_V + tl.arange(0, D_ROPE)[None, :], dq_pe.to(DQ.dtype.element_ty), mask=h_ok[:, None])


@triton.jit
def _sparse_mla_bwd_dkv_kernel(
    Q, KV, IDX, DO, LSE, DELTA, DKV,
    scale, scale_log2, H, TOPK, t0,
    stride_qt, stride_qh, stride_kv, stride_it, stride_dot, stride_doh, stride_lt, stride_dkv,
    D_V: tl.constexpr, D_ROPE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr, PARTIALS: tl.constexpr,
):
    """dK/dV of one token's key block, summed over all heads in registers. Then either one fp32
    atomic add per (token, key, column) into dkv [L, D] (H/BLOCK_H times fewer atomics than per
    head block), or, with PARTIALS, a plain store of the rows into DKV = partials [tokens, TOPK, D]
    (token t at row t - t0) for `_dkv_segment_sum_kernel` to add up in a fixed order."""
    t = t0 + tl.program_id(0).to(tl.int64)
    slots = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    valid, safe, k_nope, k_pe = _load_key_block(IDX, KV, t, slots, TOPK, stride_it, stride_kv, D_V, D_ROPE)
    dk_nope = tl.zeros([BLOCK_K, D_V], tl.float32)
    dk_pe = tl.zeros([BLOCK_K, D_ROPE], tl.float32)
    for h0 in range(0, H, BLOCK_H):
        heads = h0 + tl.arange(0, BLOCK_H)
        h_ok = heads < H
        q_nope, q_pe, do, lse2, delta = _load_head_rows(Q, DO, LSE, DELTA, t, heads, h_ok, stride_qt, stride_qh,
                                                        stride_dot, stride_doh, stride_lt, D_V, D_ROPE)
        p, ds = _probs_and_dscores(q_nope, q_pe, do, lse2, delta, k_nope, k_pe, valid, h_ok, scale, scale_log2,
                                   DOT_FP32, PRECISION)
        ds_t = tl.trans(ds.to(q_nope.dtype))
        dk_nope += _dot(ds_t, q_nope, DOT_FP32, PRECISION) + _dot(tl.trans(p.to(do.dtype)), do, DOT_FP32, PRECISION)
        dk_pe += _dot(ds_t, q_pe, DOT_FP32, PRECISION)
    if PARTIALS:
        rows = DKV + (tl.program_id(0) * TOPK + slots)[:, None] * stride_dkv
        in_row = (slots < TOPK)[:, None]
        tl.store(rows + tl.arange(0, D_V)[None, :], dk_nope, mask=in_row)
        tl.store(rows + D_V + tl.arange(0, D_ROPE)[None, :], dk_pe, mask=in_row)
    else:
        rows = DKV + safe[:, None] * stride_dkv
        # Relaxed ordering: the adds only need to be atomic, not ordered with other memory traffic.
        tl.atomic_add(rows + tl.arange(0, D_V)[None, :], dk_nope, mask=valid[:, None], sem="relaxed")
        tl.atomic_add(rows + D_V + tl.arange(0, D_ROPE)[None, :], dk_pe, mask=valid[:, None], sem="relaxed")


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
    """Forward: (BLOCK_H, BLOCK_K, num_warps, num_stages). Backward: that tuple for the dq kernel and
    one for the dkv kernel; a dkv entry of None makes the dq kernel add dkv itself (FUSE_DKV). The
    default keeps them split: fusing won at h16 on random indices but lost on the indexer's
    (kernels/sparse_mla/NOTES.md). 16-bit inputs: the best of `benchmarks/bench_sparse_mla.py
    --sweep 128 16` on an H100. fp32 tiles are twice as large, so fp32 takes 32-key tiles and one
    stage to fit the 227 KB of shared memory a block may use."""
    block_h = _head_block(heads)
    if not backward:
        if elem_bytes > 2:
            return (block_h, 32, 8, 1)
        return (block_h, 64, 8, 2) if block_h > 16 else (16, 64, 4, 2)
    dq = (min(block_h, 32), 32, 8, 1) if elem_bytes > 2 else (16, 64, 4, 2)
    return dq, split_dkv_config(heads, elem_bytes)


def split_dkv_config(heads: int, elem_bytes: int = 2):
    """Tiles of the separate dkv kernel (the deterministic path always uses it); also the tiles that
    fit the dq kernel with FUSE_DKV (its 64-key tiles exceed shared memory)."""
    if elem_bytes > 2:
        return (min(_head_block(heads), 32), 32, 8, 1)
    return (16, 32, 4, 2)


def _head_block(heads: int) -> int:
    """Heads per program: the head count rounded up to a power of two, within [16, 64]."""
    return min(max(16, triton.next_power_of_2(heads)), 64)


def sparse_mla_fwd_triton(q, kv, indices, scale: float, d_v: int, config=None):
    """q [T, H, D], kv [L, D], indices [T, k] int32 -> out [T, H, d_v] (q.dtype), lse [T, H] fp32.
    `config` overrides default_config (benchmark sweeps)."""
    check_triton_inputs(q, kv, indices, d_v)
    q, kv, indices = q.contiguous(), kv.contiguous(), indices.contiguous().to(torch.int32)
    T, H, D = q.shape
    out = torch.empty(T, H, d_v, dtype=q.dtype, device=q.device)
    lse = torch.empty(T, H, dtype=torch.float32, device=q.device)
    block_h, block_k, warps, stages = config or default_config(H, False, q.element_size())
    grid = (T, triton.cdiv(H, block_h))
    _sparse_mla_fwd_kernel[grid](
        q, kv, indices, out, lse, scale * LOG2E, H, indices.shape[1],
        q.stride(0), q.stride(1), kv.stride(0), indices.stride(0), out.stride(0), out.stride(1), lse.stride(0),
        D_V=d_v, D_ROPE=D - d_v, BLOCK_H=block_h, BLOCK_K=block_k,
        DOT_FP32=_interpreting(), PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=warps, num_stages=stages,
    )
    return out, lse


# Bytes of fp32 partial dK/dV rows one deterministic chunk of tokens may hold.
PARTIAL_BYTES = 1 << 31


def sparse_mla_bwd_triton(q, kv, indices, scale: float, d_v: int, out, lse, dout, config=None,
                          deterministic: bool | None = None):
    """Returns dq [T, H, D] (q.dtype) and dkv [L, D] (kv.dtype, accumulated in fp32).

    dkv: by default fp32 atomic adds, so the summation order, and the last bits, may vary between
    runs. deterministic=True (None: follow torch.are_deterministic_algorithms_enabled()) instead
    stores each (token, slot) row and sums every key's rows in (token, slot) order, chunk by chunk
    of tokens: bit-identical across runs, at the cost of writing and reading T*k*D*4 bytes.
    `config` is ((BLOCK_H, BLOCK_K, warps, stages) for dq, the same for dkv); dkv None: the dq kernel
    adds dkv itself (FUSE_DKV) unless deterministic."""
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    q, kv, indices = q.contiguous(), kv.contiguous(), indices.contiguous().to(torch.int32)
    dout = dout.contiguous()
    T, H, D = q.shape
    topk = indices.shape[1]
    delta = torch.empty(T, H, dtype=torch.float32, device=q.device)  # rowsum(dO * O), fp32
    for s in range(0, T, 4096):  # in row blocks: fp32 copies of all of dO and O would double their memory
        delta[s : s + 4096] = (dout[s : s + 4096].float() * out[s : s + 4096].float()).sum(-1)
    dq = torch.empty_like(q)
    dkv = torch.zeros(kv.shape, dtype=torch.float32, device=kv.device)
    dq_cfg, dkv_cfg = config or default_config(H, True, q.element_size())
    fuse = dkv_cfg is None and not deterministic  # dkv added by the dq kernel (atomic mode only)
    if dkv_cfg is None and deterministic:
        dkv_cfg = split_dkv_config(H, q.element_size())
    common = dict(D_V=d_v, D_ROPE=D - d_v, DOT_FP32=_interpreting(),
                  PRECISION="ieee" if q.dtype == torch.float32 else "tf32")
    lse = lse.contiguous()
    args = (scale, scale * LOG2E, H, topk, q.stride(0), q.stride(1), kv.stride(0), indices.stride(0),
            dout.stride(0), dout.stride(1), lse.stride(0))
    block_h, block_k, warps, stages = dq_cfg
    _sparse_mla_bwd_dq_kernel[(T, triton.cdiv(H, block_h))](
        q, kv, indices, dout, lse, delta, dq, dkv, *args, dkv.stride(0),
        BLOCK_H=block_h, BLOCK_K=block_k, num_warps=warps, num_stages=stages, FUSE_DKV=fuse, **common,
    )
    if fuse:
        return dq, dkv.to(kv.dtype)
    block_h, block_k, warps, stages = dkv_cfg
    dkv_opts = dict(BLOCK_H=block_h, BLOCK_K=block_k, num_warps=warps, num_stages=stages, **common)
    if not deterministic:
        _sparse_mla_bwd_dkv_kernel[(T, triton.cdiv(topk, block_k))](
            q, kv, indices, dout, lse, delta, dkv, *args[:4], 0, *args[4:], dkv.stride(0), PARTIALS=False, **dkv_opts)
        return dq, dkv.to(kv.dtype)
    chunk = max(1, PARTIAL_BYTES // (topk * D * 4))
    keys = torch.arange(kv.shape[0] + 1, device=kv.device)
    for t0 in range(0, T, chunk):
        n = min(T, t0 + chunk) - t0
        part = torch.empty(n * topk, D, dtype=torch.float32, device=kv.device)
        _sparse_mla_bwd_dkv_kernel[(n, triton.cdiv(topk, block_k))](
            q, kv, indices, dout, lse, delta, part, *args[:4], t0, *args[4:], part.stride(0), PARTIALS=True, **dkv_opts)
        # Stable sort: a key's rows stay in (token, slot) order; -1 slots sort first and are skipped.
        sorted_keys, order = torch.sort(indices[t0 : t0 + n].reshape(-1).long(), stable=True)
        ptr = torch.searchsorted(sorted_keys, keys)
        _dkv_segment_sum_kernel[(kv.shape[0],)](part, order, ptr, dkv, part.stride(0), dkv.stride(0),
                                                D=D, DP=triton.next_power_of_2(D), num_warps=4)
    return dq, dkv.to(kv.dtype)
