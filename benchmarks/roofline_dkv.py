#!/usr/bin/env python
"""The sparse MLA backward's dK/dV pass against its own memory traffic, measured (Hopper).

    python benchmarks/roofline_dkv.py                      # h128 and h64 at L 32k, h128 at L 128k

The Gluon dK/dV pass (kernels/sparse_mla/gluon_bwd_dkv.py) reads, per token, slab of 192 columns
and key range, the token's q and dO slab once and the P and dS tiles ([H, 64] bf16 each) of every
64-slot block of the range, and adds a [64 keys, 192] fp32 tile into dkv by relaxed atomics; its
MMAs sit between the reads and the adds. `_dkv_traffic_kernel` here moves exactly those bytes, in
the same launches, with the same slab-major dkv and persisting L2 window, and no MMA:
- `reads`: the q/dO slabs and P/dS tiles, summed over the heads (so that the loads are used);
- `adds`: the atomic adds alone (a value derived from the key index);
- `both`: both, the pass's traffic. Its time is what the memory system needs for the pass's
  bytes: a pass that takes about as long is bound by its traffic, not by its MMAs. (The probe is a
  plain Triton kernel, not an optimal one: at h64 the pass itself was faster.)

T 4096 tokens, k 2048 random distinct causal keys (bench_sparse_mla's problem). Prints a table (ms;
`ratio` = traffic / pass) and writes benchmarks/results/roofline_dkv-<device>.json (op
`sparse_mla_bwd_dkv`; `baseline` = the traffic alone, so `speedup` = the same ratio).
"""

from __future__ import annotations

import argparse
import os
import sys

import triton
import triton.language as tl

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from results_io import RESULTS_DIR, environment, write_results  # noqa: E402

# Slots per block and columns per add, as the Gluon pass (constexpr: the kernel reads them).
BLOCK_K, CHUNK = tl.constexpr(64), tl.constexpr(64)


