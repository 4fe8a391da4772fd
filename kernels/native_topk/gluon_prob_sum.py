"""prob_sum's two dense passes for Hopper in Gluon: the per-head log-sum-exp, and the first main pass.

Both do what the Triton kernels of triton_impl.py do (the CPU path, the fallback and these
kernels' test oracle):
- `_lse_ws_kernel`: lse2[slot, h] = log2 sum_{j < n(slot)} exp2(scale_log2 * <q[row, h], kv[j]>)
  (`_lse_kernel`);
- `_main_ws_kernel`: the first try's main pass (`_score_pass_kernel` with PROB, PASS 2, no counts):
  every key whose score sum_h exp2(scale_log2 * <q[row, h], kv[j]> - lse2[slot, h]) is >= the
  row's write threshold tw goes to the row's candidate buffer in ascending key order, as
  (order-preserving int32 image of the score) << 32 | key, and the row's count of such keys to
  CNT_W (it may pass cap; slots past cap + BN are never written).

Why: the Triton passes run one program per 128 rows of one head and stream both their q tile and
the kv tile from L2 for every 64-column step (64 flops a byte at 128 x 128 tiles), and run their
exp2 epilogue while the tensor cores wait: at L 32k, H 16, 22.4 ms (440 TFLOP/s) and 34.2 ms
(288). Here all heads share kv (MQA), so the rows are q viewed [T * H, D] (row = token * H + head):
- one program takes 128 of these rows (128 / H tokens) and keeps them in shared memory for the
  whole pass (D 576: 9 chunks of [128, 64], 144 KiB), so only kv streams: 128 flops a byte;
- a producer warpgroup loads kv in [128 keys, 64 columns] chunks by TMA into a ring of STAGES
  buffers, in key order (one thread of it issues each copy), and signals the ready barrier of the
  warpgroup that reads the chunk;
- two math warpgroups take alternate tiles of 128 keys (WG0 the even ones, WG1 the odd ones):
  S [128 rows, 128 keys] = Q K^T in NC wgmma steps, each chunk's buffer freed as soon as the MMA
  after it is issued; then the tile's epilogue. While one runs its epilogue (exp2 of 16,384
  scores) the other's MMAs run.
- lse: online max and sum of exp2 per row; at the end WG1 hands its (m, l) to WG0 through shared
  memory, and WG0 merges and writes lse2.
- main pass: p = exp2(S * scale_log2 - lse2) summed over each token's H consecutive rows (H 8 to
  128, powers of two: within one warp up to 16, across warps above), then the candidate store.
  The two warpgroups write a row's candidates in tile order: each waits for the other's cursors
  (through shared memory) before its stores.
Rows of a program belong to consecutive tokens whose causal lengths differ by less than a tile,
so only the last one or two tiles are masked.

Not run by TRITON_INTERPRET (Gluon has no interpreter): tested on the GPU against the Triton passes.
"""

from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia import hopper
from triton.experimental.gluon.language.nvidia.hopper import mbarrier

try:  # host-side descriptors carrying the shared-memory layout
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
except ImportError:  # pragma: no cover - a Triton without Gluon's Hopper host module
    TensorDescriptor = None

from kernels.gluon_compat import sync_warps as _sync_warps, tma_load as _tma_load

# The candidates' score image is the Triton pass's own helper (a @triton.jit function of
# element-wise ops compiles inside a Gluon kernel).
from .triton_impl import _ordered_key

