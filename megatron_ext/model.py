"""Build the megatron-core GPTModel with NSMLA layers."""

from __future__ import annotations

from megatron.core.models.gpt import GPTModel

from .specs import nsmla_block_spec


def build_model(config, vocab_size: int, seq_length: int, untie_embeddings: bool = True) -> GPTModel:
    """GPTModel whose decoder follows config.layer_variant per layer. MLA applies its own rotary
    embedding inside attention, so GPTModel creates none (position_embedding_type='rope' with MLA)."""
    return GPTModel(
        config=config,
        transformer_layer_spec=nsmla_block_spec(config),
        vocab_size=vocab_size,
        max_sequence_length=seq_length,
        pre_process=True,
        post_process=True,
        parallel_output=True,
        share_embeddings_and_output_weights=not untie_embeddings,
        position_embedding_type="rope",
    )
