"""The one autograd Function of sparse MLA; the implementation (reference or Triton) is a parameter."""

from __future__ import annotations

import math

import torch

from .reference import sparse_mla_bwd_reference, sparse_mla_fwd_reference
from .triton_impl import sparse_mla_bwd_triton, sparse_mla_fwd_triton

IMPLEMENTATIONS = {
    "reference": (sparse_mla_fwd_reference, sparse_mla_bwd_reference),
    "triton": (sparse_mla_fwd_triton, sparse_mla_bwd_triton),
}


class SparseMLAFunction(torch.autograd.Function):
    """Saves q, kv, indices, out and lse; the backward recomputes scores instead of saving them."""

    @staticmethod
    def forward(ctx, q, kv, indices, scale, d_v, backend):
        fwd, _ = IMPLEMENTATIONS[backend]
        out, lse = fwd(q, kv, indices, scale, d_v)
        ctx.save_for_backward(q, kv, indices, out, lse)
        ctx.scale, ctx.d_v, ctx.backend = scale, d_v, backend
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, kv, indices, out, lse = ctx.saved_tensors
        _, bwd = IMPLEMENTATIONS[ctx.backend]
        dq, dkv = bwd(q, kv, indices, ctx.scale, ctx.d_v, out, lse, dout)
        return dq, dkv, None, None, None, None


def sparse_mla(q, kv, indices, scale: float | None = None, d_v: int = 512, backend: str = "reference"):
    """Differentiable sparse MLA. q [T, H, D], kv [L, D], indices [T, k] (-1 = none).

    Returns out [T, H, d_v] and lse [T, H] (fp32, not differentiable). ``scale`` defaults to
    1/sqrt(D); ``backend`` is 'reference' (PyTorch, any device) or 'triton' (CUDA, or the CPU under
    TRITON_INTERPRET=1)."""
    if backend not in IMPLEMENTATIONS:
        raise ValueError(f"sparse_mla: backend must be one of {sorted(IMPLEMENTATIONS)}, got {backend!r}")
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    return SparseMLAFunction.apply(q, kv, indices, float(scale), int(d_v), backend)


def sparse_mla_reference(q, kv, indices, scale: float | None = None, d_v: int = 512):
    return sparse_mla(q, kv, indices, scale, d_v, "reference")


def sparse_mla_triton(q, kv, indices, scale: float | None = None, d_v: int = 512):
    return sparse_mla(q, kv, indices, scale, d_v, "triton")
