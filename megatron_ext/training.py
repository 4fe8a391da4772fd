"""The pretraining loop: megatron-core GPTModel and LR schedule, AdamW, data-parallel gradient
averaging, TP-aware gradient clipping, evaluation, logging and checkpoints.

Why torch AdamW rather than megatron-core's optimizer: megatron's optimizer, grad-norm and
clipping code allocate CUDA tensors unconditionally (clip_grads.py), so it cannot run on the CPU
machines this project is tested on. One optimizer path for CPU and GPU keeps checkpoints and loss
curves comparable; its state is checkpointed through megatron-core's dist_checkpointing helpers.
"""

from __future__ import annotations

import contextlib
import math
import os
import time

import torch
import torch.distributed as dist

from megatron.core import parallel_state
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.tensor_parallel.layers import param_is_not_tensor_parallel_duplicate

from . import checkpointing, distributed
from .arguments import ArgumentError, build_config, validate_args
from .attention import NSMLASelfAttention
from .data import build_datasets, get_batch, padded_vocab_size, resolve_data
from .model import build_model
from .monitor import Monitor


def build_optimizer(model, args):
    """AdamW with megatron's grouping: no weight decay on biases and norm weights (1-d tensors)."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.dim() == 1 else decay).append(p)
    groups = [{"params": decay, "wd_mult": 1.0}, {"params": no_decay, "wd_mult": 0.0}]
    fused = next(model.parameters()).is_cuda
    optimizer = torch.optim.AdamW(
        groups, lr=args.lr, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_eps,
        weight_decay=args.weight_decay, fused=fused or None,
    )
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=args.lr,
        min_lr=args.min_lr,
        lr_warmup_steps=args.lr_warmup_iters,
        lr_decay_steps=args.lr_decay_iters,
        lr_decay_style=args.lr_decay_style,
        start_wd=args.weight_decay,
        end_wd=args.weight_decay,
        wd_incr_steps=args.train_iters,
        wd_incr_style="constant",
        wsd_decay_steps=max(1, args.lr_decay_iters // 10) if args.lr_decay_style == "WSD" else None,
        lr_wsd_decay_style="linear" if args.lr_decay_style == "WSD" else None,
    )
    return optimizer, scheduler


def allreduce_gradients(model) -> None:
    """Average gradients over data-parallel ranks (one flat buffer, one all-reduce)."""
    dp = parallel_state.get_data_parallel_world_size()
    if dp == 1:
        return
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=parallel_state.get_data_parallel_group())
    flat /= dp
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def clip_gradients(model, max_norm: float) -> float:
    """Global L2 norm over all parameters, counting TP-replicated ones once; clip to max_norm."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    owned = [p.grad for p in model.parameters() if p.grad is not None and param_is_not_tensor_parallel_duplicate(p)]
    device = grads[0].device
    sq = torch.zeros((), dtype=torch.float32, device=device)
    for g in owned:
        sq += g.float().pow(2).sum()
    dist.all_reduce(sq, group=parallel_state.get_model_parallel_group())
    norm = float(sq.sqrt())
    if max_norm > 0 and math.isfinite(norm) and norm > max_norm:
        for g in grads:
            g.mul_(max_norm / (norm + 1e-6))
    return norm


def sparse_attention_modules(model):
    return [m for m in model.modules() if isinstance(m, NSMLASelfAttention) and m.variant == "nsmla"]


def _autocast(args, device):
    if args.bf16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def forward_loss(model, batch, args, device) -> torch.Tensor:
    """Mean next-token loss over the micro-batch's unmasked tokens."""
    with _autocast(args, device):
        losses = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    mask = batch["loss_mask"]
    return (losses.float() * mask).sum() / mask.sum().clamp(min=1)


def _mean_over_dp(value: torch.Tensor) -> float:
    value = value.detach().clone()
    dist.all_reduce(value, group=parallel_state.get_data_parallel_group())
    return float(value) / parallel_state.get_data_parallel_world_size()


def _micro_batches(args) -> int:
    """Micro-batches each data-parallel rank runs per global batch."""
    return args.global_batch_size // (args.micro_batch_size * parallel_state.get_data_parallel_world_size())


def train_step(model, optimizer, scheduler, dataset, iteration, args, device, monitor_recall: bool):
    optimizer.zero_grad(set_to_none=True)
    micro_batches = _micro_batches(args)
    sparse = sparse_attention_modules(model) if monitor_recall else []
    total = torch.zeros((), device=device)
    recalls = []
    for micro in range(micro_batches):
        batch = get_batch(dataset, iteration, micro, args, device)
        for m in sparse:
            m.monitor_recall = micro == 0
        loss = forward_loss(model, batch, args, device)
        (loss / micro_batches).backward()
        total += loss.detach() / micro_batches
        if micro == 0:
            recalls = [m.last_recall for m in sparse]
        for m in sparse:
            m.monitor_recall, m.last_recall = False, None
    allreduce_gradients(model)
    grad_norm = clip_gradients(model, args.clip_grad)
    optimizer.step()
    scheduler.step(1)
    scalars = {"loss": _mean_over_dp(total), "grad_norm": grad_norm, "lr": optimizer.param_groups[0]["lr"]}
    measured = [(m.layer_number, r) for m, r in zip(sparse, recalls) if r is not None]
    if measured:
        for layer, (rec, mass) in measured:
            scalars[f"recall_layer{layer}"] = float(rec)
            scalars[f"mass_layer{layer}"] = float(mass)
        scalars["indexer_recall"] = sum(float(r) for _, (r, _) in measured) / len(measured)
        scalars["indexer_attn_mass"] = sum(float(m) for _, (_, m) in measured) / len(measured)
    return scalars


