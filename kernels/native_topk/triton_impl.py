"""Triton kernels of the native indexer: fused scoring passes and the exact in-buffer selection.

The [T, L] score matrix never reaches memory. Each pass recomputes scores tile by tile
([BM query rows, BN keys], a GEMM over D in DC-wide chunks) and keeps only per-row reductions:

- `_score_pass_kernel` with PASS=0: sample statistics (count, sum, sum of squares, max), and on a
  first try the counting grid placed by them (`_sample_grid`);
  PASS=1: counts of scores >= each of J per-row thresholds (a cumulative histogram), and on a
  first try the write threshold and the main pass's grid aimed from them (`_aim`);
  PASS=2: every (score, key) with score >= a per-row write threshold `tw`, compacted in
  ascending key order into a per-row candidate buffer of `cap` int64 slots plus BN spare ones (the
  score's order-preserving int32 image in the high half, the key in the low half), the exact count
  >= tw and (COUNT=True, retried rows only) the counts of PASS=1.
- `_lse_kernel`: per-head log-sum-exp over the causal keys (prob_sum's first pass).
- `_select_kernel`: the exact top-k of one row's candidates (ties: lower key index), by an
  interpolation search on the order-preserving integer image of the fp32 scores (one reduction
  of three values a step), then the output in chunks with one prefix scan each.

Scores are built from an operand A against kv [L, D]:
- logit_sum: A [T, P * D_PAD] holds the reference's sum_h q[:, h] (fp32 sum rounded to q's dtype)
  in P parts of kv's dtype, each zero-padded to D_PAD (a multiple of the K chunk DC). P = 1 when q
  and kv share a dtype: the products are exact and the score differs from the reference's fp32 dot
  only in summation order. P = 2 (hi + lo, exact to 2^-17) only for fp32 q against 16-bit kv.
- prob_sum: A is q itself viewed [H, T, D]; score = sum_h exp2(scale_log2 * logit_h - lse2_h).
The host driver (streaming.py) picks thresholds, retries rows whose candidates did not fit, and
falls back to the reference for rows that cannot be resolved (more than cap - k tied scores).
"""

from __future__ import annotations

import triton
import triton.language as tl

from kernels.triton_utils import dot


