"""Measured ceilings for the sparse MLA forward's roofline (used by bench_sparse_mla.py).

Two numbers, both measured on the device in the same run rather than taken from a data sheet:
- `gemm_peak_tflops`: a large dense bf16 torch.matmul, the tensor cores' attainable rate;
- `gather_ms`: the fastest of a few configurations of `_gather_rows_kernel`, which reads exactly
  the bytes a sparse MLA forward must read at least once per token (each token's k selected rows
  of kv, 576 bf16 columns) and reduces them with a column sum, no MMA. Its time is the bound set
  by gathering through L2/HBM with this access pattern.

The forward's roofline time is max(FLOPs / gemm peak, gather_ms): with one head block per token
(H <= 64) the kernel gathers each row once; with two (H = 128) twice, so the bound credits the
ideal kernel, not ours.
"""

from __future__ import annotations

import itertools

import triton
import triton.language as tl


@triton.jit
def _gather_rows_kernel(KV, IDX, OUT, TOPK, stride_kv, stride_it,
                        D_V: tl.constexpr, D_ROPE: tl.constexpr, BLOCK_K: tl.constexpr):
    """OUT[t] = sum over token t's selected rows and all columns of kv (fp32): one program a token.
    IDX [T, TOPK] int32 (-1 = none), KV [L, D_V + D_ROPE]."""
    t = tl.program_id(0).to(tl.int64)
    acc = tl.zeros([D_V], tl.float32)
    acc_pe = tl.zeros([D_ROPE], tl.float32)
    for start in range(0, TOPK, BLOCK_K):
        slots = start + tl.arange(0, BLOCK_K)
        idx = tl.load(IDX + t * stride_it + slots, mask=slots < TOPK, other=-1)
        valid = idx >= 0
        row = KV + tl.where(valid, idx, 0).to(tl.int64)[:, None] * stride_kv
        nope = tl.load(row + tl.arange(0, D_V)[None, :], mask=valid[:, None], other=0.0)
        pe = tl.load(row + D_V + tl.arange(0, D_ROPE)[None, :], mask=valid[:, None], other=0.0)
        acc += tl.sum(nope.to(tl.float32), 0)
        acc_pe += tl.sum(pe.to(tl.float32), 0)
    tl.store(OUT + t, tl.sum(acc, 0) + tl.sum(acc_pe, 0))


def gather_ms(kv, indices, d_v: int = 512) -> tuple[float, tuple]:
    """(median ms, config) of the fastest gather-and-sum over `indices` [T, k] into kv [L, D]."""
    import torch
    from triton.testing import do_bench

    T, k = indices.shape
    out = torch.empty(T, dtype=torch.float32, device=kv.device)
    timed = []
    for block_k, warps, stages in itertools.product((16, 32, 64), (4, 8), (1, 2, 3)):
        def run():
            _gather_rows_kernel[(T,)](kv, indices, out, k, kv.stride(0), indices.stride(0), D_V=d_v,
                                      D_ROPE=kv.shape[1] - d_v, BLOCK_K=block_k, num_warps=warps,
                                      num_stages=stages)
        try:
            timed.append((do_bench(run, warmup=10, rep=100, return_mode="median"), (block_k, warps, stages)))
        except Exception as err:  # a configuration that does not fit
            print(f"   gather config {(block_k, warps, stages)} failed: {type(err).__name__}")
    return min(timed)


def gemm_peak_tflops(n: int = 8192) -> float:
    """Median TFLOP/s of a dense bf16 [n, n] x [n, n] torch.matmul."""
    import torch
    from triton.testing import do_bench

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = do_bench(lambda: a @ b, warmup=25, rep=300, return_mode="median")
    return 2 * n**3 / ms / 1e9
