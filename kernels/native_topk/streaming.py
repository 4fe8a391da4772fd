"""Host driver of the Triton native top-k: thresholds, candidate buffers, retries, fallback.

For the rows with more than k causal keys (the others take every causal key):
1. prob_sum only: per-head log-sum-exp over the causal keys (`_lse_kernel`; on Hopper, for bf16
   q and kv, the Gluon kernel of gluon_prob_sum.py, which also takes the first main pass of step 3
   for 8 to 128 heads, powers of two: `gluon_prob_sum_for`).
2. Sample passes: mean/std/max over every `STATS_STEP`-th key, then counts over every
   `SAMPLE_STEP`-th key at a `SAMPLE_GRID`-point grid (points around the quantile k would sit at
   for normal scores, and points between the mean and the max). Scaled to the full row, the counts
   give a write threshold `tw` expected to keep about `TARGET` x k keys.
3. Main pass over all keys: every key scoring >= tw written (score, index) to a per-row buffer of
   `cap` = CAP x k slots, and the exact count of keys >= tw.
4. Rows with k <= count(>= tw) <= cap hold all of their top-k in the buffer: `_select_kernel`
   picks it exactly, skipping the others, so steps 1-4 of every chunk of rows are queued with no
   host sync. Then the other rows (about 1 in 50,000 on random data) get exact counts at 16 of the
   sample's thresholds from a counting pass over just them, and go again (step 3) with a threshold
   taken from those counts; retried main passes count at their own 16 thresholds as they go.
   A bracket [a, b) with count(>= a) >= k > count(>= b) narrows 17-fold per try, and once
   count(>= a) <= cap, tw = a succeeds. After MAX_TRIES the row is done by the reference (only
   possible when more than cap - k keys tie at the k-th score).
   When the rows missing the first main pass are few (their reference score matrix, rows x L
   (x H for prob_sum), within REFERENCE_ELEMENTS), the reference does them at once instead: a
   Triton pass over a few rows runs on a few SMs and takes as long as the whole pass (at L 32k,
   prob_sum: 36 rows, about 20 ms of retries against about 1 ms of torch scoring).
The selection is exact for the scores the kernels compute; see triton_impl.py for their precision.
"""

from __future__ import annotations

import collections

import torch
import triton
from triton.tools.tensor_descriptor import TensorDescriptor

from kernels.triton_utils import LOG2E, interpreting

from .reference import (_check as check_reference_inputs, chunk_rows, logit_sum_query, native_scores_reference,
                        score_elements, topk_of_scores)
from .triton_impl import _lse_kernel, _score_pass_kernel, _select_kernel

# The counting sample is every SAMPLE_STEP-th key, counted at SAMPLE_GRID thresholds; the grid is
# placed by the mean, std and max of a sparser sample (every STATS_STEP-th key, or denser where
# topk is small: the std also sets how far retries widen, NOTES). At L 128k the
# stats at step 64 and a 16-point grid took the op from 49.5 to 43.9 ms, same output, no missed rows
# (NOTES, eighth round).
SAMPLE_STEP = 16
STATS_STEP = 64
SAMPLE_GRID = 16  # (a power of two: the kernel's count vector is tl.arange(0, J))
MAIN_GRID = 16
TARGET = 1.4  # write threshold aims at TARGET * k candidates ...
CAP = 2  # ... into CAP * k buffer slots
MAX_TRIES = 6
REFERENCE_ELEMENTS = 1 << 25  # score elements up to which missed rows go to the reference
# Candidate buffers of one chunk of rows (64k rows at k = 2048). 2 GiB rather than 1: L 64k in one
# chunk took 13.2-13.4 against 13.8-14.1 ms, for 1 GB more peak memory (NOTES, eighth round).
BUFFER_BYTES = 1 << 31

