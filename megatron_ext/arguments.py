"""Command-line flags: Megatron-LM names where they exist, `--nsmla-*` for ours.

Declared once here and shared by pretrain_nsmla.py and the tools. With no arguments at all the
defaults describe the embedded tiny run: a 4-layer NSMLA model on the bundled Shakespeare corpus.
"""

from __future__ import annotations

import argparse
import math

import torch.nn.functional as F

from .config import ATTENTION_VARIANTS, KERNEL_BACKENDS, NSMLAConfig
from kernels.native_topk import SCORING_MODES


class ArgumentError(ValueError):
    """Bad command-line input; the message names the flag and what would be valid."""


def _model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model (MLA)")
    g.add_argument("--num-layers", type=int, default=4)
    g.add_argument("--hidden-size", type=int, default=256)
    g.add_argument("--ffn-hidden-size", type=int, default=None, help="default: 8/3 * hidden rounded to 64 (SwiGLU)")
    g.add_argument("--num-attention-heads", type=int, default=4)
    g.add_argument("--multi-latent-attention", action="store_true", default=True,
                   help="accepted for Megatron-LM compatibility; NSMLA models are always MLA")
    g.add_argument("--q-lora-rank", type=int, default=128, help="0 or omitted value 'none' = no query LoRA")
    g.add_argument("--kv-lora-rank", type=int, default=128)
    g.add_argument("--qk-head-dim", type=int, default=32, help="per-head q/k dims without RoPE")
    g.add_argument("--qk-pos-emb-head-dim", type=int, default=16, help="decoupled RoPE dims")
    g.add_argument("--v-head-dim", type=int, default=32)
    g.add_argument("--rope-type", choices=("rope", "yarn"), default="rope")
    g.add_argument("--rotary-base", type=float, default=10000.0)
    g.add_argument("--rotary-scaling-factor", type=float, default=40.0)
    g.add_argument("--original-max-position-embeddings", type=int, default=4096)
    g.add_argument("--mscale", type=float, default=1.0)
    g.add_argument("--mscale-all-dim", type=float, default=0.0)
    g.add_argument("--normalization", choices=("RMSNorm", "LayerNorm"), default="RMSNorm")
    g.add_argument("--norm-epsilon", type=float, default=1e-6)
    g.add_argument("--swiglu", action="store_true", default=True)
    g.add_argument("--no-swiglu", dest="swiglu", action="store_false")
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true", default=True)
    g.add_argument("--tie-embeddings-and-output-weights", dest="untie_embeddings_and_output_weights",
                   action="store_false")
    g.add_argument("--init-method-std", type=float, default=0.02)
    g.add_argument("--hidden-dropout", type=float, default=0.0)
    g.add_argument("--attention-dropout", type=float, default=0.0)
    g.add_argument("--add-bias-linear", action="store_true", default=False)
    g.add_argument("--seq-length", type=int, default=256)
    g.add_argument("--max-position-embeddings", type=int, default=None)
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=128)

    n = p.add_argument_group("NSMLA")
    n.add_argument("--nsmla-attention", choices=ATTENTION_VARIANTS, default="nsmla",
                   help="attention of every layer: 'nsmla' (top-k sparse) or 'dense' (baseline)")
    n.add_argument("--nsmla-layer-pattern", default=None,
                   help="per-layer attention, one letter a layer: S sparse, D dense (e.g. DSSS)")
    n.add_argument("--nsmla-topk", type=int, default=64, help="keys each query attends to")
    n.add_argument("--nsmla-scoring", choices=SCORING_MODES, default="logit_sum")
    n.add_argument("--nsmla-kernel-backend", choices=KERNEL_BACKENDS, default="auto",
                   help="sparse attention and indexer kernels: 'triton', 'reference' (PyTorch), or 'auto' "
                        "(triton on a GPU, reference on the CPU)")
    n.add_argument("--nsmla-recall-rows", type=int, default=32,
                   help="query rows sampled per log interval to measure indexer recall (0 = off)")


