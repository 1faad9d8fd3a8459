"""Vocabulary parallelism: the logits (or the LM head's rows) split over the P ranks of a process group.

Rank r holds vocabulary entries [r * Vp, (r + 1) * Vp) of every row, Vp equal on every rank (Megatron pads the
vocabulary to make it so), and the same labels (global token ids). No rank ever holds a full row.

Forward: each rank runs the ordinary kernels on its shard with *local* labels (``local_labels``: the label minus
the shard's start where the rank owns it, ``NOT_OWNED`` where another rank does; a row whose target is elsewhere
still gets its log-sum-exp and statistics). Per scored token it contributes a few fp32 numbers (``partials``):

    lse_r                  log-sum-exp over the shard (-inf for a shard of -inf logits: it adds nothing)
    target_r               the target's logit where the rank owns it, else 0 (with the statistics the raw
                           logit, as the kernel read it)
    and with the statistics: mean logit, entropy, log sum p^2 and is_top1 over the shard, and its maximum

One all-gather (``gather``: P x K x tokens fp32, K = 2, or 7 with the statistics) gives every rank every
shard's numbers, and ``combine`` turns them into the unsharded op's values, in rank order (the same bits on every
rank, run after run):

    lse      = log sum_r exp(lse_r)                        w_r = exp(lse_r - lse), the shard's probability mass
    logp     = target_owner - lse
    mean     = sum_r mean_r / P                            (equal shards)
    entropy  = sum_r w_r (entropy_r - log w_r)
    log sum p^2 = log sum_r w_r^2 sum p_r^2
    is_top1  = the owner's is_top1, raw target >= every shard's maximum, and no earlier shard reaching it
               (first argmax, the single-process op's tie rule)

Backward needs no communication: dlogits of a shard = coef * (onehot_local - exp(x - lse)) with the global lse,
the ordinary backward kernel with the local labels (a target elsewhere adds no one-hot term). The fused-linear
ops sum the hidden-state gradient over the group (``all_reduce_sum_``), as Megatron's column-parallel head does.
"""

import contextlib
import contextvars
import os
from typing import Optional, Tuple

import torch
import torch.distributed as dist

from fastdpo import _ops

LOCAL_IGNORE = -1  # the ignore_index of local labels
NOT_OWNED = -2  # a target another rank holds: outside [0, Vp) for every shift of a vocabulary tile, != LOCAL_IGNORE
K_PLAIN, K_STATS = 2, 7  # partials per token: lse, target (+ mean, entropy, log sum p^2, is_top1, max)


def _all_gather(out: torch.Tensor, src: torch.Tensor, group) -> None:
    # torch 2.13 renames all_gather_into_tensor (and deprecates the old name)
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    fn(out, src, group=group)


def check_group(process_group) -> None:
    if not dist.is_available() or not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(f"process_group must be a torch.distributed.ProcessGroup or None, got "
                        f"{type(process_group).__name__}")


def _comm_device(group, like: torch.Tensor) -> torch.device:
    # gloo reduces CPU tensors; NCCL (and others) the device's
    return torch.device("cpu") if dist.get_backend(group) == "gloo" else like.device


def labels_fingerprint(labels: torch.Tensor) -> torch.Tensor:
    """(6,) int64 on the labels' device: position-weighted sums of the labels' three 20-bit pieces, under two
    weightings (position mod 4093 and mod 4091, plus 1). Exact integer sums (each term < 2^32, so no overflow below
    2^31 tokens): the same on every device and in any order. Two label tensors that differ get different
    fingerprints unless the differences cancel under both weightings at once."""
    flat = labels.reshape(-1).long()
    pos = torch.arange(flat.numel(), device=flat.device)
    pieces = torch.stack([flat & 0xFFFFF, (flat >> 20) & 0xFFFFF, (flat >> 40) & 0xFFFFFF])  # (3, n)
    weights = torch.stack([pos % 4093 + 1, pos % 4091 + 1])  # (2, n)
    return (pieces[:, None, :] * weights[None, :, :]).sum(-1).reshape(-1)


