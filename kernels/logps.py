"""Per-token log-probabilities of target tokens, fused: forward and backward Triton kernels.

A *row* is one scoring position (n, t) of logits (N, T, V). With ``shift`` = 1, row (n, t) scores
``labels[n, t + 1]`` (the Hugging Face causal-LM convention) and the last position of each sequence
scores nothing; without it, row (n, t) scores ``labels[n, t]``. A row is *valid* when its label exists
and differs from ``ignore_index``.

Forward, one read of each logit of a valid row (invalid rows read nothing):

    m, s    = running max and running sum of exp(x - m) over vocabulary blocks  (online log-sum-exp)
    lse     = m + log(s)
    logp    = x[label] - lse          (NaN when label lies outside [0, V): never an out-of-bounds read)

and with ``WITH_STATS`` the per-token statistics DPO trainers log, in the same pass (p = softmax(x)):

    mean_logit       = sum_v x[v] / V
    entropy          = lse - sum_v p[v] x[v]       (running sum of exp(x - m) * x, rescaled like s)
    log_sum_sq_probs = log(sum_v p[v]^2)           (running sum of exp(2 (x - m)); WPO weighting)
    is_top1          = label is the first argmax   (x[label] >= m and x[label] > max of x before label)

The log-prob and the statistics of a row are stored at its label's *position* (t + shift; the first
position, which no row scores when shifting, gets 0 from the last row, which scores nothing), so outputs come
out aligned with ``labels`` and need no shifting copy; ``lse`` stays per row.

Backward, one read of each logit of a row with non-zero coefficient and one write of every gradient:

    dlogits[row, v] = coef[position of row] * (1[v == label] - exp(x[v] - lse[row]))

``coef`` (fp32, indexed like ``labels`` through its own strides: a per-sequence coefficient broadcast with a
zero position stride costs no (N, T) tensor) carries everything upstream: the per-sequence gradient of the
summed or averaged log-prob, a per-token gradient, or the DPO loss's own coefficient. Invalid rows get a zero
gradient without a read, whatever their coefficient. The gradient is formed in fp32 and rounded once on store,
so the target element (1 - p, where bf16 would cancel) is exact to the storage precision.

``_sequence_sums_kernel`` (one program per sequence, a fixed reduction order) then sums the log-probs, the
token count and the statistics of each sequence: what every loss reads.

Rows are tiled [BLOCK_T, BLOCK_V]: BLOCK_T > 1 only for small vocabularies, where one row per program
would leave most lanes idle. Offsets of rows are int64 (16 x 2048 x 128256 logits already pass 2^31).
"""

import warnings

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
# ``tl.reshape(..., can_reorder=True)`` lets the compiler group the logits each thread already holds, so the
# per-lane sums below stay inside a thread (without it Triton 3.9 moves the block through shared memory: 4 more
# barriers per block). Triton 3.9 deprecates the flag, to be removed in 3.10; pass it only before that.
_CAN_REORDER = tl.constexpr(tuple(int(p) for p in triton.__version__.split(".")[:2]) < (3, 10))
warnings.filterwarnings("ignore", message=r"tl\.reshape\(can_reorder=True\) is deprecated", category=UserWarning)

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


