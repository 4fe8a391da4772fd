#!/usr/bin/env python
"""One NSMLA attention layer, forward + backward, against the dense MLA layer, over sequence lengths.

    python benchmarks/bench_sparse_layer.py --seqlens 4096 8192 16384 32768 --topk 512 --heads 16

DeepSeek MLA dims (q_lora 1536, kv_lora 512, rope 64, qk 128, v 128), hidden 2048, batch 1, bf16
autocast on GPU. Reports median time (CUDA events via triton.testing.do_bench) and peak memory
above the inputs, for the whole layer (projections + indexer + top-k + sparse attention) and for
the dense layer (torch SDPA). With the PyTorch reference backend this shows the memory scaling
(O(L*k) for sparse); speed belongs to the Triton kernels. Writes
benchmarks/results/sparse_layer-<device>.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from results_io import RESULTS_DIR, environment, write_results  # noqa: E402


def main() -> None:
    warnings.filterwarnings("ignore")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seqlens", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    p.add_argument("--topk", type=int, default=512)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--scoring", default="logit_sum")
    p.add_argument("--backend", choices=("reference", "triton"), default="reference", help="sparse attention kernels")
    p.add_argument("--out-dir", default=RESULTS_DIR)
    opts = p.parse_args()

    import torch
    import torch.nn.functional as F
    from triton.testing import do_bench

    from megatron.core.transformer.spec_utils import build_module
    from megatron_ext import distributed
    from megatron_ext.config import NSMLAConfig
    from megatron_ext.specs import nsmla_attention_spec

    if not torch.cuda.is_available():
        sys.exit("bench_sparse_layer.py needs a CUDA GPU")
    device = torch.device("cuda")
    distributed.initialize(0, 1, device, tp=1)
    config = NSMLAConfig(
        num_layers=1, hidden_size=2048, num_attention_heads=opts.heads, q_lora_rank=1536, kv_lora_rank=512,
        qk_head_dim=128, qk_pos_emb_head_dim=64, v_head_dim=128, rope_type="rope", index_topk=opts.topk,
        native_scoring=opts.scoring, use_cpu_initialization=True, attention_dropout=0.0, hidden_dropout=0.0,
        add_bias_linear=False, gated_linear_unit=True, activation_func=F.silu, ffn_hidden_size=4096,
        normalization="RMSNorm", recall_sample_rows=0, kernel_backend=opts.backend,
    )
    torch.manual_seed(0)
    layers = {v: build_module(nsmla_attention_spec(v), config=config, layer_number=1).to(device) for v in ("dense", "nsmla")}
    layers["nsmla"].load_state_dict(layers["dense"].state_dict())
    name = torch.cuda.get_device_name()
    records = []
    print(f"{name} | torch {torch.__version__} | heads {opts.heads} | topk {opts.topk} | backend {opts.backend}")
    print(f"{'seqlen':>7} {'dense ms':>9} {'sparse ms':>10} {'speedup':>8} {'dense GB':>9} {'sparse GB':>10}")
    for L in opts.seqlens:
        hidden = torch.randn(L, 1, 2048, device=device, requires_grad=True)
        grad = torch.randn(L, 1, 2048, device=device)
        row = {}
        for variant, layer in layers.items():
            def step(layer=layer, hidden=hidden, grad=grad):
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    out, _ = layer(hidden)
                out.backward(grad)

            step()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step()
            torch.cuda.synchronize()
            peak = (torch.cuda.max_memory_allocated() - base) / 2**30
            ms = do_bench(step, warmup=2, rep=2000 if variant == "dense" else 4000, return_mode="median")
            row[variant] = (ms, peak)
        (d_ms, d_gb), (s_ms, s_gb) = row["dense"], row["nsmla"]
        print(f"{L:7d} {d_ms:9.2f} {s_ms:10.2f} {d_ms / s_ms:8.3f} {d_gb:9.3f} {s_gb:10.3f}")
        records.append({
            "op": "sparse_layer_fwdbwd", "heads": opts.heads, "seqlen": L, "topk": opts.topk, "ms": s_ms,
            "baseline": "dense MLA layer (torch SDPA)", "baseline_ms": d_ms, "speedup": d_ms / s_ms,
            "peak_mem_gb": s_gb, "baseline_peak_mem_gb": d_gb, "kernel_backend": opts.backend,
            "scoring": opts.scoring, **environment(name),
        })
    distributed.shutdown()
    write_results(records, f"sparse_layer-{opts.backend}", name, opts.out_dir)


if __name__ == "__main__":
    main()
