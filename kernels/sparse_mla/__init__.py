"""Sparse MLA attention in absorbed (MQA) form: each query attends to its own top-k latent keys."""

from .reference import (
    SparseMLAReference,
    sparse_mla_bwd_reference,
    sparse_mla_fwd_reference,
    sparse_mla_reference,
)
from .triton_impl import SparseMLATriton, sparse_mla_bwd_triton, sparse_mla_fwd_triton, sparse_mla_triton

__all__ = [
    "SparseMLATriton",
    "sparse_mla_bwd_triton",
    "sparse_mla_fwd_triton",
    "sparse_mla_triton",
    "SparseMLAReference",
    "sparse_mla_bwd_reference",
    "sparse_mla_fwd_reference",
    "sparse_mla_reference",
]