_AGREEMENT = contextvars.ContextVar("fastdpo_agreement", default=None)


@contextlib.contextmanager
def agreement(group, n_agree: int):
    """Wraps a vocabulary-parallel call: an input this rank refuses before the call's agreement collective
    (``check_split``) still joins that collective, marked as a refusal, so that every other rank raises too (a
    ``ValueError`` naming the refusing ranks) instead of waiting in it; this rank then raises its own error.
    ``n_agree``: the number of caller numbers the call's ``check_split`` sends. No group: nothing to agree."""
    if group is None:
        yield
        return
    state = {"joined": False}
    token = _AGREEMENT.set(state)
    try:
        yield
    except (ValueError, TypeError):
        if not state["joined"] and dist.is_available() and isinstance(group, dist.ProcessGroup):
            state["joined"] = True
            dev = (torch.device("cpu") if dist.get_backend(group) == "gloo"
                   else torch.device("cuda", torch.cuda.current_device()))
            mine = torch.zeros(agreement_size(n_agree), dtype=torch.int64, device=dev)
            mine[0] = -1  # no shard has a negative size: the mark of a refusal
            size = dist.get_world_size(group)
            _all_gather(torch.empty(size * mine.numel(), dtype=torch.int64, device=dev), mine, group)
        raise
    finally:
        _AGREEMENT.reset(token)


def check_split(group, vocab_shard: int, labels: torch.Tensor, like: torch.Tensor, what: str, *,
                ignore_index: int, shift: bool, vocab_size_check: bool = True, agree: Tuple[int, ...] = (),
                cu: Optional[torch.Tensor] = None) -> Tuple[int, int]:
    """(rank, size) in ``group``, after one small all-gather (the one host read of a vocabulary-parallel call)
    that checks, before any kernel runs and before any other collective, that every rank agrees on all that sizes
    or gates a collective: the number of vocabulary entries of its shard, the labels (shape and values, by
    ``labels_fingerprint``; they fix the rows every later collective carries), the packed batch's segment offsets
    ``cu`` (likewise), ``ignore_index``, ``shift``, the dtype, and ``agree`` (the caller's other such numbers: the statistics wanted, which inputs need a gradient,
    the hidden size). It also checks the labels' range over the whole vocabulary here (CPU labels), so that a bad
    label raises on every rank at once. Any disagreement raises the same ``ValueError`` on every rank."""
    check_group(group)
    state = _AGREEMENT.get()
    if state is not None:
        state["joined"] = True
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    dev = _comm_device(group, like)
    bad = [0, 0]  # (a label out of range, its value); unchecked for CUDA labels (the kernels give NaN there)
    if vocab_size_check and labels.device.type == "cpu" and labels.numel() and _check_labels_enabled():
        out = (labels != ignore_index) & ((labels < 0) | (labels >= size * vocab_shard))
        if bool(out.any()):
            bad = [1, int(labels[out][0])]
    scalars = torch.tensor([vocab_shard, labels.dim(), *labels.shape, *([0] * (3 - labels.dim())), ignore_index,
                            int(shift), dtype_code(like.dtype), *agree, *bad], dtype=torch.int64)
    cu_print = (torch.cat([labels_fingerprint(cu), cu.new_full((1,), cu.numel(), dtype=torch.int64)])
                if cu is not None else torch.zeros(7, dtype=torch.int64, device=labels.device))
    mine = torch.cat([scalars.to(dev), labels_fingerprint(labels).to(dev), cu_print.to(dev)])
    assert mine.numel() == agreement_size(len(agree))
    every = torch.empty(size * mine.numel(), dtype=torch.int64, device=dev)
    _all_gather(every, mine, group)  # (flat: gloo concatenates along dim 0)
    every = every.view(size, -1).tolist()
    refused = [r for r, e in enumerate(every) if e[0] < 0]
    if refused:
        raise ValueError(f"rank(s) {refused} of process_group refused their inputs before the call's collectives (see "
                         "the error raised there): every rank must pass valid inputs")
    k = scalars.numel()
    if any(e[0] != every[0][0] for e in every):
        raise ValueError(f"{what} must hold the same number of vocabulary entries on every rank of process_group "
                         f"(rank r holds [r * Vp, (r + 1) * Vp); pad the vocabulary to a multiple of the group size, "
                         f"as Megatron does): got {[e[0] for e in every]} by rank")
    if any(e[1:5] != every[0][1:5] for e in every):
        raise ValueError(f"every rank of process_group must pass the same rows (the same labels): got shapes "
                         f"{[tuple(e[2:2 + e[1]]) for e in every]} by rank")
    if any(e[k:k + 6] != every[0][k:k + 6] for e in every):
        raise ValueError("every rank of process_group must pass the same labels (the vocabulary is split, the rows "
                         "are not): their values differ between ranks")
    if any(e[k + 6:] != every[0][k + 6:] for e in every):
        raise ValueError("every rank of process_group must pass the same cu_seqlens (or none): they differ between "
                         "ranks")
    if any(e[5:k - 2] != every[0][5:k - 2] for e in every):
        raise ValueError(f"every rank of process_group must call with the same ignore_index, shift, dtype, options "
                         f"and inputs requiring a gradient (a collective would run on some ranks only): got "
                         f"{[e[5:k - 2] for e in every]} by rank")
    worst = next((e[k - 1] for e in every if e[k - 2]), None)
    if worst is not None:
        raise ValueError(f"labels hold values outside [0, {size * vocab_shard}) other than "
                         f"ignore_index={ignore_index}, e.g. {worst}")
    return rank, size