# prob_sum's log-sum-exp and first main pass by the Gluon kernels (gluon_prob_sum.py) where they
# take the inputs; False forces the Triton kernels (tests and benchmarks compare the two).
GLUON_PROB_SUM = True
# prob_sum's sample passes by the Gluon kernels (gluon_sample.py) where the Gluon passes run and H is in
# gluon_sample.SAMPLE_HEADS; False keeps the Triton sample passes (tests compare the two).
GLUON_SAMPLE = True

# Rows that needed main pass number i (key i) or went to the reference ("reference": few rows
# missing the first pass, or unresolved after MAX_TRIES), since import; benchmarks print it to
# show how often the first threshold misses on their data.
PASS_COUNTS: collections.Counter = collections.Counter()


def default_config(mode: str, kv_dtype: torch.dtype = torch.bfloat16) -> dict:
    """Tile sizes of the scoring passes (BM rows x BN keys, D in DC-wide chunks)."""
    if interpreting():
        return dict(BM=16, BN=16, DC=32, num_warps=4, num_stages=1)
    # Best of `benchmarks/profile_native_topk.py` on an H100 (kernels/native_topk/NOTES.md).
    if mode == "prob_sum":
        return dict(BM=128, BN=128, DC=64, num_warps=8, num_stages=3)
    if kv_dtype == torch.float32:  # 4-byte operands: the 16-bit tiles would exceed shared memory
        return dict(BM=64, BN=128, DC=64, num_warps=8, num_stages=3)
    return dict(BM=128, BN=128, DC=64, num_warps=8, num_stages=4)


def _check(q: torch.Tensor, kv: torch.Tensor, topk: int, mode: str) -> None:
    """The reference's checks (mode, shapes, topk), then what the kernels add: device and dtype."""
    check_reference_inputs(q, kv, mode, topk)
    if not (q.is_cuda or interpreting()) or q.device != kv.device:
        raise ValueError("native_topk (triton): q and kv must be on the same CUDA device (or set TRITON_INTERPRET=1)")
    if kv.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"native_topk (triton): kv must be bf16, fp16 or fp32, got {kv.dtype}")


def _operand(q: torch.Tensor, kv: torch.Tensor, mode: str, d_pad: int):
    """(A, P) in kv's dtype (see triton_impl.py): prob_sum A = q viewed [H, T, D], P = H;
    logit_sum A = [T, P * d_pad], the P parts of sum_h q side by side, zero-padded."""
    if mode == "prob_sum":  # contiguous [T, H, D] underneath, so that rows are [T, H * D] for TMA
        return q.to(kv.dtype).contiguous().transpose(0, 1), q.shape[1]
    if q.dtype == kv.dtype and d_pad == q.shape[2]:
        # The reference's sum_h q kept in q's dtype is already A: at T 32k an fp32 copy, casts,
        # zero padding and a copy took 0.15 ms of GPU time before the first pass could start.
        return logit_sum_query(q, kv.dtype), 1
    qs = logit_sum_query(q)  # the reference's sum_h q: fp32 sum rounded to q's dtype
    parts = [qs.to(kv.dtype)]
    if q.dtype != kv.dtype and kv.dtype != torch.float32:  # q wider than kv: hi + lo parts
        parts.append((qs - parts[0].float()).to(kv.dtype))
    A = torch.zeros(qs.shape[0], len(parts), d_pad, dtype=kv.dtype, device=kv.device)
    for p, part in enumerate(parts):
        A[:, p, : qs.shape[1]] = part
    return A.view(qs.shape[0], -1), len(parts)


def gluon_prob_sum_for(q: torch.Tensor, kv: torch.Tensor):
    """The module of prob_sum's Gluon passes (gluon_prob_sum.py) if it takes q [T, H, D] and kv,
    else None: when GLUON_PROB_SUM is off, under the interpreter, with a Triton without Gluon."""
    if not GLUON_PROB_SUM or interpreting():
        return None
    try:
        from . import gluon_prob_sum
    except ImportError:
        return None
    return gluon_prob_sum if gluon_prob_sum.gluon_prob_sum_supported(q, kv) else None


