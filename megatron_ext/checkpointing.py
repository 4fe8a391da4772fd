"""Distributed checkpoints (megatron-core torch_dist): model, AdamW state, LR schedule, data
position and RNG states. Saves are atomic (written under a temporary name, then renamed) and
never overwrite an existing iteration."""

from __future__ import annotations

import os
import random
import shutil
from itertools import chain

import numpy as np
import torch
import torch.distributed as dist

from torch.distributed.checkpoint import CheckpointException
from torch.distributed.checkpoint.utils import _get_failure_dict

from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.dist_checkpointing.optimizer import (
    get_param_id_to_sharded_param_map,
    optim_state_to_sharding_state,
)
from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

from .arguments import MODEL_SHAPE_FLAGS, ArgumentError

TRACKER = "latest_checkpointed_iteration.txt"


class _HostSafeSaveStrategy(TorchDistSaveShardedStrategy):
    """torch_dist saving that also runs without CUDA; the files are the same torch_dist format.

    megatron-core 0.16.1 assumes CUDA in two places of a save: it stages tensors to the host with
    non-blocking copies followed by torch.cuda.synchronize(), and its finalize step broadcasts the
    failure flag from a tensor on torch.cuda.current_device(). Without CUDA the tensors already
    live on the host, so staging is made blocking, and the finalize (gather the write results,
    the coordinator writes the metadata, everyone learns whether a rank failed) runs on the CPU.
    """

    def _get_save_and_finalize_callbacks(self, writer, save_state_dict_ret):
        request = super()._get_save_and_finalize_callbacks(writer, save_state_dict_ret)
        if torch.cuda.is_available():
            return request
        storage_writer, global_metadata, dist_wrapper = save_state_dict_ret

        def preload():
            return writer.preload_tensors(writer.write_buckets, non_blocking=False)

        def finalize():
            results = dist_wrapper.gather_object(storage_writer.retrieve_write_results())
            failures = {}
            if dist_wrapper.is_coordinator:
                failures = _get_failure_dict(results)
                if not failures:
                    storage_writer.finish(global_metadata, results)
            failed = torch.tensor([int(bool(failures))], dtype=torch.int)
            dist.broadcast(failed, src=dist_wrapper.coordinator_rank, group=dist_wrapper.group)
            if failed.item():
                raise CheckpointException("write", failures)

        return request._replace(preload_fn=preload, finalize_fns=[finalize])


def _save_strategy():
    return _HostSafeSaveStrategy("torch_dist", 1)


def iteration_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def latest_iteration(root: str):
    """Iteration named by the tracker file, or None when `root` holds no checkpoint."""
    path = os.path.join(root, TRACKER)
    if not os.path.isfile(path):
        return None
    text = open(path).read().strip()
    if not text.isdigit():
        raise ArgumentError(f"--load {root}: {TRACKER} should hold an iteration number, found {text!r}")
    return int(text)


