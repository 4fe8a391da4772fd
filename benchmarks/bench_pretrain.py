#!/usr/bin/env python
"""Training throughput, peak memory and loss of NSMLA (sparse) against dense MLA, same run.

    python benchmarks/bench_pretrain.py --preset tiny            # the default tiny model
    python benchmarks/bench_pretrain.py --preset l4k             # L=4096, top-k 512, DeepSeek MLA dims

Both variants train the same model (same seed, same data: the embedded corpus unless --data-path
is passed through) for the same iterations. Throughput is the median over log intervals after the
first (which holds compilation and warm-up). Prints a table and writes
benchmarks/results/pretrain-<preset>-<device>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from results_io import RESULTS_DIR, environment, write_results  # noqa: E402

PRESETS = {
    # The default run of pretrain_nsmla.py (its own defaults), shortened.
    "tiny": ["--train-iters", "60", "--log-interval", "10"],
    # DeepSeek-V2/V3 attention dims (kv_lora 512 + rope 64 = 576-d latent keys), 16 heads.
    "l4k": [
        "--num-layers", "4", "--hidden-size", "1024", "--num-attention-heads", "16", "--q-lora-rank", "512",
        "--kv-lora-rank", "512", "--qk-head-dim", "128", "--qk-pos-emb-head-dim", "64", "--v-head-dim", "128",
        "--seq-length", "4096", "--micro-batch-size", "1", "--nsmla-topk", "512", "--train-iters", "40",
        "--log-interval", "5", "--lr", "1e-3", "--eval-iters", "2",
    ],
}


def run_variant(variant: str, argv: list[str], workdir: str) -> dict:
    from megatron_ext.distributed import shutdown
    from megatron_ext.training import pretrain

    log = os.path.join(workdir, f"{variant}.jsonl")
    try:
        last = pretrain(argv + ["--nsmla-attention", variant, "--log-json", log])
    finally:
        shutdown()
    records = [json.loads(line) for line in open(log) if '"loss"' in line]
    steady = [r["s_per_iter"] for r in records[1:]] or [records[-1]["s_per_iter"]]
    tokens_per_iter = records[-1]["tokens_per_s"] * records[-1]["s_per_iter"]
    ms = statistics.median(steady) * 1000
    return {
        "variant": variant,
        "ms_per_iter": ms,
        "tokens_per_s": tokens_per_iter / (ms / 1000),
        "first_loss": records[0]["loss"],
        "final_loss": records[-1]["loss"],
        "validation_loss": last.get("validation_loss"),
        "indexer_recall": records[-1].get("indexer_recall"),
        "indexer_attn_mass": records[-1].get("indexer_attn_mass"),
        "peak_mem_gb": last.get("peak_mem_gb"),
        "iters": records[-1]["iteration"],
    }


def main() -> None:
    warnings.filterwarnings("ignore")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--out-dir", default=RESULTS_DIR)
    opts, passthrough = parser.parse_known_args()

    import torch

    cuda = torch.cuda.is_available()
    argv = PRESETS[opts.preset] + (["--bf16"] if cuda else []) + passthrough
    device = torch.cuda.get_device_name() if cuda else f"cpu-{platform.machine()}-{os.cpu_count()}cores"
    with tempfile.TemporaryDirectory() as workdir:
        results = {v: run_variant(v, argv, workdir) for v in ("dense", "nsmla")}
    from megatron_ext.arguments import build_parser

    args = build_parser().parse_args(argv)
    meta = {
        "op": "pretrain",
        "preset": opts.preset,
        **environment(device),
        "heads": args.num_attention_heads,
        "seqlen": args.seq_length,
        "topk": args.nsmla_topk,
        "layers": args.num_layers,
        "hidden": args.hidden_size,
        "micro_batch": args.micro_batch_size,
        "bf16": args.bf16,
        "kernel_backend": args.nsmla_kernel_backend,
        "command": "python benchmarks/bench_pretrain.py --preset " + opts.preset + " " + " ".join(passthrough),
    }
    dense = results["dense"]
    records = []
    for variant, r in results.items():
        rec = dict(meta, **r)
        rec["baseline"] = "dense"
        rec["baseline_ms"] = dense["ms_per_iter"]
        rec["speedup"] = dense["ms_per_iter"] / r["ms_per_iter"]
        records.append(rec)

    print(f"\n{device} | torch {torch.__version__} | seq {args.seq_length} | topk {args.nsmla_topk} | "
          f"heads {args.num_attention_heads} | layers {args.num_layers}")
    print(f"{'variant':8} {'ms/iter':>9} {'tokens/s':>10} {'speedup':>8} {'peak GB':>8} {'loss 1st':>9} "
          f"{'loss last':>9} {'val loss':>9} {'recall':>7}")
    for r in records:
        peak = f"{r['peak_mem_gb']:.2f}" if r["peak_mem_gb"] is not None else "n/a"
        recall = f"{r['indexer_recall']:.3f}" if r["indexer_recall"] is not None else "-"
        val = f"{r['validation_loss']:.4f}" if r["validation_loss"] is not None else "-"
        print(f"{r['variant']:8} {r['ms_per_iter']:9.1f} {r['tokens_per_s']:10,.0f} {r['speedup']:8.2f} {peak:>8} "
              f"{r['first_loss']:9.4f} {r['final_loss']:9.4f} {val:>9} {recall:>7}")
    write_results(records, f"pretrain-{opts.preset}-{args.nsmla_kernel_backend}", device, opts.out_dir)


if __name__ == "__main__":
    main()
