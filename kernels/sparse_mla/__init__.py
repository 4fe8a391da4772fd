"""Sparse MLA attention in absorbed (MQA) form: each query attends to its own top-k latent keys."""

from .function import SparseMLAFunction, sparse_mla, sparse_mla_reference, sparse_mla_triton
from .reference import sparse_mla_bwd_reference, sparse_mla_fwd_reference
from .triton_impl import sparse_mla_bwd_triton, sparse_mla_fwd_triton

__all__ = [
    "SparseMLAFunction",
    "sparse_mla",
    "sparse_mla_bwd_reference",
    "sparse_mla_bwd_triton",
    "sparse_mla_fwd_reference",
    "sparse_mla_fwd_triton",
    "sparse_mla_reference",
    "sparse_mla_triton",
]
