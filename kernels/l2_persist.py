"""A persisting L2 window for the kernels launched inside a `with` block (CUDA access policy window).

Why: the sparse MLA backward's dK/dV pass adds fp32 rows into a 25 MB slab of dkv (L 32k) while
it streams gigabytes of P/dS through L2, which evicts the slab: on an H100 half of its atomic
adds missed L2. Marking the slab persisting keeps it resident (kernels/sparse_mla/NOTES.md,
twelfth round: the pass went from 12.6 to 9.5 ms at h128).

The CUDA runtime calls go through ctypes to the libcudart that torch has loaded (torch exposes no
access-policy API). The persisting set-aside is device-wide and slows kernels that do not use it
(measured: the same pass without a window 23 ms instead of 12.6 while the set-aside was on), so
it is only set for the duration of the block and then returned to its previous size, and the
persisting lines are reset to normal. Where the runtime cannot be reached, the device has no
persisting L2, or the stream is being captured into a CUDA graph, the block runs without a window.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools

import torch

_LIMIT_PERSISTING_L2 = 0x06          # cudaLimitPersistingL2CacheSize
_ATTR_MAX_PERSISTING_L2 = 108        # cudaDevAttrMaxPersistingL2CacheSize
_ATTR_MAX_WINDOW = 109               # cudaDevAttrMaxAccessPolicyWindowSize
_STREAM_ATTR_ACCESS_POLICY = 1       # cudaStreamAttributeAccessPolicyWindow
_PERSISTING, _STREAMING, _NORMAL = 2, 1, 0  # cudaAccessProperty


class _AccessPolicyWindow(ctypes.Structure):
    # cudaAccessPolicyWindow, padded to the size of the cudaStreamAttrValue union it is passed as.
    _fields_ = [("base_ptr", ctypes.c_void_p), ("num_bytes", ctypes.c_size_t), ("hitRatio", ctypes.c_float),
                ("hitProp", ctypes.c_int), ("missProp", ctypes.c_int), ("_pad", ctypes.c_char * 32)]


@functools.lru_cache(maxsize=1)
def _cudart():
    """The libcudart that this process has loaded (Linux), or None."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "libcudart.so" in line}
    except OSError:
        return None
    for path in sorted(paths):
        try:
            return ctypes.CDLL(path)
        except OSError:
            continue
    return None


def _device_attribute(attribute: int, device: int) -> int:
    """A cudaDeviceGetAttribute value (0 where there is no runtime or the call fails)."""
    rt = _cudart()
    if rt is None:
        return 0
    value = ctypes.c_int()
    if rt.cudaDeviceGetAttribute(ctypes.byref(value), attribute, device) != 0:
        return 0
    return max(0, value.value)


@functools.lru_cache(maxsize=None)
def max_persisting_bytes(device: int) -> int:
    """The device's largest persisting L2 set-aside in bytes (0 where there is none or no runtime)."""
    return _device_attribute(_ATTR_MAX_PERSISTING_L2, device)


@functools.lru_cache(maxsize=None)
def max_window_bytes(device: int) -> int:
    """The largest access-policy window the device takes, in bytes (134,217,728 on the H100)."""
    return _device_attribute(_ATTR_MAX_WINDOW, device)


class _Window:
    def __init__(self, rt, stream: torch.cuda.Stream, limit: int, max_window: int):
        self._rt, self._stream, self.limit = rt, ctypes.c_void_p(stream.cuda_stream), limit
        self._max_window = max_window

    def cover(self, t: torch.Tensor) -> None:
        """Later launches on the stream keep t's bytes in L2 (the fraction that fits the set-aside).
        A tensor larger than the device's largest window is covered from its start up to that size:
        asking for more fails, and the failure would surface as an unrelated error in the next
        CUDA call of torch."""
        nbytes = min(t.numel() * t.element_size(), self._max_window)
        window = _AccessPolicyWindow(t.data_ptr(), nbytes, min(1.0, self.limit / max(nbytes, 1)), _PERSISTING,
                                     _STREAMING)
        self._set(window)

    def clear(self) -> None:
        self._set(_AccessPolicyWindow(None, 0, 0.0, _NORMAL, _NORMAL))

    def _set(self, window: _AccessPolicyWindow) -> None:
        code = self._rt.cudaStreamSetAttribute(self._stream, _STREAM_ATTR_ACCESS_POLICY, ctypes.byref(window))
        if code != 0:
            self._rt.cudaGetLastError()  # clear it, so that torch's next check does not report it
            raise RuntimeError(f"cudaStreamSetAttribute(access policy window of {window.num_bytes} bytes) "
                               f"failed with CUDA error {code}")


@contextlib.contextmanager
def persisting_l2(device: torch.device):
    """Yields an object whose cover(t) marks tensor t persisting in L2 for the kernels launched after
    it on the current stream, until the block ends; or None where no window can be had (see the
    module docstring), so that callers fall back to their plain launch. The set-aside is a limit of
    the calling thread's current device, which must be `device` (one device per process, as
    Megatron's launch sets it)."""
    rt = _cudart()
    index = device.index if device.index is not None else torch.cuda.current_device()
    limit, max_window = max_persisting_bytes(index), max_window_bytes(index)
    if rt is None or limit == 0 or max_window == 0 or torch.cuda.is_current_stream_capturing():
        yield None
        return
    old = ctypes.c_size_t()
    if rt.cudaDeviceGetLimit(ctypes.byref(old), _LIMIT_PERSISTING_L2) != 0 or \
            rt.cudaDeviceSetLimit(_LIMIT_PERSISTING_L2, ctypes.c_size_t(limit)) != 0:
        yield None
        return
    window = _Window(rt, torch.cuda.current_stream(device), limit, max_window)
    try:
        yield window
    finally:
        window.clear()
        rt.cudaCtxResetPersistingL2Cache()
        rt.cudaDeviceSetLimit(_LIMIT_PERSISTING_L2, old)
