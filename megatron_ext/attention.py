"""NSMLA self-attention: MLA whose sparse layers attend, per query, to the indexer's top-k keys.

Built only from megatron-core's parallel linears (and a replicated linear for the down
projections), so it runs without Transformer Engine and on the CPU. Layout conventions follow
megatron: activations are [S, B, hidden]; heads are split over tensor-parallel ranks.

Sparse layers compute attention in MLA's absorbed form (DeepSeek V2 sec. 2.1.2): the key
up-projection W_UK is folded into the query, so every head attends over the shared latent keys
[c_kv ; k_rope] (kv_lora_rank + rope dims) and returns a latent output that W_UV maps to the head's
value space. Dense layers use the ordinary (non-absorbed) form through torch SDPA.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F

from megatron.core import parallel_state
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module

from kernels.sparse_mla import sparse_mla

from .layers import sum_gradient_over_tp
from .rope import MLARotary, apply_mla_rope, softmax_scale

Spec = Union[ModuleSpec, type, None]


@dataclass
class NSMLASelfAttentionSubmodules:
    """Layers of one NSMLA attention block (names as megatron's MLA)."""

    linear_q_proj: Spec = None  # hidden -> heads*(qk_head_dim+rope), when q_lora_rank is None
    linear_q_down_proj: Spec = None  # hidden -> q_lora_rank (replicated)
    q_layernorm: Spec = None
    linear_q_up_proj: Spec = None  # q_lora_rank -> heads*(qk_head_dim+rope), column parallel
    linear_kv_down_proj: Spec = None  # hidden -> kv_lora_rank + rope (replicated)
    kv_layernorm: Spec = None
    linear_kv_up_proj: Spec = None  # kv_lora_rank -> heads*(qk_head_dim+v_head_dim), column parallel
    linear_proj: Spec = None  # heads*v_head_dim -> hidden, row parallel
    indexer: Spec = None  # NativeIndexer for sparse layers, None for dense ones


class NSMLASelfAttention(MegatronModule):
    """MLA self-attention with an optional top-k sparse core.

    `variant` is 'nsmla' (sparse, needs an indexer) or 'dense'; the weights are the same either way,
    so a checkpoint moves between the two unchanged.
    """

    def __init__(
        self,
        config,
        submodules: NSMLASelfAttentionSubmodules,
        layer_number: int,
        attn_mask_type=None,
        variant: Optional[str] = None,
        **_unused,
    ):
        super().__init__(config=config)
        self.layer_number = layer_number
        self.variant = variant or config.layer_variant(layer_number)
        tp = parallel_state.get_tensor_model_parallel_world_size()
        if config.num_attention_heads % tp:
            raise ValueError(
                f"--num-attention-heads ({config.num_attention_heads}) must be divisible by "
                f"--tensor-model-parallel-size ({tp})"
            )
        self.heads = config.num_attention_heads // tp
        self.qk_nope = config.qk_head_dim
        self.qk_rope = config.qk_pos_emb_head_dim
        self.v_dim = config.v_head_dim
        self.kv_rank = config.kv_lora_rank
        self.softmax_scale = softmax_scale(config)
        self.rotary = MLARotary(config)
        q_dim = config.num_attention_heads * (self.qk_nope + self.qk_rope)
        linear = dict(config=config, init_method=config.init_method, bias=config.add_bias_linear)
        column = dict(linear, gather_output=False, skip_bias_add=False, is_expert=False)

        if config.q_lora_rank is None:
            self.linear_q_proj = build_module(submodules.linear_q_proj, config.hidden_size, q_dim, **column)
        else:
            self.linear_q_down_proj = build_module(
                submodules.linear_q_down_proj, config.hidden_size, config.q_lora_rank, **linear
            )
            self.q_layernorm = build_module(
                submodules.q_layernorm, config=config, hidden_size=config.q_lora_rank, eps=config.layernorm_epsilon
            )
            self.linear_q_up_proj = build_module(submodules.linear_q_up_proj, config.q_lora_rank, q_dim, **column)
        self.linear_kv_down_proj = build_module(
            submodules.linear_kv_down_proj, config.hidden_size, self.kv_rank + self.qk_rope, **linear
        )
        self.kv_layernorm = build_module(
            submodules.kv_layernorm, config=config, hidden_size=self.kv_rank, eps=config.layernorm_epsilon
        )
        self.linear_kv_up_proj = build_module(
            submodules.linear_kv_up_proj,
            self.kv_rank,
            config.num_attention_heads * (self.qk_nope + self.v_dim),
            **column,
        )
        self.linear_proj = build_module(
            submodules.linear_proj,
            config.num_attention_heads * self.v_dim,
            config.hidden_size,
            config=config,
            init_method=config.output_layer_init_method,
            bias=config.add_bias_linear,
            input_is_parallel=True,
            skip_bias_add=True,
            is_expert=False,
        )
        self.indexer = None
        if self.variant == "nsmla":
            if submodules.indexer is None:
                raise ValueError(f"layer {layer_number}: a sparse (nsmla) layer needs an indexer submodule")
            self.indexer = build_module(submodules.indexer, config=config, softmax_scale=self.softmax_scale)
        # Set by the training loop on logging steps; the result is read back after the forward.
        self.monitor_recall = False
        self.last_recall = None

    # ---- projections -------------------------------------------------------------------------
    def project(self, hidden_states: torch.Tensor):
        """hidden [S, B, hidden] -> q_nope [S,B,H,dn], q_pe [S,B,H,dr] (rotated), c_kv [S,B,kv_rank]
        (normalised), k_pe [S,B,1,dr] (rotated)."""
        S, B, _ = hidden_states.shape
        if self.config.q_lora_rank is None:
            q, _ = self.linear_q_proj(hidden_states)
        else:
            q_c, _ = self.linear_q_down_proj(hidden_states)
            q, _ = self.linear_q_up_proj(self.q_layernorm(q_c))
        q = q.view(S, B, self.heads, self.qk_nope + self.qk_rope)
        q_nope, q_pe = q.split([self.qk_nope, self.qk_rope], dim=-1)
        kv_c, _ = self.linear_kv_down_proj(hidden_states)
        c_kv, k_pe = kv_c.split([self.kv_rank, self.qk_rope], dim=-1)
        c_kv = self.kv_layernorm(c_kv)
        cos, sin = self.rotary(S, hidden_states.device)
        q_pe = apply_mla_rope(q_pe, cos, sin)
        k_pe = apply_mla_rope(k_pe.unsqueeze(2), cos, sin)
        return q_nope, q_pe, c_kv, k_pe

    def _kv_up_weights(self):
        """Local heads' W_UK [H, dn, kv_rank] and W_UV [H, dv, kv_rank] from linear_kv_up_proj."""
        w = self.linear_kv_up_proj.weight.view(self.heads, self.qk_nope + self.v_dim, self.kv_rank)
        return w[:, : self.qk_nope], w[:, self.qk_nope :]

    # ---- cores -------------------------------------------------------------------------------
    def dense_core(self, q_nope, q_pe, c_kv, k_pe) -> torch.Tensor:
        """Non-absorbed causal MLA over all keys. Returns [S, B, H*dv]."""
        S, B = c_kv.shape[:2]
        kv, _ = self.linear_kv_up_proj(c_kv)  # column parallel: sums c_kv's grad over TP ranks
        k_nope, v = kv.view(S, B, self.heads, self.qk_nope + self.v_dim).split([self.qk_nope, self.v_dim], -1)
        k_pe = sum_gradient_over_tp(k_pe)  # replicated, used by local heads only
        q = torch.cat([q_nope, q_pe], dim=-1).permute(1, 2, 0, 3)
        k = torch.cat([k_nope, k_pe.expand(-1, -1, self.heads, -1)], dim=-1).permute(1, 2, 0, 3)
        v = v.permute(1, 2, 0, 3)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.softmax_scale)
        return out.permute(2, 0, 1, 3).reshape(S, B, self.heads * self.v_dim)

    def absorbed_inputs(self, q_nope, q_pe, c_kv, k_pe):
        """Absorbed queries [B*S, H, kv_rank+dr] and shared latent keys [B*S, kv_rank+dr], batch-major."""
        S, B = c_kv.shape[:2]
        w_uk, _ = self._kv_up_weights()
        q_lat = torch.einsum("sbhd,hdc->sbhc", q_nope, w_uk.to(q_nope.dtype))
        q_abs = torch.cat([q_lat, q_pe.to(q_lat.dtype)], dim=-1)
        kv_abs = torch.cat([c_kv, k_pe.squeeze(2).to(c_kv.dtype)], dim=-1)
        kv_abs = sum_gradient_over_tp(kv_abs)  # replicated, used by local heads only
        q_abs = q_abs.transpose(0, 1).reshape(B * S, self.heads, -1)
        kv_abs = kv_abs.transpose(0, 1).reshape(B * S, -1)
        return q_abs, kv_abs

    def absorbed_core(self, q_abs, kv_abs, indices, S: int, B: int) -> torch.Tensor:
        """Attention of q_abs over the kv_abs rows named by indices [B*S, k]. Returns [S, B, H*dv]."""
        out_lat, _lse = sparse_mla(q_abs, kv_abs, indices, self.softmax_scale, self.kv_rank,
                                   self.config.backend_for(q_abs.device))
        _, w_uv = self._kv_up_weights()
        out = torch.einsum("thc,hvc->thv", out_lat, w_uv.to(out_lat.dtype))
        return out.reshape(B, S, self.heads * self.v_dim).transpose(0, 1)

    def sparse_core(self, q_nope, q_pe, c_kv, k_pe) -> torch.Tensor:
        S, B = c_kv.shape[:2]
        q_abs, kv_abs = self.absorbed_inputs(q_nope, q_pe, c_kv, k_pe)
        indices = self.indexer(q_abs, kv_abs, B, S)
        if self.monitor_recall:
            self.last_recall = self.indexer.recall(q_abs, kv_abs, indices, S)
        return self.absorbed_core(q_abs, kv_abs, indices, S, B)

    def forward(self, hidden_states, attention_mask=None, inference_context=None, packed_seq_params=None, **_):
        """hidden_states [S, B, hidden] -> (output [S, B, hidden], bias or None). Causal masking is
        implied (the attention mask megatron passes is not needed)."""
        if inference_context is not None or packed_seq_params is not None:
            raise NotImplementedError("NSMLA attention supports neither KV-cache inference nor packed_seq_params yet")
        parts = self.project(hidden_states)
        core = self.sparse_core(*parts) if self.variant == "nsmla" else self.dense_core(*parts)
        return self.linear_proj(core)
