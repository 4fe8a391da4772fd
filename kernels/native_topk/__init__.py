"""Native indexer: score keys with the attention's own absorbed queries and latent keys, pick top-k."""

from .reference import SCORING_MODES, native_scores_reference, native_topk_reference
from .streaming import native_topk_triton

IMPLEMENTATIONS = {"reference": native_topk_reference, "triton": native_topk_triton}


def native_topk(q, kv, topk: int, mode: str = "logit_sum", scale: float = 1.0, q_offset: int = 0,
                backend: str = "reference"):
    """Top-k causal keys per query (see reference.py for the contract). 'reference' returns each
    row best first; 'triton' returns the same set in ascending key order."""
    if backend not in IMPLEMENTATIONS:
        raise ValueError(f"native_topk: backend must be one of {sorted(IMPLEMENTATIONS)}, got {backend!r}")
    return IMPLEMENTATIONS[backend](q, kv, topk, mode, scale, q_offset)


__all__ = ["IMPLEMENTATIONS", "SCORING_MODES", "native_scores_reference", "native_topk", "native_topk_reference",
           "native_topk_triton"]