def agreement_size(n_agree: int) -> int:
    """int64 numbers each rank sends in ``check_split`` with ``n_agree`` caller numbers: the shard size, the labels'
    rank and shape (3), ignore_index, shift, the dtype, the caller's, a bad label (2), the labels' fingerprint (6)
    and the segment offsets' (6, and their count)."""
    return 23 + n_agree


def _check_labels_enabled() -> bool:
    return os.environ.get("FASTDPO_CHECK_LABELS", "1") != "0"


_DTYPE_CODES = {torch.float32: 1, torch.bfloat16: 2, torch.float16: 3, torch.float64: 4}


def dtype_code(dtype: torch.dtype) -> int:
    return _DTYPE_CODES.get(dtype, 0)


def gather(x: torch.Tensor, group, size: int) -> torch.Tensor:
    """(P, *x.shape): every rank's ``x``, in rank order."""
    dev = _comm_device(group, x)
    src = (x if x.device == dev else x.to(dev)).contiguous().view(-1)
    out = torch.empty(size * src.numel(), dtype=x.dtype, device=dev)
    _all_gather(out, src, group)
    return out.view(size, *x.shape).to(x.device)


def all_reduce_sum_(x: torch.Tensor, group) -> torch.Tensor:
    dev = _comm_device(group, x)
    if x.device == dev:
        dist.all_reduce(x, group=group)
        return x
    y = x.to(dev)
    dist.all_reduce(y, group=group)
    return x.copy_(y)


def local_labels(labels: torch.Tensor, ignore_index: int, start: int, vocab_shard: int) -> torch.Tensor:
    """Global labels -> this shard's: ``label - start`` where owned, ``NOT_OWNED`` where not, ``LOCAL_IGNORE``
    where ignored (int64)."""
    labels = labels.long()
    owned = (labels >= start) & (labels < start + vocab_shard)
    local = torch.where(owned, labels - start, NOT_OWNED)
    return torch.where(labels == ignore_index, LOCAL_IGNORE, local)


def partials(token_logps: torch.Tensor, lse_at: torch.Tensor, stats: Optional[torch.Tensor],
             local: torch.Tensor) -> torch.Tensor:
    """(K, *shape) fp32: what this shard sends per token, from the kernels' outputs on local labels (token
    log-probs and ``lse_at``, the log-sum-exp, both aligned with ``local``; stats (6, *shape) from a forward
    ``with_max``, or None).

    The target's logit: with the statistics, the kernel's own (its raw value, which is_top1 compares bit for
    bit with every shard's maximum); without them, ``token_logp + lse`` (what the log-prob needs; -inf where the
    shard holds no finite logit, whose target is then -inf too)."""
    if stats is not None:
        return torch.stack([lse_at, stats[_ops.TARGET_LOGIT], *stats[:_ops.TARGET_LOGIT].unbind(0)])
    owned = local >= 0
    target = torch.where(lse_at == float("-inf"), float("-inf"), token_logps + lse_at)
    return torch.stack([lse_at, torch.where(owned, target, 0.0)])


