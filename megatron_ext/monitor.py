"""Progress lines, TensorBoard scalars and a JSON log, written by global rank 0 only.

Rank 0 holds the full loss (no pipeline parallelism), so one writer suffices and multi-node runs
produce one TensorBoard directory rather than one per node.
"""

from __future__ import annotations

import json
import time

import torch.distributed as dist


def _fmt_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Monitor:
    def __init__(self, args, total_iters: int, start_iter: int):
        self.rank0 = dist.get_rank() == 0
        self.total = total_iters
        self.tokens_per_iter = args.global_batch_size * args.seq_length
        self.writer = None
        self.json_path = args.log_json
        if self.rank0 and args.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=args.tensorboard_dir)
        self._mark(start_iter)
        self.t_start = self.t_mark

    def _mark(self, iteration: int) -> None:
        self.t_mark = time.perf_counter()
        self.iter_mark = iteration

    def log(self, iteration: int, scalars: dict) -> dict:
        """Log the scalars of `iteration` (loss, lr, grad_norm, recall...); adds tokens/s and ETA."""
        now = time.perf_counter()
        iters = max(1, iteration - self.iter_mark)
        per_iter = (now - self.t_mark) / iters
        scalars = dict(scalars)
        scalars["tokens_per_s"] = self.tokens_per_iter / per_iter if per_iter > 0 else float("nan")
        scalars["s_per_iter"] = per_iter
        self._mark(iteration)
        if not self.rank0:
            return scalars
        eta = _fmt_eta(per_iter * (self.total - iteration))
        line = (
            f"iter {iteration:6d}/{self.total} | loss {scalars['loss']:.4f} | lr {scalars['lr']:.3e} | "
            f"grad norm {scalars['grad_norm']:.3f} | {scalars['tokens_per_s']:,.0f} tok/s | "
            f"{per_iter * 1000:.0f} ms/iter | ETA {eta}"
        )
        if scalars.get("indexer_recall") is not None:
            line += f" | recall {scalars['indexer_recall']:.3f} mass {scalars['indexer_attn_mass']:.3f}"
        print(line, flush=True)
        self._write(iteration, scalars)
        return scalars

    def log_eval(self, iteration: int, loss: float) -> None:
        if self.rank0:
            print(f"eval  {iteration:6d} | validation loss {loss:.4f}", flush=True)
            self._write(iteration, {"validation_loss": loss})

    def _write(self, iteration: int, scalars: dict) -> None:
        names = {
            "loss": "train/loss",
            "lr": "train/lr",
            "grad_norm": "train/grad_norm",
            "tokens_per_s": "throughput/tokens_per_s",
            "validation_loss": "validation/loss",
            "indexer_recall": "indexer/recall",
            "indexer_attn_mass": "indexer/attn_mass",
        }
        if self.writer is not None:
            for key, value in scalars.items():
                tag = names.get(key) or (f"indexer/{key}" if key.startswith(("recall_layer", "mass_layer")) else None)
                if tag is not None and value is not None:
                    self.writer.add_scalar(tag, value, iteration)
            self.writer.flush()
        if self.json_path:
            with open(self.json_path, "a") as f:
                f.write(json.dumps({"iteration": iteration, **scalars}) + "\n")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