@triton.jit
def _dkv_traffic_kernel(Q, DO, IDX, P, DS, DKV, BOUNDS, OUT, rng, c0, stride_qt, stride_qh, stride_ot, stride_oh,
                        stride_it, stride_pt, stride_ph, stride_dkv, stride_bt,
                        HP: tl.constexpr, D_V: tl.constexpr, READ: tl.constexpr, ADD: tl.constexpr):
    """One program = token t, columns c0 .. c0 + 191, slots BOUNDS[t, rng] .. BOUNDS[t, rng + 1] - 1.
    P, DS [T, HP, k padded to 64] bf16; DKV points at the launch's slab (row stride stride_dkv fp32);
    OUT [T, 64] fp32 receives the sums that keep the reads live."""
    t = tl.program_id(0).to(tl.int64)
    lo = tl.load(BOUNDS + t * stride_bt + rng)
    hi = tl.load(BOUNDS + t * stride_bt + rng + 1)
    h = tl.arange(0, HP)
    s = tl.arange(0, BLOCK_K)
    c = tl.arange(0, CHUNK)
    keep = tl.zeros([BLOCK_K], tl.float32)
    if READ:  # the token's q and dO slab (dO has no columns past D_V)
        for i in tl.static_range(3):
            cols = c0 + i * CHUNK + c
            qv = tl.load(Q + t * stride_qt + h[:, None] * stride_qh + cols[None, :]).to(tl.float32)
            dv = tl.load(DO + t * stride_ot + h[:, None] * stride_oh + cols[None, :], mask=(cols < D_V)[None, :],
                         other=0.0).to(tl.float32)
            keep += tl.sum(qv + dv, 0)
    for b in range(lo // BLOCK_K, tl.cdiv(hi, BLOCK_K)):
        slots = b * BLOCK_K + s
        idx = tl.load(IDX + t * stride_it + slots, mask=(slots >= lo) & (slots < hi), other=-1)
        if READ:
            off = t * stride_pt + h[:, None] * stride_ph + slots[None, :]
            v = tl.sum(tl.load(P + off).to(tl.float32) + tl.load(DS + off).to(tl.float32), 0)
        else:
            v = idx.to(tl.float32)
        if ADD:
            ok = idx >= 0
            row = tl.where(ok, idx, 0).to(tl.int64) * stride_dkv
            for i in tl.static_range(3):
                tl.atomic_add(DKV + row[:, None] + i * CHUNK + c[None, :],
                              v[:, None] + tl.zeros([BLOCK_K, CHUNK], tl.float32), mask=ok[:, None], sem="relaxed")
        else:
            keep += v
    tl.store(OUT + t * BLOCK_K + s, keep)


def traffic(q, dout, idx, p, ds, slabs, bounds, range_keys, window, read: bool, add: bool, out) -> None:
    """The pass's launches (`gluon_bwd_dkv.slab_launches`, as `sparse_mla_dkv_gluon`) with
    `_dkv_traffic_kernel` in place of the Gluon kernel."""
    from kernels.sparse_mla.gluon_bwd_dkv import slab_launches

    T, H, _ = p.shape
    slab_cols = slabs.shape[2]
    for slab, rng, target in slab_launches(slabs, bounds, range_keys, window):
        _dkv_traffic_kernel[(T,)](
            q, dout, idx, p, ds, target, bounds, out, rng, slab * slab_cols, q.stride(0), q.stride(1),
            dout.stride(0), dout.stride(1), idx.stride(0), p.stride(0), p.stride(1), target.stride(0),
            bounds.stride(0), HP=H, D_V=dout.shape[2], READ=read, ADD=add, num_warps=8)


def bench_case(H, L, T, k, gen, common):
    """Time the Gluon dK/dV pass and its traffic (three modes) at one shape; one record."""
    import torch
    from triton.testing import do_bench

    from bench_sparse_mla import make_problem
    from kernels.l2_persist import persisting_l2
    from kernels.sparse_mla import gluon_bwd_dkv as dkv_pass
    from kernels.sparse_mla.gluon_bwd import sparse_mla_pds_gluon
    from kernels.sparse_mla.triton_impl import sparse_mla_fwd_triton

    q, kv, idx = make_problem(T, L, H, k, "cuda", gen)
    scale = q.shape[2] ** -0.5
    out, lse = sparse_mla_fwd_triton(q, kv, idx, scale, 512)
    dout = torch.randn_like(out)
    kp = triton.cdiv(k, BLOCK_K.value) * BLOCK_K.value
    p = torch.empty(T, H, kp, dtype=torch.bfloat16, device="cuda")
    ds = torch.empty_like(p)
    sparse_mla_pds_gluon(q, kv, idx, out, dout, lse, scale, 0, p, ds)
    slabs, range_keys = dkv_pass.dkv_plan(L, kv.device)
    if slabs is None:
        sys.exit("roofline_dkv.py needs a device with a persisting L2 set-aside (the pass's slab-major path)")
    # Several key ranges need each row's slots in key order (as the backward sorts them).
    idx_s = torch.sort(idx, dim=1).values if range_keys < L else idx
    bounds = dkv_pass.slot_bounds(idx_s, L, range_keys)
    keep = torch.empty(T, BLOCK_K.value, device="cuda")

    def timed(fn):
        def run():
            with persisting_l2(kv.device) as window:
                fn(window)
        run()
        torch.cuda.synchronize()
        return do_bench(run, warmup=3, rep=100, return_mode="median")

    torch.cuda.reset_peak_memory_stats()
    ms = timed(lambda w: dkv_pass.sparse_mla_dkv_gluon(q, dout, idx_s, p, ds, 0, slabs, bounds, range_keys, w))
    peak = torch.cuda.max_memory_allocated() / 2**30
    modes = {name: timed(lambda w, r=r, a=a: traffic(q, dout, idx_s, p, ds, slabs, bounds, range_keys, w, r, a, keep))
             for name, r, a in (("reads", True, False), ("adds", False, True), ("both", True, True))}
    flops = 2 * T * H * k * (576 + 512)  # dK (dS^T q) and dV (P^T dO)
    n_prog = bounds.shape[1] - 1
    add_gb = T * k * 576 * 4 / 1e9
    read_gb = (3 * n_prog * 2 * T * H * 192 * 2 + 3 * p.numel() * 2 * 2) / 1e9  # q/dO slabs + P/dS per slab
    print(f"{H:4d} {L:7d} {ms:9.3f} {flops / ms / 1e9:8.1f} {modes['both']:9.3f} {modes['adds']:9.3f} "
          f"{modes['reads']:9.3f} {modes['both'] / ms:8.2f}")
    return dict(common, op="sparse_mla_bwd_dkv", kernel="gluon", heads=H, seqlen=L, tokens=T, topk=k, ms=ms,
                tflops=flops / ms / 1e9, baseline="the pass's memory traffic alone (Triton, no MMA)",
                baseline_ms=modes["both"], speedup=modes["both"] / ms, adds_only_ms=modes["adds"],
                reads_only_ms=modes["reads"], atomic_add_gb=add_gb, read_gb=read_gb, key_ranges=n_prog,
                peak_mem_gb=peak)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", nargs="+", default=["128:32768", "64:32768", "128:131072"], metavar="H:L")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--topk", type=int, default=2048)
    p.add_argument("--out-dir", default=RESULTS_DIR)
    p.add_argument("--tag", default="", help="added to the result file's name")
    opts = p.parse_args()
    cases = []
    for case in opts.cases:
        try:
            H, L = (int(x) for x in case.split(":"))
        except ValueError:
            sys.exit(f"--cases: {case!r} is not H:L (for example 128:32768)")
        cases.append((H, L))

    import torch

    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9:
        sys.exit("roofline_dkv.py needs a Hopper GPU (the Gluon dK/dV pass)")
    from kernels.sparse_mla.gluon_bwd_dkv import HEADS

    bad = [H for H, _ in cases if H not in HEADS]
    if bad:
        sys.exit(f"--cases: the Gluon dK/dV pass takes H in {HEADS}, not {bad}")
    name = torch.cuda.get_device_name()
    common = environment(name)
    gen = torch.Generator(device="cuda").manual_seed(0)
    print(f"{name} | torch {torch.__version__} | triton {triton.__version__} | T {opts.tokens} | k {opts.topk}")
    print(f"{'H':>4} {'L':>7} {'pass ms':>9} {'TFLOP/s':>8} {'traffic':>9} {'adds':>9} {'reads':>9} {'ratio':>8}")
    records = [bench_case(H, L, opts.tokens, opts.topk, gen, common) for H, L in cases]
    write_results(records, "roofline_dkv", name, opts.out_dir, opts.tag)


if __name__ == "__main__":
    main()
