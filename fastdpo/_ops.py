"""The primitives every fastdpo op is built from, on both backends.

``logps_forward``: per-token log-prob of the target and statistics (aligned with the labels), log-sum-exp per
row; one read of the logits.
``sequence_sums``: per-sequence sums of those and the token counts.
``logps_backward``: dlogits = coef * (onehot(label) - softmax) from the saved log-sum-exp; one read of the
logits, one write of the gradient.

Rows are logits positions (n, t) and *positions* are those of the labels, see ``kernels/logps.py``; per-token
tensors here are (N, T) fp32 (fp64 for fp64 logits on the PyTorch path). Inputs are validated by the caller.
"""

from typing import Optional, Tuple

import torch
import triton

from fastdpo import _backend
from fastdpo.kernels import COMPILE_OPTIONS
from fastdpo.kernels import logps as _k

# Rows of logits the PyTorch path turns into fp32 at once: 2^20 elements (4 MiB fp32); measured fastest
# of 2^16..2^22 on a 2-core CPU at V=32000.
_TORCH_CHUNK_ELEMS = 1 << 20


def row_labels(labels: torch.Tensor, ignore_index: int, shift: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Label scored by each row (N, T) int64, and which rows are valid (N, T) bool."""
    labels = labels.long()
    if shift:
        pad = labels.new_full((labels.shape[0], min(1, labels.shape[1])), ignore_index)
        labels = torch.cat([labels[:, 1:], pad], dim=1)
    return labels, labels != ignore_index


def rows_to_positions(rows: torch.Tensor, shift: bool) -> torch.Tensor:
    """Per-row values (N, T) -> aligned with the labels: with ``shift`` row t scores label t + 1."""
    if not shift:
        return rows
    return torch.cat([rows.new_zeros((rows.shape[0], min(1, rows.shape[1]))), rows[:, :-1]], dim=1)


def positions_to_rows(pos: torch.Tensor, shift: bool) -> torch.Tensor:
    """Inverse of ``rows_to_positions`` (the first position, which no row scores, is dropped)."""
    if not shift:
        return pos
    return torch.cat([pos[:, 1:], pos.new_zeros((pos.shape[0], min(1, pos.shape[1])))], dim=1)


# Rows of the (4, N, T) ``stats`` of ``logps_forward(with_stats=True)``; ``with_max`` adds two, the row maximum
# and the target's own logit (0 where the label is not in [0, V)): a vocabulary shard's share of the global
# is_top1, see ``fastdpo._vocab``.
MEAN_LOGIT, ENTROPY, LOG_SUM_SQ_PROBS, IS_TOP1, ROW_MAX, TARGET_LOGIT = range(6)


def named_token_stats(stats: torch.Tensor) -> dict:
    """(4, N, T) stats -> the per-token fields under TRL's names (``is_top1`` as bool)."""
    return {"mean_logits": stats[MEAN_LOGIT], "entropy": stats[ENTROPY],
            "log_sum_sq_probs": stats[LOG_SUM_SQ_PROBS], "is_top1": stats[IS_TOP1] > 0}


def logps_forward(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, shift: bool,
                  with_stats: bool = False,
                  with_max: bool = False) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Returns (token_logps (N, T) at positions, lse (N, T) per row, stats (4, N, T) at positions or None);
    zeros where no valid row scores a position. stats: mean logit, entropy, log sum p^2, is_top1 (1.0 when the
    label is the first argmax); with ``with_max`` (and ``with_stats``) (6, N, T), the row maximum and the target's
    logit after them."""
    with_max = bool(with_max and with_stats)
    if _backend.use_triton(logits):
        return _triton_forward(logits, labels, ignore_index, shift, with_stats, with_max)
    return _torch_forward(logits, labels, ignore_index, shift, with_stats, with_max)


def sequence_sums(token_logps: torch.Tensor, stats: Optional[torch.Tensor], labels: torch.Tensor,
                  ignore_index: int, shift: bool, cu: Optional[torch.Tensor] = None
                  ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Per sequence: (sum of token log-probs (S,), valid positions (S,) int64, sums of the stats (4, S) or
    None), from ``logps_forward``'s outputs. Sequences are the N rows, or with ``cu`` (S + 1 offsets) the segments
    of one packed row (N = 1) whose segment starts ``mask_segment_starts`` has masked."""
    if _backend.use_triton(token_logps):
        return _triton_sums(token_logps, stats, labels, ignore_index, shift, cu)
    if cu is None:
        valid = valid_positions(labels, ignore_index, shift)
        return token_logps.sum(1), valid.sum(1), None if stats is None else stats.sum(2)
    valid = labels[0] != ignore_index
    counts = segment_sum(valid.long(), cu)
    return (segment_sum(token_logps[0], cu), counts,
            None if stats is None else segment_sum(stats[:, 0], cu))


# ------------------------------------------------------------------------------------------- packed rows


def segment_ids(cu: torch.Tensor, total: int) -> torch.Tensor:
    """(total,) int64: the segment of each position of a packed row (offsets outside [0, total] clamped)."""
    cu = cu.long().clamp(0, total)
    pos = torch.arange(total, device=cu.device)
    return (torch.searchsorted(cu, pos, right=True) - 1).clamp(0, cu.numel() - 2)


def mask_segment_starts(labels: torch.Tensor, cu: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """(1, total) labels with the first position of every segment set to ``ignore_index``: with ``shift`` the last
    row of a segment would otherwise score the next segment's first token; masked, it scores nothing, exactly as
    the last position of a padded sequence (and position 0 of a sequence is scored by no row, as padded)."""
    total = labels.shape[1]
    starts = torch.zeros(total + 1, dtype=torch.bool, device=labels.device)
    starts.scatter_(0, cu[:-1].long().clamp(0, total), True)
    return labels.masked_fill(starts[:total][None], ignore_index)


def segment_sum(values: torch.Tensor, cu: torch.Tensor) -> torch.Tensor:
    """(..., total) -> (..., S): sums over the segments [cu[s], cu[s + 1]) in a fixed order (a float64 or int64
    running sum: the same bits on every run, any device). A segment whose offsets cannot be trusted (outside
    [0, total], decreasing, a first other than 0 or a last other than total: on a GPU no host check reads them)
    sums to NaN (-1 for integers), as in the kernel."""
    total = values.shape[-1]
    acc = values.long() if not values.dtype.is_floating_point else values.double()
    cs = torch.cat([acc.new_zeros(acc.shape[:-1] + (1,)), acc.cumsum(-1)], -1)
    bad = bad_segments(cu, total)
    cu = cu.long().clamp(0, total)
    out = (cs[..., cu[1:]] - cs[..., cu[:-1]]).to(values.dtype)
    return out.masked_fill(bad, float("nan") if values.dtype.is_floating_point else -1)


def bad_segments(cu: torch.Tensor, total: int) -> torch.Tensor:
    """(S,) bool: the segments whose offsets cannot be trusted (computed on the device: no host read)."""
    cu = cu.long()
    start, end = cu[:-1], cu[1:]
    bad = (start < 0) | (start > end) | (end > total)
    bad[0] |= start[0] != 0
    bad[-1] |= end[-1] != total
    return bad


def logps_backward(logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor, coef: torch.Tensor,
                   ignore_index: int, shift: bool, inplace: bool = False) -> torch.Tensor:
    """dlogits (N, T, V) in the logits' dtype; written into the logits' storage when ``inplace``.
    ``coef`` (N, T) at positions, any strides (a per-sequence coefficient may be broadcast with stride 0)."""
    out = logits if inplace else torch.empty_like(logits)
    if _backend.use_triton(logits):
        _triton_backward(logits, labels, lse, coef, ignore_index, shift, out)
    else:
        _torch_backward(logits, labels, lse, positions_to_rows(coef, shift), ignore_index, shift, out)
    return out


def valid_positions(labels: torch.Tensor, ignore_index: int, shift: bool) -> torch.Tensor:
    """(N, T) bool: the positions some valid row scores (with ``shift``, never position 0)."""
    valid = labels != ignore_index
    if shift and labels.shape[1]:
        valid[:, 0] = False
    return valid


# ----------------------------------------------------------------------------------------------- Triton


def _labels_i64(labels: torch.Tensor) -> torch.Tensor:
    # One kernel variant fewer to compile; (N, T) is negligible next to the logits.
    return labels if labels.dtype == torch.int64 else labels.long()


def _launch_view(t: torch.Tensor) -> Tuple[torch.Tensor, int]:
    """(view, offset) for the logits or gradient pointer of a launch: ``view`` starts at a 16-byte aligned address
    at most 15 bytes before ``t`` (the same storage), ``offset`` is the number of elements between the two, which
    the kernels add to every index. Only these two pointers are specialised on alignment (``kernels/logps.py``),
    and an aligned one is the only variant the AOT check compiles. A tensor whose storage itself is not aligned
    (external memory) is returned as is."""
    skew = t.data_ptr() % 16
    if skew == 0 or skew % t.element_size() or t.storage_offset() * t.element_size() < skew:
        return t, 0
    k = skew // t.element_size()
    return t.as_strided(t.shape, t.stride(), t.storage_offset() - k), k


def _is_aligned(t: torch.Tensor) -> bool:
    return _k.is_aligned(t.data_ptr(), t.element_size(), t.shape[-1], *t.stride())


def _triton_forward(logits, labels, ignore_index, shift, with_stats, with_max=False):
    N, T, V = logits.shape
    labels = _labels_i64(labels)
    token_logps = torch.empty((N, T), device=logits.device, dtype=torch.float32)
    lse = torch.empty_like(token_logps)
    stats = (torch.empty((6 if with_max else 4, N, T), device=logits.device, dtype=torch.float32) if with_stats
             else None)
    n_rows = N * T
    if n_rows:
        meta = _k.fwd_meta(V, with_stats, _is_aligned(logits))
        grid = (triton.cdiv(n_rows, meta["BLOCK_T"]),)
        x, x_off = _launch_view(logits)
        _k._sequence_logps_fwd_kernel[grid](
            x, labels, token_logps, lse, stats if with_stats else token_logps,
            n_rows, T, V,
            *logits.stride(),
            *labels.stride(),
            ignore_index, int(shift), int(with_max), x_off,
            **meta, **COMPILE_OPTIONS)
    return token_logps, lse, stats


def _triton_sums(token_logps, stats, labels, ignore_index, shift, cu=None):
    N, T = token_logps.shape
    S = N if cu is None else cu.numel() - 1
    labels = _labels_i64(labels)
    logps = torch.empty(S, device=token_logps.device, dtype=torch.float32)
    num_tokens = torch.empty(S, device=token_logps.device, dtype=torch.int64)
    seq_stats = None if stats is None else torch.empty((4, S), device=token_logps.device, dtype=torch.float32)
    if S:
        _k._sequence_sums_kernel[(S,)](
            token_logps, token_logps if stats is None else stats, labels,
            num_tokens if cu is None else cu.long(), logps, num_tokens, logps if stats is None else seq_stats,
            S, T, N * T,
            *labels.stride(),
            ignore_index, int(shift),
            **_k.sums_meta(stats is not None, cu is not None), **COMPILE_OPTIONS)
    return logps, num_tokens, seq_stats


def _triton_backward(logits, labels, lse, coef, ignore_index, shift, out):
    N, T, V = logits.shape
    labels = _labels_i64(labels)
    coef = coef if coef.dtype == torch.float32 else coef.float()  # its own strides below, not the original's
    n_rows = N * T
    if n_rows:
        meta = _k.bwd_meta(V, _is_aligned(logits) and _is_aligned(out))
        grid = (triton.cdiv(n_rows, meta["BLOCK_T"]),)
        x, x_off = _launch_view(logits)
        g, g_off = _launch_view(out)
        _k._sequence_logps_bwd_kernel[grid](
            x, labels, lse, coef, g,
            n_rows, T, V,
            *logits.stride(),
            *labels.stride(),
            *out.stride(),
            *coef.stride(),
            ignore_index, int(shift), x_off, g_off,
            **meta, **COMPILE_OPTIONS)
# ---------------------------------------------------------------------------------------------- PyTorch


def _compute_dtype(logits: torch.Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def _spans(rows_mask: torch.Tensor):
    """(n, lo, hi) per sequence: the smallest range of rows holding every True of ``rows_mask[n]``.
    Prompt and padding rows outside it are never read."""
    N, T = rows_mask.shape
    if T == 0:
        return
    any_ = rows_mask.any(1)
    ar = torch.arange(T, device=rows_mask.device)
    lo = torch.where(rows_mask, ar, T).amin(1)
    hi = torch.where(rows_mask, ar, -1).amax(1) + 1
    for n, (a, l, h) in enumerate(zip(any_.tolist(), lo.tolist(), hi.tolist())):
        if a:
            yield n, l, h


def _chunks(lo: int, hi: int, V: int):
    step = max(1, _TORCH_CHUNK_ELEMS // max(V, 1))
    for t0 in range(lo, hi, step):
        yield t0, min(hi, t0 + step)


def _first_argmax_is(x: torch.Tensor, m: torch.Tensor, tgt: torch.Tensor, lab: torch.Tensor) -> torch.Tensor:
    """is_top1: the label is the first index of the row maximum (TRL's argmax semantics, ties included).
    Only rows whose target equals the maximum are searched for an earlier tie."""
    top = tgt >= m
    sel = top.nonzero().squeeze(1)
    if sel.numel():
        sub = x.index_select(0, sel)
        earlier = (sub == m[sel, None]) & (torch.arange(x.shape[1], device=x.device)[None, :] < lab[sel, None])
        top[sel] = ~earlier.any(1)
    return top


def _torch_forward(logits, labels, ignore_index, shift, with_stats, with_max=False):
    N, T, V = logits.shape
    cdt = _compute_dtype(logits)
    rlab, valid = row_labels(labels, ignore_index, shift)
    row_logps = torch.zeros((N, T), dtype=cdt, device=logits.device)
    lse = torch.zeros_like(row_logps)
    stats = torch.zeros((6 if with_max else 4, N, T), dtype=cdt, device=logits.device) if with_stats else None
    for n, lo, hi in _spans(valid):
        for t0, t1 in _chunks(lo, hi, V):
            x = logits[n, t0:t1].to(cdt)  # (r, V): a copy of one chunk at most
            ok = valid[n, t0:t1]
            # max / exp / sum rather than torch.logsumexp: an inf logit gives NaN, as in the kernel
            m = x.amax(1)  # (amax: max with indices costs 14x more on CPU)
            # a row of -inf logits: exponentials against 0 (exp(-inf - (-inf)) would be NaN), lse = -inf
            m_ref = m.masked_fill(m == float("-inf"), 0.0)
            e = (x - m_ref[:, None]).exp_()
            s = e.sum(1)
            lse_c = s.log().add_(m_ref)
            lab = torch.where(ok, rlab[n, t0:t1], 0)
            in_range = (lab >= 0) & (lab < V)  # an unchecked bad label gives NaN, as in the kernel
            tgt = torch.where(in_range, x.gather(1, lab.clamp(0, V - 1)[:, None]).squeeze(1), float("nan"))
            row_logps[n, t0:t1] = torch.where(ok, tgt - lse_c, 0.0)
            lse[n, t0:t1] = torch.where(ok, lse_c, 0.0)
            if with_stats:
                ex = torch.linalg.vecdot(e, x)
                if torch.isnan(ex).any():  # e = 0 where x = -inf (a padded vocabulary): p * x must be 0 there
                    ex = torch.linalg.vecdot(e, x.masked_fill(x == float("-inf"), 0.0))
                rows = (x.sum(1) / V, lse_c - ex / s, torch.linalg.vecdot(e, e).log() - 2 * s.log(),
                        _first_argmax_is(x, m, tgt, lab).to(cdt))
                if with_max:  # a vocabulary shard's partials: its maximum, the target's logit (0 elsewhere)
                    rows += (m, torch.where(in_range, tgt, 0.0))
                for i, r in enumerate(rows):
                    stats[i, n, t0:t1] = torch.where(ok, r, 0.0)
    token_logps = rows_to_positions(row_logps, shift)
    if stats is not None:
        stats = rows_to_positions(stats.view(stats.shape[0] * N, T), shift).view(stats.shape)  # (T may be 0)
    return token_logps, lse, stats


def _torch_backward(logits, labels, lse, coef, ignore_index, shift, out):
    N, T, V = logits.shape
    cdt = _compute_dtype(logits)
    rlab, valid = row_labels(labels, ignore_index, shift)
    coef = coef.to(cdt)
    read = valid & (coef != 0)
    spans = {n: (lo, hi) for n, lo, hi in _spans(read)}
    for n in range(N):
        lo, hi = spans.get(n, (T, T))
        out[n, :lo].zero_()
        out[n, hi:].zero_()
        for t0, t1 in _chunks(lo, hi, V):
            r = read[n, t0:t1]
            c = torch.where(r, coef[n, t0:t1], 0.0)
            o = out[n, t0:t1]
            # Formed in the output itself when it has the compute dtype (fp32 in, fp32 out), else in a chunk.
            g = o if o.dtype == cdt else torch.empty(o.shape, dtype=cdt, device=o.device)
            torch.sub(logits[n, t0:t1].to(cdt), lse[n, t0:t1, None].to(cdt), out=g)
            g.exp_().mul_(-c[:, None])
            lab = torch.where(r, rlab[n, t0:t1], 0)
            in_range = (lab >= 0) & (lab < V)  # as in the kernel: no one-hot term for an unchecked bad label
            g.scatter_add_(1, lab.clamp(0, V - 1)[:, None], torch.where(in_range, c, 0.0)[:, None])
            g.masked_fill_(~r[:, None], 0.0)
            if g is not o:
                o.copy_(g)
