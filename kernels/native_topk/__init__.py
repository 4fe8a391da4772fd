"""Native indexer: score keys with the attention's own absorbed queries and latent keys, pick top-k."""

from .reference import SCORING_MODES, native_scores_reference, native_topk_reference

__all__ = ["SCORING_MODES", "native_scores_reference", "native_topk_reference"]