def tile_config(vocab_size: int, with_stats: bool = False) -> dict:
    """Block sizes and warps for a vocabulary: every configuration the dispatcher can choose lies in
    ``all_tile_configs()`` (the AOT check compiles exactly those)."""
    cap = MAX_BLOCK_V_STATS if with_stats else MAX_BLOCK_V
    block_v = min(max(triton.next_power_of_2(vocab_size), MIN_BLOCK_V), cap)
    block_t = max(1, MAX_TILE_2D // block_v)
    # 2-D tiles take 8 warps: at 4, Triton 3.6 and 3.7 spill 8 bytes of some fp32 forwards (AOT check)
    num_warps = 8 if block_t * block_v >= 4096 or block_t > 1 else 4
    return {"BLOCK_T": block_t, "BLOCK_V": block_v, "num_warps": num_warps}


def all_tile_configs(with_stats: bool = False) -> list:
    out, block_v = [], MIN_BLOCK_V
    while block_v <= (MAX_BLOCK_V_STATS if with_stats else MAX_BLOCK_V):
        out.append(tile_config(block_v, with_stats))
        block_v *= 2
    return out


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
def _lanes(x, BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, VEC: tl.constexpr):
    """(BLOCK_T, BLOCK_V) -> (BLOCK_T, BLOCK_V // VEC): sums of VEC neighbours, the elements one thread loads
    in one 16-byte vector, so the sum stays inside the thread (no shuffle, no barrier)."""
    return tl.sum(tl.reshape(x, (BLOCK_T, BLOCK_V // VEC, VEC), can_reorder=_CAN_REORDER), 2)


@triton.jit
def _online_update(x, x_for_sum, v, label, m, s, xsum, xp, q, m_before, BLOCK_T: tl.constexpr,
                   BLOCK_V: tl.constexpr, VEC: tl.constexpr, WITH_STATS: tl.constexpr):
    """One vocabulary block of the forward: x (BLOCK_T, BLOCK_V) fp32, -inf where masked; x_for_sum is x with
    masked lanes 0. m (BLOCK_T,) is the row maximum so far; s, xsum, xp, q (sums) and m_before (a maximum)
    are per-lane accumulators (BLOCK_T, BLOCK_V // VEC), each lane rescaled by the row's alpha."""
    m_new = tl.maximum(m, tl.max(x, 1))
    # exp2(-inf) = 0 on the first block; a row that never saw a finite value keeps m = -inf.
    alpha = tl.exp2((m - m_new) * LOG2E)[:, None]
    p = tl.exp2((x - m_new[:, None]) * LOG2E)
    s = s * alpha + _lanes(p, BLOCK_T, BLOCK_V, VEC)
    if WITH_STATS:
        xsum += _lanes(x_for_sum, BLOCK_T, BLOCK_V, VEC)
        # p = 0 where x = -inf (masked lanes, padded vocabularies): clamping x to the lowest finite fp32 makes
        # p * x 0 there, not NaN (a NaN logit still propagates through p)
        xp = xp * alpha + _lanes(p * tl.maximum(x, -3.4028234663852886e38), BLOCK_T, BLOCK_V, VEC)
        q = q * (alpha * alpha) + _lanes(p * p, BLOCK_T, BLOCK_V, VEC)
        before = tl.where(v[None, :] < label[:, None], x, float("-inf"))
        m_before = tl.maximum(m_before, tl.max(tl.reshape(before, (BLOCK_T, BLOCK_V // VEC, VEC),
                                                          can_reorder=_CAN_REORDER), 2))
    return m_new, s, xsum, xp, q, m_before


@triton.jit
def _sequence_logps_fwd_kernel(
    # data ptrs
    logits_ptr,  # (N, T, V) any float dtype, any strides
    labels_ptr,  # (N, T) int64
    token_logps_ptr,  # (N * T,) fp32 out, at positions: log p(label), 0 where no valid row scores it
    lse_ptr,  # (N * T,) fp32 out, per row: log-sum-exp, 0 on invalid rows
    stats_ptr,  # (4 or 5, N * T) fp32 out, only WITH_STATS, at positions: mean logit, entropy, log sum p^2,
    # is_top1, and with ``with_max`` the row maximum (what a vocabulary shard contributes to the global is_top1)
    # shapes
    n_rows, T, V,
    # strides
    stride_xn, stride_xt, stride_xv,
    stride_ln, stride_lt,
    ignore_index,
    shift,  # 0 or 1
    with_max,  # 0 or 1: a runtime mask on one store, not a compiled variant (a branch there spilled on 3.6)
    BLOCK_T: tl.constexpr,
    BLOCK_V: tl.constexpr,
    WITH_STATS: tl.constexpr,
):
    VEC: tl.constexpr = 128 // logits_ptr.dtype.element_ty.primitive_bitwidth  # logits in a 16-byte load
    pid = tl.program_id(0)
    rows, in_bounds, n, t, label, valid = _row_coords(
        pid, n_rows, T, stride_ln, stride_lt, labels_ptr, ignore_index, shift, BLOCK_T)
    row_ptr = logits_ptr + n * stride_xn + t * stride_xt  # (BLOCK_T,) int64 offsets

    # The row maximum is reduced every block (the exponentials need it); every sum is kept per lane, each
    # lane rescaled by the row's alpha, and reduced once after the loop: one block-wide reduction per block.
    # Full blocks load without a vocabulary mask; the last, partial block (if any) with one.
    m = tl.full((BLOCK_T,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_T, BLOCK_V // VEC), tl.float32)
    xsum = tl.zeros((BLOCK_T, BLOCK_V // VEC), tl.float32)
    xp = tl.zeros((BLOCK_T, BLOCK_V // VEC), tl.float32)
    q = tl.zeros((BLOCK_T, BLOCK_V // VEC), tl.float32)
    m_before = tl.full((BLOCK_T, BLOCK_V // VEC), float("-inf"), tl.float32)
    label32 = tl.where((label >= 0) & (label < V), label, 0).to(tl.int32)  # V < 2^31: 32-bit compares
    cols = tl.arange(0, BLOCK_V)
    v_full = (V // BLOCK_V) * BLOCK_V
    for v0 in range(0, v_full, BLOCK_V):
        v = v0 + cols
        x = tl.load(row_ptr[:, None] + v[None, :] * stride_xv, mask=valid[:, None], other=float("-inf"),
                    eviction_policy="evict_first").to(tl.float32)
        m, s, xsum, xp, q, m_before = _online_update(x, x, v, label32, m, s, xsum, xp, q, m_before, BLOCK_T, BLOCK_V,
                                                     VEC, WITH_STATS)
    if v_full < V:
        v = v_full + cols
        mask = valid[:, None] & (v < V)[None, :]
        x = tl.load(row_ptr[:, None] + v[None, :] * stride_xv, mask=mask, other=float("-inf"),
                    eviction_policy="evict_first").to(tl.float32)
        m, s, xsum, xp, q, m_before = _online_update(x, tl.where(mask, x, 0.0), v, label32, m, s, xsum, xp, q,
                                                     m_before, BLOCK_T, BLOCK_V, VEC, WITH_STATS)
    s = tl.sum(s, 1)
    lse = m + tl.log2(s) * LN2
    if WITH_STATS:
        xsum = tl.sum(xsum, 1)
        xp = tl.sum(xp, 1)
        q = tl.sum(q, 1)
        m_before = tl.max(m_before, 1)

    label_ok = (label >= 0) & (label < V)
    target = tl.load(row_ptr + tl.where(label_ok, label, 0) * stride_xv, mask=valid, other=0.0).to(tl.float32)
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
        tl.store(stats_ptr + 4 * n_rows + pos, tl.where(valid, m, 0.0), mask=in_bounds & (rows * 0 + with_max > 0))


@triton.jit
def _sequence_logps_bwd_kernel(
    # data ptrs
    logits_ptr,  # (N, T, V) any float dtype, any strides
    labels_ptr,  # (N, T) int64
    lse_ptr,  # (N * T,) fp32 per row, from the forward
    coef_ptr,  # (N, T) fp32 at positions, any strides: d loss / d logp of each scored label
    dlogits_ptr,  # (N, T, V) out, dtype of the logits; may alias logits_ptr (in-place backward)
    # shapes
    n_rows, T, V,
    # strides
    stride_xn, stride_xt, stride_xv,
    stride_ln, stride_lt,
    stride_gn, stride_gt, stride_gv,
    stride_cn, stride_ct,
    ignore_index,
    shift,  # 0 or 1
    BLOCK_T: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    pid = tl.program_id(0)
    rows, in_bounds, n, t, label, valid = _row_coords(
        pid, n_rows, T, stride_ln, stride_lt, labels_ptr, ignore_index, shift, BLOCK_T)
    label_t = t + shift
    coef = tl.load(coef_ptr + n * stride_cn + label_t * stride_ct, mask=valid, other=0.0)
    lse = tl.load(lse_ptr + rows, mask=in_bounds, other=0.0)
    read = valid & (coef != 0.0)
    x_row = logits_ptr + n * stride_xn + t * stride_xt
    g_row = dlogits_ptr + n * stride_gn + t * stride_gt
    cols = tl.arange(0, BLOCK_V)
    for v0 in range(0, V, BLOCK_V):
        v = v0 + cols
        in_v = (v < V)[None, :]
        x = tl.load(x_row[:, None] + v[None, :] * stride_xv, mask=read[:, None] & in_v, other=float("-inf"),
                    eviction_policy="evict_first").to(tl.float32)
        p = tl.exp2((x - lse[:, None]) * LOG2E)
        onehot = (v[None, :] == label[:, None]).to(tl.float32)
        g = tl.where(read[:, None], coef[:, None] * (onehot - p), 0.0)
        tl.store(g_row[:, None] + v[None, :] * stride_gv, g.to(dlogits_ptr.dtype.element_ty),
                 mask=in_bounds[:, None] & in_v)


@triton.jit
def _sequence_sums_kernel(
    # data ptrs
    token_logps_ptr,  # (N, T) fp32 at positions, from the forward
    stats_ptr,  # (4, N, T) fp32 at positions (only WITH_STATS)
    labels_ptr,  # (N, T) int64
    logps_ptr,  # (N,) fp32 out: sum of the log-probs of the sequence
    num_tokens_ptr,  # (N,) int64 out: its valid positions
    seq_stats_ptr,  # (4, N) fp32 out (only WITH_STATS): sums of each statistic over its valid positions
    # shapes
    N, T,
    NT,  # N * T
    # strides
    stride_ln, stride_lt,
    ignore_index,
    shift,  # 0 or 1
    BLOCK: tl.constexpr,
    WITH_STATS: tl.constexpr,
):
    """Program n sums sequence n's positions in a fixed order: the same bits on every run."""
    n = tl.program_id(0).to(tl.int64)
    acc = tl.zeros((BLOCK,), tl.float32)
    cnt = tl.zeros((BLOCK,), tl.int64)
    s0 = tl.zeros((BLOCK,), tl.float32)
    s1 = tl.zeros((BLOCK,), tl.float32)
    s2 = tl.zeros((BLOCK,), tl.float32)
    s3 = tl.zeros((BLOCK,), tl.float32)
    cols = tl.arange(0, BLOCK)
    for t0 in range(0, T, BLOCK):
        t = t0 + cols
        in_t = (t < T) & (t >= shift)  # with shift, position 0 is scored by no row
        label = tl.load(labels_ptr + n * stride_ln + t * stride_lt, mask=in_t, other=ignore_index)
        valid = in_t & (label != ignore_index)
        acc += tl.load(token_logps_ptr + n * T + t, mask=valid, other=0.0)
        cnt += valid.to(tl.int64)
        if WITH_STATS:
            s0 += tl.load(stats_ptr + n * T + t, mask=valid, other=0.0)
            s1 += tl.load(stats_ptr + NT + n * T + t, mask=valid, other=0.0)
            s2 += tl.load(stats_ptr + 2 * NT + n * T + t, mask=valid, other=0.0)
            s3 += tl.load(stats_ptr + 3 * NT + n * T + t, mask=valid, other=0.0)
    tl.store(logps_ptr + n, tl.sum(acc, 0))
    tl.store(num_tokens_ptr + n, tl.sum(cnt, 0))
    if WITH_STATS:
        tl.store(seq_stats_ptr + n, tl.sum(s0, 0))
        tl.store(seq_stats_ptr + N + n, tl.sum(s1, 0))
        tl.store(seq_stats_ptr + 2 * N + n, tl.sum(s2, 0))
        tl.store(seq_stats_ptr + 3 * N + n, tl.sum(s3, 0))


SUMS_BLOCK = 1024
SUMS_NUM_WARPS = 4
