"""Per-token log-probabilities of target tokens, fused: forward and backward Triton kernels.

A *row* is one scoring position (n, t) of logits (N, T, V). With ``shift`` = 1, row (n, t) scores
``labels[n, t + 1]`` (the Hugging Face causal-LM convention) and the last position of each sequence
scores nothing; without it, row (n, t) scores ``labels[n, t]``. A row is *valid* when its label exists
and differs from ``ignore_index``.

Forward, one read of each logit of a valid row (invalid rows read nothing):

    m, s    = running max and running sum of exp(x - m) over vocabulary blocks  (online log-sum-exp)
    lse     = m + log(s)
    logp    = x[label] - lse          (NaN when label lies outside [0, V): never an out-of-bounds read)

A row whose logits seen so far are all -inf (a masked or padded vocabulary) keeps m = -inf and s = 0: the
exponentials are taken against 0 instead of m there, so no -inf - (-inf) ever forms. A row that is -inf
everywhere gets lse = -inf (and NaN log-prob, as ``log_softmax``); a -inf target in a row with finite logits
gets -inf.

and with ``WITH_STATS`` the per-token statistics DPO trainers log, in the same pass (p = softmax(x)):

    mean_logit       = sum_v x[v] / V
    entropy          = lse - sum_v p[v] x[v]       (running sum of exp(x - m) * x, rescaled like s)
    log_sum_sq_probs = log(sum_v p[v]^2)           (running sum of exp(2 (x - m)); WPO weighting)
    is_top1          = label is the first argmax   (x[label] >= m and x[label] > max of x before label)

The log-prob and the statistics of a row are stored at its label's *position* (t + shift; the first
position, which no row scores when shifting, gets 0 from the last row, which scores nothing), so outputs come
out aligned with ``labels`` and need no shifting copy; ``lse`` stays per row. With ``with_max`` the forward
also stores the row maximum and the target's own logit (what a vocabulary shard contributes, ``fastdpo._vocab``).

Backward, one read of each logit of a row with non-zero coefficient and one write of every gradient:

    dlogits[row, v] = coef[position of row] * (1[v == label] - exp(x[v] - lse[row]))

``coef`` (fp32, indexed like ``labels`` through its own strides: a per-sequence coefficient broadcast with a
zero position stride costs no (N, T) tensor) carries everything upstream: the per-sequence gradient of the
summed or averaged log-prob, a per-token gradient, or the DPO loss's own coefficient. Invalid rows get a zero
gradient without a read, whatever their coefficient. The gradient is formed in fp32 and rounded once on store,
so the target element (1 - p, where bf16 would cancel) is exact to the storage precision.

``_sequence_sums_kernel`` (one program per sequence, a fixed reduction order) then sums the log-probs, the
token count and the statistics of each sequence: what every loss reads.

Tiles and reductions: a program holds [BLOCK_T, BLOCK_V] logits as a 3-D tile [BLOCK_T, BLOCK_V // VEC, VEC]
loaded directly in that shape (VEC: the logits of one 16-byte load), so every sum is per lane (over the last
axis, inside a thread when the loads are vectors) and reduced over lanes once after the vocabulary loop. No
reshape: the axes of every reduction are explicit, and no row's values can reach another row's sum (a
reordering reshape lets the compiler permute elements across rows). BLOCK_T > 1 only for small vocabularies.

Compiled variants. Every integer argument is typed (offsets are int64) and never specialised by Triton
(``do_not_specialize``), and only the logits' and gradient's pointers are specialised on 16-byte alignment (the
launcher hands them aligned, ``aligned_view``). What varies is the constexprs: the tile, ``WITH_STATS`` and
``ALIGNED`` (unit vocabulary stride, row strides and V multiples of 16: vector loads). ``fwd_meta`` /
``bwd_meta`` / ``sums_meta`` choose them for a launch and ``all_meta`` lists every choice they can make: the
AOT check (``fastdpo.aot``) compiles exactly that list.
"""

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
FLT_LOWEST = tl.constexpr(-3.4028234663852886e38)

