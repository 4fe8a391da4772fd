"""prob_sum's Gluon passes (kernels/native_topk/gluon_prob_sum.py) against the Triton ones and fp32.

GPU (Hopper) only: Gluon has no CPU interpreter. The whole op with these passes inside is
checked against the reference by test_native_topk_triton.py's prob_sum cases on the GPU.
- lse: |gluon - fp32 torch| <= 2e-5 and |gluon - triton| <= 2e-5 (log2 units; both kernels sum
  fp32 exp2 terms in different orders, measured about 3e-6).
- main pass: with the same lse2 and write thresholds, each row's candidates equal the Triton
  pass's (same keys, ascending, same count) except keys whose score lies within 1e-5 x H of the
  threshold (the two sum the heads' probabilities in different orders); the scores of the common
  keys agree within 1e-5 relative.
- sample passes (gluon_sample.py): see test_gluon_sample_passes_match_triton.
"""

import pytest
import torch

import kernels.native_topk.streaming as streaming
from kernels.native_topk import gluon_sample
from kernels.native_topk.gluon_prob_sum import main_pass_supported
from tests.conftest import fresh_seed

HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9
pytestmark = pytest.mark.skipif(not HOPPER, reason="the Gluon prob_sum passes need a Hopper GPU (no CPU interpreter)")

# (T, L, H, k, row_base, q_offset): odd T and L, ragged tiles, q_offset > 0, H not a power of two
# (lse only), 32 to 128 heads (a token's rows across warps; 128: one token a program).
SHAPES = [(37, 1031, 16, 64, 5, 0), (300, 300, 8, 64, 100, 0), (129, 3000, 128, 256, 0, 0),
          (1000, 4000, 16, 512, 100, 2500), (700, 2000, 3, 128, 64, 1000), (513, 5000, 40, 128, 1, 4000),
          (2000, 2000, 4, 64, 100, 0), (600, 5000, 1, 512, 50, 4000), (4096, 4096, 16, 512, 1024, 0),
          (257, 2500, 32, 128, 3, 700), (200, 3100, 64, 256, 10, 0)]


def _inputs(T, L, H):
    gen = torch.Generator(device="cuda").manual_seed(fresh_seed())
    q = torch.randn(T, H, 576, device="cuda", dtype=torch.bfloat16, generator=gen)
    kv = torch.randn(L, 576, device="cuda", dtype=torch.bfloat16, generator=gen)
    return q, kv, 576**-0.5


def _runner(q, kv, scale, row_base, q_offset, gluon, lse2=None):
    cfg = streaming.default_config("prob_sum")
    A = streaming._operand(q, kv, "prob_sum", streaming._d_pad(kv.shape[1], cfg))
    rows = torch.arange(row_base, q.shape[0], device="cuda", dtype=torch.int32)
    streaming.GLUON_PROB_SUM = gluon
    try:
        return streaming._Rows(A, kv, rows, q_offset, scale, "prob_sum", cfg, lse2=lse2, row_base=row_base)
    finally:
        streaming.GLUON_PROB_SUM = True


def _lse2_fp32(q, kv, scale_log2, toks, q_offset):
    out = []
    for s in range(0, toks.numel(), 128):
        t = toks[s : s + 128]
        x = torch.einsum("thd,ld->thl", q[t].float(), kv.float()) * scale_log2
        n = (t + q_offset + 1).clamp(max=kv.shape[0])
        x = x.masked_fill(torch.arange(kv.shape[0], device="cuda")[None, None, :] >= n[:, None, None], float("-inf"))
        out.append(torch.logsumexp(x * 0.6931471805599453, -1) / 0.6931471805599453)
    return torch.cat(out)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}-L{}-H{}-k{}-base{}-off{}".format(*s))
def test_gluon_lse_matches_triton_and_fp32(shape):
    T, L, H, _, row_base, q_offset = shape
    q, kv, scale = _inputs(T, L, H)
    gluon = _runner(q, kv, scale, row_base, q_offset, True)
    assert gluon.gluon is not None
    triton_lse2 = _runner(q, kv, scale, row_base, q_offset, False).lse2
    ref = _lse2_fp32(q, kv, gluon.scale_log2, torch.arange(row_base, T, device="cuda"), q_offset)
    assert gluon.lse2.shape == ref.shape and torch.isfinite(gluon.lse2).all()
    assert (gluon.lse2 - ref).abs().max().item() <= 2e-5
    assert (gluon.lse2 - triton_lse2).abs().max().item() <= 2e-5


def _candidates(res, r, cap):
    n = min(int(res["count_w"][r]), cap)
    v = res["buf"][r, :n]
    img = (v >> 32).to(torch.int32)
    score = torch.where(img < 0, img ^ 0x7FFFFFFF, img).view(torch.float32)
    return (v & 0xFFFFFFFF).tolist(), score


@pytest.mark.parametrize("shape", [s for s in SHAPES if main_pass_supported(s[2], 128)] + [(3001, 3001, 8, 512, 512, 0)],
                         ids=lambda s: "T{}-L{}-H{}-k{}-base{}-off{}".format(*s))
