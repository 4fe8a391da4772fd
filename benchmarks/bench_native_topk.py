#!/usr/bin/env python
"""Native indexer scoring + top-k: the fused Triton passes against score GEMM + torch.topk.

    python benchmarks/bench_native_topk.py --seqlens 32768 65536 131072 --topk 2048 --heads 16
    python benchmarks/bench_native_topk.py --modes prob_sum --seqlens 32768

T = L queries of one causal sequence (every row of a training sequence), D = 576, bf16 inputs.
Baseline, per block of query rows (only the causal key prefix of the block): `--baseline-rows` rows
for logit_sum, `--baseline-rows // H` for prob_sum (the same number of (row, head) score rows a block):
logit_sum: (sum_h q) in bf16 @ kv^T on cuBLAS, fp32 scores, causal mask, torch.topk;
prob_sum: per-head logits (bf16 GEMM), fp32 softmax, sum over heads, torch.topk.
Both sides score with the same bf16 sum_h q (the reference's rounding; kernels/native_topk/
reference.py), so they compute the same scores up to fp32 summation order. Times: CUDA events, median of --reps after one warm-up.
Writes benchmarks/results/native_topk-<device>.json (op native_topk).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from results_io import RESULTS_DIR, environment, write_results  # noqa: E402


def cuda_ms(fn, reps):
    import torch

    fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def baseline_topk(q, kv, k, mode, scale, rows):
    import torch

    T = q.shape[0]
    qs = q.float().sum(1).to(kv.dtype) if mode == "logit_sum" else None
    for s in range(0, T, rows):
        e = min(T, s + rows)
        keys = torch.arange(e, device=q.device)
        causal = keys[None, :] <= torch.arange(s, e, device=q.device)[:, None]
        if mode == "logit_sum":
            scores = (qs[s:e] @ kv[:e].t()).float()
        else:
            logits = torch.einsum("thd,ld->htl", q[s:e], kv[:e]).float() * scale
            scores = logits.masked_fill(~causal, float("-inf")).softmax(-1).sum(0)
        scores = scores.masked_fill(~causal, float("-inf"))
        torch.topk(scores, min(k, e), dim=-1)


def main() -> None:
    warnings.filterwarnings("ignore")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seqlens", type=int, nargs="+", default=[32768, 65536, 131072])
    p.add_argument("--topk", type=int, default=2048)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--modes", nargs="+", default=["logit_sum"], choices=["logit_sum", "prob_sum"])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--baseline-rows", type=int, default=4096,
                   help="query rows per baseline block; for prob_sum, (row, head) pairs per block (this // H rows)")
    p.add_argument("--out-dir", default=RESULTS_DIR)
    p.add_argument("--tag", default="", help="added to the result file's name")
    opts = p.parse_args()

    import torch
    import triton

    import kernels.native_topk.streaming as streaming
    from kernels.native_topk import native_topk_triton

    if not torch.cuda.is_available():
        sys.exit("bench_native_topk.py needs a CUDA GPU")
    dev = torch.device("cuda")
    name = torch.cuda.get_device_name()
    gen = torch.Generator(device=dev).manual_seed(0)
    H, k, D = opts.heads, opts.topk, 576
    scale = D**-0.5
    records = []
    print(f"{name} | torch {torch.__version__} | triton {triton.__version__} | H {H} | k {k} | T = L")
    print(f"{'mode':>9} {'L':>7} {'ms':>9} {'baseline ms':>12} {'speedup':>8} {'peak GB':>8} {'rows per pass':>20}")
    for mode in opts.modes:
        for L in opts.seqlens:
            q = torch.randn(L, H, D, device=dev, dtype=torch.bfloat16, generator=gen)
            kv = torch.randn(L, D, device=dev, dtype=torch.bfloat16, generator=gen)
            streaming.PASS_COUNTS.clear()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            ms = cuda_ms(lambda: native_topk_triton(q, kv, k, mode, scale), opts.reps)
            peak = (torch.cuda.max_memory_allocated() - base) / 2**30
            passes = dict(streaming.PASS_COUNTS)
            rows = max(1, opts.baseline_rows if mode == "logit_sum" else opts.baseline_rows // H)
            torch.cuda.reset_peak_memory_stats()
            bms = cuda_ms(lambda: baseline_topk(q, kv, k, mode, scale, rows), opts.reps)
            bpeak = (torch.cuda.max_memory_allocated() - base) / 2**30
            print(f"{mode:>9} {L:7d} {ms:9.2f} {bms:12.2f} {bms / ms:8.2f} {peak:8.2f} {str(passes):>20}")
            records.append({
                "op": "native_topk", "mode": mode, "heads": H, "seqlen": L, "tokens": L, "topk": k, "ms": ms,
                "tflops": None, "baseline": f"score GEMM (bf16 cuBLAS) + torch.topk per {rows} rows",
                "baseline_ms": bms, "speedup": bms / ms, "peak_mem_gb": peak, "baseline_peak_mem_gb": bpeak,
                "rows_per_main_pass": {str(a): b for a, b in passes.items()}, "reps": opts.reps,
                **environment(name),
            })
            q = kv = None  # free before the next length
            torch.cuda.empty_cache()
    write_results(records, "native_topk", name, opts.out_dir, opts.tag)


if __name__ == "__main__":
    main()