# Vocabulary block of one program: 32 fp32 values per thread at 8 warps.
MAX_BLOCK_V = 8192
# With the statistics, five values per logit live at once: half the block keeps registers (~100) low enough
# for two programs per SM (measured with the AOT check).
MAX_BLOCK_V_STATS = 4096
# 256-wide tiles (8 rows) need a shared-memory exchange for the per-lane sums (6-7 barriers per block, AOT
# check): vocabularies under 512 (toys, tests) take a 4 x 512 tile and mask the rest.
MIN_BLOCK_V = 512
# Small vocabularies share a program between rows, up to this many elements: every element of a 2-D tile
# carries its own 64-bit address, and 8192 of them spill registers (measured with the AOT check).
MAX_TILE_2D = 2048
# ALIGNED: row strides, V and the base pointer multiples of this many elements (and bytes), unit vocab stride.
ALIGN = 16
# Without ALIGNED (scalar loads, per-element sums in the forward), blocks hold at most this many logits per row.
MAX_BLOCK_V_GENERIC = 2048
# Integer arguments are never specialised at launch (each value equal to 1 or divisible by 16 would compile a
# variant of its own): the constexprs below are the only variants.
_FWD_INTS = ["n_rows", "T", "V", "stride_xn", "stride_xt", "stride_xv", "stride_ln", "stride_lt", "ignore_index",
             "shift", "with_max", "x_off"]
_BWD_INTS = ["n_rows", "T", "V", "stride_xn", "stride_xt", "stride_xv", "stride_ln", "stride_lt", "stride_gn",
             "stride_gt", "stride_gv", "stride_cn", "stride_ct", "ignore_index", "shift", "x_off", "g_off"]
_SUMS_INTS = ["S", "T", "NT", "stride_ln", "stride_lt", "ignore_index", "shift"]


