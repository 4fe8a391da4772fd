"""Plain PyTorch sparse MLA (absorbed form): the CPU path and the oracle for fast kernels.

Math in fp32 whatever the input dtype; queries are processed in chunks so that the gathered
keys ``[chunk, k, D]`` and scores ``[chunk, H, k]`` are the only large temporaries.
"""

from __future__ import annotations

import torch

# Elements of the largest per-chunk temporary; bounds peak memory independently of T.
_CHUNK_ELEMENTS = 1 << 24


def _check_inputs(q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, d_v: int) -> None:
    if q.dim() != 3:
        raise ValueError(f"sparse_mla: q must be [T, H, D], got shape {tuple(q.shape)}")
    if kv.dim() != 2 or kv.shape[1] != q.shape[2]:
        raise ValueError(
            f"sparse_mla: kv must be [L, D] with D = q.shape[2] = {q.shape[2]}, got {tuple(kv.shape)}"
        )
    if indices.dim() != 2 or indices.shape[0] != q.shape[0]:
        raise ValueError(
            f"sparse_mla: indices must be [T, k] with T = {q.shape[0]}, got {tuple(indices.shape)}"
        )
    if indices.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"sparse_mla: indices must be int32 or int64, got {indices.dtype}")
    if not 0 < d_v <= q.shape[2]:
        raise ValueError(f"sparse_mla: d_v must be in [1, {q.shape[2]}], got {d_v}")
    if q.device != kv.device or q.device != indices.device:
        raise ValueError(
            f"sparse_mla: q, kv, indices on different devices ({q.device}, {kv.device}, {indices.device})"
        )


def _chunk_rows(heads: int, topk: int, dim: int) -> int:
    per_row = topk * max(dim, heads)
    return max(1, min(4096, _CHUNK_ELEMENTS // max(per_row, 1)))


def _gather(kv32: torch.Tensor, idx: torch.Tensor):
    """Gathered keys [C, k, D] and the validity mask [C, k]. Invalid slots hold row 0 of kv: their
    scores are masked to -inf, so they get zero probability and their gradient is dropped."""
    valid = idx >= 0
    return kv32[idx.clamp(min=0).long()], valid


def sparse_mla_fwd_reference(
    q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, scale: float, d_v: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward. q [T, H, D], kv [L, D], indices [T, k] -> out [T, H, d_v] (q.dtype), lse [T, H] fp32."""
    _check_inputs(q, kv, indices, d_v)
    T, H, D = q.shape
    out = torch.empty(T, H, d_v, dtype=q.dtype, device=q.device)
    lse = torch.empty(T, H, dtype=torch.float32, device=q.device)
    kv32 = kv.float()
    step = _chunk_rows(H, indices.shape[1], D)
    for s in range(0, T, step):
        e = min(T, s + step)
        keys, valid = _gather(kv32, indices[s:e])
        scores = torch.einsum("chd,ckd->chk", q[s:e].float(), keys) * scale
        scores = scores.masked_fill(~valid.unsqueeze(1), float("-inf"))
        row_lse = torch.logsumexp(scores, dim=-1)  # -inf for a row without any valid key
        probs = torch.exp(scores - row_lse.unsqueeze(-1).clamp(min=torch.finfo(torch.float32).min))
        probs = probs.nan_to_num(0.0)
        out[s:e] = torch.einsum("chk,ckv->chv", probs, keys[..., :d_v]).to(q.dtype)
        lse[s:e] = row_lse
    return out, lse


def sparse_mla_bwd_reference(
    q: torch.Tensor,
    kv: torch.Tensor,
    indices: torch.Tensor,
    scale: float,
    d_v: int,
    out: torch.Tensor,
    lse: torch.Tensor,
    dout: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward. Returns dq [T, H, D] (q.dtype) and dkv [L, D] (kv.dtype, accumulated in fp32)."""
    T, H, D = q.shape
    dq = torch.empty_like(q)
    dkv = torch.zeros(kv.shape, dtype=torch.float32, device=kv.device)
    kv32 = kv.float()
    step = _chunk_rows(H, indices.shape[1], D)
    for s in range(0, T, step):
        e = min(T, s + step)
        idx = indices[s:e]
        keys, valid = _gather(kv32, idx)
        q32, do32 = q[s:e].float(), dout[s:e].float()
        scores = torch.einsum("chd,ckd->chk", q32, keys) * scale
        row_lse = lse[s:e].unsqueeze(-1)
        probs = torch.exp(scores - row_lse).masked_fill(~valid.unsqueeze(1), 0.0).nan_to_num(0.0)
        dprobs = torch.einsum("chv,ckv->chk", do32, keys[..., :d_v])
        delta = (do32 * out[s:e].float()).sum(-1, keepdim=True)
        dscores = probs * (dprobs - delta)
        dq[s:e] = (torch.einsum("chk,ckd->chd", dscores, keys) * scale).to(q.dtype)
        dkeys = torch.einsum("chk,chd->ckd", dscores, q32) * scale
        dkeys[..., :d_v] += torch.einsum("chk,chv->ckv", probs, do32)
        flat_idx = idx.reshape(-1).long()
        keep = flat_idx >= 0
        dkv.index_add_(0, flat_idx[keep], dkeys.reshape(-1, D)[keep])
    return dq, dkv.to(kv.dtype)
