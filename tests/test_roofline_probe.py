"""The benchmarks' gather probe (benchmarks/roofline.py) must read every selected row: its
per-token sums equal torch's. CPU: TRITON_INTERPRET=1 at a small shape; GPU: a DeepSeek-width one."""

import os
import sys

import torch

from tests.conftest import assert_close, fresh_seed

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
from roofline import _gather_rows_kernel  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_gather_probe_sums_every_selected_row():
    gen = torch.Generator().manual_seed(fresh_seed())
    T, L, d_v, d_rope, k, block_k = (37, 3001, 512, 64, 2048 + 5, 64) if DEVICE == "cuda" else (5, 70, 32, 16, 37, 16)
    kv = torch.randn(L, d_v + d_rope, generator=gen)
    idx = torch.randint(0, L, (T, k), generator=gen, dtype=torch.int32)
    idx[torch.rand(T, k, generator=gen) < 0.25] = -1
    ref = torch.where(idx[..., None] >= 0, kv[idx.clamp(min=0).long()], 0.0).sum((1, 2))
    out = torch.empty(T, device=DEVICE)
    kv_d, idx_d = kv.to(DEVICE), idx.to(DEVICE)
    _gather_rows_kernel[(T,)](kv_d, idx_d, out, k, kv_d.stride(0), idx_d.stride(0), D_V=d_v, D_ROPE=d_rope,
                              BLOCK_K=block_k)
    assert_close("gather sums", ref, out.cpu(), 1e-5)
