#!/usr/bin/env python
"""Sparse MLA kernels (absorbed form, D = 512 + 64) against a plain PyTorch gather + bmm attention.

    python benchmarks/bench_sparse_mla.py --heads 16 64 128 --seqlen 32768 --topk 2048 --tokens 4096
    python benchmarks/bench_sparse_mla.py --sweep 128 16     # also time block-size configurations

`tokens` query rows sit at the end of a `seqlen`-long context and each selects `topk` distinct
causal keys at random. Times are medians of triton.testing.do_bench (CUDA events). FLOPs count
the tensor-core work: forward 2*T*H*k*(D + D_V); backward 2*T*H*k*(3*D + 2*D_V) (S recomputed,
dP, dQ, dK, dV). Baseline: gather the selected keys to [T, k, D], bmm, softmax, bmm (torch bf16),
and its autograd backward. Writes benchmarks/results/sparse_mla-<device>.json.

The forward records also carry its roofline (benchmarks/roofline.py): max(FLOPs / measured bf16
GEMM peak, measured time to gather each token's selected kv rows once), and our time's fraction
of it. `--indices indexer` takes each token's keys from the native indexer (logit_sum over the same
random q and kv) instead of at random: popular keys, as in training. If FlashMLA is importable
(`flash_mla`, built beside the project), its sparse forward is timed on the same problem (h64/h128).
Where the Gluon forward applies (h64/h128 on Hopper) both forwards are timed; the record keeps the
faster (`kernel`), with the Triton kernel's time as `triton_kernel_ms`; likewise the backward with
its passes in Gluon (`gluon_bwd*.py`) against the all-Triton backward. The deterministic backward
record uses the same Gluon first pass and dq pass, and Triton's ordered dK/dV sum.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from results_io import RESULTS_DIR, environment, write_results  # noqa: E402

D_V, D_ROPE = 512, 64


def gather_bmm_attention(q, kv, idx, scale):
    """The plain PyTorch baseline: [T, k, D] gathered keys, two batched GEMMs, masked softmax."""
    valid = idx >= 0
    keys = kv[idx.clamp(min=0).long()]  # [T, k, D]
    s = (q @ keys.transpose(1, 2)).float() * scale  # [T, H, k]
    s = s.masked_fill(~valid[:, None, :], float("-inf"))
    p = s.softmax(-1).to(q.dtype)
    return p @ keys[..., :D_V]


def make_problem(T, L, H, k, device, gen, indices="random"):
    import torch

    q = torch.randn(T, H, D_V + D_ROPE, device=device, dtype=torch.bfloat16, generator=gen)
    kv = torch.randn(L, D_V + D_ROPE, device=device, dtype=torch.bfloat16, generator=gen)
    if indices == "indexer":
        from kernels.native_topk import native_topk_triton

        return q, kv, native_topk_triton(q, kv, k, "logit_sum", q_offset=L - T)
    pos = torch.arange(L - T, L, device=device)
    scores = torch.rand(T, L, device=device, generator=gen)
    scores = scores.masked_fill(torch.arange(L, device=device)[None, :] > pos[:, None], -1.0)
    idx = scores.topk(k, dim=-1).indices.int()  # distinct causal keys
    return q, kv, idx


def flash_mla_ms(q, kv, idx, scale):
    """Median ms of FlashMLA's sparse forward on the same problem, or None where it is not
    installed or does not take this head count (it takes 64 or 128)."""
    from triton.testing import do_bench

    try:
        from flash_mla import flash_mla_sparse_fwd
    except ImportError:
        return None
    if q.shape[1] not in (64, 128):
        return None
    kv3, idx3 = kv.unsqueeze(1), idx.unsqueeze(1)  # its layout: one latent kv head
    return do_bench(lambda: flash_mla_sparse_fwd(q, kv3, idx3, scale, D_V), warmup=25, rep=200, return_mode="median")


def bench_heads(H, T, L, k, scale, sweep, dev, gen, common, indices, gemm_peak):
    """Time the Triton kernels (best configuration) and the baseline at H heads; three records."""
    import torch
    import triton
    from triton.testing import do_bench

    from kernels.sparse_mla.triton_impl import (default_config, gluon_forward_for, gluon_pds_for, sparse_mla_bwd_triton,
                                                sparse_mla_fwd_triton)
    from roofline import gather_ms

    records = []
    q, kv, idx = make_problem(T, L, H, k, dev, gen, indices)
    fwd_flops = 2 * T * H * k * (D_V + D_ROPE + D_V)
    bwd_flops = 2 * T * H * k * (3 * (D_V + D_ROPE) + 2 * D_V)
    out, lse = sparse_mla_fwd_triton(q, kv, idx, scale, D_V)
    dout = torch.randn_like(out)

    fwd_cfgs = [default_config(H, False)]
    if gluon_forward_for(q, kv, D_V) is not None:
        fwd_cfgs.insert(0, "gluon")  # the warp-specialised Gluon kernel (the default at these shapes)
    bwd_default = default_config(H, True)  # (pass 1, dkv[, separate dq pass])
    top_h = max(16, triton.next_power_of_2(H))
    grid = [c for c in itertools.product((16, 32, 64), (32, 64), (4, 8), (1, 2)) if c[0] <= top_h] if sweep else []
    # A whole 128-head block per program halves the key gathers; its accumulator needs 16 warps.
    fwd_cfgs += grid + ([(128, bk, 16, st) for bk in (32, 64) for st in (1, 2)] if sweep and H >= 128 else [])
    dq_grid = grid
    # dkv kernel (pass 2): (BLOCK_K, BLOCK_C, num_warps, num_stages).
    dkv_grid = list(itertools.product((32, 64, 128), (32, 64, 128), (4, 8), (1, 2))) if sweep else []

    timings = {}  # str(config) -> ms, of every configuration timed

    def best(fn, cfgs):
        timed = []
        for cfg in dict.fromkeys(cfgs):
            try:
                timed.append((do_bench(lambda: fn(cfg), warmup=25, rep=200, return_mode="median"), cfg))
                timings[str(cfg)] = timed[-1][0]
            except Exception as err:  # a configuration that does not fit (shared memory, registers)
                print(f"   config {cfg} failed: {type(err).__name__}: {str(err)[:80]}")
        return min(timed, key=lambda t: t[0])

    def bwd(cfg, deterministic=None):
        # "gluon_bwd": the default dispatch, whose passes (P/dS, dq, dK/dV) run in the Gluon kernels.
        return sparse_mla_bwd_triton(q, kv, idx, scale, D_V, out, lse, dout, None if cfg == "gluon_bwd" else cfg,
                                     deterministic=deterministic)

    fwd_ms, fwd_cfg = best(lambda c: sparse_mla_fwd_triton(q, kv, idx, scale, D_V, c), fwd_cfgs)
    # The two backward kernels are tuned one after the other (dq first, holding dkv at its default).
    _, tuned = best(bwd, [bwd_default] + [(c,) + bwd_default[1:] for c in dq_grid])
    bwd_ms, bwd_cfg = best(bwd, [tuned] + [tuned[:1] + (c,) + tuned[2:] for c in dkv_grid])
    if gluon_pds_for(q, kv, D_V) is not None:
        g_bwd_ms, _ = best(bwd, ["gluon_bwd"])
        if g_bwd_ms < bwd_ms:
            bwd_ms, bwd_cfg = g_bwd_ms, "gluon_bwd"

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base_fwd = do_bench(lambda: gather_bmm_attention(q, kv, idx, scale), warmup=10, rep=200, return_mode="median")
    qg, kvg = q.clone().requires_grad_(), kv.clone().requires_grad_()
    base_out = gather_bmm_attention(qg, kvg, idx, scale)
    base_bwd = do_bench(lambda: base_out.backward(dout, retain_graph=True), warmup=5, rep=200,
                        grad_to_none=[qg, kvg], return_mode="median")
    base_peak = torch.cuda.max_memory_allocated() / 2**30
    qg = kvg = base_out = None  # free the baseline's graph before measuring the kernels
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    sparse_mla_fwd_triton(q, kv, idx, scale, D_V, fwd_cfg)
    bwd(bwd_cfg)
    peak = torch.cuda.max_memory_allocated() / 2**30

    g_ms, g_cfg = gather_ms(kv, idx, D_V)
    compute_ms = fwd_flops / gemm_peak / 1e9
    roof_ms = max(compute_ms, g_ms)
    roof = dict(gather_ms=g_ms, gather_config=list(g_cfg), gather_tbps=T * k * (D_V + D_ROPE) * 2 / g_ms / 1e9,
                gemm_peak_tflops=gemm_peak, roofline_ms=roof_ms,
                roofline_bound="gather" if g_ms > compute_ms else "compute", roofline_frac=roof_ms / fwd_ms)
    print(f"   roofline H{H}: gather {g_ms:.3f} ms ({roof['gather_tbps']:.2f} TB/s, config {g_cfg}), compute "
          f"{compute_ms:.3f} ms at {gemm_peak:.0f} TFLOP/s -> bound {roof['roofline_bound']}; forward at "
          f"{100 * roof['roofline_frac']:.0f}% of it")
    peer_ms = flash_mla_ms(q, kv, idx, scale)
    if peer_ms is not None:
        print(f"   FlashMLA sparse forward H{H}: {peer_ms:.3f} ms ({fwd_flops / peer_ms / 1e9:.0f} TFLOP/s); "
              f"ours {fwd_ms:.3f} ms, ratio {peer_ms / fwd_ms:.2f}")
    det_ms = do_bench(lambda: bwd(bwd_cfg, deterministic=True), warmup=3, rep=200, return_mode="median")
    for op, ms, flops, cfg, bms, det in (("sparse_mla_fwd", fwd_ms, fwd_flops, fwd_cfg, base_fwd, False),
                                         ("sparse_mla_bwd", bwd_ms, bwd_flops, bwd_cfg, base_bwd, False),
                                         ("sparse_mla_bwd", det_ms, bwd_flops, bwd_cfg, base_bwd, True)):
        tflops = flops / ms / 1e9
        print(f"{op:15} {H:4d} {str(cfg):>18} {ms:9.3f} {tflops:8.1f} {bms:12.3f} {bms / ms:8.2f}"
              + ("  (deterministic)" if det else ""))
        records.append(dict(common, op=op, heads=H, ms=ms, tflops=tflops, deterministic=det,
                            config=cfg if isinstance(cfg, str) else list(cfg),
                            kernel="gluon" if str(cfg).startswith("gluon") else "triton",
                            baseline="torch gather+bmm (bf16)", baseline_ms=bms, speedup=bms / ms,
                            baseline_tflops=flops / bms / 1e9, peak_mem_gb=peak, baseline_peak_mem_gb=base_peak,
                            indices=indices))
        if op == "sparse_mla_fwd":
            records[-1].update(roof)
            if "gluon" in timings:  # the Gluon kernel against this file's Triton kernel, same run
                tri_ms = timings[str(default_config(H, False))]
                records[-1].update(triton_kernel_ms=tri_ms, gluon_vs_triton=tri_ms / timings["gluon"])
                print(f"   Gluon forward H{H}: {timings['gluon']:.3f} ms against the Triton kernel's {tri_ms:.3f} ms "
                      f"({tri_ms / timings['gluon']:.2f}x)")
        if op == "sparse_mla_bwd" and "gluon_bwd" in timings and not det:  # Gluon passes against Triton's
            tri_ms = timings[str(bwd_default)]
            records[-1].update(triton_kernel_ms=tri_ms, gluon_vs_triton=tri_ms / timings["gluon_bwd"])
            print(f"   backward with the Gluon passes H{H}: {timings['gluon_bwd']:.3f} ms against all-Triton "
                  f"{tri_ms:.3f} ms ({tri_ms / timings['gluon_bwd']:.2f}x)")
        if op == "sparse_mla_fwd":
            if peer_ms is not None:
                records[-1].update(peer="FlashMLA flash_mla_sparse_fwd", peer_ms=peer_ms, peer_ratio=peer_ms / ms)
    torch.cuda.empty_cache()
    return records


def main() -> None:
    warnings.filterwarnings("ignore")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--heads", type=int, nargs="+", default=[16, 64, 128])
    p.add_argument("--seqlen", type=int, default=32768)
    p.add_argument("--topk", type=int, default=2048)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--sweep", type=int, nargs="*", default=[], metavar="H",
                   help="head counts at which to time block-size configurations too")
    p.add_argument("--indices", choices=("random", "indexer"), default="random",
                   help="each token's keys: random distinct causal ones, or the native indexer's top-k")
    p.add_argument("--out-dir", default=RESULTS_DIR)
    p.add_argument("--tag", default="", help="added to the result file's name")
    opts = p.parse_args()

    import torch
    import triton
    if not torch.cuda.is_available():
        sys.exit("bench_sparse_mla.py needs a CUDA GPU")
    dev = torch.device("cuda")
    name = torch.cuda.get_device_name()
    gen = torch.Generator(device=dev).manual_seed(0)
    T, L, k = opts.tokens, opts.seqlen, opts.topk
    scale = (D_V + D_ROPE) ** -0.5
    records = []
    common = {"seqlen": L, "topk": k, "tokens": T, **environment(name)}
    print(f"{name} | torch {torch.__version__} | triton {triton.__version__} | T {T} | L {L} | k {k}")
    print(f"{'op':15} {'H':>4} {'config':>18} {'ms':>9} {'TFLOP/s':>8} {'baseline ms':>12} {'speedup':>8}")
    from roofline import gemm_peak_tflops

    gemm_peak = gemm_peak_tflops()
    print(f"bf16 GEMM peak (torch.matmul 8192^3): {gemm_peak:.0f} TFLOP/s | indices: {opts.indices}")
    for H in opts.heads:
        records += bench_heads(H, T, L, k, scale, H in opts.sweep, dev, gen, common, opts.indices, gemm_peak)
        torch.cuda.empty_cache()
    write_results(records, "sparse_mla", name, opts.out_dir, opts.tag)


if __name__ == "__main__":
    main()