def tile_config(vocab_size: int, with_stats: bool = False, aligned: bool = True) -> dict:
    """Block sizes and warps for a vocabulary (``aligned``: the forward's ALIGNED variant)."""
    cap = MAX_BLOCK_V_STATS if with_stats else MAX_BLOCK_V
    if not aligned:
        cap = min(cap, MAX_BLOCK_V_GENERIC)
    block_v = min(max(triton.next_power_of_2(vocab_size), MIN_BLOCK_V), cap)
    # without ALIGNED every logit of a 2-D tile is a scalar load with its own 64-bit address and accumulators:
    # half the tile (4 x 512 spilled 32 bytes on sm_80)
    block_t = max(1, (MAX_TILE_2D if aligned else MAX_TILE_2D // 2) // block_v)
    # 2-D tiles take 8 warps: at 4, Triton 3.6 and 3.7 spill 8 bytes of some fp32 forwards (AOT check); so do
    # the statistics' per-element sums without ALIGNED (168 registers at 4 warps)
    num_warps = 8 if block_t * block_v >= 4096 or block_t > 1 or (with_stats and not aligned) else 4
    return {"BLOCK_T": block_t, "BLOCK_V": block_v, "num_warps": num_warps}


def _all_tiles(with_stats: bool, aligned: bool = True) -> list:
    out, block_v = [], MIN_BLOCK_V
    while block_v <= MAX_BLOCK_V:
        tile = tile_config(block_v, with_stats, aligned)
        if tile not in out:
            out.append(tile)
        block_v *= 2
    return out


def is_aligned(data_ptr: int, element_size: int, vocab_size: int, *strides: int) -> bool:
    """Whether (N, T, V) logits (or a gradient) may take the ALIGNED variant: a unit vocabulary stride (the last
    of ``strides``), a 16-byte aligned base, and row strides and V multiples of ``ALIGN`` elements."""
    *rows, sv = strides
    return (sv == 1 and data_ptr % 16 == 0 and vocab_size % ALIGN == 0 and all(s % ALIGN == 0 for s in rows)
            and ALIGN * element_size >= 16)


def fwd_meta(vocab_size: int, with_stats: bool, aligned: bool) -> dict:
    """Constexprs and warps of a forward launch."""
    return {**tile_config(vocab_size, with_stats, aligned), "WITH_STATS": bool(with_stats), "ALIGNED": bool(aligned)}


def bwd_meta(vocab_size: int, aligned: bool) -> dict:
    """Constexprs and warps of a backward launch."""
    return {**tile_config(vocab_size), "ALIGNED": bool(aligned)}


def sums_meta(with_stats: bool, segmented: bool = False) -> dict:
    return {"BLOCK": SUMS_BLOCK, "num_warps": SUMS_NUM_WARPS, "WITH_STATS": bool(with_stats),
            "SEGMENTED": bool(segmented)}


def all_meta() -> dict:
    """Every launch configuration ``fwd_meta``, ``bwd_meta`` and ``sums_meta`` can return, per kernel name."""
    bools = (True, False)
    return {
        "_sequence_logps_fwd_kernel": [{**t, "WITH_STATS": s, "ALIGNED": a} for s in bools for a in bools
                                       for t in _all_tiles(s, a)],
        "_sequence_logps_bwd_kernel": [{**t, "ALIGNED": a} for t in _all_tiles(False) for a in bools],
        "_sequence_sums_kernel": [sums_meta(s, g) for s in bools for g in bools],
    }


# Pointer arguments: the logits' dtype ("x") or a fixed one (what the AOT check compiles them as).
POINTERS = {
    "_sequence_logps_fwd_kernel": {"logits_ptr": "x", "labels_ptr": "*i64", "token_logps_ptr": "*fp32",
                                   "lse_ptr": "*fp32", "stats_ptr": "*fp32"},
    "_sequence_logps_bwd_kernel": {"logits_ptr": "x", "labels_ptr": "*i64", "lse_ptr": "*fp32",
                                   "coef_ptr": "*fp32", "dlogits_ptr": "x"},
    "_sequence_sums_kernel": {"token_logps_ptr": "*fp32", "stats_ptr": "*fp32", "labels_ptr": "*i64",
                              "cu_ptr": "*i64", "logps_ptr": "*fp32", "num_tokens_ptr": "*i64",
                              "seq_stats_ptr": "*fp32"},
}


@triton.jit
def _row_coords(pid, n_rows, T, stride_ln, stride_lt, labels_ptr, ignore_index, shift, BLOCK_T: tl.constexpr):
    """Rows handled by program ``pid``: (sequence, position) indices, labels and validity."""
    rows = pid.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    in_bounds = rows < n_rows
    n = rows // T
    t = rows % T
    label_t = t + shift  # shift is 0 or 1
    has_label = in_bounds & (label_t < T)
    label = tl.load(labels_ptr + n * stride_ln + label_t * stride_lt, mask=has_label, other=0).to(tl.int64)
    valid = has_label & (label != ignore_index)
    return rows, in_bounds, n, t, label, valid


@triton.jit
def _position(n, t, T, shift):
    """Flat index (N * T) of the label that row (n, t) scores: t + shift, and 0 for the last row with shift
    (it scores nothing, and position 0 is scored by no row)."""
    label_t = t + shift
    return n * T + tl.where(label_t < T, label_t, 0)


@triton.jit
def _stride(s, ALIGNED: tl.constexpr):
    """A row stride as int64; with ALIGNED, written as a multiple of 16 (the launcher guarantees it is one), which
    is what lets the compiler prove every row 16-byte aligned and load vectors."""
    s = s.to(tl.int64)
    if ALIGNED:
        s = s // 16 * 16
    return s


@triton.jit
def _col_offsets(v, stride_v, ALIGNED: tl.constexpr):
    """Offsets of vocabulary entries ``v`` (int32) within a row: contiguous with ALIGNED, else int64 products
    (a vocabulary-major layout puts v * stride past 2^31)."""
    if ALIGNED:
        off = v
    else:
        off = v.to(tl.int64) * stride_v.to(tl.int64)
    return off


@triton.jit
def _online_update(x, x_for_sum, v, label, m, s, xsum, xp, q, m_before, WITH_STATS: tl.constexpr):
    """One vocabulary block of the forward: x (BLOCK_T, L, B) fp32, -inf where masked; x_for_sum is x with
    masked lanes 0; v (L, B) the block's vocabulary ids. m (BLOCK_T,) is the row maximum so far; s, xsum, xp,
    q (sums) and m_before (a maximum) are per-lane accumulators (BLOCK_T, L), each lane rescaled by the row's
    alpha. Every sum reduces the last axis, a lane's B values; only the maximum is reduced over the row."""
    m_new = tl.maximum(m, tl.max(tl.max(x, 2), 1))
    # Exponentials are taken against m_new, or 0 while the row has seen no finite logit: exp(-inf - 0) = 0,
    # where exp(-inf - (-inf)) would be NaN and poison the row's sums for good.
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2((m - m_ref) * LOG2E)[:, None]
    p = tl.exp2((x - m_ref[:, None, None]) * LOG2E)
    s = s * alpha + tl.sum(p, 2)
    if WITH_STATS:
        xsum += tl.sum(x_for_sum, 2)
        # p = 0 where x = -inf (masked lanes, padded vocabularies): clamping x to the lowest finite fp32 makes
        # p * x 0 there, not NaN (a NaN logit still propagates through p)
        xp = xp * alpha + tl.sum(p * tl.maximum(x, FLT_LOWEST), 2)
        q = q * (alpha * alpha) + tl.sum(p * p, 2)
        before = tl.where(v[None, :, :] < label[:, None, None], x, float("-inf"))
        m_before = tl.maximum(m_before, tl.max(before, 2))
    return m_new, s, xsum, xp, q, m_before


@triton.jit(do_not_specialize=_FWD_INTS,
            do_not_specialize_on_alignment=["labels_ptr", "token_logps_ptr", "lse_ptr", "stats_ptr"])
def _sequence_logps_fwd_kernel(
    # data ptrs
    logits_ptr,  # (N, T, V) any float dtype, any strides
    labels_ptr,  # (N, T) int64
    token_logps_ptr,  # (N * T,) fp32 out, at positions: log p(label), 0 where no valid row scores it
    lse_ptr,  # (N * T,) fp32 out, per row: log-sum-exp, 0 on invalid rows
    stats_ptr,  # (4 or 6, N * T) fp32 out, only WITH_STATS, at positions: mean logit, entropy, log sum p^2,
    # is_top1, and with ``with_max`` the row maximum and the target's logit (a vocabulary shard's partials)
    # shapes
    n_rows: tl.int64, T: tl.int64, V: tl.int32,
    # strides
    stride_xn: tl.int64, stride_xt: tl.int64, stride_xv: tl.int64,
    stride_ln: tl.int64, stride_lt: tl.int64,
    ignore_index: tl.int64,
    shift: tl.int32,  # 0 or 1
    with_max: tl.int32,  # 0 or 1: a runtime mask on two stores (a branch there spilled on Triton 3.6)
    x_off: tl.int64,  # elements from logits_ptr (16-byte aligned) to the logits; 0 with ALIGNED
    BLOCK_T: tl.constexpr,
    BLOCK_V: tl.constexpr,
    WITH_STATS: tl.constexpr,
    ALIGNED: tl.constexpr,  # unit vocabulary stride; row strides and V multiples of 16; logits 16-byte aligned
):
    # A block is a (BLOCK_T, L, B) tile, column l * B + b, and every sum is kept per lane (l): over the B values
    # of a lane, which one thread holds, so that no sum crosses threads inside the loop. With ALIGNED a lane is
    # one 16-byte vector load; otherwise loads are scalar and a lane is one logit (B = 1: per-element sums, in
    # smaller blocks, see ``tile_config``).
    B: tl.constexpr = 128 // logits_ptr.dtype.element_ty.primitive_bitwidth if ALIGNED else 1
    L: tl.constexpr = BLOCK_V // B  # lanes per row
    pid = tl.program_id(0)
    rows, in_bounds, n, t, label, valid = _row_coords(
        pid, n_rows, T, stride_ln, stride_lt, labels_ptr, ignore_index, shift, BLOCK_T)
    if ALIGNED:
        V = V // 16 * 16
    if not ALIGNED:
        logits_ptr += x_off
    row_ptr = logits_ptr + n * _stride(stride_xn, ALIGNED) + t * _stride(stride_xt, ALIGNED)  # (BLOCK_T,)

    # The row maximum is reduced every block (the exponentials need it); every sum is kept per lane, each
    # lane rescaled by the row's alpha, and reduced once after the loop: one block-wide reduction per block.
    # Full blocks load without a vocabulary mask; the partial block at the end of the row (if any) with one, and
    # first: the loop's accumulators then flow only into the reductions after it (Triton 3.6's thread-locality
    # pass asserts on a loop result used twice, as a tail block after the loop does).
    m = tl.full((BLOCK_T,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_T, L), tl.float32)
    xsum = tl.zeros((BLOCK_T, L), tl.float32)
    xp = tl.zeros((BLOCK_T, L), tl.float32)
    q = tl.zeros((BLOCK_T, L), tl.float32)
    m_before = tl.full((BLOCK_T, L), float("-inf"), tl.float32)
    label32 = tl.where((label >= 0) & (label < V), label, 0).to(tl.int32)  # V < 2^31: 32-bit compares
    cols = tl.arange(0, L)[:, None] * B + tl.arange(0, B)[None, :]  # (L, B): column within a block
    v_full = (V // BLOCK_V) * BLOCK_V
    if v_full < V:
        v = v_full + cols
        mask = valid[:, None, None] & (v < V)[None, :, :]
        x = tl.load(row_ptr[:, None, None] + _col_offsets(v, stride_xv, ALIGNED)[None, :, :], mask=mask,
                    other=float("-inf"), eviction_policy="evict_first").to(tl.float32)
        m, s, xsum, xp, q, m_before = _online_update(x, tl.where(mask, x, 0.0), v, label32, m, s, xsum, xp, q,
                                                     m_before, WITH_STATS)
    for v0 in range(0, v_full, BLOCK_V):
        v = v0 + cols
        x = tl.load(row_ptr[:, None, None] + _col_offsets(v, stride_xv, ALIGNED)[None, :, :],
                    mask=valid[:, None, None], other=float("-inf"), eviction_policy="evict_first").to(tl.float32)
        m, s, xsum, xp, q, m_before = _online_update(x, x, v, label32, m, s, xsum, xp, q, m_before, WITH_STATS)
    s = tl.sum(s, 1)
    lse = tl.where(m == float("-inf"), 0.0, m) + tl.log2(s) * LN2  # -inf for a row of -inf logits
    if WITH_STATS:
        xsum = tl.sum(xsum, 1)
        xp = tl.sum(xp, 1)
        q = tl.sum(q, 1)
        m_before = tl.max(m_before, 1)

    label_ok = (label >= 0) & (label < V)
    target = tl.load(row_ptr + _col_offsets(tl.where(label_ok, label, 0), stride_xv, ALIGNED), mask=valid,
                     other=0.0).to(tl.float32)
    logp = tl.where(label_ok, target - lse, float("nan"))
    pos = _position(n, t, T, shift)
    tl.store(token_logps_ptr + pos, tl.where(valid, logp, 0.0), mask=in_bounds)
    tl.store(lse_ptr + rows, tl.where(valid, lse, 0.0), mask=in_bounds)
    if WITH_STATS:
        is_top1 = ((target >= m) & (target > m_before)).to(tl.float32)
        tl.store(stats_ptr + pos, tl.where(valid, xsum / V, 0.0), mask=in_bounds)
        tl.store(stats_ptr + n_rows + pos, tl.where(valid, lse - xp / s, 0.0), mask=in_bounds)
        tl.store(stats_ptr + 2 * n_rows + pos, tl.where(valid, (tl.log2(q) - 2.0 * tl.log2(s)) * LN2, 0.0),
                 mask=in_bounds)
        tl.store(stats_ptr + 3 * n_rows + pos, tl.where(valid, is_top1, 0.0), mask=in_bounds)
        shard = in_bounds & (rows * 0 + with_max > 0)
        tl.store(stats_ptr + 4 * n_rows + pos, tl.where(valid, m, 0.0), mask=shard)
        # the target's own logit (0 where the label is not in [0, V): another shard's), compared bit for bit
        # with every shard's maximum for the global is_top1
        tl.store(stats_ptr + 5 * n_rows + pos, tl.where(valid & label_ok, target, 0.0), mask=shard)


@triton.jit(do_not_specialize=_BWD_INTS, do_not_specialize_on_alignment=["labels_ptr", "lse_ptr", "coef_ptr"])
def _sequence_logps_bwd_kernel(
    # data ptrs
    logits_ptr,  # (N, T, V) any float dtype, any strides
    labels_ptr,  # (N, T) int64
    lse_ptr,  # (N * T,) fp32 per row, from the forward
    coef_ptr,  # (N, T) fp32 at positions, any strides: d loss / d logp of each scored label
    dlogits_ptr,  # (N, T, V) out, dtype of the logits; may alias logits_ptr (in-place backward)
    # shapes
    n_rows: tl.int64, T: tl.int64, V: tl.int32,
    # strides
    stride_xn: tl.int64, stride_xt: tl.int64, stride_xv: tl.int64,
    stride_ln: tl.int64, stride_lt: tl.int64,
    stride_gn: tl.int64, stride_gt: tl.int64, stride_gv: tl.int64,
    stride_cn: tl.int64, stride_ct: tl.int64,
    ignore_index: tl.int64,
    shift: tl.int32,  # 0 or 1
    x_off: tl.int64, g_off: tl.int64,  # elements from the (16-byte aligned) pointers to the data; 0 with ALIGNED
    BLOCK_T: tl.constexpr,
    BLOCK_V: tl.constexpr,
    ALIGNED: tl.constexpr,  # as in the forward, for the logits and the gradient both
):
    pid = tl.program_id(0)
    rows, in_bounds, n, t, label, valid = _row_coords(
        pid, n_rows, T, stride_ln, stride_lt, labels_ptr, ignore_index, shift, BLOCK_T)
    if ALIGNED:
        V = V // 16 * 16
    else:
        logits_ptr += x_off
        dlogits_ptr += g_off
    label_t = t + shift
    coef = tl.load(coef_ptr + n * stride_cn + label_t * stride_ct, mask=valid, other=0.0)
    lse = tl.load(lse_ptr + rows, mask=in_bounds, other=0.0)
    read = valid & (coef != 0.0)
    x_row = logits_ptr + n * _stride(stride_xn, ALIGNED) + t * _stride(stride_xt, ALIGNED)
    g_row = dlogits_ptr + n * _stride(stride_gn, ALIGNED) + t * _stride(stride_gt, ALIGNED)
    cols = tl.arange(0, BLOCK_V)
    for v0 in range(0, V, BLOCK_V):
        v = v0 + cols
        in_v = (v < V)[None, :]
        x = tl.load(x_row[:, None] + _col_offsets(v, stride_xv, ALIGNED)[None, :], mask=read[:, None] & in_v,
                    other=float("-inf"), eviction_policy="evict_first").to(tl.float32)
        p = tl.exp2((x - lse[:, None]) * LOG2E)
        onehot = (v[None, :] == label[:, None]).to(tl.float32)
        g = tl.where(read[:, None], coef[:, None] * (onehot - p), 0.0)
        tl.store(g_row[:, None] + _col_offsets(v, stride_gv, ALIGNED)[None, :], g.to(dlogits_ptr.dtype.element_ty),
                 mask=in_bounds[:, None] & in_v)


@triton.jit(do_not_specialize=_SUMS_INTS, do_not_specialize_on_alignment=["labels_ptr", "cu_ptr"])
def _sequence_sums_kernel(
    # data ptrs
    token_logps_ptr,  # (N, T) fp32 at positions, from the forward
    stats_ptr,  # (4, N, T) fp32 at positions (only WITH_STATS)
    labels_ptr,  # (N, T) int64
    cu_ptr,  # SEGMENTED: (S + 1,) int64 segment offsets into the N * T positions (N = 1: a packed row)
    logps_ptr,  # (S,) fp32 out: sum of the log-probs of the sequence
    num_tokens_ptr,  # (S,) int64 out: its valid positions
    seq_stats_ptr,  # (4, S) fp32 out (only WITH_STATS): sums of each statistic over its valid positions
    # shapes
    S: tl.int32,  # sequences: N, or the segments of a packed row
    T: tl.int32,
    NT: tl.int64,  # N * T
    # strides
    stride_ln: tl.int64, stride_lt: tl.int64,
    ignore_index: tl.int64,
    shift: tl.int32,  # 0 or 1
    BLOCK: tl.constexpr,
    WITH_STATS: tl.constexpr,
    SEGMENTED: tl.constexpr,
):
    """Program n sums sequence n's positions in a fixed order: the same bits on every run. A sequence is row n of
    (N, T), or with SEGMENTED the positions [cu[n], cu[n + 1]) of a packed row (N = 1), whose first positions the
    caller has already masked. Offsets outside [0, NT], decreasing, or a first offset other than 0 or a last other
    than NT give NaN (and a count of -1) for the sequences they touch: the offsets are never trusted for a read."""
    n = tl.program_id(0).to(tl.int64)
    if SEGMENTED:
        start = tl.load(cu_ptr + n).to(tl.int64)
        end = tl.load(cu_ptr + n + 1).to(tl.int64)
        bad = (start < 0) | (start > end) | (end > NT) | ((n == 0) & (start != 0)) | ((n == S - 1) & (end != NT))
        start = tl.minimum(tl.maximum(start, 0), NT)
        end = tl.where(bad, start, end)
        row = labels_ptr + start * stride_lt
        first = 0
        n_pos = end - start
    else:
        start = n * T
        row = labels_ptr + n * stride_ln
        first = shift  # with shift, position 0 is scored by no row
        n_pos = T
        bad = n < 0
    acc = tl.zeros((BLOCK,), tl.float32)
    cnt = tl.zeros((BLOCK,), tl.int64)
    s0 = tl.zeros((BLOCK,), tl.float32)
    s1 = tl.zeros((BLOCK,), tl.float32)
    s2 = tl.zeros((BLOCK,), tl.float32)
    s3 = tl.zeros((BLOCK,), tl.float32)
    cols = tl.arange(0, BLOCK)
    for t0 in range(0, n_pos, BLOCK):
        t = t0 + cols
        in_t = (t < n_pos) & (t >= first)
        label = tl.load(row + t * stride_lt, mask=in_t, other=ignore_index)
        valid = in_t & (label != ignore_index)
        acc += tl.load(token_logps_ptr + start + t, mask=valid, other=0.0)
        cnt += valid.to(tl.int64)
        if WITH_STATS:
            s0 += tl.load(stats_ptr + start + t, mask=valid, other=0.0)
            s1 += tl.load(stats_ptr + NT + start + t, mask=valid, other=0.0)
            s2 += tl.load(stats_ptr + 2 * NT + start + t, mask=valid, other=0.0)
            s3 += tl.load(stats_ptr + 3 * NT + start + t, mask=valid, other=0.0)
    nan = float("nan")
    tl.store(logps_ptr + n, tl.where(bad, nan, tl.sum(acc, 0)))
    tl.store(num_tokens_ptr + n, tl.where(bad, -1, tl.sum(cnt, 0)))
    if WITH_STATS:
        tl.store(seq_stats_ptr + n, tl.where(bad, nan, tl.sum(s0, 0)))
        tl.store(seq_stats_ptr + S + n, tl.where(bad, nan, tl.sum(s1, 0)))
        tl.store(seq_stats_ptr + 2 * S + n, tl.where(bad, nan, tl.sum(s2, 0)))
        tl.store(seq_stats_ptr + 3 * S + n, tl.where(bad, nan, tl.sum(s3, 0)))


SUMS_BLOCK = 1024
SUMS_NUM_WARPS = 4