def test_gluon_main_pass_matches_triton(shape):
    T, L, H, k, row_base, q_offset = shape
    q, kv, scale = _inputs(T, L, H)
    gluon = _runner(q, kv, scale, row_base, q_offset, True)
    triton = _runner(q, kv, scale, row_base, q_offset, False, lse2=gluon.lse2)
    assert triton.gluon is None
    grid, tw, _ = streaming._first_thresholds(gluon, k)
    cap = streaming.CAP * k
    got = gluon.run(2, th=grid, tw=tw, cap=cap, count=False)
    want = triton.run(2, th=grid, tw=tw, cap=cap, count=False)
    got = {key: v.cpu() for key, v in got.items()}
    want = {key: v.cpu() for key, v in want.items()}
    tw = tw.cpu()
    tol = 1e-5 * H
    swapped = 0
    for r in range(tw.numel()):
        gk, gs = _candidates(got, r, cap)
        wk, ws = _candidates(want, r, cap)
        assert gk == sorted(gk), f"row {r}: candidates not in ascending key order"
        if gk == wk:
            assert torch.allclose(gs, ws, rtol=1e-5, atol=0), f"row {r}: scores differ"
            assert int(got["count_w"][r]) == int(want["count_w"][r])
            continue
        # only keys at the threshold may differ
        swapped += 1
        gd, wd = dict(zip(gk, gs.tolist())), dict(zip(wk, ws.tolist()))
        for key in set(gk) ^ set(wk):
            s = gd.get(key, wd.get(key))
            assert abs(s - float(tw[r])) <= tol, f"row {r}: key {key} (score {s}) differs, threshold {float(tw[r])}"
    assert swapped <= max(1, tw.numel() // 100), f"{swapped} rows differ near their threshold"


def _sampled_scores_fp32(q, kv, lse2, scale_log2, toks, q_offset, key_step):
    """prob_sum scores [R, n sampled keys] of keys 0, key_step, 2 key_step, ... in fp32 torch, with the
    runner's lse2 [R, H]; keys past a token's causal bound are -inf."""
    keys = torch.arange(0, kv.shape[0], key_step, device="cuda")
    out = []
    for s in range(0, toks.numel(), 128):
        t = toks[s : s + 128]
        x = torch.einsum("thd,ld->thl", q[t].float(), kv[keys].float()) * scale_log2
        score = torch.exp2(x - lse2[s : s + 128, :, None]).sum(1)
        n = (t + q_offset + 1).clamp(max=kv.shape[0])
        out.append(score.masked_fill(keys[None, :] >= n[:, None], float("-inf")))
    return torch.cat(out)


SAMPLE_SHAPES = [s for s in SHAPES if s[2] in gluon_sample.SAMPLE_HEADS] + [(2000, 9000, 16, 2048, 100, 5000)]


@pytest.mark.parametrize("shape", SAMPLE_SHAPES, ids=lambda s: "T{}-L{}-H{}-k{}-base{}-off{}".format(*s))
def test_gluon_sample_passes_match_triton(shape):
    """Gluon sample passes (gluon_sample.py) against the Triton ones with the same lse2.
    - stats: sample sizes equal; sums, sums of squares and max within 1e-5 relative;
    - counts at the same thresholds: a count may differ from the Triton pass's only by keys whose
      fp32 score lies within 1e-5 x H of that threshold (the passes sum the heads in different
      orders; the grid's top threshold is often a sampled score itself);
    - the thresholds the driver gets from these passes select the same top-k as with the Triton
      passes (the whole op, both ways)."""
    T, L, H, k, row_base, q_offset = shape
    q, kv, scale = _inputs(T, L, H)
    r = _runner(q, kv, scale, row_base, q_offset, True)
    qa = r.A.transpose(0, 1)
    step0 = min(streaming.STATS_STEP, max(streaming.SAMPLE_STEP, k // 32))
    target = streaming.TARGET * k
    grid = torch.empty(r.R, streaming.SAMPLE_GRID, device="cuda")
    std = torch.empty(r.R, device="cuda")
    ref = r.run(0, key_step=step0, aim=(target, grid, std))["stats"]
    got = gluon_sample.sample_pass_gluon(qa, kv, r.lse2, row_base, r.R, q_offset, r.scale_log2, step0)
    assert torch.equal(got[:, 0], ref[:, 0])
    for c in (1, 2, 3):
        assert ((got[:, c] - ref[:, c]).abs() <= 1e-5 * ref[:, c].abs()).all(), c

    ref_c = r.run(1, key_step=streaming.SAMPLE_STEP, th=grid)["counts"]
    cnt = gluon_sample.sample_pass_gluon(qa, kv, r.lse2, row_base, r.R, q_offset, r.scale_log2,
                                         streaming.SAMPLE_STEP, th=grid)
    assert cnt.shape == ref_c.shape and cnt.dtype == ref_c.dtype
    diff = (cnt - ref_c).abs()
    toks = torch.arange(row_base, T, device="cuda")
    scores = _sampled_scores_fp32(q, kv, r.lse2.reshape(r.R, H), r.scale_log2, toks, q_offset, streaming.SAMPLE_STEP)
    near = ((scores[:, None, :] - grid[:, :, None]).abs() <= 1e-5 * H).sum(2)  # [R, J]
    bad = diff > near
    assert not bad.any(), f"{int(bad.sum())} counts differ by more than their near-threshold keys"

    streaming.GLUON_SAMPLE = False
    try:
        want = streaming.native_topk_triton(q, kv, k, "prob_sum", scale, q_offset=q_offset)
    finally:
        streaming.GLUON_SAMPLE = True
    have = streaming.native_topk_triton(q, kv, k, "prob_sum", scale, q_offset=q_offset)
    assert torch.equal(torch.sort(have, 1).values, torch.sort(want, 1).values)