def _training_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int, default=4)
    g.add_argument("--global-batch-size", type=int, default=None, help="default: micro batch x data parallel")
    g.add_argument("--train-iters", type=int, default=200)
    g.add_argument("--lr", type=float, default=2e-3)
    g.add_argument("--min-lr", type=float, default=2e-4)
    g.add_argument("--lr-decay-style", choices=("constant", "linear", "cosine", "inverse-square-root", "WSD"),
                   default="cosine")
    g.add_argument("--lr-warmup-iters", type=int, default=None, help="default: 10%% of --train-iters")
    g.add_argument("--lr-decay-iters", type=int, default=None, help="default: --train-iters")
    g.add_argument("--weight-decay", type=float, default=0.1)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.95)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU); parameters stay fp32")
    g.add_argument("--deterministic", action="store_true",
                   help="deterministic GPU algorithms (bit-identical reruns and resumes; slower)")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    g.add_argument("--use-cpu-initialization", action="store_true",
                   help="initialise weights on the CPU (always on without CUDA); identical across TP sizes")
    g.add_argument("--log-interval", type=int, default=10)
    g.add_argument("--eval-interval", type=int, default=None, help="default: --train-iters (evaluate at the end)")
    g.add_argument("--eval-iters", type=int, default=4)
    g.add_argument("--tensorboard-dir", default=None)
    g.add_argument("--log-json", default=None, help="also append one JSON line per log interval here")
    g.add_argument("--exit-interval", type=int, default=None, help="stop after this iteration (for tests)")

    c = p.add_argument_group("checkpointing")
    c.add_argument("--save", default=None)
    c.add_argument("--load", default=None)
    c.add_argument("--save-interval", type=int, default=None)
    c.add_argument("--ckpt-format", choices=("torch_dist",), default="torch_dist")

    d = p.add_argument_group("data")
    d.add_argument("--data-path", nargs="+", default=None,
                   help="prefixes of .bin/.idx files, optionally weighted: 'w1 p1 w2 p2'")
    d.add_argument("--split", default="949,50,1")
    d.add_argument("--tokenizer-type", default="SentencePieceTokenizer", choices=("SentencePieceTokenizer",))
    d.add_argument("--tokenizer-model", default=None)
    d.add_argument("--mock-data", action="store_true", help="random tokens (needs --vocab-size)")
    d.add_argument("--vocab-size", type=int, default=None, help="only with --mock-data")
    d.add_argument("--data-cache-path", default=None,
                   help="where dataset indices (and the default corpus's tokenizer and .bin/.idx) are cached")
    d.add_argument("--default-vocab-size", type=int, default=4096,
                   help="tokenizer vocabulary trained for the embedded default corpus")

    par = p.add_argument_group("parallelism")
    par.add_argument("--tensor-model-parallel-size", type=int, default=1)
    par.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    par.add_argument("--context-parallel-size", type=int, default=1)
    par.add_argument("--sequence-parallel", action="store_true")
    par.add_argument("--distributed-backend", choices=("auto", "nccl", "gloo"), default="auto")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pretrain_nsmla.py",
        description="Pretrain a natively sparse MLA model on megatron-core. With no arguments: a tiny model "
        "on the embedded Shakespeare corpus.",
        allow_abbrev=False,
    )
    _model_args(p)
    _training_args(p)
    return p


def _fail(msg: str) -> None:
    raise ArgumentError(msg)


