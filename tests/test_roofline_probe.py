"""The benchmarks' memory probes must move the bytes they stand for: the gather probe
(benchmarks/roofline.py) reads every selected row, and the dK/dV traffic probe
(benchmarks/roofline_dkv.py) reads and adds what the Gluon dK/dV pass does; their sums and adds equal
torch's. CPU: TRITON_INTERPRET=1 at small shapes; GPU: DeepSeek widths."""

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


def test_dkv_traffic_probe_moves_the_pass_bytes():
    """benchmarks/roofline_dkv.py's traffic kernel reads the q/dO slab and every P/dS tile of the
    token's slot range, and adds into exactly the range's selected rows: its sums and adds equal
    torch's, in each mode."""
    from roofline_dkv import _dkv_traffic_kernel

    gen = torch.Generator().manual_seed(fresh_seed())
    T, H, L, k, c0 = (37, 128, 3001, 2048 + 5, 384) if DEVICE == "cuda" else (3, 4, 300, 130, 384)
    kp = -(-k // 64) * 64
    q = torch.randn(T, H, 576, generator=gen).bfloat16()
    dout = torch.randn(T, H, 512, generator=gen).bfloat16()
    p = torch.randn(T, H, kp, generator=gen).bfloat16()
    ds = torch.randn(T, H, kp, generator=gen).bfloat16()
    idx = torch.stack([torch.randperm(L, generator=gen)[:k] for _ in range(T)]).int()
    idx[torch.rand(T, k, generator=gen) < 0.2] = -1
    # a range of slots per token, not aligned to the 64-slot blocks
    lo = torch.randint(0, k // 2, (T,), generator=gen)
    hi = torch.randint(k // 2 + 1, k + 1, (T,), generator=gen)
    bounds = torch.stack([lo, hi], 1).int()
    slot = torch.arange(kp)
    in_range = (slot[None, :] >= lo[:, None]) & (slot[None, :] < hi[:, None])  # [T, kp]
    idx_p = torch.full((T, kp), -1, dtype=torch.int32)
    idx_p[:, :k] = idx
    use = in_range & (idx_p >= 0)
    cols = c0 + torch.arange(192)
    slab_sum = q.float()[:, :, cols].sum(1) + torch.where(cols < 512, dout.float()[:, :, cols.clamp(max=511)], 0).sum(1)
    head_sum = (p.float() + ds.float()).sum(1)  # [T, kp]
    blocks = (in_range.view(T, -1, 64).any(2)).repeat_interleave(64, 1)  # slots of the blocks a program visits
    for read, add in ((True, False), (False, True), (True, True)):
        dkv = torch.zeros(L, 192)
        out = torch.empty(T, 64, device=DEVICE)
        args = [x.to(DEVICE) for x in (q, dout, idx_p, p, ds, dkv, bounds)]
        _dkv_traffic_kernel[(T,)](*args, out, 0, c0, q.stride(0), q.stride(1), dout.stride(0), dout.stride(1),
                                  idx_p.stride(0), p.stride(0), p.stride(1), 192, bounds.stride(0),
                                  HP=H, D_V=512, READ=read, ADD=add, num_warps=4)
        v = head_sum if read else idx_p.float()
        if read:  # the slab's column sums, then (without adds) the head sums of whole visited blocks
            keep = slab_sum.view(T, 3, 64).sum(1)
            if not add:
                keep = keep + torch.where(blocks, v, 0).view(T, -1, 64).sum(1)
            assert_close(f"kept sums, add={add}", keep, out.cpu(), 1e-5)
        if add:
            want = torch.zeros(L, 192)
            want.index_add_(0, idx_p[use].long(), v[use][:, None].expand(-1, 192).contiguous())
            assert_close(f"adds, read={read}", want, args[5].cpu(), 1e-5)
