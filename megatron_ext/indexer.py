"""Native indexer: top-k key selection from the attention's own absorbed queries and latent keys.

No parameters, no gradient, no loss. Under tensor parallelism each rank holds a slice of the heads,
so the queries are gathered over the tensor-parallel group first: every rank then scores with all
heads and selects the same keys as a single process would.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron.core import parallel_state

from kernels.native_topk import native_scores_reference, native_topk


def _gather_heads(q: torch.Tensor) -> torch.Tensor:
    """[T, H/tp, D] -> [T, H, D] over the tensor-parallel group (no autograd)."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    if tp == 1:
        return q
    parts = [torch.empty_like(q) for _ in range(tp)]
    dist.all_gather(parts, q.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=1)


class NativeIndexer(torch.nn.Module):
    """Selects, for each query, its top-k causal keys. Holds no parameters."""

    def __init__(self, config, softmax_scale: float):
        super().__init__()
        self.topk = config.index_topk
        self.mode = config.native_scoring
        self.scale = softmax_scale
        self.recall_rows = config.recall_sample_rows
        self.config = config

    @torch.no_grad()
    def forward(self, q: torch.Tensor, kv: torch.Tensor, batch: int, seqlen: int) -> torch.Tensor:
        """q [B*S, H/tp, D] and kv [B*S, D], batch-major. Returns indices [B*S, topk] int32 into the
        B*S rows of kv (sequence b only selects rows b*S .. b*S+S-1), -1 where fewer keys exist."""
        q = _gather_heads(q.detach())
        kv = kv.detach()
        backend = self.config.indexer_backend_for(q.device, seqlen)
        out = []
        for b in range(batch):
            rows = slice(b * seqlen, (b + 1) * seqlen)
            idx = native_topk(q[rows], kv[rows], self.topk, self.mode, self.scale, backend=backend)
            out.append(torch.where(idx >= 0, idx + b * seqlen, idx))
        return torch.cat(out, dim=0)

    @torch.no_grad()
    def recall(self, q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, seqlen: int):
        """Recall of the selected keys against the exact dense-attention top-k, on sampled rows of
        the first sequence. The exact top-k ranks keys by attention probability summed over heads.

        Returns (recall, mass): the fraction of the exact top-k keys that were selected, and the
        fraction of the dense attention probability (averaged over heads) that falls on the selected
        keys. None when every sampled row has no more than topk causal keys (selection is trivial).
        """
        first = seqlen if q.shape[0] >= seqlen else q.shape[0]
        lo = self.topk  # rows at positions >= topk have more causal keys than topk
        if self.recall_rows == 0 or lo >= first:
            return None
        rows = torch.linspace(lo, first - 1, steps=min(self.recall_rows, first - lo), device=q.device).long()
        q_all = _gather_heads(q.detach())
        probs = native_scores_reference(q_all[rows], kv[:first].detach(), "prob_sum", self.scale, rows)
        probs = probs.clamp(min=0.0)  # non-causal keys were -inf
        exact = torch.topk(probs, self.topk, dim=-1).indices
        chosen = indices[rows].long()
        hit = torch.zeros_like(probs, dtype=torch.bool)
        valid = chosen >= 0
        row_ids = torch.arange(len(rows), device=q.device).unsqueeze(1).expand_as(chosen)
        hit[row_ids[valid], chosen[valid]] = True
        recall = hit.gather(1, exact).float().mean()
        mass = (probs * hit).sum(-1).mean() / q_all.shape[1]
        return recall, mass
