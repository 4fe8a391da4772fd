"""The one typed NSMLA config: megatron-core's MLA config plus the sparse-attention knobs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megatron.core.transformer.transformer_config import MLATransformerConfig

from kernels.native_topk import SCORING_MODES

# The Triton native top-k pays fixed costs per call (sample passes, host syncs, retries) that only
# long rows amortise. On an H100 against score GEMM + torch.topk: 0.14x at 4096 keys (k 512),
# 1.35x at 32768 (k 2048) (kernels/native_topk/NOTES.md). `auto` uses it from this length on.
TRITON_TOPK_MIN_KEYS = 32768

ATTENTION_VARIANTS = ("nsmla", "dense")
KERNEL_BACKENDS = ("auto", "reference", "triton")
# One letter per layer in --nsmla-layer-pattern.
PATTERN_LETTERS = {"S": "nsmla", "D": "dense"}


@dataclass
class NSMLAConfig(MLATransformerConfig):
    """MLA transformer config for natively sparse MLA. Validation messages name the CLI flag."""

    attention_variant: str = "nsmla"
    """Attention of every layer unless `layer_pattern` is set: `nsmla` (top-k sparse) or `dense`
    (--nsmla-attention)."""

    layer_pattern: Optional[str] = None
    """Per-layer attention, one letter a layer: `S` sparse, `D` dense, e.g. `DSSS`
    (--nsmla-layer-pattern). Length must equal num_layers."""

    index_topk: int = 2048
    """Keys each query attends to in sparse layers (--nsmla-topk)."""

    native_scoring: str = "logit_sum"
    """Native indexer scoring: `logit_sum` (sum over heads of q_h.k) or `prob_sum` (sum over heads of
    softmax probabilities) (--nsmla-scoring)."""

    kernel_backend: str = "auto"
    """Implementation of the sparse attention and the native indexer (--nsmla-kernel-backend):
    `reference` (PyTorch), `triton`, or `auto`: triton on CUDA tensors when the latent sizes suit
    the kernels (powers of two >= 16), the reference otherwise (CPU)."""

    recall_sample_rows: int = 32
    """Query rows per sequence sampled to measure the indexer's recall when monitoring is on
    (--nsmla-recall-rows); 0 disables it."""

    def _triton_sizes(self):
        return (("--kv-lora-rank", self.kv_lora_rank), ("--qk-pos-emb-head-dim", self.qk_pos_emb_head_dim))

    def backend_for(self, device) -> str:
        """The implementation (`reference` or `triton`) that runs on `device` under kernel_backend."""
        if self.kernel_backend != "auto":
            return self.kernel_backend
        sizes_ok = all(v >= 16 and not v & (v - 1) for _, v in self._triton_sizes())
        return "triton" if device.type == "cuda" and sizes_ok else "reference"

    def indexer_backend_for(self, device, num_keys: int) -> str:
        """backend_for, except that `auto` keeps the reference top-k for sequences shorter than
        TRITON_TOPK_MIN_KEYS, where the Triton streaming top-k loses (fixed costs per call)."""
        backend = self.backend_for(device)
        if self.kernel_backend == "auto" and num_keys < TRITON_TOPK_MIN_KEYS:
            return "reference"
        return backend

    def __post_init__(self):
        super().__post_init__()
        if self.attention_variant not in ATTENTION_VARIANTS:
            raise ValueError(
                f"--nsmla-attention must be one of {ATTENTION_VARIANTS}, got {self.attention_variant!r}"
            )
        if self.layer_pattern is not None:
            bad = sorted(set(self.layer_pattern) - set(PATTERN_LETTERS))
            if bad or len(self.layer_pattern) != self.num_layers:
                raise ValueError(
                    f"--nsmla-layer-pattern must have one letter per layer ({self.num_layers}) from "
                    f"{sorted(PATTERN_LETTERS)} (S sparse, D dense), got {self.layer_pattern!r}"
                )
        if self.index_topk <= 0:
            raise ValueError(f"--nsmla-topk must be a positive integer, got {self.index_topk}")
        if self.native_scoring not in SCORING_MODES:
            raise ValueError(f"--nsmla-scoring must be one of {SCORING_MODES}, got {self.native_scoring!r}")
        if self.kernel_backend not in KERNEL_BACKENDS:
            raise ValueError(
                f"--nsmla-kernel-backend must be one of {KERNEL_BACKENDS}, got {self.kernel_backend!r}"
            )
        if self.kernel_backend == "triton":
            for flag, value in self._triton_sizes():
                if value < 16 or value & (value - 1):
                    raise ValueError(
                        f"--nsmla-kernel-backend triton needs {flag} to be a power of two >= 16 (DeepSeek: 512 "
                        f"and 64), got {value}; use --nsmla-kernel-backend reference for other sizes"
                    )
        if self.recall_sample_rows < 0:
            raise ValueError(f"--nsmla-recall-rows must be >= 0, got {self.recall_sample_rows}")
        if self.rope_type not in ("rope", "yarn"):
            raise ValueError(f"--rope-type must be 'rope' or 'yarn', got {self.rope_type!r}")
        if self.attention_dropout != 0.0:
            raise ValueError(
                f"--attention-dropout must be 0 for NSMLA (sparse attention has no dropout), got {self.attention_dropout}"
            )
        for flag, value in (
            ("--kv-lora-rank", self.kv_lora_rank),
            ("--qk-head-dim", self.qk_head_dim),
            ("--v-head-dim", self.v_head_dim),
        ):
            if value <= 0:
                raise ValueError(f"{flag} must be positive, got {value}")
        if self.qk_pos_emb_head_dim <= 0 or self.qk_pos_emb_head_dim % 2:
            raise ValueError(
                f"--qk-pos-emb-head-dim must be a positive even number (RoPE rotates pairs), got {self.qk_pos_emb_head_dim}"
            )
        if self.q_lora_rank is not None and self.q_lora_rank <= 0:
            raise ValueError(f"--q-lora-rank must be positive or unset, got {self.q_lora_rank}")

    def layer_variant(self, layer_number: int) -> str:
        """Attention variant of a layer (1-based layer_number, as megatron numbers layers)."""
        if self.layer_pattern is None:
            return self.attention_variant
        return PATTERN_LETTERS[self.layer_pattern[layer_number - 1]]
