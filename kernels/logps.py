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

Backward, one read of each logit of a row with non-zero coefficient and one write of every gradient:

    dlogits[row, v] = coef[row] * (1[v == label] - exp(x[v] - lse[row]))

``coef`` (one fp32 per row) carries everything upstream: the per-sequence gradient of the summed or
averaged log-prob, a per-token gradient, or the DPO loss's own coefficient. Invalid rows have coef 0 and
get a zero gradient without a read. The gradient is formed in fp32 and rounded once on store, so the
target element (1 - p, where bf16 would cancel) is exact to the storage precision.

Rows are tiled [BLOCK_T, BLOCK_V]: BLOCK_T > 1 only for small vocabularies, where one row per program
would leave most lanes idle. Offsets of rows are int64 (16 x 2048 x 128256 logits already pass 2^31).
"""

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)

# Vocabulary block of one program: 32 fp32 values per thread at 8 warps.
MAX_BLOCK_V = 8192
MIN_BLOCK_V = 256
# Small vocabularies share a program between rows, up to this many elements: every element of a 2-D tile
# carries its own 64-bit address, and 8192 of them spill registers (measured with the AOT check).
MAX_TILE_2D = 2048


def tile_config(vocab_size: int) -> dict:
    """Block sizes and warps for a vocabulary: every configuration the dispatcher can choose lies in
    ``all_tile_configs()`` (the AOT check compiles exactly those)."""
    block_v = min(max(triton.next_power_of_2(vocab_size), MIN_BLOCK_V), MAX_BLOCK_V)
    block_t = max(1, MAX_TILE_2D // block_v)
    return {"BLOCK_T": block_t, "BLOCK_V": block_v, "num_warps": 8 if block_t * block_v >= 4096 else 4}


def all_tile_configs() -> list:
    out, block_v = [], MIN_BLOCK_V
    while block_v <= MAX_BLOCK_V:
        out.append(tile_config(block_v))
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
def _sequence_logps_fwd_kernel(
    # data ptrs
    logits_ptr,  # (N, T, V) any float dtype, any strides
    labels_ptr,  # (N, T) int64
    token_logps_ptr,  # (N * T,) fp32 out: log p(label), 0 on invalid rows
    lse_ptr,  # (N * T,) fp32 out: log-sum-exp, 0 on invalid rows
    stats_ptr,  # (4, N * T) fp32 out, only WITH_STATS: mean logit, entropy, log sum p^2, is_top1; 0 if invalid
    # shapes
    n_rows, T, V,
    # strides
    stride_xn, stride_xt, stride_xv,
    stride_ln, stride_lt,
    ignore_index,
    shift,  # 0 or 1
    BLOCK_T: tl.constexpr,
    BLOCK_V: tl.constexpr,
    WITH_STATS: tl.constexpr,
):
    pid = tl.program_id(0)
    rows, in_bounds, n, t, label, valid = _row_coords(
        pid, n_rows, T, stride_ln, stride_lt, labels_ptr, ignore_index, shift, BLOCK_T)
    row_ptr = logits_ptr + n * stride_xn + t * stride_xt  # (BLOCK_T,) int64 offsets

    m = tl.full((BLOCK_T,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_T,), tl.float32)
    if WITH_STATS:
        xsum = tl.zeros((BLOCK_T,), tl.float32)
        xp = tl.zeros((BLOCK_T,), tl.float32)
        q = tl.zeros((BLOCK_T,), tl.float32)
        m_before = tl.full((BLOCK_T,), float("-inf"), tl.float32)
    cols = tl.arange(0, BLOCK_V)
    for v0 in range(0, V, BLOCK_V):
        v = v0 + cols
        mask = valid[:, None] & (v < V)[None, :]
        x = tl.load(row_ptr[:, None] + v[None, :] * stride_xv, mask=mask, other=float("-inf"),
                    eviction_policy="evict_first").to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, 1))
        # exp2(-inf) = 0 on the first block; a row that never saw a finite value keeps m = -inf.
        alpha = tl.exp2((m - m_new) * LOG2E)
        p = tl.exp2((x - m_new[:, None]) * LOG2E)
        s = s * alpha + tl.sum(p, 1)
        if WITH_STATS:
            xsum += tl.sum(tl.where(mask, x, 0.0), 1)
            # p = 0 where x = -inf (masked lanes, padded vocabularies): p * x must be 0 there, not NaN
            xp = xp * alpha + tl.sum(p * tl.where(x == float("-inf"), 0.0, x), 1)
            q = q * alpha * alpha + tl.sum(p * p, 1)
            m_before = tl.maximum(m_before, tl.max(tl.where(v[None, :] < label[:, None], x, float("-inf")), 1))
        m = m_new
    lse = m + tl.log2(s) * LN2

    label_ok = (label >= 0) & (label < V)
    target = tl.load(row_ptr + tl.where(label_ok, label, 0) * stride_xv, mask=valid, other=0.0).to(tl.float32)
    logp = tl.where(label_ok, target - lse, float("nan"))
    tl.store(token_logps_ptr + rows, tl.where(valid, logp, 0.0), mask=in_bounds)
    tl.store(lse_ptr + rows, tl.where(valid, lse, 0.0), mask=in_bounds)
    if WITH_STATS:
        is_top1 = ((target >= m) & (target > m_before)).to(tl.float32)
        tl.store(stats_ptr + rows, tl.where(valid, xsum / V, 0.0), mask=in_bounds)
        tl.store(stats_ptr + n_rows + rows, tl.where(valid, lse - xp / s, 0.0), mask=in_bounds)
        tl.store(stats_ptr + 2 * n_rows + rows, tl.where(valid, (tl.log2(q) - 2.0 * tl.log2(s)) * LN2, 0.0),
                 mask=in_bounds)
        tl.store(stats_ptr + 3 * n_rows + rows, tl.where(valid, is_top1, 0.0), mask=in_bounds)


@triton.jit
def _sequence_logps_bwd_kernel(
    # data ptrs
    logits_ptr,  # (N, T, V) any float dtype, any strides
    labels_ptr,  # (N, T) int64
    lse_ptr,  # (N * T,) fp32, from the forward
    coef_ptr,  # (N * T,) fp32: d loss / d logp of each row, 0 on invalid rows
    dlogits_ptr,  # (N, T, V) out, dtype of the logits; may alias logits_ptr (in-place backward)
    # shapes
    n_rows, T, V,
    # strides
    stride_xn, stride_xt, stride_xv,
    stride_ln, stride_lt,
    stride_gn, stride_gt, stride_gv,
    ignore_index,
    shift,  # 0 or 1
    BLOCK_T: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    pid = tl.program_id(0)
    rows, in_bounds, n, t, label, valid = _row_coords(
        pid, n_rows, T, stride_ln, stride_lt, labels_ptr, ignore_index, shift, BLOCK_T)
    coef = tl.load(coef_ptr + rows, mask=in_bounds, other=0.0)
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
