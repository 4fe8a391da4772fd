"""Rotary position embedding for MLA's decoupled rope dims, with no CUDA assumptions.

Layout follows DeepSeek/megatron MLA: the rope dims arrive interleaved (pairs x0 x1, x2 x3, ...)
and are regrouped to halves before rotating, so checkpoints convert to the HF layout unchanged.
"""

from __future__ import annotations

import math

import torch

from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import (
    _yarn_find_correction_range,
    _yarn_get_concentration_factor,
    _yarn_get_mscale,
    _yarn_linear_ramp_mask,
)


def softmax_scale(config) -> float:
    """1/sqrt(qk_head_dim + rope dim), times YaRN's mscale^2 when YaRN is on (as megatron's MLA)."""
    scale = 1.0 / math.sqrt(config.qk_head_dim + config.qk_pos_emb_head_dim)
    if config.rope_type == "yarn":
        mscale = _yarn_get_mscale(config.rotary_scaling_factor, config.mscale_all_dim)
        scale *= mscale * mscale
    return scale


class MLARotary(torch.nn.Module):
    """cos/sin tables [S, dim] for positions offset .. offset+S-1 (plain RoPE or YaRN)."""

    def __init__(self, config):
        super().__init__()
        self.dim = config.qk_pos_emb_head_dim
        self.config = config
        base = config.rotary_base
        exponent = torch.arange(0, self.dim, 2, dtype=torch.float64) / self.dim
        inv_freq = 1.0 / (base**exponent)
        self.mscale = 1.0
        if config.rope_type == "yarn":
            low, high = _yarn_find_correction_range(
                config.beta_fast, config.beta_slow, self.dim, base, config.original_max_position_embeddings
            )
            extrapolate = 1.0 - _yarn_linear_ramp_mask(low, high, self.dim // 2, device="cpu").double()
            inv_freq = inv_freq / config.rotary_scaling_factor * (1 - extrapolate) + inv_freq * extrapolate
            self.mscale = float(
                _yarn_get_concentration_factor(config.rotary_scaling_factor, config.mscale, config.mscale_all_dim)
            )
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)

    def forward(self, seq_len: int, device: torch.device, offset: int = 0):
        pos = torch.arange(offset, offset + seq_len, device=device, dtype=torch.float32)
        freqs = torch.outer(pos, self.inv_freq.to(device))
        emb = torch.cat((freqs, freqs), dim=-1)
        return torch.cos(emb) * self.mscale, torch.sin(emb) * self.mscale


def apply_mla_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [S, B, N, dim] interleaved; cos/sin [S, dim]. Returns the rotated x in half-split layout."""
    x = torch.cat((x[..., 0::2], x[..., 1::2]), dim=-1)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    cos = cos[:, None, None, :].to(x.dtype)
    sin = sin[:, None, None, :].to(x.dtype)
    return x * cos + rotated * sin
