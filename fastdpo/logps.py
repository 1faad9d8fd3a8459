"""Per-sequence summed (or averaged) log-probs of target tokens: the op every fastdpo loss stands on."""

from typing import Dict, NamedTuple, Optional

import torch

from fastdpo import _library, _ops, _vocab
from fastdpo._checks import check_cu_seqlens, check_inplace, check_logits_labels, packed_shapes


class SequenceLogps(NamedTuple):
    logps: torch.Tensor  # (N,) fp32: sum (or mean) over unmasked positions of log p(label)
    num_tokens: torch.Tensor  # (N,) int64: unmasked positions per sequence
    token_logps: Optional[torch.Tensor] = None  # (N, T) fp32, aligned with labels; 0 where masked
    token_stats: Optional[Dict[str, torch.Tensor]] = None  # (N, T) each: entropy, mean_logits, ... (on request)


def _mean_scale(num_tokens: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """1 / num_tokens, and 0 for a sequence without tokens (its mean is 0, never NaN)."""
    return torch.where(num_tokens > 0, 1.0 / num_tokens.clamp(min=1).to(dtype), 0.0)


class SequenceLogpsFunction(torch.autograd.Function):
    """``(logits, labels, ignore_index, shift, average, inplace_backward, with_stats) -> (logps, token_logps,
    num_tokens, stats)``.

    logits (N, T, V) float, labels (N, T) int. logps (N,) and token_logps (N, T) are differentiable; the
    backward is one pass that writes dlogits from the saved log-sum-exp (nothing of size T x V is saved).
    With ``inplace_backward`` the gradient is written into the logits' storage: the logits are clobbered.
    """

    @staticmethod
    def forward(ctx, logits, labels, ignore_index=-100, shift=True, average=False, inplace_backward=False,
                with_stats=False, process_group=None, cu_seqlens=None):
        """``cu_seqlens``: a packed row (``packed_inputs`` makes logits (1, total, V) and labels (1, total) with
        the segment starts masked); sequences are then its segments."""
        check_logits_labels(logits, labels, ignore_index)
        check_inplace(logits, inplace_backward)
        if process_group is None:
            token_logps, lse, stats, logps, num_tokens = _library.logps_forward(logits, labels, ignore_index, shift,
                                                                              bool(with_stats), cu_seqlens)
        else:  # vocabulary-parallel: the backward runs on the shard's local labels with the global lse
            gathered, local = shard_pass(logits, labels, ignore_index, shift, bool(with_stats), process_group,
                                         cu_seqlens)
            token_logps, lse, stats, logps, num_tokens = _library.logps_from_partials(
                gathered, labels, ignore_index, shift, logits.shape[2], bool(with_stats), cu_seqlens)
            labels, ignore_index = local, _vocab.LOCAL_IGNORE
        if average:
            logps = logps * _mean_scale(num_tokens, logps.dtype)
        ctx.mark_non_differentiable(num_tokens, stats)
        ctx.set_materialize_grads(False)
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(logits, labels, lse, num_tokens, cu_seqlens)
        ctx.options = (ignore_index, shift, average, inplace_backward)
        return logps, token_logps, num_tokens, stats

    @staticmethod
    def backward(ctx, grad_logps, grad_token_logps, _grad_num_tokens, _grad_stats=None):
        logits, labels, lse, num_tokens, cu = ctx.saved_tensors
        ignore_index, shift, average, inplace = ctx.options
        coef = sequence_coef(labels, num_tokens, grad_logps, grad_token_logps, average, cu)
        return (logps_backward(logits, labels, lse, coef, ignore_index, shift, inplace),
                None, None, None, None, None, None, None, None)


def shard_pass(logits, labels, ignore_index, shift, with_stats, process_group, cu=None):
    """A vocabulary shard's forward and the one all-gather: (every shard's partials (P, K, N, T), this shard's
    local labels (N, T)); see ``fastdpo._vocab``."""
    Vp = logits.shape[2]
    rank, size = _vocab.check_split(process_group, Vp, labels, logits, "logits", ignore_index=ignore_index,
                                    shift=shift, agree=(int(with_stats),), cu=cu)
    partials, local = _library.shard_forward(logits, labels, ignore_index, shift, rank * Vp, size * Vp, with_stats)
    return _vocab.gather(partials, process_group, size), local


def packed_inputs(logits, labels, cu_seqlens, ignore_index: int, shift: bool, *, pairs: bool):
    """A packed batch as the ops run it: logits (total, V) or (1, total, V) -> (1, total, V) (a view), labels
    (total,) or (1, total) -> (1, total) with each segment's first position masked when shifting (the last token
    of a segment scores nothing, as in the padded batch). Checks everything first (``check_cu_seqlens``)."""
    logits = packed_shapes("logits", logits, 1)
    labels = packed_shapes("labels", labels, 0)
    check_logits_labels(logits, labels, ignore_index)
    check_cu_seqlens(cu_seqlens, labels.shape[1], labels.device, pairs=pairs)
    if shift:
        labels = _ops.mask_segment_starts(labels, cu_seqlens, ignore_index)
    return logits, labels


def logps_backward(logits, labels, lse, coef, ignore_index, shift, inplace):
    """dlogits through the custom ops; in place: written into the logits, which are returned."""
    if inplace:
        _library.logps_backward_(logits, labels, lse, coef, ignore_index, shift)
        return logits
    return _library.logps_backward(logits, labels, lse, coef, ignore_index, shift)


def sequence_coef(labels, num_tokens, grad_seq, grad_token, average, cu=None):
    """d loss / d token-logp (N, T), aligned with the labels, from gradients of the per-sequence (S,) and
    per-token (N, T) outputs. Masked positions may hold anything: the backward never reads them. A
    per-sequence gradient alone is broadcast (stride 0), never materialised; in a packed row (``cu``) it is
    gathered per position."""
    if grad_seq is not None and average:
        grad_seq = grad_seq * _mean_scale(num_tokens, grad_seq.dtype)
    if grad_seq is not None:
        per_pos = (grad_seq[:, None].expand(labels.shape) if cu is None
                   else grad_seq[_ops.segment_ids(cu, labels.shape[1])][None])
    if grad_token is None:
        if grad_seq is None:
            return labels.new_zeros(labels.shape, dtype=torch.float32)
        return per_pos
    return grad_token if grad_seq is None else grad_token + per_pos


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100, shift: bool = True,
                   average: bool = False, return_token_logps: bool = False, return_token_stats: bool = False,
                   inplace_backward: bool = False, process_group=None,
                   cu_seqlens: Optional[torch.Tensor] = None) -> SequenceLogps:
    """Per-sequence log-probs of ``labels`` under ``logits``, in one pass over the logits.

    Args:
        logits: (N, T, V) float32, bfloat16 or float16 (float64 runs on the PyTorch path), any strides:
            ``logits[:, :-1]`` is read in place, never copied.
        labels: (N, T) int64 or int32; ``ignore_index`` marks prompt and padding positions.
        shift: ``logits[:, t]`` scores ``labels[:, t + 1]`` (Hugging Face causal LM); False: aligned.
        average: divide each sum by its token count (0 for a sequence with no tokens).
        return_token_logps: also return the per-token log-probs (N, T), aligned with ``labels``.
        return_token_stats: also return ``token_stats``, per-token (N, T) ``entropy``, ``mean_logits``,
            ``log_sum_sq_probs`` and ``is_top1``, computed in the same pass (0 where masked; no gradient).
        inplace_backward: write the logits gradient into the logits' storage (they are clobbered).
        process_group: vocabulary-parallel (a tensor-parallel LM head): ``logits`` is this rank's shard, entries
            [r * Vp, (r + 1) * Vp) of the vocabulary for rank r of the group (Vp equal on every rank), ``labels``
            the global ids, the same on every rank. Every rank gets the unsharded outputs; the gradient of the
            shard is its part of the full gradient (the upstream gradient must be the same on every rank, as it
            is when each computes the same loss). One all-gather of 2 fp32 per token (7 with the statistics).
        cu_seqlens: a packed batch (padding-free): logits (total, V) or (1, total, V), labels (total,) or
            (1, total), sequence s its tokens [cu_seqlens[s], cu_seqlens[s + 1]) (1-D int32/int64 offsets, 0 first,
            the token count last: flash-attention's ``cu_seq_lens``). Every output has the padded op's meaning:
            per-sequence outputs (S,), per-token ones shaped like ``labels``; with ``shift`` no token scores across
            a boundary (a segment's last token scores nothing, as a padded sequence's).

    Returns:
        ``SequenceLogps(logps (N,) fp32, num_tokens (N,) int64, token_logps (N, T) fp32 or None,
        token_stats or None)``.
    """
    shape = labels.shape if isinstance(labels, torch.Tensor) else None
    with _vocab.agreement(process_group, 1):  # an input refused here is refused on every rank
        if cu_seqlens is not None:
            logits, labels = packed_inputs(logits, labels, cu_seqlens, ignore_index, shift, pairs=False)
        logps, token_logps, num_tokens, stats = SequenceLogpsFunction.apply(
            logits, labels, ignore_index, shift, average, inplace_backward, return_token_stats, process_group,
            cu_seqlens)
    if cu_seqlens is not None:
        token_logps = token_logps.view(shape)
        stats = stats.view(4, *shape) if return_token_stats else stats
    return SequenceLogps(logps, num_tokens, token_logps if return_token_logps else None,
                         _ops.named_token_stats(stats) if return_token_stats else None)