@torch.no_grad()
def evaluate(model, dataset, eval_round: int, args, device) -> float:
    model.eval()
    micro_batches = _micro_batches(args)
    total = torch.zeros((), device=device)
    for i in range(args.eval_iters):
        for micro in range(micro_batches):
            batch = get_batch(dataset, eval_round * args.eval_iters + i, micro, args, device)
            total += forward_loss(model, batch, args, device)
    model.train()
    return _mean_over_dp(total / (args.eval_iters * micro_batches))


def setup(argv=None):
    """Parse and validate everything, start the process group, build data, model and optimizer.
    Every input error surfaces here, before the first training step."""
    from .arguments import build_parser

    args = build_parser().parse_args(argv)
    rank, world, local_rank = distributed.world_from_env()
    validate_args(args, world)
    device = distributed.pick_device(args.device, local_rank)
    if args.nsmla_kernel_backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ArgumentError("--nsmla-kernel-backend triton needs a CUDA GPU (or TRITON_INTERPRET=1 on the CPU, slow)")
    if device.type == "cpu":
        if args.bf16:
            raise ArgumentError("--bf16 needs a GPU (bf16 autocast on the CPU is slow and not tested)")
        args.use_cpu_initialization = True
    config = build_config(args, torch.float32)
    distributed.initialize(rank, world, device, args.tensor_model_parallel_size, args.distributed_backend)
    tokenizer = resolve_data(args)
    args.padded_vocab_size = padded_vocab_size(
        tokenizer.vocab_size, args.make_vocab_size_divisible_by, args.tensor_model_parallel_size
    )
    if args.load:
        it = checkpointing.latest_iteration(args.load)
        if it is not None:
            checkpointing.check_checkpoint_args(args.load, it, args)
    distributed.set_determinism(args.deterministic)
    distributed.set_seed(args.seed, device)
    model = build_model(config, args.padded_vocab_size, args.seq_length, args.untie_embeddings_and_output_weights)
    model.to(device)
    optimizer, scheduler = build_optimizer(model, args)
    start = checkpointing.load_checkpoint(args.load, model, optimizer, scheduler, args) if args.load else 0
    checkpointing.check_save_targets(args, start)
    train_ds, valid_ds = build_datasets(args, tokenizer)
    return args, device, model, optimizer, scheduler, train_ds, valid_ds, start


def pretrain(argv=None) -> dict:
    """Run training; returns the last logged scalars (for tests and benchmarks)."""
    args, device, model, optimizer, scheduler, train_ds, valid_ds, start = setup(argv)
    stop = args.train_iters if args.exit_interval is None else min(args.train_iters, args.exit_interval)
    monitor = Monitor(args, args.train_iters, start)
    if dist.get_rank() == 0:
        n_params = sum(p.numel() for p in model.parameters())
        print(
            f"NSMLA: {n_params / 1e6:.2f}M parameters per TP rank | layers "
            f"{''.join('S' if m.variant == 'nsmla' else 'D' for m in model.modules() if isinstance(m, NSMLASelfAttention))}"
            f" | topk {args.nsmla_topk} ({args.nsmla_scoring}) | kernels: attention "
            f"{model.config.backend_for(device)}, indexer {model.config.indexer_backend_for(device, args.seq_length)} | seq {args.seq_length} | global batch "
            f"{args.global_batch_size} | device {device} | world {dist.get_world_size()} "
            f"(TP {args.tensor_model_parallel_size}) | start iter {start}",
            flush=True,
        )
    last = {}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model.train()
    t0 = time.perf_counter()
    for iteration in range(start, stop):
        step = iteration + 1
        log_now = step % args.log_interval == 0 or step == stop
        scalars = train_step(model, optimizer, scheduler, train_ds, iteration, args, device, log_now)
        if log_now:
            last = monitor.log(step, scalars)
        if valid_ds is not None and (step % args.eval_interval == 0 or step == stop):
            loss = evaluate(model, valid_ds, step // args.eval_interval, args, device)
            monitor.log_eval(step, loss)
            last["validation_loss"] = loss
        if args.save and ((args.save_interval and step % args.save_interval == 0) or step == stop):
            path = checkpointing.save_checkpoint(args.save, step, model, optimizer, scheduler, args)
            if dist.get_rank() == 0:
                print(f"saved checkpoint {path}", flush=True)
    last["train_seconds"] = time.perf_counter() - t0
    if device.type == "cuda":
        last["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
    monitor.close()
    return last
