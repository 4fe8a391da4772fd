"""Shared test helpers: relative-error assertion and a one-process megatron parallel state."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

# Triton kernels run on the CPU through Triton's interpreter. It must be chosen before any kernel
# module is imported (triton.jit reads it at decoration time).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")


def rel_err(ref: torch.Tensor, out: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64."""
    ref, out = ref.detach().double(), out.detach().double()
    return float((out - ref).norm() / ref.norm().clamp(min=1e-30))


def assert_close(name: str, ref: torch.Tensor, out: torch.Tensor, ratio: float) -> None:
    assert ref.shape == out.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    err = rel_err(ref, out)
    assert err <= ratio, f"{name}: ||out-ref||/||ref|| = {err:.3e} > {ratio:.1e}"


@pytest.fixture
def single_process():
    """torch.distributed (gloo, world 1) and megatron parallel state with TP=1, torn down after."""
    from megatron_ext import distributed

    os.environ.pop("RANK", None)
    distributed.initialize(0, 1, torch.device("cpu"), tp=1)
    yield
    distributed.shutdown()


def fresh_seed() -> int:
    """A new seed per call so every run draws new inputs; printed so a failure can be replayed."""
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"seed={seed}")
    return seed
