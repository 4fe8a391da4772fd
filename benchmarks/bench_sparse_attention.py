#!/usr/bin/env python
"""Whole sparse attention (native indexer + top-k + sparse MLA forward + backward) against dense
causal attention (torch SDPA, FlashAttention where it applies) forward + backward, same heads and length.

    python benchmarks/bench_sparse_attention.py --seqlens 32768 65536 131072 --heads 128 16 --topk 2048

Sparse side: absorbed queries q [L, H, 576] and latent keys kv [L, 576] (DeepSeek: 512 + 64), bf16,
the Triton kernels (`native_topk_triton`, `sparse_mla(..., backend="triton")`), logit_sum scoring.
Dense side: MLA's non-absorbed shapes, q/k [1, H, L, 192] (128 nope + 64 rope), v [1, H, L, 128].
Both are the attention core only (no projections). Where all of q, dq, out and dout for L rows do
not fit beside the rest (H = 128 beyond 32k on an 80 GB card), queries run in blocks of
--block-rows, each block's queries a leaf tensor of their own: every query's work is independent
of the others', so the time is the same work, and dkv accumulates across blocks. Times: CUDA
events, median of --reps after one warm-up.
Writes benchmarks/results/sparse_attention-<device>.json (op sparse_layer_fwdbwd).
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
from results_io import RESULTS_DIR, environment, write_results  # noqa: E402

D_V, D_ROPE, QK_NOPE, V_DENSE = 512, 64, 128, 128


def sparse_step(q_blocks, kv, dout, k, scale, mode):
    """Indexer + top-k + forward + backward over query blocks; q_blocks: (first row, leaf [rows, H, D])
    pairs, each block's dq landing in its own leaf's grad and dkv accumulating in kv.grad.
    dout [block, H, D_V] serves every block (its values do not change the work)."""
    from kernels.native_topk import native_topk_triton
    from kernels.sparse_mla import sparse_mla

    for s, qb in q_blocks:
        idx = native_topk_triton(qb.detach(), kv.detach(), k, mode, scale, q_offset=s)
        out, _ = sparse_mla(qb, kv, idx, scale, D_V, backend="triton")
        out.backward(dout[: qb.shape[0]])


def main() -> None:
    warnings.filterwarnings("ignore")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seqlens", type=int, nargs="+", default=[32768, 65536, 131072])
    p.add_argument("--heads", type=int, nargs="+", default=[128, 16])
    p.add_argument("--topk", type=int, default=2048)
    p.add_argument("--scoring", default="logit_sum", choices=["logit_sum", "prob_sum"])
    p.add_argument("--block-rows", type=int, default=16384, help="query rows per block when H x L is large")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out-dir", default=RESULTS_DIR)
    p.add_argument("--tag", default="", help="added to the result file's name")
    opts = p.parse_args()

    import torch
    import torch.nn.functional as F
    import triton

    if not torch.cuda.is_available():
        sys.exit("bench_sparse_attention.py needs a CUDA GPU")
    dev = torch.device("cuda")
    name = torch.cuda.get_device_name()
    gen = torch.Generator(device=dev).manual_seed(0)
    k, D = opts.topk, D_V + D_ROPE
    records = []
    print(f"{name} | torch {torch.__version__} | triton {triton.__version__} | k {k} | {opts.scoring}")
    print(f"{'H':>4} {'L':>7} {'sparse ms':>10} {'dense ms':>10} {'speedup':>8} {'sparse GB':>10} {'dense GB':>9}")
    for H in opts.heads:
        for L in opts.seqlens:
            row = {}
            # Dense: flash attention forward + backward.
            dq_dim = QK_NOPE + D_ROPE
            qd = torch.randn(1, H, L, dq_dim, device=dev, dtype=torch.bfloat16, generator=gen).requires_grad_()
            kd = torch.randn(1, H, L, dq_dim, device=dev, dtype=torch.bfloat16, generator=gen).requires_grad_()
            vd = torch.randn(1, H, L, V_DENSE, device=dev, dtype=torch.bfloat16, generator=gen).requires_grad_()
            dod = torch.randn(1, H, L, V_DENSE, device=dev, dtype=torch.bfloat16, generator=gen)

            def dense():
                F.scaled_dot_product_attention(qd, kd, vd, is_causal=True, scale=dq_dim**-0.5).backward(dod)

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            row["dense"] = (cuda_ms(dense, opts.reps), (torch.cuda.max_memory_allocated() - base) / 2**30)
            qd = kd = vd = dod = None  # free before the sparse side
            torch.cuda.empty_cache()
            # Sparse: indexer + top-k + sparse MLA forward + backward.
            q = torch.randn(L, H, D, device=dev, dtype=torch.bfloat16, generator=gen)
            kv = torch.randn(L, D, device=dev, dtype=torch.bfloat16, generator=gen).requires_grad_()
            block = L if L * H <= 32768 * 128 else opts.block_rows
            # Each block's queries are a leaf of their own: a slice of one leaf q would make autograd
            # scatter every block's dq into a zeroed full-size [L, H, D] tensor and add that into q.grad
            # (at L 64k, H 128: 58 of 487 ms, work the unblocked step does not have).
            q_blocks = [(s, q[s : s + block].detach().requires_grad_()) for s in range(0, L, block)]
            dout = torch.randn(block, H, D_V, device=dev, dtype=torch.bfloat16, generator=gen)

            def sparse():
                kv.grad = None
                for _, qb in q_blocks:
                    qb.grad = None
                sparse_step(q_blocks, kv, dout, k, D**-0.5, opts.scoring)

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            row["sparse"] = (cuda_ms(sparse, opts.reps), (torch.cuda.max_memory_allocated() - base) / 2**30)
            q = kv = dout = q_blocks = None
            torch.cuda.empty_cache()
            (s_ms, s_gb), (d_ms, d_gb) = row["sparse"], row["dense"]
            print(f"{H:4d} {L:7d} {s_ms:10.1f} {d_ms:10.1f} {d_ms / s_ms:8.2f} {s_gb:10.2f} {d_gb:9.2f}")
            records.append({
                "op": "sparse_layer_fwdbwd", "heads": H, "seqlen": L, "tokens": L, "topk": k, "ms": s_ms,
                "tflops": None, "baseline": "dense causal attention fwd+bwd (torch SDPA, q/k 192, v 128)",
                "baseline_ms": d_ms, "speedup": d_ms / s_ms, "peak_mem_gb": s_gb, "baseline_peak_mem_gb": d_gb,
                "query_block_rows": block, "scoring": opts.scoring, "reps": opts.reps,
                "includes": "native indexer + top-k + sparse MLA fwd + bwd (attention core, no projections)",
                **environment(name),
            })
    write_results(records, "sparse_attention", name, opts.out_dir, opts.tag)


if __name__ == "__main__":
    main()