BM = gl.constexpr(128)   # q rows (token, head) a program
BN = gl.constexpr(128)   # keys a tile
DC = gl.constexpr(64)    # columns a chunk (one 128-byte swizzled row of bf16)
MAX_D = 576              # q's rows stay in shared memory: 128 x D x 2 bytes
# Main pass head counts: whole tokens a program (powers of two), at most 16 of them: fewer heads make
# more tokens, whose head-sum and layout-change scratch no longer fits beside q and the ring (H 4:
# 246,016 bytes of the 232,448 a block may have).
MAIN_HEADS = (8, 16, 32, 64, 128)
_NEG_BIG = gl.constexpr(-1.0e30)  # running max start: a fully masked tile gives exp2(-inf) = 0, not NaN
# The math warpgroups' scores [128 rows, 128 keys] fp32 (two m64 wgmma row blocks), and per-row values.
ACC = gl.constexpr(gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 128, 16]))
ROW = gl.constexpr(gl.SliceLayout(1, ACC.value))
COL = gl.constexpr(gl.SliceLayout(0, ACC.value))
# Main pass: a tile's per-token sums [tokens, 128 keys], each warp's lanes along the keys (for the
# prefix count), and per-token values.
TOKS = gl.constexpr(gl.BlockedLayout([1, 4], [1, 32], [4, 1], [1, 0]))
TOK = gl.constexpr(gl.SliceLayout(1, TOKS.value))
KEY = gl.constexpr(gl.SliceLayout(0, TOKS.value))
# Head sums of H > 16: the eight 16-row group sums of one key in one thread [BM / 16, BN].
GROUPS = gl.constexpr(gl.BlockedLayout([8, 1], [1, 32], [1, 4], [0, 1]))
SMEM = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
STAGES_DEFAULT = 4  # (5 measured slower for the lse: 13.84 against 12.98 ms at L 32k)
# Registers a thread of each math warpgroup of either pass (the loader keeps the rest of 168 x 384;
# 240 was timed no faster, 248 starves the loader).
MATH_REGS = gl.constexpr(232)