def validate_args(args, world_size: int) -> None:
    """Checks that need no data and no model. Raises ArgumentError naming the flag."""
    for flag in ("num_layers", "hidden_size", "num_attention_heads", "seq_length", "micro_batch_size",
                 "train_iters", "log_interval", "kv_lora_rank", "qk_head_dim", "v_head_dim",
                 "tensor_model_parallel_size", "eval_iters"):
        value = getattr(args, flag)
        if value is None or value <= 0:
            _fail(f"--{flag.replace('_', '-')} must be a positive integer, got {value}")
    if args.nsmla_topk <= 0:
        _fail(f"--nsmla-topk must be a positive integer, got {args.nsmla_topk}")
    if args.q_lora_rank is not None and args.q_lora_rank < 0:
        _fail(f"--q-lora-rank must be >= 0 (0 = no query LoRA), got {args.q_lora_rank}")
    if args.pipeline_model_parallel_size != 1:
        _fail("--pipeline-model-parallel-size must be 1: pipeline parallelism is not supported yet")
    if args.context_parallel_size != 1:
        _fail("--context-parallel-size must be 1: context parallelism is not supported yet")
    if args.sequence_parallel:
        _fail("--sequence-parallel is not supported yet (torch norms without Transformer Engine refuse it)")
    tp = args.tensor_model_parallel_size
    if world_size % tp:
        _fail(f"--tensor-model-parallel-size {tp} must divide the number of processes ({world_size})")
    if args.num_attention_heads % tp:
        _fail(f"--num-attention-heads ({args.num_attention_heads}) must be divisible by "
              f"--tensor-model-parallel-size ({tp})")
    dp = world_size // tp
    if args.global_batch_size is None:
        args.global_batch_size = args.micro_batch_size * dp
    if args.global_batch_size % (args.micro_batch_size * dp):
        _fail(f"--global-batch-size ({args.global_batch_size}) must be a multiple of --micro-batch-size x "
              f"data-parallel size ({args.micro_batch_size} x {dp})")
    if args.max_position_embeddings is None:
        args.max_position_embeddings = args.seq_length
    if args.seq_length > args.max_position_embeddings:
        _fail(f"--seq-length ({args.seq_length}) exceeds --max-position-embeddings ({args.max_position_embeddings})")
    if args.nsmla_layer_pattern is not None and len(args.nsmla_layer_pattern) != args.num_layers:
        _fail(f"--nsmla-layer-pattern has {len(args.nsmla_layer_pattern)} letters but --num-layers is "
              f"{args.num_layers}; give one letter (S or D) per layer")
    if args.mock_data and args.data_path:
        _fail("--mock-data and --data-path exclude each other")
    if args.mock_data and not args.vocab_size:
        _fail("--mock-data needs --vocab-size")
    if args.data_path and not args.tokenizer_model:
        _fail("--data-path needs --tokenizer-model (the sentencepiece model the data was tokenized with)")
    if args.lr <= 0 or args.min_lr < 0 or args.min_lr > args.lr:
        _fail(f"need --lr > 0 and 0 <= --min-lr <= --lr, got --lr {args.lr} --min-lr {args.min_lr}")
    if args.lr_decay_iters is None:
        args.lr_decay_iters = args.train_iters
    if args.lr_warmup_iters is None:
        args.lr_warmup_iters = args.train_iters // 10
    if args.lr_warmup_iters < 0 or args.lr_warmup_iters > args.lr_decay_iters:
        _fail(f"--lr-warmup-iters must be in [0, --lr-decay-iters = {args.lr_decay_iters}], got {args.lr_warmup_iters}")
    if args.eval_interval is None:
        args.eval_interval = args.train_iters
    for flag in ("save_interval", "eval_interval", "exit_interval"):
        value = getattr(args, flag)
        if value is not None and value <= 0:
            _fail(f"--{flag.replace('_', '-')} must be a positive integer, got {value}")
    if args.save_interval and not args.save:
        _fail("--save-interval needs --save (the checkpoint directory)")
    if args.ffn_hidden_size is None:
        args.ffn_hidden_size = int(math.ceil(args.hidden_size * 8 / 3 / 64) * 64) if args.swiglu else 4 * args.hidden_size


def build_config(args, dtype_params) -> NSMLAConfig:
    """NSMLAConfig from validated args; config-level errors are re-raised as ArgumentError."""
    try:
        return NSMLAConfig(
            num_layers=args.num_layers,
            hidden_size=args.hidden_size,
            ffn_hidden_size=args.ffn_hidden_size,
            num_attention_heads=args.num_attention_heads,
            q_lora_rank=args.q_lora_rank or None,
            kv_lora_rank=args.kv_lora_rank,
            qk_head_dim=args.qk_head_dim,
            qk_pos_emb_head_dim=args.qk_pos_emb_head_dim,
            v_head_dim=args.v_head_dim,
            rope_type=args.rope_type,
            rotary_base=args.rotary_base,
            rotary_scaling_factor=args.rotary_scaling_factor,
            original_max_position_embeddings=args.original_max_position_embeddings,
            mscale=args.mscale,
            mscale_all_dim=args.mscale_all_dim,
            normalization=args.normalization,
            layernorm_epsilon=args.norm_epsilon,
            gated_linear_unit=args.swiglu,
            activation_func=F.silu if args.swiglu else F.gelu,
            bias_activation_fusion=False,
            init_method_std=args.init_method_std,
            hidden_dropout=args.hidden_dropout,
            attention_dropout=args.attention_dropout,
            add_bias_linear=args.add_bias_linear,
            tensor_model_parallel_size=args.tensor_model_parallel_size,
            use_cpu_initialization=args.use_cpu_initialization,
            params_dtype=dtype_params,
            attention_variant=args.nsmla_attention,
            layer_pattern=args.nsmla_layer_pattern,
            index_topk=args.nsmla_topk,
            native_scoring=args.nsmla_scoring,
            kernel_backend=args.nsmla_kernel_backend,
            recall_sample_rows=args.nsmla_recall_rows,
        )
    except (ValueError, AssertionError) as err:
        raise ArgumentError(str(err)) from err


# Flags that fix the shape or meaning of the weights: a checkpoint must agree on all of them.
MODEL_SHAPE_FLAGS = (
    "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "q_lora_rank", "kv_lora_rank",
    "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim", "normalization", "swiglu",
    "untie_embeddings_and_output_weights", "add_bias_linear", "padded_vocab_size",
)