def _d_pad(d: int, cfg: dict) -> int:
    return triton.cdiv(d, cfg["DC"]) * cfg["DC"]


def _row_slots(cap: int, cfg: dict) -> int:
    """int64 slots of a row's candidate buffer: cap, plus BN spare ones so that the main pass's
    store needs no bound test (triton_impl `_store_candidates`)."""
    return cap + cfg["BN"]


def _tma_ok(t: torch.Tensor, strides) -> bool:
    """Whether a descriptor over t with these strides (elements, last 1) meets the copy engine's
    alignment: 16-byte base and strides."""
    size = t.element_size()
    return t.data_ptr() % 16 == 0 and strides[-1] == 1 and all(s * size % 16 == 0 for s in strides[:-1])


class _Rows:
    """Launches the passes for one set of rows (slots 0..R-1 map to query rows `rows`;
    rows == row_base + slot when row_base is not None, which lets the passes load by TMA)."""

    def __init__(self, operand, kv, rows, q_offset, scale, mode, cfg, lse2=None, row_base=None):
        self.mode, self.scale, self.row_base = mode, scale, row_base
        (self.A, self.P), self.kv, self.rows, self.q_offset, self.cfg = operand, kv, rows, q_offset, cfg
        self.prob = mode == "prob_sum"
        self.scale_log2 = scale * LOG2E
        self.R = rows.numel()
        self.d_pad = _d_pad(kv.shape[1], cfg)
        # prob_sum: A [H, T, D] (strides head, token); logit_sum: A [T, P * d_pad] (no head stride).
        self.strides = (self.A.stride(0), self.A.stride(1)) if self.prob else (0, self.A.stride(0))
        # prob_sum over rows row_base .. row_base + R - 1: the Gluon passes where they take the inputs
        self.gluon = gluon_prob_sum_for(self.A.transpose(0, 1), kv) if self.prob and row_base is not None else None
        if lse2 is not None:  # prob_sum rows whose log-sum-exp an earlier runner computed
            self.lse2 = lse2
            return
        if self.gluon is not None:
            self.lse2 = self.gluon.lse2_gluon(self.A.transpose(0, 1), kv, row_base, self.R, q_offset, self.scale_log2)
            return
        self.lse2 = torch.empty(self.R if self.prob else 1, self.P, dtype=torch.float32, device=kv.device)
        if self.prob:
            grid = (triton.cdiv(self.R, cfg["BM"]), self.P)
            _lse_kernel[grid](self.A, kv, rows, self.lse2, self.R, kv.shape[0], q_offset,
                              self.scale_log2, *self.strides, kv.stride(0), self.lse2.stride(0),
                              D=kv.shape[1], D_PAD=self.d_pad, DOT_FP32=interpreting(), **cfg)

    def subset(self, slots: torch.Tensor) -> "_Rows":
        """The runner of rows[slots], reusing their per-head log-sum-exp (prob_sum) instead of redoing it."""
        lse2 = self.lse2[slots].contiguous() if self.prob else None
        return _Rows((self.A, self.P), self.kv, self.rows[slots].contiguous(), self.q_offset, self.scale, self.mode,
                     self.cfg, lse2)

    def _descriptors(self, key_step: int, cfg: dict):
        """(a_desc, kv_desc, True) for TMA loads, or (A, kv, False) where the rows are not
        contiguous or the layout does not allow it (alignment; prob_sum heads not whole chunks)."""
        kv, DC = self.kv, cfg["DC"]
        if self.prob:
            A2 = self.A.transpose(0, 1)  # [T, H, D], contiguous (_operand)
            A2 = A2.reshape(A2.shape[0], -1) if A2.is_contiguous() and kv.shape[1] % DC == 0 else None
        else:
            A2 = self.A
        kv_strides = [key_step * kv.stride(0), 1]
        if self.row_base is None or A2 is None or not (_tma_ok(A2, A2.stride()) and _tma_ok(kv, kv_strides)):
            return self.A, kv, False
        a_desc = TensorDescriptor(A2, list(A2.shape), list(A2.stride()), [cfg["BM"], DC])
        kv_desc = TensorDescriptor(kv, [triton.cdiv(kv.shape[0], key_step), kv.shape[1]], kv_strides, [cfg["BN"], DC])
        return a_desc, kv_desc, True

    def run(self, pass_id, key_step=1, th=None, tw=None, cap=0, count=True, aim=None):
        """One `_score_pass_kernel` launch over these rows (the first main pass of prob_sum: the Gluon
        kernel where `self.gluon` takes it); count=False skips a main pass's counts at th.
        aim (sample passes): (target, out [R, G], out [R]) for the kernel's threshold arithmetic (see
        `_first_thresholds`)."""
        dev, R, cfg = self.kv.device, self.R, self.cfg
        if (pass_id == 2 and not count and key_step == 1 and self.gluon is not None
                and self.gluon.main_pass_supported(self.P, cfg["BN"])):
            return self._run_gluon_main(tw, cap)
        a_desc, kv_desc, tma = self._descriptors(key_step, cfg)
        J = th.shape[1] if th is not None else 1
        th = th.contiguous() if th is not None else torch.empty(R, 1, device=dev)
        tw = tw.contiguous() if tw is not None else torch.empty(R, device=dev)
        stats = torch.empty(R, 4, device=dev)
        counts = torch.empty(R, J, dtype=torch.int32, device=dev)
        count_w = torch.empty(R, dtype=torch.int32, device=dev)
        rmax = torch.empty(R, device=dev)
        # packed (score, key)
        buf = torch.empty((R, _row_slots(cap, cfg)) if pass_id == 2 else (1, 1), dtype=torch.int64, device=dev)
        target, aim_th, aim_w = aim if aim is not None else (0.0, stats, stats)
        _score_pass_kernel[(triton.cdiv(R, cfg["BM"]),)](
            self.A, self.kv, a_desc, kv_desc, self.lse2, self.rows, th, tw, stats, counts, count_w, rmax, buf,
            aim_th, aim_w, R, self.kv.shape[0], self.q_offset, self.row_base or 0, self.P, self.scale_log2, key_step,
            cap, float(target), *self.strides, self.kv.stride(0), self.lse2.stride(0), th.stride(0), buf.stride(0),
            PROB=self.prob, PASS=pass_id, J=J, NPARTS=1 if self.prob else self.P, D=self.kv.shape[1],
            D_PAD=self.d_pad, DOT_FP32=interpreting(), TMA=tma, COUNT=count, ASM_STORE=not interpreting(),
            GRID=aim_th.shape[1] if aim is not None else 0, **cfg,
        )
        return dict(stats=stats, counts=counts, count_w=count_w, rmax=rmax, buf=buf)

    def _run_gluon_main(self, tw: torch.Tensor, cap: int) -> dict:
        """`run(2, tw=tw, cap=cap, count=False)` by the Gluon main pass (prob_sum, gluon_prob_sum.py):
        buf and count_w only, the two a pass without counts writes (its callers read no others)."""
        dev, R = self.kv.device, self.R
        buf = torch.empty((R, _row_slots(cap, self.cfg)), dtype=torch.int64, device=dev)
        count_w = torch.empty(R, dtype=torch.int32, device=dev)
        self.gluon.main_pass_gluon(self.A.transpose(0, 1), self.kv, self.lse2, tw.contiguous(), buf, count_w,
                                   self.row_base, self.q_offset, self.scale_log2, cap)
        return dict(count_w=count_w, buf=buf)


