#!/usr/bin/env python
"""Where the native top-k's main pass spends its time: one probe kernel, epilogue added step by step.

    python benchmarks/probe_topk_epilogue.py --seqlen 32768

The probe scores a causal T x T x 576 bf16 GEMM of random rows (T = L = --seqlen) tile by tile, as
the main pass does, with a write threshold per row aimed at 1.3k of its keys, and adds the main
pass's epilogue in steps (EPI): 0 row max only; 1 + count of the keys >= threshold; 2 + positions by
tl.cumsum (not stored); 3 + key store; 4 + score store (the main pass before the sixth round);
5 positions from per-row atomics instead; 6 positions from a tensor-core prefix sum (take @
upper-triangular ones) + key and score stores; 7 as 6 with the key store only; 8 as 6 with one
packed int64 store (the main pass since the sixth round). FLAT: one loop over (key tile, D chunk)
steps instead of nested loops; TMA: tensor-descriptor loads instead of pointer loads.
Prints one line per case (median ms, TFLOP/s of the GEMM); writes no file. A probe for
kernels/native_topk/NOTES.md, not a second implementation: the kernels live in triton_impl.py.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import triton
import triton.language as tl

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from bench_native_topk import cuda_ms  # noqa: E402
from kernels.native_topk.triton_impl import _operands, _ordered_key  # noqa: E402


@triton.jit
def _epilogue(acc, rows, keys, tw, cursor, smax, BUF_V, BUF_I, BUF_P, CUR, cap, tri, EPI: tl.constexpr):
    """acc [BM, BN] fp32 scores of one tile; returns the updated per-row cursor and max [BM]."""
    s = tl.where(keys[None, :] <= rows[:, None], acc, float("-inf"))
    smax = tl.maximum(smax, tl.max(s, 1))
    if EPI >= 1:
        take = (s >= tw[:, None]).to(tl.int32)
        if EPI == 5:
            pos = tl.atomic_add(CUR + rows[:, None] + tl.zeros_like(take), take, mask=take > 0, sem="relaxed")
            keep = (take > 0) & (pos < cap)
            buf = rows[:, None].to(tl.int64) * cap + pos
            tl.store(BUF_V + buf, s, mask=keep)
            tl.store(BUF_I + buf, keys[None, :] + tl.zeros_like(pos), mask=keep)
        elif EPI >= 6:  # positions from a tensor-core prefix sum: take [BM, BN] @ upper-triangular ones
            incl = tl.dot(take.to(tl.bfloat16), tri)
            pos = cursor[:, None] + incl.to(tl.int32) - 1
            keep = (take > 0) & (pos < cap)
            buf = rows[:, None].to(tl.int64) * cap + pos
            if EPI == 8:
                tl.store(BUF_P + buf, (_ordered_key(s).to(tl.int64) << 32) | keys[None, :].to(tl.int64), mask=keep)
            else:
                tl.store(BUF_I + buf, keys[None, :] + tl.zeros_like(pos), mask=keep)
            if EPI == 6:
                tl.store(BUF_V + buf, s, mask=keep)
        elif EPI >= 2:
            pos = cursor[:, None] + tl.cumsum(take, 1) - 1
            keep = (take > 0) & (pos < cap)
            buf = rows[:, None].to(tl.int64) * cap + pos
            if EPI == 2:
                smax = tl.maximum(smax, tl.max(tl.where(keep, pos, 0), 1).to(tl.float32) * 1e-30)
            if EPI >= 3:
                tl.store(BUF_I + buf, keys[None, :] + tl.zeros_like(pos), mask=keep)
            if EPI >= 4:
                tl.store(BUF_V + buf, s, mask=keep)
        cursor += tl.sum(take, 1)
    return cursor, smax


@triton.jit
def k_epi(A, KV, TW, BUF_V, BUF_I, BUF_P, CUR, CNT, OUT, T, cap, D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
          DC: tl.constexpr, FLAT: tl.constexpr, TMA: tl.constexpr, EPI: tl.constexpr):
    pid = tl.num_programs(0) - 1 - tl.program_id(0)
    row0 = pid * BM
    rows = row0 + tl.arange(0, BM)
    row_ok = rows < T
    tw = tl.load(TW + rows, mask=row_ok, other=float("inf"))
    n_tiles = tl.cdiv(tl.minimum(row0 + BM, T), BN)
    NC: tl.constexpr = D // DC
    a_desc, b_desc = A, KV  # unused without TMA
    if TMA:
        a_desc = tl.make_tensor_descriptor(A, shape=[T, D], strides=[D, 1], block_shape=[BM, DC])
        b_desc = tl.make_tensor_descriptor(KV, shape=[T, D], strides=[D, 1], block_shape=[BN, DC])
    smax = tl.full([BM], float("-inf"), tl.float32)
    cursor = tl.zeros([BM], tl.int32)
    tri = (tl.arange(0, BN)[:, None] <= tl.arange(0, BN)[None, :]).to(tl.bfloat16)
    if FLAT:
        acc = tl.zeros([BM, BN], tl.float32)
        for step in range(0, n_tiles * NC):
            t = step // NC
            c = step % NC
            a, b = _operands(A, KV, a_desc, b_desc, rows, row_ok, row0, t, 0, c, 1, T, 0, D, D, D, D, BN, DC, TMA)
            acc = tl.dot(a, b.T, acc)
            if c == NC - 1:
                cursor, smax = _epilogue(acc, rows, t * BN + tl.arange(0, BN), tw, cursor, smax, BUF_V, BUF_I, BUF_P, CUR, cap, tri, EPI)
                acc = tl.zeros([BM, BN], tl.float32)
    else:
        for t in range(0, n_tiles):
            acc = tl.zeros([BM, BN], tl.float32)
            for c in range(0, NC):
                a, b = _operands(A, KV, a_desc, b_desc, rows, row_ok, row0, t, 0, c, 1, T, 0, D, D, D, D, BN, DC, TMA)
                acc = tl.dot(a, b.T, acc)
            cursor, smax = _epilogue(acc, rows, t * BN + tl.arange(0, BN), tw, cursor, smax, BUF_V, BUF_I, BUF_P, CUR, cap, tri, EPI)
    tl.store(OUT + rows, smax, mask=row_ok)
    tl.store(CNT + rows, cursor, mask=row_ok)


# (BM, BN, DC, warps, stages, FLAT, TMA, EPI)
DEFAULT_CASES = [(64, 128, 64, 8, 3, False, False, e) for e in (0, 4, 8)] + [
    (128, 128, 64, 8, 3, True, True, e) for e in range(9)] + [(128, 256, 64, 8, 3, True, True, 0)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--seqlen", type=int, default=32768)
    opts = p.parse_args()
    T, D, k, cap, dev = opts.seqlen, 576, 2048, 4096, "cuda"
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device=dev))
    gen = torch.Generator(device=dev).manual_seed(0)
    A = torch.randn(T, D, device=dev, generator=gen).bfloat16()
    KV = torch.randn(T, D, device=dev, generator=gen).bfloat16()
    flop = T * T * D  # the causal half of 2 T^2 D
    # Scores ~ N(0, sd) on random rows: the threshold keeping 1.3 k of a row's causal keys.
    sd = (A[:256].float() @ KV[:4096].float().t()).std().item()
    n = torch.arange(T, device=dev) + 1
    frac = (1.3 * k / n).clamp(max=1.0 - 1e-6)
    tw = (torch.special.ndtri(1 - frac) * sd).float().contiguous()
    tw[n <= k] = float("-inf")
    buf_v = torch.empty(T, cap, device=dev)
    buf_i = torch.empty(T, cap, dtype=torch.int32, device=dev)
    buf_p = torch.empty(T, cap, dtype=torch.int64, device=dev)
    cur = torch.zeros(T, dtype=torch.int32, device=dev)
    cnt = torch.empty(T, dtype=torch.int32, device=dev)
    out = torch.empty(T, device=dev)
    print(f"{torch.cuda.get_device_name()} | T = L {T} | D {D} | torch {torch.__version__} | triton {triton.__version__}")
    for BM, BN, DC, w, st, flat, tma, epi in DEFAULT_CASES:
        def fn():
            cur.zero_()
            k_epi[(triton.cdiv(T, BM),)](A, KV, tw, buf_v, buf_i, buf_p, cur, cnt, out, T, cap, D=D, BM=BM, BN=BN,
                                        DC=DC, FLAT=flat, TMA=tma, EPI=epi, num_warps=w, num_stages=st)
        name = f"BM {BM} BN {BN} warps {w} stages {st} flat {flat:d} tma {tma:d} EPI {epi}"
        try:
            ms = cuda_ms(fn, 5)
        except Exception as e:  # a tile that does not fit (shared memory) is reported, not fatal
            print(f"{name}: failed: {type(e).__name__}: {str(e)[:120]}")
            continue
        taken = (cur if epi == 5 else cnt).float().mean().item() if epi else float("nan")
        print(f"{name}: {ms:.2f} ms ({flop / ms / 1e9:.0f} TFLOP/s), mean keys taken a row {taken:.0f}")


if __name__ == "__main__":
    main()
