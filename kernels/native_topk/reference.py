"""Plain PyTorch native-indexer scoring and top-k: the CPU path and the oracle for fast kernels."""

from __future__ import annotations

import torch

SCORING_MODES = ("logit_sum", "prob_sum")

# Elements of the largest per-chunk temporary ([chunk, H, L] for prob_sum).
_CHUNK_ELEMENTS = 1 << 24


def _check(q: torch.Tensor, kv: torch.Tensor, mode: str, topk: int) -> None:
    if mode not in SCORING_MODES:
        raise ValueError(f"native indexer: scoring mode must be one of {SCORING_MODES}, got {mode!r}")
    if q.dim() != 3 or kv.dim() != 2 or q.shape[-1] != kv.shape[-1]:
        raise ValueError(
            f"native indexer: need q [T, H, D] and kv [L, D] with equal D, got {tuple(q.shape)}, {tuple(kv.shape)}"
        )
    if topk <= 0:
        raise ValueError(f"native indexer: topk must be > 0, got {topk}")


def _causal_mask(q_pos: torch.Tensor, num_keys: int) -> torch.Tensor:
    """[C, L] True where key j <= query position (the keys a query may attend to)."""
    keys = torch.arange(num_keys, device=q_pos.device)
    return keys.unsqueeze(0) <= q_pos.unsqueeze(1)


def native_scores_reference(
    q: torch.Tensor, kv: torch.Tensor, mode: str, scale: float, q_pos: torch.Tensor
) -> torch.Tensor:
    """Scores [C, L] (fp32, -inf on non-causal keys) for query rows q [C, H, D] at positions q_pos [C]."""
    kv32 = kv.float()
    allowed = _causal_mask(q_pos, kv.shape[0])
    if mode == "logit_sum":
        # sum_h q in fp32, rounded to q's dtype (what q.sum(1) returns for bf16 q), then an fp32
        # dot: every 16-bit product is exact, so fast kernels differ only in summation order.
        scores = logit_sum_query(q) @ kv32.t()
    else:
        logits = torch.einsum("chd,ld->chl", q.float(), kv32) * scale
        logits = logits.masked_fill(~allowed.unsqueeze(1), float("-inf"))
        scores = torch.softmax(logits, dim=-1).sum(dim=1)
    return scores.masked_fill(~allowed, float("-inf"))


def logit_sum_query(q: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """q [C, H, D] -> sum_h q [C, D] in dtype: summed in fp32, rounded once to q's dtype (dtype q's
    own dtype returns that rounding without a further copy)."""
    return q.sum(dim=1, dtype=torch.float32).to(q.dtype).to(dtype)


def native_topk_reference(
    q: torch.Tensor,
    kv: torch.Tensor,
    topk: int,
    mode: str = "logit_sum",
    scale: float = 1.0,
    q_offset: int = 0,
) -> torch.Tensor:
    """Top-k causal keys per query of one sequence.

    q [T, H, D] holds queries at positions q_offset .. q_offset+T-1; kv [L, D] holds keys at
    positions 0 .. L-1. Returns indices [T, topk] int32 into kv, best first, -1 where a query has
    fewer than topk causal keys. Runs without autograd: the indexer never receives a gradient.
    """
    _check(q, kv, mode, topk)
    T, H, _ = q.shape
    L = kv.shape[0]
    out = torch.full((T, topk), -1, dtype=torch.int32, device=q.device)
    keep = min(topk, L)
    rows = chunk_rows(L, H, mode)
    with torch.no_grad():
        for s in range(0, T, rows):
            e = min(T, s + rows)
            q_pos = torch.arange(s, e, device=q.device) + q_offset
            out[s:e, :keep] = topk_of_scores(native_scores_reference(q[s:e], kv, mode, scale, q_pos), keep)
    return out


def topk_of_scores(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """scores [C, L] (-inf = not allowed) -> [C, keep] int32 key indices, best first, equal scores
    in ascending key order, -1 where fewer than `keep` keys are allowed."""
    # Stable descending sort: equal scores keep the lower key index first.
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :keep]
    best = torch.gather(scores, 1, order)
    return torch.where(torch.isinf(best), -1, order).to(torch.int32)


def score_elements(rows: int, num_keys: int, heads: int, mode: str) -> int:
    """Elements of the largest scoring temporary for `rows` query rows ([rows, H, L] for prob_sum)."""
    return rows * num_keys * (heads if mode == "prob_sum" else 1)


def chunk_rows(num_keys: int, heads: int, mode: str) -> int:
    """Query rows per chunk so that the largest scoring temporary stays near _CHUNK_ELEMENTS."""
    return max(1, _CHUNK_ELEMENTS // score_elements(1, num_keys, heads, mode))