def _init_adam_state(optimizer: torch.optim.Optimizer) -> None:
    """Allocate AdamW's state so a loading template has tensors of the right shapes."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if not optimizer.state[p]:
                optimizer.state[p] = {
                    "step": torch.zeros((), dtype=torch.float32),
                    "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                    "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
                }


def _rng_object(rank: int, world: int) -> ShardedObject:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
    }
    return ShardedObject("rng_state", state, (world,), (rank,), replica_id=0)


def _state_dict(model, optimizer, scheduler, args, iteration: int):
    """The sharded state dict to save, or to load into (optimizer state must exist)."""
    model_sd = model.sharded_state_dict()
    _init_adam_state(optimizer)
    params = chain.from_iterable(g["params"] for g in optimizer.param_groups)
    id_map = get_param_id_to_sharded_param_map(model_sd, params)
    optim_sd = optimizer.state_dict()
    step = max((float(s["step"]) for s in optim_sd["state"].values()), default=0.0)
    optim_state_to_sharding_state(optim_sd, id_map, exclude_keys=("step",))
    return {
        "model": model_sd,
        "optimizer": optim_sd,
        "optimizer_step": step,
        "opt_param_scheduler": scheduler.state_dict(),
        "iteration": iteration,
        "model_args": {k: getattr(args, k) for k in MODEL_SHAPE_FLAGS},
        "world_size": dist.get_world_size(),
        "rng_state": _rng_object(dist.get_rank(), dist.get_world_size()),
    }


def check_save_targets(args, start_iteration: int) -> None:
    """Refuse, before training, a run whose saves would overwrite an existing checkpoint."""
    if not args.save:
        return
    planned = set()
    if args.save_interval:
        planned.update(range(args.save_interval, args.train_iters + 1, args.save_interval))
    planned.add(args.train_iters if args.exit_interval is None else min(args.exit_interval, args.train_iters))
    clash = sorted(i for i in planned if i > start_iteration and os.path.exists(iteration_dir(args.save, i)))
    if clash:
        raise ArgumentError(
            f"--save {args.save} already holds {os.path.basename(iteration_dir(args.save, clash[0]))}, which this run "
            "would overwrite; resume from it with --load, choose another --save, or move it away"
        )


def save_checkpoint(root: str, iteration: int, model, optimizer, scheduler, args) -> str:
    """Write iter_XXXXXXX under root (all ranks take part) and point the tracker at it."""
    final = iteration_dir(root, iteration)
    tmp = final + ".tmp"
    if dist.get_rank() == 0:
        os.makedirs(root, exist_ok=True)
        if os.path.exists(tmp):  # debris of an interrupted save of this same iteration
            shutil.rmtree(tmp)
        os.makedirs(tmp)
    dist.barrier()
    state = _state_dict(model, optimizer, scheduler, args, iteration)
    dist_checkpointing.save(state, tmp, sharded_strategy=_save_strategy())
    dist.barrier()
    if dist.get_rank() == 0:
        os.rename(tmp, final)
        with open(os.path.join(root, TRACKER + ".tmp"), "w") as f:
            f.write(str(iteration))
        os.replace(os.path.join(root, TRACKER + ".tmp"), os.path.join(root, TRACKER))
    dist.barrier()
    return final


def check_checkpoint_args(root: str, iteration: int, args) -> None:
    """Compare the saved model shape with this run's; any difference is one clear error."""
    common = dist_checkpointing.load_common_state_dict(iteration_dir(root, iteration))
    saved = common.get("model_args", {})
    diffs = [
        f"--{k.replace('_', '-')}: checkpoint {saved[k]!r}, this run {getattr(args, k)!r}"
        for k in MODEL_SHAPE_FLAGS
        if k in saved and saved[k] != getattr(args, k)
    ]
    if diffs:
        raise ArgumentError(f"--load {iteration_dir(root, iteration)} was saved with another model config: " + "; ".join(diffs))
    return common


def load_checkpoint(root: str, model, optimizer, scheduler, args) -> int:
    """Load the latest checkpoint under root into model/optimizer/scheduler. Returns its iteration
    (0 when root holds none)."""
    iteration = latest_iteration(root)
    if iteration is None:
        return 0
    path = iteration_dir(root, iteration)
    if not os.path.isdir(path):
        raise ArgumentError(f"--load {root}: the tracker names iteration {iteration} but {path} is missing")
    common = check_checkpoint_args(root, iteration, args)
    template = _state_dict(model, optimizer, scheduler, args, iteration)
    # RNG states are per rank: they only carry over to the same number of ranks (they matter for
    # dropout alone; resharded runs start from this run's seeded generators).
    same_world = common.get("world_size") == dist.get_world_size()
    if not same_world:
        del template["rng_state"]
    loaded = dist_checkpointing.load(template, path)
    model.load_state_dict(loaded["model"])
    optim_sd = loaded["optimizer"]
    for group, saved_group in zip(optimizer.state_dict()["param_groups"], optim_sd["param_groups"]):
        saved_group["params"] = group["params"]
    for param_state in optim_sd["state"].values():
        param_state["step"] = torch.tensor(loaded["optimizer_step"], dtype=torch.float32)
    optimizer.load_state_dict(optim_sd)
    scheduler.load_state_dict(loaded["opt_param_scheduler"])
    if not same_world:
        if dist.get_rank() == 0:
            print(f"checkpoint saved by {common.get('world_size')} ranks, loading on {dist.get_world_size()}: "
                  "RNG states not restored", flush=True)
        return iteration
    rng = loaded["rng_state"]
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return iteration