def _first_thresholds(runner: _Rows, topk: int):
    """From the samples: main-pass grid [R, MAIN_GRID] (ascending), write threshold [R] and the
    sample's score std [R] (the scale by which retries widen their search). The arithmetic runs in
    the Triton sample passes' epilogues (triton_impl: `_sample_grid`, then `_aim`), so the host
    queues two launches and no small ops; after the Gluon passes (gluon_sample.py) the same code
    runs in a small Triton kernel, four launches in all."""
    R, dev, target = runner.R, runner.kv.device, TARGET * topk
    # Every row has more than topk keys, so this step samples at least 32 keys of each.
    stats_step = min(STATS_STEP, max(SAMPLE_STEP, topk // 32))
    if GLUON_SAMPLE and runner.gluon is not None:
        from . import gluon_sample
        if runner.P in gluon_sample.SAMPLE_HEADS:
            return gluon_sample.first_thresholds_gluon(
                runner.A.transpose(0, 1), runner.kv, runner.lse2, runner.row_base, R, runner.q_offset,
                runner.scale_log2, target, stats_step, SAMPLE_STEP, SAMPLE_GRID)
    grid, std = torch.empty(R, SAMPLE_GRID, device=dev), torch.empty(R, device=dev)
    runner.run(0, key_step=stats_step, aim=(target, grid, std))
    main, tw = torch.empty(R, MAIN_GRID, device=dev), torch.empty(R, device=dev)
    runner.run(1, key_step=SAMPLE_STEP, th=grid, aim=(target, main, tw))
    return main, tw, std


def _next_thresholds(th, counts, rmax, std, topk: int, cap: int):
    """Refined (grid, tw) for rows whose candidates did not fit, from exact counts at thresholds th."""
    th, order = torch.sort(th, dim=1)
    counts = counts.gather(1, order).long()
    n_th = th.shape[1]
    a_i = (counts >= topk).sum(1) - 1  # last threshold still keeping >= k keys (counts fall along th)
    has_a = a_i >= 0
    a = th.gather(1, a_i.clamp(min=0)[:, None]).squeeze(1)
    c_a = counts.gather(1, a_i.clamp(min=0)[:, None]).squeeze(1)
    has_b = a_i + 1 < n_th
    above_max = torch.nextafter(rmax, torch.full_like(rmax, float("inf")))  # count(>= it) = 0
    b = torch.where(has_b, th.gather(1, (a_i + 1).clamp(max=n_th - 1)[:, None]).squeeze(1), above_max)
    c_b = torch.where(has_b, counts.gather(1, (a_i + 1).clamp(max=n_th - 1)[:, None]).squeeze(1), 0)
    # No threshold kept k keys: the k-th score lies below min(th[0], row max). Widen downwards by
    # 4x the larger of the grid's span and the score std, from the row max when the grid lies above it.
    top = torch.minimum(th[:, 0], rmax)
    width = torch.maximum((th[:, -1] - th[:, 0]).abs(), std) + top.abs() * 1e-3 + 1e-6
    a = torch.where(has_a, a, top - 4 * width)
    b = torch.where(has_a, b, torch.where(th[:, 0] > rmax, above_max, th[:, 0]))
    steps = torch.arange(1, MAIN_GRID + 1, device=th.device)[None, :] / (MAIN_GRID + 1)
    grid = a[:, None] + (b - a)[:, None] * steps
    frac = ((c_a - TARGET * topk) / (c_a - c_b).clamp(min=1)).clamp(0, 1).float()
    tw = torch.where(has_a & (c_a <= cap), a, torch.where(has_a, a + (b - a) * frac, a))
    return grid, tw


def _select(res: dict, rows, out, topk: int, cap: int, grid, iters=None, out_chunk: int = 1024) -> None:
    """out[rows[slot]] = exact top-k of each slot's candidate buffer, for the slots whose
    candidates fit (topk <= count <= cap; the kernel skips the others, so no host sync decides
    which). res: a main pass that counted at thresholds grid [R, J], or grid None where it did not.
    iters (benchmarks): int32 [R] that receives each slot's search steps. out_chunk: slots a row
    written per step of the kernel's output loop (a power of two; tests make it small so that
    the loop's carried counts are exercised at small cap)."""
    bounds = grid is not None
    if bounds:
        # The highest threshold that still keeps >= topk keys bounds the k-th score from below.
        lower = torch.where(res["counts"] >= topk, grid, float("-inf")).amax(1)
        # The lowest threshold keeping < topk keys bounds it from above.
        upper = torch.where(res["counts"] < topk, grid, float("inf")).amin(1)
    else:  # no counts: the search starts from the candidates' own min and max
        lower = upper = res["count_w"]  # (not read)
    cp = triton.next_power_of_2(cap)
    # Rows per program: at cap 4096 one row on 4 warps is fastest (0.86 ms at L 32k; 2 warps the
    # same, 8 warps 1.10, 2 rows on 4 or 8 warps 1.42 / 1.18; NOTES, ninth round).
    rb = max(1, min(4, 4096 // cp))
    n = rows.numel()
    _select_kernel[(triton.cdiv(n, rb),)](
        res["buf"], res["count_w"], lower, upper, rows, out, iters if iters is not None else res["count_w"], n, topk,
        cap, res["buf"].stride(0), out.stride(0), RB=rb, CP=cp, CH=min(cp, out_chunk), BOUNDS=bounds,
        COUNT_ITERS=iters is not None, num_warps=4)


def _misfits(count_w: torch.Tensor, topk: int, cap: int) -> torch.Tensor:
    """Slots whose main pass kept fewer than topk or more than cap candidates (a host sync)."""
    return torch.nonzero((count_w < topk) | (count_w > cap)).squeeze(1)


def _first_try(A, kv, rows, topk, mode, scale, q_offset, out, cfg, row_base: int) -> dict:
    """First try at out[rows] (rows: int32 [R] = row_base, row_base + 1, ..., each with more than
    topk causal keys), with no host sync: sample thresholds, one main pass, and the selection of
    every row whose candidates fit. Returns what `_retry` needs for the others; the candidate
    buffer is not kept, so the next chunk's pass reuses its memory."""
    cap = CAP * topk
    runner = _Rows(A, kv, rows, q_offset, scale, mode, cfg, row_base=row_base)
    grid, tw, std = _first_thresholds(runner, topk)
    PASS_COUNTS[1] += runner.R
    # The first main pass does not count at the grid (16 compares a score, a quarter of its
    # time): nearly every row fits, and the retries count as they go.
    res = runner.run(2, th=grid, tw=tw, cap=cap, count=False)
    _select(res, runner.rows, out, topk, cap, None)
    return dict(runner=runner, grid=grid, tw=tw, std=std, count_w=res["count_w"])


def _retry(first: dict, q, kv, topk, mode, scale, q_offset, out) -> None:
    """Finish the rows of a `_first_try` whose candidates did not fit (about 1 in 50,000 on random
    data): few of them go to the reference at once, the others get exact counts at the first
    try's grid and go again with thresholds from those counts (module docstring, step 4)."""
    cap = CAP * topk
    bad = _misfits(first["count_w"], topk, cap)
    if bad.numel() == 0:
        return
    runner = first["runner"].subset(bad)
    if score_elements(runner.R, kv.shape[0], q.shape[1], mode) > REFERENCE_ELEMENTS:
        # Per try: the thresholds tried (grid and tw), the exact counts at them (count_w at tw: the
        # cursor counts past cap) and the row max. The first main pass did not count at its grid,
        # so a counting pass over the bad rows only supplies those counts and the row max.
        grid, tw, std, count_w = first["grid"][bad], first["tw"][bad], first["std"][bad], first["count_w"][bad]
        res = runner.run(1, th=grid)
        counts, rmax = res["counts"], res["rmax"]
        for attempt in range(1, MAX_TRIES):
            grid, tw = _next_thresholds(torch.cat([grid, tw[:, None]], 1), torch.cat([counts, count_w[:, None]], 1),
                                        rmax, std, topk, cap)
            PASS_COUNTS[attempt + 1] += runner.R
            res = runner.run(2, th=grid, tw=tw, cap=cap, count=True)  # retries count as they go
            _select(res, runner.rows, out, topk, cap, grid)
            bad = _misfits(res["count_w"], topk, cap)
            if bad.numel() == 0:
                return
            runner = runner.subset(bad)
            grid, tw, std = grid[bad], tw[bad], std[bad]
            counts, count_w, rmax = res["counts"][bad], res["count_w"][bad], res["rmax"][bad]
    PASS_COUNTS["reference"] += runner.R
    _reference_rows(q, kv, runner.rows, topk, mode, scale, q_offset, out)


def _reference_rows(q, kv, rows, topk: int, mode: str, scale: float, q_offset: int, out) -> None:
    """out[rows] = the reference's top-k of query rows `rows` (int32 [R], any rows of q), in
    ascending key order, -1 last; in chunks of rows whose fp32 scores stay small."""
    big = torch.iinfo(torch.int32).max
    per = chunk_rows(kv.shape[0], q.shape[1], mode)
    for s in range(0, rows.numel(), per):
        r = rows[s : s + per].long()
        idx = topk_of_scores(native_scores_reference(q[r], kv, mode, scale, r + q_offset), min(topk, kv.shape[0]))
        asc = torch.sort(torch.where(idx < 0, big, idx), dim=1).values
        out[r, : idx.shape[1]] = torch.where(asc == big, -1, asc).to(torch.int32)


def native_topk_triton(q, kv, topk: int, mode: str = "logit_sum", scale: float = 1.0, q_offset: int = 0,
                       config: dict | None = None) -> torch.Tensor:
    """Same contract as native_topk_reference (q [T, H, D], kv [L, D] -> indices [T, topk] int32,
    -1 where fewer than topk causal keys exist), with the selected keys of each row in ascending
    key order rather than best first."""
    _check(q, kv, topk, mode)
    T, L = q.shape[0], kv.shape[0]
    dev = kv.device
    with torch.no_grad():
        first = max(0, topk - q_offset)  # rows before this have <= topk causal keys: all taken
        head = T if L <= topk else min(T, first)
        # Rows from `head` on are written whole by the selection (or the reference), so only the
        # head rows get their keys 0..n-1 here (a [T, topk] fill cost about 0.4 ms at T 32k).
        out = torch.empty(T, topk, dtype=torch.int32, device=dev)
        slot = torch.arange(topk, device=dev, dtype=torch.int32)[None, :]
        n_head = (torch.arange(head, device=dev, dtype=torch.int32) + q_offset + 1).clamp(max=L)
        out[:head] = torch.where(slot < n_head[:, None], slot, -1)
        if head == T:
            return out
        kv = kv.contiguous()
        cfg = config or default_config(mode, kv.dtype)
        if CAP * topk + cfg["BN"] >= 1 << 23:  # the candidate store's fp32 slot arithmetic (triton_impl)
            raise ValueError(f"native_topk (triton): topk {topk} is too large for the candidate buffers "
                             f"({CAP} x topk + {cfg['BN']} must stay below 2^23)")
        A = _operand(q.detach(), kv.detach(), mode, _d_pad(kv.shape[1], cfg))
        chunk = max(cfg["BM"], BUFFER_BYTES // (_row_slots(CAP * topk, cfg) * 8))
        # Every chunk's first try is queued before any host sync, so the host's work for one
        # chunk overlaps the GPU's for the previous; then the rare misfits of all chunks.
        tries = [_first_try(A, kv, torch.arange(s, min(T, s + chunk), device=dev, dtype=torch.int32), topk, mode,
                            scale, q_offset, out, cfg, s) for s in range(first, T, chunk)]
        for t in tries:
            _retry(t, q, kv, topk, mode, scale, q_offset, out)
    return out