@triton.jit
def _operands(A, KV, a_desc, kv_desc, rows, row_ok, row0, t, h, c, key_step, span, stride_ap, stride_at, stride_kv,
              D: tl.constexpr, D_PAD: tl.constexpr, BN: tl.constexpr, DC: tl.constexpr, TMA: tl.constexpr):
    """D chunk c of head h (prob_sum; 0 for logit_sum) of this program's rows, [BM, DC], and of key
    tile t (keys (t * BN + i) * key_step), [BN, DC].

    A's columns: head h starts at h * stride_ap; for logit_sum its P parts sit side by side, each
    zero-padded to D_PAD columns, and chunk c is columns (c % (D_PAD / DC)) * DC of part
    c // (D_PAD / DC), so hi.kv + lo.kv is one accumulator.
    TMA: a_desc is A as [rows, row width] and kv_desc is kv's every key_step-th row as [keys, D]
    (host-side descriptors, streaming.py); the copy engine zero-fills past their edges, so chunks
    past D and keys past L read zeros. Needs rows row0 .. row0 + BM - 1 to be this block's rows.
    Otherwise pointer loads: D is a compile-time constant, and when D_PAD == D the loads carry only
    row masks, which keeps them vectorised."""
    NCD: tl.constexpr = D_PAD // DC
    d0 = (c % NCD) * DC
    a_col = h * stride_ap + (c // NCD) * D_PAD + d0
    if TMA:  # (descriptor offsets must be int32; the step counter is int64 when the rows are)
        a = a_desc.load([tl.cast(row0, tl.int32), tl.cast(a_col, tl.int32)])
        b = kv_desc.load([tl.cast(t * BN, tl.int32), tl.cast(d0, tl.int32)])
    else:
        cols = d0 + tl.arange(0, DC)
        keys = (t * BN + tl.arange(0, BN)) * key_step
        a_mask = row_ok[:, None]
        b_mask = (keys < span)[:, None]
        if D_PAD != D:
            a_mask = a_mask & (cols < D)[None, :]
            b_mask = b_mask & (cols < D)[None, :]
        a = tl.load(A + rows[:, None] * stride_at + (a_col + tl.arange(0, DC))[None, :], mask=a_mask, other=0.0)
        b = tl.load(KV + keys[:, None] * stride_kv + cols[None, :], mask=b_mask, other=0.0)
    return a, b


@triton.jit
def _first_slot(BM: tl.constexpr):
    """The first slot of this program's block of rows. Programs take row blocks last first: the
    last rows have the most causal keys, so they start first and the short blocks fill in behind
    them (causal load balance)."""
    return (tl.num_programs(0) - 1 - tl.program_id(0)) * BM


@triton.jit
def _row_block(ROWS, R, L, q_offset, BM: tl.constexpr):
    """Slots, row ids, validity and causal key counts [BM] of this program's block of rows
    (slots _first_slot(BM) ... + BM - 1)."""
    slots = _first_slot(BM) + tl.arange(0, BM)
    row_ok = slots < R
    rows = tl.load(ROWS + slots, mask=row_ok, other=0).to(tl.int64)  # rows * strides may pass 2^31
    n_keys = tl.where(row_ok, tl.minimum(rows + q_offset + 1, L), 0)
    return slots, rows, row_ok, n_keys


@triton.jit
def _lse_kernel(A, KV, ROWS, LSE2, R, L, q_offset, scale_log2,
                stride_ap, stride_at, stride_kv, stride_lr,
                D: tl.constexpr, D_PAD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, DC: tl.constexpr, DOT_FP32: tl.constexpr):
    """lse2[slot, h] = log2 sum_j exp2(scale_log2 * <q[row, h], kv[j]>) over the causal keys j."""
    h = tl.program_id(1)
    slots, rows, row_ok, n_keys = _row_block(ROWS, R, L, q_offset, BM)
    m = tl.full([BM], float("-inf"), tl.float32)
    l = tl.zeros([BM], tl.float32)
    for k0 in range(0, tl.max(n_keys), BN):
        keys = k0 + tl.arange(0, BN)
        valid = keys[None, :] < n_keys[:, None]
        s = tl.zeros([BM, BN], tl.float32)
        for c in range(0, D_PAD // DC):
            a, b = _operands(A, KV, A, KV, rows, row_ok, 0, k0 // BN, h, c, 1, L, stride_ap, stride_at, stride_kv,
                             D, D_PAD, BN, DC, False)
            s = dot(a, tl.trans(b), DOT_FP32, "ieee", s)
        s = tl.where(valid, s * scale_log2, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        l = l * tl.exp2(m - m_use) + tl.sum(tl.exp2(s - m_use[:, None]), 1)
        m = m_new
    tl.store(LSE2 + slots * stride_lr + h, m + tl.log2(tl.where(l > 0, l, 1.0)), mask=row_ok)


@triton.jit
def _ordered_key(x):
    """fp32 -> int32 that orders like the floats (negative floats get their magnitude bits
    flipped; -0.0 is first made +0.0 so that it equals +0.0)."""
    bits = (x + 0.0).to(tl.int32, bitcast=True)
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


# The candidate store as inline PTX: the same test, position and 8-byte value as the tl.store path
# of `_store_candidates`. $1 row buffer's address minus 8 x 0x4B000000 (int64), $2 score,
# $3 write threshold, $4 inclusive prefix count (fp32), $5 cursor - 1 + 2^23 (fp32), $6 key; $0
# is a dummy result. The slot's fp32 t = incl + cursor - 1 + 2^23 has bits 0x4B000000 + slot, so
# the address is (row buffer - 8 x 0x4B000000) + 8 x bits(t), one multiply-add.
_STORE_PTX = tl.constexpr("""{
.reg .pred p; .reg .b32 pos, img, m; .reg .f32 t; .reg .b64 a, v;
setp.ge.f32 p, $2, $3;
add.f32 t, $4, $5;
mov.b32 pos, t;
mad.wide.s32 a, pos, 8, $1;
add.f32 t, $2, 0f00000000;
mov.b32 img, t;
shr.s32 m, img, 31;
and.b32 m, m, 0x7FFFFFFF;
xor.b32 img, img, m;
mov.b64 v, {$6, img};
@p st.global.b64 [a], v;
mov.b32 $0, 0;
}""")


@triton.jit
def _store_candidates(row_buf, s, tw, incl, cursor, keys, cap, ASM: tl.constexpr):
    """Write each score s >= tw of the tile at slot min(cursor, cap) + incl - 1 of its row's
    buffer as (_ordered_key(s) << 32) | key. row_buf [BM] pointers to rows of cap + BN slots (the
    slot stays below cap + BN, so no bound test), s/incl [BM, BN] fp32 (incl: inclusive prefix
    counts of the taken keys, exact integers), tw/cursor [BM], keys [BN] int32.

    ASM (the GPU path): the test, position, packing and store in one inline-PTX op a score. A
    tl.store would make the compiler move the pointers, values and masks of the whole tile from
    the MMA's register layout into the store's coalesced layout through shared memory (about 70
    barriers a tile) and spill registers, for stores that are scattered anyway: the main pass at
    L 32k took 3.9 ms, 1.9 of them in this step (NOTES, eighth round). The position comes from
    incl + (min(cursor, cap) - 1 + 2^23) in fp32, whose bits minus those of 2^23 are the integer
    (exact below 2^24: the driver checks cap + BN < 2^23), so no float-to-int conversions; the
    bits of 2^23 are subtracted from the row's address once (NOTES, tenth round).
    The interpreter (CPU) runs the tl.store path."""
    if ASM:
        base = (tl.minimum(cursor, cap) - 1).to(tl.float32) + 8388608.0
        # (row addresses as int64: triton 3.6 takes no pointer operands here)
        row_addr = row_buf.to(tl.int64) - 8 * 0x4B000000
        tl.inline_asm_elementwise(
            _STORE_PTX, "=r,l,f,f,f,f,r",
            [tl.broadcast_to(row_addr[:, None], s.shape), s, tl.broadcast_to(tw[:, None], s.shape), incl,
             tl.broadcast_to(base[:, None], s.shape), tl.broadcast_to(keys[None, :], s.shape)],
            dtype=tl.int32, is_pure=False, pack=1)
    else:
        pos = tl.minimum(cursor, cap)[:, None] + incl.to(tl.int32) - 1
        packed = (_ordered_key(s).to(tl.int64) << 32) | keys[None, :].to(tl.int64)
        tl.store(row_buf[:, None] + pos, packed, mask=s >= tw[:, None])


@triton.jit
def _reduce_tile(s, valid, keys, slots, row_ok, tw, TH, BUF, stride_th, stride_buf, cap, tri,
                 counts, s_n, s_sum, s_sq, s_max, cursor,
                 PASS: tl.constexpr, J: tl.constexpr, COUNT: tl.constexpr, DOT_FP32: tl.constexpr,
                 ASM_STORE: tl.constexpr):
    """Fold one tile's scores s [BM, BN] (-inf past each row's causal keys; `valid` marks the
    others in PASS 0, None otherwise) into the pass's per-row state:
    counts [BM, J], sample sums s_n/s_sum/s_sq [BM], row max s_max [BM], candidate cursor [BM].
    The first main pass (PASS 2 without COUNT) keeps no row max: only retries use it, and they
    get it from their counting pass."""
    if PASS != 2 or COUNT:
        s_max = tl.maximum(s_max, tl.max(s, 1))
    if PASS == 0:
        finite = tl.where(valid, s, 0.0)
        s_n += tl.sum(valid.to(tl.float32), 1)
        s_sum += tl.sum(finite, 1)
        s_sq += tl.sum(finite * finite, 1)
    elif COUNT:
        jj = tl.arange(0, J)
        for j in tl.static_range(J):
            th = tl.load(TH + slots * stride_th + j, mask=row_ok, other=float("inf"))
            c = tl.sum((s >= th[:, None]).to(tl.int32), 1)
            counts += tl.where(jj[None, :] == j, c[:, None], 0)
    if PASS == 2:
        # exact: at most BN <= 256 ones a row, 0/1 operands, fp32 accumulation
        ones = tl.where(s >= tw[:, None], 1.0, 0.0).to(tl.bfloat16)  # (bool -> bf16 directly fails in the interpreter)
        incl = dot(ones, tri, DOT_FP32, "ieee")
        # One 8-byte store a candidate: each lands in its own memory sector, so two 4-byte
        # stores (score, key) cost twice as much (about 2 ms at L 32k).
        _store_candidates(BUF + slots.to(tl.int64) * stride_buf, s, tw, incl, cursor, keys, cap, ASM_STORE)
        cursor += tl.max(incl, 1).to(tl.int32)  # (incl rises along the row: its max is the row's count)
    return counts, s_n, s_sum, s_sq, s_max, cursor


@triton.jit
def _normal_quantile(p):
    """z with Phi(z) = p for p in (0, 1), fp32, via z = sqrt(2) erfinv(2p - 1) and M. Giles'
    single-precision erfinv polynomials ("Approximating the erfinv function", GPU Computing Gems,
    2011): relative error about 1e-7, far below what placing a sample grid needs."""
    w = -tl.log(4.0 * p * (1.0 - p))  # -log((1 - x)(1 + x)) for x = 2p - 1, without cancellation
    a = w - 2.5
    lo = 2.81022636e-08
    lo = 3.43273939e-07 + lo * a
    lo = -3.5233877e-06 + lo * a
    lo = -4.39150654e-06 + lo * a
    lo = 0.00021858087 + lo * a
    lo = -0.00125372503 + lo * a
    lo = -0.00417768164 + lo * a
    lo = 0.246640727 + lo * a
    lo = 1.50140941 + lo * a
    b = tl.sqrt(tl.maximum(w, 5.0)) - 3.0
    hi = -0.000200214257
    hi = 0.000100950558 + hi * b
    hi = 0.00134934322 + hi * b
    hi = -0.00367342844 + hi * b
    hi = 0.00573950773 + hi * b
    hi = -0.0076224613 + hi * b
    hi = 0.00943887047 + hi * b
    hi = 1.00167406 + hi * b
    hi = 2.83297682 + hi * b
    return 1.4142135623730951 * tl.where(w < 5.0, lo, hi) * (2.0 * p - 1.0)


@triton.jit
def _sample_grid(s_n, s_sum, s_sq, s_max, n_keys, target, G: tl.constexpr):
    """The counting grid [BM, G] (ascending) and the score std [BM] from a sample's count, sum,
    sum of squares and max: G - 8 points at mean + std * (z0 + [-2.5, 2.5]), z0 the normal quantile
    that `target` of the row's n_keys keys would exceed, and 8 points from the mean to the max."""
    n = tl.maximum(s_n, 1.0)
    mean = s_sum / n
    std = tl.sqrt(tl.maximum(s_sq / n - mean * mean, 0.0))
    std = tl.maximum(std, tl.abs(mean) * 1e-3 + 1e-6)
    p = tl.minimum(tl.maximum(1.0 - target / tl.maximum(n_keys, 1).to(tl.float32), 1e-6), 1.0 - 1e-6)
    z0 = _normal_quantile(p)
    NZ: tl.constexpr = G - 8
    jj = tl.arange(0, G)[None, :].to(tl.float32)
    normal = mean[:, None] + std[:, None] * (z0[:, None] + (-2.5 + 5.0 / (NZ - 1) * jj))
    upper = mean[:, None] + (jj - NZ) / 7.0 * tl.maximum(s_max - mean, 0.0)[:, None]
    return tl.sort(tl.where(jj < NZ, normal, upper), 1), std


@triton.jit
def _aim(counts, th, n_keys, key_step, target, J: tl.constexpr, M: tl.constexpr):
    """From exact counts [BM, J] of a sample (every key_step-th key) at ascending thresholds th
    [BM, J]: the write threshold [BM] estimated to keep `target` of the row's n_keys keys, and M
    of the thresholds around it [BM, M] (the grid a retried main pass counts at)."""
    n = tl.maximum(n_keys, 1).to(tl.float32)
    est = counts.to(tl.float32) * (n / tl.cdiv(tl.maximum(n_keys, 1), key_step).to(tl.float32))[:, None]
    jj = tl.arange(0, J)[None, :]
    j_w = tl.maximum(tl.sum((est >= target).to(tl.int32), 1) - 1, 0)
    j_1 = tl.minimum(j_w + 1, J - 1)
    g0 = tl.sum(tl.where(jj == j_w[:, None], th, 0.0), 1)
    e0 = tl.sum(tl.where(jj == j_w[:, None], est, 0.0), 1)
    g1 = tl.sum(tl.where(jj == j_1[:, None], th, 0.0), 1)
    e1 = tl.sum(tl.where(jj == j_1[:, None], est, 0.0), 1)
    # Between the last threshold estimated to keep >= target keys and the next, the count falls
    # about geometrically (a score tail): aim at target on the log of the estimates. Taking the
    # threshold itself kept 1.48 k keys a row at L 32k when aiming at 1.3 k (NOTES, seventh round).
    ok = (e0 >= target) & (e1 > 0) & (e1 < e0)
    l0 = tl.log(tl.maximum(e0, 1.0))
    frac = (l0 - tl.log(target)) / tl.maximum(l0 - tl.log(tl.maximum(e1, 1.0)), 1e-9)
    tw = g0 + (g1 - g0) * tl.where(ok, tl.minimum(tl.maximum(frac, 0.0), 1.0), 0.0)
    pick = tl.minimum(tl.maximum(j_w[:, None] - M // 2 + 1 + tl.arange(0, M)[None, :], 0), J - 1)  # [BM, M]
    th_m = tl.sum(tl.where(pick[:, :, None] == tl.arange(0, J)[None, None, :], th[:, None, :], 0.0), 2)
    return tw, th_m


@triton.jit
def _score_pass_kernel(
    A, KV, a_desc, kv_desc, LSE2, ROWS, TH, TW, STATS, CNT, CNT_W, RMAX, BUF, AIM_TH, AIM_W,
    R, L, q_offset, row_base, P, scale_log2, key_step, cap, target,
    stride_ap, stride_at, stride_kv, stride_lr, stride_th, stride_buf,
    PROB: tl.constexpr, PASS: tl.constexpr, J: tl.constexpr, NPARTS: tl.constexpr, D: tl.constexpr,
    D_PAD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, DC: tl.constexpr, DOT_FP32: tl.constexpr,
    TMA: tl.constexpr, COUNT: tl.constexpr = True, ASM_STORE: tl.constexpr = False, GRID: tl.constexpr = 0,
):
    """One streaming pass over the causal keys of BM rows; keys j * key_step (key_step > 1 samples).
    COUNT=False (PASS 2 only): skip the counts at the J thresholds (the first main pass, whose rows
    mostly fit; the driver counts exactly only for the rows that did not).
    TMA (rows[slot] = row_base + slot): operands by descriptor (a_desc, kv_desc; see _operands).

    One flat loop over (key tile, head, D chunk) steps rather than loops nested per tile: the
    software pipeline then runs across tile boundaries, so the next tile's first chunks load while
    this tile's epilogue runs (NOTES, seventh round). The price: the accumulator's reset after
    each tile makes ptxas serialise the wgmma (C7515); nested loops avoid that but measured slower
    (NOTES, tenth round)."""
    slots, rows, row_ok, n_keys = _row_block(ROWS, R, L, q_offset, BM)
    row0 = row_base + _first_slot(BM)  # the block's first row (TMA)
    counts = tl.zeros([BM, J], tl.int32)
    s_n = tl.zeros([BM], tl.float32)
    s_sum = tl.zeros([BM], tl.float32)
    s_sq = tl.zeros([BM], tl.float32)
    s_max = tl.full([BM], float("-inf"), tl.float32)
    cursor = tl.zeros([BM], tl.int32)
    tw = tl.load(TW + slots, mask=row_ok, other=float("inf"))
    # tri[i, j] = (i <= j): take [BM, BN] @ tri is the inclusive prefix count of each row's taken
    # keys, on the tensor cores and in the accumulator's own layout. tl.cumsum would move the tile
    # through shared memory and back; at L 32k that alone cost about 0.85 ms (NOTES, fifth round).
    tri = tl.where(tl.arange(0, BN)[:, None] <= tl.arange(0, BN)[None, :], 1.0, 0.0).to(tl.bfloat16)
    NCH: tl.constexpr = NPARTS * (D_PAD // DC)  # D chunks a head
    n_heads = P if PROB else 1
    span = tl.max(n_keys).to(tl.int32)  # (int32 steps: int64 index arithmetic costs)
    short = tl.min(tl.where(row_ok, n_keys, span)).to(tl.int32)  # the fewest causal keys of a row here
    acc = tl.zeros([BM, BN], tl.float32)  # one head's logits
    total = tl.zeros([BM, BN], tl.float32)  # prob_sum: the sum of the heads' probabilities
    for step in range(0, tl.cdiv(tl.cdiv(span, key_step), BN) * n_heads * NCH):
        c = step % NCH
        h = (step // NCH) % n_heads
        t = step // (NCH * n_heads)
        a, b = _operands(A, KV, a_desc, kv_desc, rows, row_ok, row0, t, h, c, key_step, span,
                         stride_ap, stride_at, stride_kv, D, D_PAD, BN, DC, TMA)
        acc = dot(a, tl.trans(b), DOT_FP32, "ieee", acc)
        if c == NCH - 1:
            if PROB:
                lse2 = tl.load(LSE2 + slots * stride_lr + h, mask=row_ok, other=0.0)
                total += tl.exp2(acc * scale_log2 - lse2[:, None])
                acc = tl.zeros([BM, BN], tl.float32)
            if h == n_heads - 1:
                if PROB:
                    s = total
                    total = tl.zeros([BM, BN], tl.float32)
                else:
                    s = acc
                    acc = tl.zeros([BM, BN], tl.float32)
                keys = (t * BN + tl.arange(0, BN)) * key_step
                if PASS == 0:
                    valid = keys[None, :] < n_keys[:, None]
                    s = tl.where(valid, s, float("-inf"))
                else:
                    valid = None
                    # Only tiles reaching past some row's last causal key need the mask: a compare
                    # and a select a score saved elsewhere. Rows past R keep scores there, but
                    # nothing of theirs is written (tw and th are +inf for them, stores masked).
                    if ((t + 1) * BN - 1) * key_step >= short:
                        s = tl.where(keys[None, :] < n_keys[:, None], s, float("-inf"))
                counts, s_n, s_sum, s_sq, s_max, cursor = _reduce_tile(
                    s, valid, keys, slots, row_ok, tw, TH, BUF, stride_th, stride_buf, cap, tri,
                    counts, s_n, s_sum, s_sq, s_max, cursor, PASS, J, COUNT, DOT_FP32, ASM_STORE)
    # GRID > 0 (the first try's sample passes): the threshold arithmetic here rather than in
    # dozens of small torch ops that the GPU would wait for (NOTES, eighth round). PASS 0 writes
    # the counting grid AIM_TH [R, GRID] and the std AIM_W [R]; PASS 1 the main pass's grid
    # AIM_TH [R, GRID] and its write threshold AIM_W [R] (`target` keys a row).
    if PASS == 0:
        stats = STATS + slots * 4
        tl.store(stats, s_n, mask=row_ok)
        tl.store(stats + 1, s_sum, mask=row_ok)
        tl.store(stats + 2, s_sq, mask=row_ok)
        tl.store(stats + 3, s_max, mask=row_ok)
        if GRID > 0:
            grid, std = _sample_grid(s_n, s_sum, s_sq, s_max, n_keys, target, GRID)
            tl.store(AIM_TH + slots[:, None] * GRID + tl.arange(0, GRID)[None, :], grid, mask=row_ok[:, None])
            tl.store(AIM_W + slots, std, mask=row_ok)
    elif COUNT:
        tl.store(CNT + slots[:, None] * J + tl.arange(0, J)[None, :], counts, mask=row_ok[:, None])
        tl.store(RMAX + slots, s_max, mask=row_ok)
        if PASS == 1 and GRID > 0:
            th = tl.load(TH + slots[:, None] * stride_th + tl.arange(0, J)[None, :], mask=row_ok[:, None], other=0.0)
            tw_aim, th_main = _aim(counts, th, n_keys, key_step, target, J, GRID)
            tl.store(AIM_TH + slots[:, None] * GRID + tl.arange(0, GRID)[None, :], th_main, mask=row_ok[:, None])
            tl.store(AIM_W + slots, tw_aim, mask=row_ok)
    if PASS == 2:
        tl.store(CNT_W + slots, cursor, mask=row_ok)


@triton.jit
def _sum_min_min(c0, a0, b0, c1, a1, b1):
    return c0 + c1, tl.minimum(a0, a1), tl.minimum(b0, b1)


@triton.jit
def _min_max(a0, b0, a1, b1):
    return tl.minimum(a0, a1), tl.maximum(b0, b1)


@triton.jit
def _select_kernel(BUF, CNT_W, LOWER, UPPER, ROWS, OUT, ITERS, n_slots, topk, cap, stride_buf, stride_out,
                   RB: tl.constexpr, CP: tl.constexpr, CH: tl.constexpr, BOUNDS: tl.constexpr,
                   COUNT_ITERS: tl.constexpr = False):
    """Exact top-k of the candidates of RB slots, in ascending key order, for the slots whose
    count fits (topk <= count <= cap <= CP); the others are left to the host's retries.

    BUF holds each candidate as (int32 image of its score that orders like the floats, from
    `_ordered_key`) << 32 | key index. An interpolation search (below) finds each row's k-th largest
    image v; the row takes every key above v and, of those equal to v, the lowest-indexed ones (the
    buffer is in ascending key order). Only the images (the high words) are read for the search;
    the key indices are read at the end for the taken slots.
    BOUNDS: LOWER/UPPER [slots] hold scores known to satisfy count(>= lower) >= topk >
    count(>= upper) (from a retried main pass's exact counts), which narrow the starting bracket;
    without them the bracket starts at the candidates' min and max.
    COUNT_ITERS (benchmarks): ITERS[slot] = the search's steps."""
    slot = tl.program_id(0) * RB + tl.arange(0, RB)
    r_ok = slot < n_slots
    count = tl.load(CNT_W + slot, mask=r_ok, other=0)
    r_ok = r_ok & (count >= topk) & (count <= cap)
    row = tl.load(ROWS + slot, mask=r_ok, other=0).to(tl.int64)
    offs = tl.arange(0, CP)
    ok = (offs[None, :] < count[:, None]) & r_ok[:, None]
    # Row r's candidate i as two int32 words (little-endian): key index at word 2 i, image at 2 i + 1.
    words = BUF.to(tl.pointer_type(tl.int32)) + slot[:, None].to(tl.int64) * (2 * stride_buf)
    IMAX: tl.constexpr = 2147483647
    # Masked slots get the least int32, below every real image (only a NaN score maps there).
    # So neither they nor rows that do not fit (lo = hi = 0) need the mask after these min/max:
    # ~(-2^31) = 2^31 - 1 drops out of the search's min, and they are never above or equal to v.
    key = tl.load(words + (2 * offs[None, :] + 1), mask=ok, other=-IMAX - 1)
    # Bracket [lo, hi] around the k-th largest image v, both ends candidates' images:
    # c_lo = count(>= lo) >= topk > count(> hi) = c_hi. Masked rows start (and stay) with lo == hi.
    if BOUNDS:
        lower = _ordered_key(tl.load(LOWER + slot, mask=r_ok, other=float("-inf")))
        # count(>= upper) < topk, so the k-th image is below upper's.
        upper = _ordered_key(tl.load(UPPER + slot, mask=r_ok, other=float("inf")))
        lo, hi = tl.reduce((tl.where(ok & (key >= lower[:, None]), key, IMAX),
                            tl.where(ok & (key < upper[:, None]), key, -IMAX - 1)), 1, _min_max)
        lo = tl.where(r_ok, lo, 0)
        hi = tl.where(r_ok, hi, 0)
        c_lo = tl.sum((key >= lo[:, None]).to(tl.int32), 1)
        c_hi = tl.sum((key > hi[:, None]).to(tl.int32), 1)
    else:  # lo, hi = min, max of the candidates: count(>= lo) = count, count(> hi) = 0
        lo, hi = tl.reduce((tl.where(ok, key, IMAX), key), 1, _min_max)
        lo = tl.where(r_ok, lo, 0)
        hi = tl.where(r_ok, hi, 0)
        c_lo = count
        c_hi = tl.zeros([RB], tl.int32)
    lo = tl.where(c_hi == topk - 1, hi, lo)  # count(> hi) = topk - 1: v = hi
    hi = tl.where(c_lo == topk, lo, hi)  # count(>= lo) = topk: v = lo
    # Interpolation search on the images: guess where count(>= x) crosses topk by linear
    # interpolation between the ends (a few steps on smooth score tails, against about 25 for
    # bisection), snapping the moved end to a candidate's image (so both ends stay candidates and a
    # bracket of few candidates closes at once). A step that does not halve the candidates left in
    # the bracket makes the next one a bisection, so even adversarial images take at most about
    # twice bisection's steps. Each step is one reduction of three values (the count at the guess
    # and the nearest images on either side of it), so the step waits on one exchange between
    # the program's warps, not two in a row.
    bisect = tl.zeros([RB], tl.int1)
    iters = tl.zeros([RB], tl.int32)
    while tl.max((lo < hi).to(tl.int32)) > 0:
        active = lo < hi
        gap = c_lo - c_hi
        span = hi.to(tl.int64) - lo.to(tl.int64)  # (up to 2^32: int64)
        frac = ((c_lo - topk).to(tl.float32) + 0.5) / tl.maximum(gap, 1).to(tl.float32)
        step = tl.where(bisect, (span + 1) >> 1, ((span + 1).to(tl.float32) * frac).to(tl.int64))
        mid = (lo.to(tl.int64) + tl.minimum(tl.maximum(step, 1), span)).to(tl.int32)  # in [lo + 1, hi]
        ge = key >= mid[:, None]
        # ~key = -1 - key reverses the order without overflow, so a min finds the largest below mid.
        c_mid, above_mid, below_mid = tl.reduce(
            (ge.to(tl.int32), tl.where(ge, key, IMAX), tl.where(ge, IMAX, ~key)), 1, _sum_min_min)
        up = c_mid >= topk  # v >= mid: lo moves up to the least image >= mid; else hi to the largest < mid
        lo = tl.where(active & up, above_mid, lo)
        c_lo = tl.where(active & up, c_mid, c_lo)
        hi = tl.where(active & ~up, ~below_mid, hi)
        c_hi = tl.where(active & ~up, c_mid, c_hi)
        bisect = active & ((c_lo - c_hi) * 2 > gap)
        lo = tl.where(active & (c_hi == topk - 1), hi, lo)
        hi = tl.where(active & (c_lo == topk), lo, hi)
        iters += active.to(tl.int32)
    if COUNT_ITERS:
        tl.store(ITERS + slot, iters, mask=r_ok)
    kth = lo[:, None]
    need = topk - tl.sum((key > kth).to(tl.int32), 1)
    # The output, in chunks of CH <= CP slots re-read from the buffer (L2): done on the whole row, the
    # 64-bit addresses of its index loads and output stores took the registers from 96 to 177
    # (4 warps), which halves how many rows an SM works on during the search.
    # One scan a chunk gives both prefix counts: images above v in the low digit, images equal to v
    # in the high one (base 2 CP; int32 while CP <= 2^14). A slot is taken when above v, or equal to
    # v within the first `need` ties; its output position counts the taken slots up to it.
    BASE: tl.constexpr = 2 * CP
    carry = tl.zeros([RB], tl.int32 if CP <= 16384 else tl.int64)
    for c0 in range(0, tl.max(tl.where(r_ok, count, 0)), CH):
        o = c0 + tl.arange(0, CH)[None, :]
        img = tl.load(words + (2 * o + 1), mask=(o < count[:, None]) & r_ok[:, None], other=-IMAX - 1)
        above = img > kth
        tied = img == kth
        flags = above.to(carry.dtype) + tied.to(carry.dtype) * BASE
        both = tl.cumsum(flags, 1) + carry[:, None]
        carry += tl.sum(flags, 1)
        cum_tied = (both // BASE).to(tl.int32)
        take = above | (tied & (cum_tied <= need[:, None]))
        pos = (both % BASE).to(tl.int32) + tl.minimum(cum_tied, need[:, None]) - 1
        idx = tl.load(words + 2 * o, mask=take, other=0)
        tl.store(OUT + row[:, None] * stride_out + pos, idx, mask=take)
