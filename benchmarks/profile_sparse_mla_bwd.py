#!/usr/bin/env python
"""Where the sparse MLA backward's time goes: CUDA time per kernel (torch.profiler) per config.

    python benchmarks/profile_sparse_mla_bwd.py --heads 128 16 --configs 64,32,4,2/64,64,4,2/64,64,8,2

A config is pass1/dkv[/dq] as default_config returns them: BLOCK_H,BLOCK_K,num_warps,num_stages for
pass 1, BLOCK_K,BLOCK_C,num_warps,num_stages[,chunks per slab] for the dkv kernel (pass 2) and,
optionally, BLOCK_H,BLOCK_K,num_warps,num_stages for a separate dq pass over the stored dS.
Same problem as bench_sparse_mla.py (T query rows at the end of an L-key context, k random
distinct causal keys each). Prints one line per heads x config with the milliseconds of each
kernel (median over --reps profiled runs; atomic and deterministic dkv both). Writes no file.
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

from bench_sparse_mla import D_ROPE, D_V, make_problem  # noqa: E402


def kernel_ms(fn, reps: int) -> dict:
    """{kernel name: median CUDA ms per call of fn} over reps profiled calls (after one warm-up)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    per_rep = []
    for _ in range(reps):
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        times: dict = {}
        for ev in prof.key_averages():
            if ev.device_type.name == "CUDA":
                name = ev.key if len(ev.key) < 40 else ev.key[:37] + "..."
                times[name] = times.get(name, 0.0) + ev.self_device_time_total / 1e3
        per_rep.append(times)
    return {n: statistics.median(r.get(n, 0.0) for r in per_rep) for n in per_rep[0]}


def main() -> None:
    warnings.filterwarnings("ignore")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--heads", type=int, nargs="+", default=[128, 16])
    p.add_argument("--seqlen", type=int, default=32768)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--topk", type=int, default=2048)
    p.add_argument("--configs", nargs="*", default=[], help="dq/dkv configs; none: default_config")
    p.add_argument("--reps", type=int, default=3)
    opts = p.parse_args()

    import torch

    from kernels.sparse_mla.triton_impl import default_config, sparse_mla_bwd_triton, sparse_mla_fwd_triton

    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    T, L, k = opts.tokens, opts.seqlen, opts.topk
    scale = (D_V + D_ROPE) ** -0.5
    print(f"{torch.cuda.get_device_name()} | T {T} | L {L} | k {k}")
    for H in opts.heads:
        q, kv, idx = make_problem(T, L, H, k, dev, gen)
        out, lse = sparse_mla_fwd_triton(q, kv, idx, scale, D_V)
        dout = torch.randn_like(out)
        flops = 2 * T * H * k * (3 * (D_V + D_ROPE) + 2 * D_V)
        configs = [tuple(tuple(int(x) for x in part.split(",")) for part in c.split("/"))
                   for c in opts.configs]
        for cfg in configs or [default_config(H, True)]:
            for det in (False, True):
                try:
                    times = kernel_ms(lambda: sparse_mla_bwd_triton(q, kv, idx, scale, D_V, out, lse, dout, cfg,
                                                                    deterministic=det), opts.reps)
                except Exception as err:  # a config that does not compile or fit
                    print(f"H {H} {cfg} det={det}: failed: {type(err).__name__}: {str(err)[:160]}")
                    continue
                total = sum(times.values())
                parts = " | ".join(f"{n} {t:.2f}" for n, t in sorted(times.items(), key=lambda x: -x[1]) if t > 0.05)
                print(f"H {H} {cfg} det={det}: total {total:.2f} ms ({flops / total / 1e9:.0f} TFLOP/s) | {parts}")


if __name__ == "__main__":
    main()
