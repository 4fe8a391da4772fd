"""Gluon names that differ between the device's triton 3.6 and later versions (3.9 on the CPU machine),
resolved once for the Gluon kernels of kernels/."""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import tma

# cp.async into shared memory: `async_copy_global_to_shared` up to 3.6, `async_load` later (3.9
# raises on the old name).
cp_async = getattr(async_copy, "async_load", None) or async_copy.async_copy_global_to_shared
# TMA load into shared memory: renamed the same way.
tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
# A barrier among the calling partition's warps: `thread_barrier` up to 3.6, `barrier` later.
sync_warps = getattr(gl, "thread_barrier", None) or gl.barrier


# A shared buffer's bytes under another type and shape: `_reinterpret` up to 3.6, `reinterpret` later
# (3.9 has no `_reinterpret`).
if hasattr(gl.shared_memory_descriptor, "reinterpret"):
    @gluon.jit
    def reinterpret(buf, dtype: gl.constexpr, shape: gl.constexpr, layout: gl.constexpr):
        return buf.reinterpret(dtype, shape, layout)
else:
    @gluon.jit
    def reinterpret(buf, dtype: gl.constexpr, shape: gl.constexpr, layout: gl.constexpr):
        return buf._reinterpret(dtype, shape, layout)
