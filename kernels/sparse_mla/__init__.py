"""Sparse MLA attention in absorbed (MQA) form: each query attends to its own top-k latent keys."""

from .reference import (
    SparseMLAReference,
    sparse_mla_bwd_reference,
    sparse_mla_fwd_reference,
    sparse_mla_reference,
)

__all__ = [
    "SparseMLAReference",
    "sparse_mla_bwd_reference",
    "sparse_mla_fwd_reference",
    "sparse_mla_reference",
]
