"""Helpers shared by the Triton kernels of every op."""

from __future__ import annotations

import os

import triton
import triton.language as tl

LOG2E = 1.4426950408889634


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1 (the CPU path CI uses to run the kernels)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def dot(a, b, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr, acc=None):
    """tl.dot with fp32 accumulation (into acc when given). Under the interpreter 16-bit tl.dot is
    not reliable, so the launchers pass DOT_FP32=True there and the operands are widened first."""
    if DOT_FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=PRECISION)
    return tl.dot(a, b, acc, input_precision=PRECISION)