@gluon.jit
def _loader(q_desc, kv_desc, q_s, k_s, ready, free, q_bar, q_row0, n_tiles):
    """Producer: the program's q rows once (NC boxes on q_bar), then every tile's NC kv chunks in
    order through the ring; chunk i goes to buffer i % STAGES once its last reader freed it."""
    # (Constexprs do not survive warp_specialize's arguments in triton 3.6: read them off the buffers.)
    NC: gl.constexpr = q_s.shape[0]
    STAGES: gl.constexpr = k_s.shape[0]
    mbarrier.expect(q_bar, NC * BM * DC * 2)
    for c in gl.static_range(NC):
        _tma_load(q_desc, [q_row0, c * DC], q_bar, q_s.index(c))
    for t in range(n_tiles):
        w = t % 2  # the math warpgroup that reads this tile
        for c in gl.static_range(NC):
            i = t * NC + c
            s = i % STAGES
            mbarrier.wait(free.index(s), ((i // STAGES) & 1) ^ 1)  # fresh barriers pass at parity 1
            mbarrier.expect(ready.index(w * STAGES + s), BN * DC * 2)
            _tma_load(kv_desc, [t * BN, c * DC], ready.index(w * STAGES + s), k_s.index(s))


@gluon.jit
def _tile_scores(W: gl.constexpr, t, bits, q_s, k_s, ready, free):
    """Q K^T of key tile t, [BM, BN] fp32 in ACC, for math warpgroup W; each chunk's buffer is
    freed once the MMA after it is issued (wgmma wait 1). bits: bit s is the parity of this
    warpgroup's next wait on buffer s's ready barrier. Each warpgroup has its own ready barriers
    (ready[W * STAGES + s]): a shared one would complete once for every tile, and a warpgroup
    waiting for its chunk two tiles ahead would pass on the parity of a chunk not its own.
    The chunks are a loop, not `static_range`: unrolled, the q chunks' 72 wgmma descriptors are
    loop-invariant, get hoisted out of the tile loop and, with triton 3.6, spilled (500 bytes a
    thread at H 128, reloaded from L2 inside the MMAs: NOTES, thirteenth round); in a loop they are
    a few uniform integer ops a chunk."""
    NC: gl.constexpr = q_s.shape[0]
    STAGES: gl.constexpr = k_s.shape[0]
    acc = gl.zeros([BM, BN], gl.float32, ACC)
    for c in range(NC):
        i = t * NC + c
        s = i % STAGES
        mbarrier.wait(ready.index(W * STAGES + s), (bits >> s) & 1)
        bits ^= 1 << s
        acc = hopper.warpgroup_mma(q_s.index(c), k_s.index(s).permute((1, 0)), acc, use_acc=c > 0, is_async=True)
        acc = hopper.warpgroup_mma_wait(1, deps=[acc])  # the previous chunk's MMA is done: refill its buffer
        mbarrier.arrive(free.index((i + STAGES - 1) % STAGES), pred=c > 0)
    acc = hopper.warpgroup_mma_wait(0, deps=[acc])
    mbarrier.arrive(free.index((t * NC + NC - 1) % STAGES))
    return acc, bits


@gluon.jit
def _block_rows(r0, n_rows, tok0, H, L, q_offset):
    """Rows r0 .. r0 + 127 of this call [BM] (ROW), and their causal key counts (0 past n_rows)."""
    rows = r0 + gl.arange(0, BM, layout=ROW)
    n_keys = gl.where(rows < n_rows, gl.minimum(tok0 + rows // H + q_offset + 1, L), 0)
    return rows, n_keys


# ---------------------------------------------------------------------------------------------
# log-sum-exp pass


@gluon.jit
def _lse_math(W: gl.constexpr, q_s, k_s, ready, free, q_bar, xbuf, x_bar, LSE2, n_rows, r0, tok0, H, L, q_offset,
              scale_log2, n_tiles, n_min):
    """Math warpgroup W: tiles W, W + 2, ...; online (max, sum of exp2) of its 128 rows [BM]."""
    rows, n_keys = _block_rows(r0, n_rows, tok0, H, L, q_offset)
    m = gl.full([BM], _NEG_BIG, gl.float32, ROW)
    l = gl.zeros([BM], gl.float32, ROW)
    bits = 0
    mbarrier.wait(q_bar, 0)
    for t in range(W, n_tiles, 2):
        acc, bits = _tile_scores(W, t, bits, q_s, k_s, ready, free)
        x = acc * scale_log2
        if (t + 1) * BN > n_min:  # a tile past some row's last causal key
            keys = t * BN + gl.arange(0, BN, layout=COL)
            x = gl.where(keys[None, :] < n_keys[:, None], x, float("-inf"))
        m_new = gl.maximum(m, gl.max(x, 1))
        l = l * gl.exp2(m - m_new) + gl.sum(gl.exp2(x - m_new[:, None]), 1)
        m = m_new
    if W == 1:
        xbuf.index(0).store(m)
        xbuf.index(1).store(l)
        _sync_warps()
        mbarrier.arrive(x_bar)
    else:
        mbarrier.wait(x_bar, 0)
        m1 = xbuf.index(0).load(ROW)
        l1 = xbuf.index(1).load(ROW)
        mm = gl.maximum(m, m1)
        l = l * gl.exp2(m - mm) + l1 * gl.exp2(m1 - mm)
        gl.store(LSE2 + rows, mm + gl.log2(gl.where(l > 0, l, 1.0)), mask=rows < n_rows)


@gluon.jit
def _lse_math0(q_s, k_s, ready, free, q_bar, xbuf, x_bar, LSE2, n_rows, r0, tok0, H, L, q_offset, scale_log2,
               n_tiles, n_min):
    _lse_math(0, q_s, k_s, ready, free, q_bar, xbuf, x_bar, LSE2, n_rows, r0, tok0, H, L, q_offset, scale_log2,
              n_tiles, n_min)


@gluon.jit
def _lse_math1(q_s, k_s, ready, free, q_bar, xbuf, x_bar, LSE2, n_rows, r0, tok0, H, L, q_offset, scale_log2,
               n_tiles, n_min):
    _lse_math(1, q_s, k_s, ready, free, q_bar, xbuf, x_bar, LSE2, n_rows, r0, tok0, H, L, q_offset, scale_log2,
              n_tiles, n_min)


@gluon.jit
def _block_bounds(n_rows, tok0, H, L, q_offset, key_step):
    """This program's first row r0 (row blocks last first: the last rows have the most causal keys,
    so they start first), its tiles of BN keys taken every key_step-th (1: all keys), and the
    fewest causal keys of its rows."""
    r0 = (gl.num_programs(0) - 1 - gl.program_id(0)) * BM
    r_last = gl.minimum(r0 + BM, n_rows) - 1
    n_max = gl.minimum(tok0 + r_last // H + q_offset + 1, L)
    n_min = gl.minimum(tok0 + r0 // H + q_offset + 1, L)
    return r0, gl.cdiv(gl.cdiv(n_max, key_step), BN), n_min


@gluon.jit
def _ring(q_desc, kv_desc, NC: gl.constexpr, STAGES: gl.constexpr):
    """Shared memory of either pass: q rows [NC, BM, DC], the kv ring [STAGES, BN, DC] and its
    barriers (ready [2 * STAGES]: warpgroup-major, free [STAGES]), and q's barrier."""
    q_s = gl.allocate_shared_memory(gl.bfloat16, [NC, BM, DC], q_desc.layout)
    k_s = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BN, DC], kv_desc.layout)
    bar: gl.constexpr = mbarrier.MBarrierLayout()
    ready = gl.allocate_shared_memory(gl.int64, [2 * STAGES, 1], bar)
    free = gl.allocate_shared_memory(gl.int64, [STAGES, 1], bar)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], bar)
    for s in gl.static_range(STAGES):
        mbarrier.init(ready.index(s), count=1)  # the expect-tx arrival; the bytes complete it
        mbarrier.init(ready.index(STAGES + s), count=1)
        mbarrier.init(free.index(s), count=1)   # its reader warpgroup, once per chunk
    mbarrier.init(q_bar, count=1)
    return q_s, k_s, ready, free, q_bar


@gluon.jit
def _lse_ws_kernel(q_desc, kv_desc, LSE2, n_rows, q_row_base, tok0, H, L, q_offset, scale_log2,
                   NC: gl.constexpr, STAGES: gl.constexpr):
    """One program = 128 rows of q viewed [T * H, D]: rows r0 .. r0 + 127 of this call (row r is
    token tok0 + r // H, head r % H; LSE2 is [n_rows] in the same order)."""
    r0, n_tiles, n_min = _block_bounds(n_rows, tok0, H, L, q_offset, 1)
    # D 576, STAGES 4: 147,456 + 65,536 bytes + 1 KiB of row statistics and the barriers.
    q_s, k_s, ready, free, q_bar = _ring(q_desc, kv_desc, NC, STAGES)
    xbuf = gl.allocate_shared_memory(gl.float32, [2, BM], gl.SwizzledSharedLayout(1, 1, 1, order=[0]))
    x_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    mbarrier.init(x_bar, count=1)
    math_args = (q_s, k_s, ready, free, q_bar, xbuf, x_bar, LSE2, n_rows, r0, tok0, H, L, q_offset, scale_log2,
                 n_tiles, n_min)
    gl.warp_specialize(
        [(_loader, (q_desc, kv_desc, q_s, k_s, ready, free, q_bar, (q_row_base + r0).to(gl.int32), n_tiles)),
         (_lse_math0, math_args), (_lse_math1, math_args)],
        [4, 4], [MATH_REGS, MATH_REGS])


# ---------------------------------------------------------------------------------------------
# main pass (first try: no counts)


@gluon.jit
def _add(a, b):
    return a + b


@gluon.jit
def _head_sum(p, TPB: gl.constexpr, H: gl.constexpr):
    """Per-token sums [TPB, BN] (TOKS) of the probabilities p [BM, BN] (ACC) over each token's H rows."""
    if H <= 16:  # a token's rows lie in one warp's 16-row slice: lane shuffles only
        tot = gl.convert_layout(gl.sum(gl.reshape(p, [TPB, H, BN]), axis=1), TOKS)
    else:
        # A token spans warps: sum each warp's 16-row groups [BM / 16, BN], move them (4 KiB) so that
        # one thread holds all groups of its key, then add each token's groups in registers.
        groups = gl.convert_layout(gl.sum(gl.reshape(p, [BM // 16, 16, BN]), axis=1), GROUPS)
        tot = gl.convert_layout(gl.sum(gl.reshape(groups, [TPB, H // 16, BN]), axis=1), TOKS)
    return tot


@gluon.jit
def _block_tokens(LSE2, n_rows, r0, tok0, L, q_offset, TPB: gl.constexpr):
    """The per-row and per-token values of a program's TPB whole tokens (rows r0 .. r0 + 127): lse2 of
    its rows [BM] (ROW), this call's token slots [TPB] (TOK), which of them exist, and their causal
    key counts (0 for the others)."""
    H: gl.constexpr = BM // TPB
    rows = r0 + gl.arange(0, BM, layout=ROW)
    lse2 = gl.load(LSE2 + rows, mask=rows < n_rows, other=0.0)
    slot = r0 // H + gl.arange(0, TPB, layout=TOK)
    ok = slot < n_rows // H
    n_tok = gl.where(ok, gl.minimum(tok0 + slot + q_offset + 1, L), 0)
    return lse2, slot, ok, n_tok


@gluon.jit
def _main_math(W: gl.constexpr, q_s, k_s, ready, free, q_bar, cur_s, turn, LSE2, TW, BUF, CNT_W, n_rows, r0, tok0,
               L, q_offset, scale_log2, cap, stride_buf, n_tiles, n_min):
    """Math warpgroup W: tiles W, W + 2, ...; each tile's per-token score sums and candidate stores."""
    TPB: gl.constexpr = cur_s.shape[0]  # tokens a program
    H: gl.constexpr = BM // TPB
    lse2, slot, ok, n_tok = _block_tokens(LSE2, n_rows, r0, tok0, L, q_offset, TPB)
    tw = gl.load(TW + slot, mask=ok, other=float("inf"))
    row_buf = BUF + slot.to(gl.int64) * stride_buf
    bits = 0
    j = 0  # this warpgroup's tiles so far
    mbarrier.wait(q_bar, 0)
    for t in range(W, n_tiles, 2):
        acc, bits = _tile_scores(W, t, bits, q_s, k_s, ready, free)
        p = gl.exp2(acc * scale_log2 - lse2[:, None])
        tot = _head_sum(p, TPB, H)
        keys = t * BN + gl.arange(0, BN, layout=KEY)
        if (t + 1) * BN > n_min:  # a tile past some token's last causal key
            tot = gl.where(keys[None, :] < n_tok[:, None], tot, float("-inf"))
        take = tot >= tw[:, None]
        incl = gl.associative_scan(take.to(gl.int32), 1, _add)
        packed = (_ordered_key(tot).to(gl.int64) << 32) | keys[None, :].to(gl.int64)
        # Tile t - 1 (the other warpgroup's) must be stored first: its cursors come through cur_s.
        mbarrier.wait(turn.index(W), (j + 1 - W) & 1, pred=t > 0)
        cursor = gl.where(t > 0, cur_s.load(TOK), 0)
        pos = gl.minimum(cursor, cap)[:, None] + incl - 1  # below cap + BN: no bound test
        gl.store(row_buf[:, None] + pos, packed, mask=take)
        cursor += gl.sum(take.to(gl.int32), 1)
        cur_s.store(cursor)
        _sync_warps()
        mbarrier.arrive(turn.index(1 - W))
        if t == n_tiles - 1:
            gl.store(CNT_W + slot, cursor, mask=ok)
        j += 1


@gluon.jit
def _main_math0(q_s, k_s, ready, free, q_bar, cur_s, turn, LSE2, TW, BUF, CNT_W, n_rows, r0, tok0, L, q_offset,
                scale_log2, cap, stride_buf, n_tiles, n_min):
    _main_math(0, q_s, k_s, ready, free, q_bar, cur_s, turn, LSE2, TW, BUF, CNT_W, n_rows, r0, tok0, L, q_offset,
               scale_log2, cap, stride_buf, n_tiles, n_min)


@gluon.jit
def _main_math1(q_s, k_s, ready, free, q_bar, cur_s, turn, LSE2, TW, BUF, CNT_W, n_rows, r0, tok0, L, q_offset,
                scale_log2, cap, stride_buf, n_tiles, n_min):
    _main_math(1, q_s, k_s, ready, free, q_bar, cur_s, turn, LSE2, TW, BUF, CNT_W, n_rows, r0, tok0, L, q_offset,
               scale_log2, cap, stride_buf, n_tiles, n_min)


@gluon.jit
def _main_ws_kernel(q_desc, kv_desc, LSE2, TW, BUF, CNT_W, n_rows, q_row_base, tok0, L, q_offset, scale_log2, cap,
                    stride_buf, H: gl.constexpr, NC: gl.constexpr, STAGES: gl.constexpr):
    """One program = 128 rows of q viewed [T * H, D] (128 / H whole tokens; H in MAIN_HEADS): rows
    r0 .. r0 + 127 of this call, token slots r0 / H .. (TW, CNT_W [slots], BUF [slots, cap + BN]
    int64, LSE2 [n_rows])."""
    r0, n_tiles, n_min = _block_bounds(n_rows, tok0, H, L, q_offset, 1)
    q_s, k_s, ready, free, q_bar = _ring(q_desc, kv_desc, NC, STAGES)
    TPB: gl.constexpr = BM // H
    cur_s = gl.allocate_shared_memory(gl.int32, [TPB], gl.SwizzledSharedLayout(1, 1, 1, order=[0]))
    cur_s.store(gl.zeros([TPB], gl.int32, gl.BlockedLayout([1], [32], [4], [0])))
    turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())  # [warpgroup to go next]
    mbarrier.init(turn.index(0), count=1)
    mbarrier.init(turn.index(1), count=1)
    math_args = (q_s, k_s, ready, free, q_bar, cur_s, turn, LSE2, TW, BUF, CNT_W, n_rows, r0, tok0, L, q_offset,
                 scale_log2, cap, stride_buf, n_tiles, n_min)
    gl.warp_specialize(
        [(_loader, (q_desc, kv_desc, q_s, k_s, ready, free, q_bar, (q_row_base + r0).to(gl.int32), n_tiles)),
         (_main_math0, math_args), (_main_math1, math_args)],
        [4, 4], [MATH_REGS, MATH_REGS])


# ---------------------------------------------------------------------------------------------
# host


def gluon_prob_sum_supported(q: torch.Tensor, kv: torch.Tensor) -> bool:
    """Inputs the lse kernel takes: bf16 q [T, H, D] (contiguous) and kv [L, D] on a Hopper GPU, D a
    multiple of 64 up to MAX_D, 16-byte aligned, at least one whole TMA box of rows and of keys
    (smaller problems, which gain nothing here, keep the Triton passes; the GPU tests' shapes
    have at least 300 keys)."""
    D = kv.shape[-1]
    return (TensorDescriptor is not None and q.is_cuda and q.dtype == torch.bfloat16 and kv.dtype == torch.bfloat16
            and q.is_contiguous() and kv.is_contiguous() and D % DC.value == 0 and D <= MAX_D
            and BM.value <= q.shape[0] * q.shape[1] < 2**31 and kv.shape[0] >= BN.value
            and q.data_ptr() % 16 == 0 and kv.data_ptr() % 16 == 0
            and torch.cuda.get_device_capability(q.device)[0] == 9)


def main_pass_supported(heads: int, bn: int) -> bool:
    """Whether `main_pass_gluon` takes this head count (whole tokens in a program of 128 rows, at
    most 16 of them) for the driver's buffers of cap + bn slots a row (its spare slots must cover a tile)."""
    return heads in MAIN_HEADS and bn >= BN.value


def _descriptors(q: torch.Tensor, kv: torch.Tensor):
    T, H, D = q.shape
    q_desc = TensorDescriptor.from_tensor(q.reshape(T * H, D), [BM.value, DC.value], SMEM)
    kv_desc = TensorDescriptor.from_tensor(kv, [BN.value, DC.value], SMEM)
    return q_desc, kv_desc


def lse2_gluon(q: torch.Tensor, kv: torch.Tensor, row_base: int, n_tokens: int, q_offset: int, scale_log2: float,
               stages: int = STAGES_DEFAULT) -> torch.Tensor:
    """lse2 [n_tokens, H] fp32 (log2 units) of tokens row_base .. row_base + n_tokens - 1 of
    q [T, H, D] (contiguous bf16) against kv [L, D]: as `_lse_kernel` with rows = row_base + slot."""
    T, H, D = q.shape
    lse2 = torch.empty(n_tokens, H, dtype=torch.float32, device=q.device)
    n_rows = n_tokens * H
    if n_rows == 0:
        return lse2
    q_desc, kv_desc = _descriptors(q, kv)
    _lse_ws_kernel[(triton.cdiv(n_rows, BM.value),)](
        q_desc, kv_desc, lse2, n_rows, row_base * H, row_base, H, kv.shape[0], q_offset, scale_log2,
        NC=D // DC.value, STAGES=stages, num_warps=4)
    return lse2


def main_pass_gluon(q: torch.Tensor, kv: torch.Tensor, lse2: torch.Tensor, tw: torch.Tensor, buf: torch.Tensor,
                    count_w: torch.Tensor, row_base: int, q_offset: int, scale_log2: float, cap: int,
                    stages: int = STAGES_DEFAULT) -> None:
    """The first main pass over tokens row_base .. row_base + R - 1 (R = tw.numel()) of q [T, H, D]:
    lse2 [R, H] fp32, tw [R] fp32 -> buf [R, >= cap + 128] int64 candidates, count_w [R] int32
    (the driver's `_Rows.run(2, count=False)` contract)."""
    T, H, D = q.shape
    R = tw.numel()
    if R == 0:
        return
    assert main_pass_supported(H, buf.shape[1] - cap) and lse2.is_contiguous() and buf.stride(1) == 1
    q_desc, kv_desc = _descriptors(q, kv)
    n_rows = R * H
    _main_ws_kernel[(triton.cdiv(n_rows, BM.value),)](
        q_desc, kv_desc, lse2, tw, buf, count_w, n_rows, row_base * H, row_base, kv.shape[0], q_offset, scale_log2,
        cap, buf.stride(0), H=H, NC=D // DC.value, STAGES=stages, num_warps=4)
