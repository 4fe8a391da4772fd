#!/usr/bin/env python
"""Time each phase of the Triton native top-k (sample passes, main pass, selection) per tile config.

    python benchmarks/profile_native_topk.py --seqlen 32768 --configs 64,64,64,4,2 128,64,64,8,2

A config is BM,BN,DC,num_warps,num_stages. Prints one line per config and phase (median ms of
CUDA events); for finding where the time of bench_native_topk.py goes. Writes no file.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from bench_native_topk import cuda_ms  # noqa: E402


def main() -> None:
    warnings.filterwarnings("ignore")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seqlen", type=int, default=32768)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--topk", type=int, default=2048)
    p.add_argument("--mode", default="logit_sum")
    p.add_argument("--configs", nargs="+", default=["64,64,64,4,2"])
    opts = p.parse_args()

    import torch

    import kernels.native_topk.streaming as st

    dev = torch.device("cuda")
    L, H, k, D = opts.seqlen, opts.heads, opts.topk, 576
    gen = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(L, H, D, device=dev, dtype=torch.bfloat16, generator=gen)
    kv = torch.randn(L, D, device=dev, dtype=torch.bfloat16, generator=gen)
    rows = torch.arange(k, L, device=dev, dtype=torch.int32)
    print(f"{torch.cuda.get_device_name()} | L {L} | H {H} | k {k} | {opts.mode} | rows {rows.numel()}")
    for text in opts.configs:
        bm, bn, dc, w, s = (int(x) for x in text.split(","))
        cfg = dict(BM=bm, BN=bn, DC=dc, num_warps=w, num_stages=s)
        cap = st.CAP * k
        try:
            A = st._operand(q, kv, opts.mode, st._d_pad(D, cfg))
            runner = st._Rows(A, kv, rows, 0, D**-0.5, opts.mode, cfg, row_base=k)
            grid, tw, _ = st._first_thresholds(runner, k)
            res = runner.run(2, th=grid, tw=tw, cap=cap)
            out = torch.empty(L, k, dtype=torch.int32, device=dev)
            times = {
                "lse": cuda_ms(lambda: st._Rows(A, kv, rows, 0, D**-0.5, opts.mode, cfg, row_base=k), 3),
                "stats(sample)": cuda_ms(lambda: runner.run(0, key_step=st.STATS_STEP), 3),
                "counts(sample)": cuda_ms(lambda: runner.run(1, key_step=st.SAMPLE_STEP, th=grid.repeat(1, st.SAMPLE_GRID // st.MAIN_GRID)), 3),
                # The first main pass skips the grid counts; retried passes count at 16 thresholds.
                "main (first, no counts)": cuda_ms(lambda: runner.run(2, th=grid, tw=tw, cap=cap, count=False), 3),
                "main (retry, 16 counts)": cuda_ms(lambda: runner.run(2, th=grid, tw=tw, cap=cap), 3),
                "select": cuda_ms(lambda: st._select(res, rows, out, k, cap, None), 3),
                "select (count bounds)": cuda_ms(lambda: st._select(res, rows, out, k, cap, grid), 3),
            }
        except Exception as err:  # a config that does not compile or fit
            print(f"{text}: failed: {type(err).__name__}: {str(err)[:200]}")
            continue
        # The selection's interpolation-search steps a row (rows whose candidates fit).
        steps = torch.zeros(rows.numel(), dtype=torch.int32, device=dev)
        st._select(res, rows, out, k, cap, None, iters=steps)
        fit = (res["count_w"] >= k) & (res["count_w"] <= cap)
        steps = steps[fit].float()
        print(f"{text}: " + " | ".join(f"{n} {t:.2f}" for n, t in times.items())
              + f" | candidates a row {res['count_w'].float().mean().item():.0f}"
              + f" | search steps mean {steps.mean().item():.2f} max {steps.max().item():.0f}")


if __name__ == "__main__":
    main()