def combine(gathered: torch.Tensor, labels: torch.Tensor, vocab_shard: int, with_stats: bool
            ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Every shard's partials (P, K, *shape) -> (logp, lse, stats (4, *shape) or None) of the whole vocabulary,
    for tokens whose global label is ``labels`` (*shape); values of ignored tokens are whatever, the caller masks
    them. A label outside [0, P * Vp) gives NaN, as in the unsharded op."""
    P = gathered.shape[0]
    lse_r, target_r = gathered[:, 0], gathered[:, 1]
    labels = labels.long()
    owner_raw = torch.div(labels, vocab_shard, rounding_mode="floor")
    in_range = (labels >= 0) & (owner_raw < P)
    owner = owner_raw.clamp(0, P - 1)
    top = lse_r.amax(0)  # NaN in, NaN out
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    # -inf (a shard of -inf logits) contributes 0; +inf or NaN gives NaN, as in the unsharded kernels
    lse = (lse_r - top).exp().sum(0).log() + top
    target = target_r.gather(0, owner[None]).squeeze(0)
    logp = torch.where(in_range, target - lse, float("nan"))
    if not with_stats:
        return logp, lse, None
    mean_r, ent_r, sq_r, top1_r, max_r = gathered[:, 2:7].unbind(1)
    log_w = lse_r - lse
    empty = lse_r == float("-inf")  # a shard with no probability mass adds nothing (not 0 * inf)
    mean = mean_r.sum(0) / P
    entropy = torch.where(empty, 0.0, log_w.exp() * (ent_r - log_w)).sum(0)
    log_sum_sq = torch.where(empty, float("-inf"), 2 * log_w + sq_r).logsumexp(0)
    # the single-process rule (the label is the first index of the row maximum) on raw logits: the owner's own
    # first-argmax test, no other shard above the target, and no earlier shard reaching it
    row_max = max_r.amax(0)
    ranks = torch.arange(P, device=gathered.device).view(P, *([1] * labels.dim()))
    earlier_tie = ((max_r >= target) & (ranks < owner)).any(0)
    own_top1 = top1_r.gather(0, owner[None]).squeeze(0) > 0
    is_top1 = own_top1 & in_range & (target >= row_max) & ~earlier_tie
    return logp, lse, torch.stack([mean, entropy, log_sum_sq, is_top1.to(mean.dtype)])


def shard_forward(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, shift: bool, start: int,
                  with_stats: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """The shard's kernels: (partials (K, N, T) at positions, local labels (N, T))."""
    local = local_labels(labels, ignore_index, start, logits.shape[2])
    token_logps, lse, stats = _ops.logps_forward(logits, local, LOCAL_IGNORE, shift, with_stats, with_max=True)
    return partials(token_logps, _ops.rows_to_positions(lse, shift), stats, local), local


def combine_positions(gathered: torch.Tensor, labels: torch.Tensor, ignore_index: int, shift: bool,
                      vocab_shard: int, with_stats: bool):
    """``combine`` on (N, T) positions: (token_logps (N, T), lse (N, T) per row, stats (4, N, T) or None), 0 where
    no valid row scores a position, as ``_ops.logps_forward`` returns them."""
    logp, lse, stats = combine(gathered, labels, vocab_shard, with_stats)
    valid = _ops.valid_positions(labels, ignore_index, shift)
    token_logps = torch.where(valid, logp, 0.0)
    lse_rows = _ops.positions_to_rows(torch.where(valid, lse, 0.0), shift)
    if stats is not None:
        stats = torch.where(valid, stats, 0.0)
    return token_logps, lse_rows, stats
