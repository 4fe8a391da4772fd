"""Layer specs: NSMLA (sparse) and dense MLA layers on megatron-core's TransformerLayer.

Everything here is megatron-core's local (non-Transformer-Engine) building blocks plus our own
attention module, so the same spec runs on the CPU and on a GPU without Transformer Engine.
"""

from __future__ import annotations

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from .attention import NSMLASelfAttention, NSMLASelfAttentionSubmodules
from .indexer import NativeIndexer
from .layers import ReplicatedLinear


def nsmla_attention_spec(variant: str) -> ModuleSpec:
    """Attention spec for one layer; `variant` is 'nsmla' (top-k sparse) or 'dense'."""
    return ModuleSpec(
        module=NSMLASelfAttention,
        params={"attn_mask_type": AttnMaskType.causal, "variant": variant},
        submodules=NSMLASelfAttentionSubmodules(
            linear_q_proj=ColumnParallelLinear,
            linear_q_down_proj=ReplicatedLinear,
            q_layernorm=WrappedTorchNorm,
            linear_q_up_proj=ColumnParallelLinear,
            linear_kv_down_proj=ReplicatedLinear,
            kv_layernorm=WrappedTorchNorm,
            linear_kv_up_proj=ColumnParallelLinear,
            linear_proj=RowParallelLinear,
            indexer=NativeIndexer if variant == "nsmla" else None,
        ),
    )


def nsmla_layer_spec(variant: str) -> ModuleSpec:
    """A pre-norm transformer layer: NSMLA/dense MLA attention and a (SwiGLU) MLP."""
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=WrappedTorchNorm,
            self_attention=nsmla_attention_spec(variant),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=WrappedTorchNorm,
            mlp=ModuleSpec(
                module=MLP,
                submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear),
            ),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def nsmla_block_spec(config) -> TransformerBlockSubmodules:
    """Decoder block spec with one layer spec per layer, following config.layer_variant."""
    layers = [nsmla_layer_spec(config.layer_variant(i + 1)) for i in range(config.num_layers)]
    return TransformerBlockSubmodules(layer_specs=layers, layer_norm=WrappedTorchNorm)
