"""fastdpo's primitives as ``torch.library`` custom ops, with fake (meta) implementations.

The autograd Functions call these, so ``torch.compile(..., fullgraph=True)`` sees each primitive as one
opaque node with known output shapes instead of tracing into Triton launches, Python loops over chunks or
host-side checks. The data-dependent label check runs inside the op (eagerly), never in a traced graph.

Layers: kernels -> dispatch (``_ops``, ``_head``, ``_linear``) -> these ops -> the autograd Functions -> the user
API.
"""

import os
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from fastdpo import _head, _linear, _ops, _vocab
from fastdpo.losses import ld_token_weights, ld_token_weights_packed


def check_label_range(labels: Tensor, vocab_size: int, ignore_index: int) -> None:
    """Labels outside [0, V) other than ignore_index: ValueError for CPU tensors. For CUDA tensors this would
    cost a host sync; there the kernels return NaN for such a token instead of reading out of bounds.
    ``FASTDPO_CHECK_LABELS=0`` skips the CPU check (such a token then gives NaN there too)."""
    if os.environ.get("FASTDPO_CHECK_LABELS", "1") == "0":
        return
    if labels.device.type == "cpu" and labels.numel():
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab_size))
        if bool(bad.any()):
            raise ValueError(f"labels hold values outside [0, {vocab_size}) other than "
                             f"ignore_index={ignore_index}, e.g. {labels[bad][0].item()}")


@torch.library.custom_op("fastdpo::logps_forward", mutates_args=())
def logps_forward(logits: Tensor, labels: Tensor, ignore_index: int, shift: bool, with_stats: bool,
                  cu: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(token_logps (N, T) aligned with the labels, lse (N, T) per row, stats (4, N, T) aligned with the labels
    or (0,) without stats, logps (S,) summed per sequence, num_tokens (S,) int64). Sequences: the N rows, or with
    ``cu`` the segments of one packed row (its labels' segment starts masked, ``_ops.mask_segment_starts``)."""
    check_label_range(labels, logits.shape[2], ignore_index)
    token_logps, lse, stats = _ops.logps_forward(logits, labels, ignore_index, shift, with_stats)
    logps, num_tokens, _ = _ops.sequence_sums(token_logps, None, labels, ignore_index, shift, cu)
    return token_logps, lse, stats if stats is not None else token_logps.new_empty(0), logps, num_tokens


def _num_seqs(labels, cu):
    return labels.shape[0] if cu is None else cu.shape[0] - 1


@logps_forward.register_fake
def _(logits, labels, ignore_index, shift, with_stats, cu=None):
    N, T, _ = logits.shape
    S = _num_seqs(labels, cu)
    dt = _ops._compute_dtype(logits)
    return (logits.new_empty((N, T), dtype=dt), logits.new_empty((N, T), dtype=dt),
            logits.new_empty((4, N, T) if with_stats else (0,), dtype=dt), logits.new_empty((S,), dtype=dt),
            logits.new_empty((S,), dtype=torch.int64))


@torch.library.custom_op("fastdpo::logps_backward", mutates_args=())
def logps_backward(logits: Tensor, labels: Tensor, lse: Tensor, coef: Tensor, ignore_index: int,
                   shift: bool) -> Tensor:
    return _ops.logps_backward(logits, labels, lse, coef, ignore_index, shift, inplace=False)


@logps_backward.register_fake
def _(logits, labels, lse, coef, ignore_index, shift):
    return torch.empty_like(logits)


@torch.library.custom_op("fastdpo::logps_backward_", mutates_args=("logits",))
def logps_backward_(logits: Tensor, labels: Tensor, lse: Tensor, coef: Tensor, ignore_index: int,
                    shift: bool) -> None:
    """In place: the gradient overwrites the logits."""
    _ops.logps_backward(logits, labels, lse, coef, ignore_index, shift, inplace=True)


@logps_backward_.register_fake
def _(logits, labels, lse, coef, ignore_index, shift):
    return None


@torch.library.custom_op("fastdpo::dpo_forward", mutates_args=())
def dpo_forward(logits: Tensor, labels: Tensor, ref_chosen: Optional[Tensor], ref_rejected: Optional[Tensor],
                ignore_index: int, shift: bool, params: List[float], cu: Optional[Tensor] = None
                ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The DPO loss of logits (2B, T, V), or of a packed row (1, total, V) of 2B segments (``cu``): one pass over
    the logits, the per-sequence sums, the loss head.

    ``params``: ``fastdpo._head.HeadParams`` of the config. Returns (loss (), coef: dL/dlogp per sequence (2B,),
    or per position (2B, T) / (1, total) with LD-DPO, lse (N, T) per row, logps (2B,), num_tokens (2B,) int64,
    seq_stats (4, 2B), rewards (2B,), metrics (10,) in ``fastdpo._head.METRICS`` order)."""
    check_label_range(labels, logits.shape[2], ignore_index)
    token_logps, lse, stats = _ops.logps_forward(logits, labels, ignore_index, shift, True)
    return _dpo_tail(token_logps, lse, stats, labels, ref_chosen, ref_rejected, ignore_index, shift, params, cu)


def _dpo_tail(token_logps, lse, stats, labels, ref_chosen, ref_rejected, ignore_index, shift, params, cu=None):
    """``dpo_forward`` after the pass over the logits: the per-sequence sums and the loss head."""
    p = _head.HeadParams(*params)
    logps, num_tokens, seq_stats = _ops.sequence_sums(token_logps, stats, labels, ignore_index, shift, cu)
    sums = logps
    if p.ld:  # LD-DPO: the tokens past the shorter completion of each pair weigh ld_alpha
        if cu is None:
            token_w = ld_token_weights(_ops.valid_positions(labels, ignore_index, shift), p.ld_alpha)
            logps = (token_logps * token_w.to(logps.dtype)).sum(1)
        else:
            token_w = ld_token_weights_packed(labels[0] != ignore_index, cu, p.ld_alpha)[None]
            logps = _ops.segment_sum((token_logps * token_w.to(logps.dtype))[0], cu)
        token_w = token_w.to(logps.dtype)
    out, coef, rewards, metrics = _head.loss_head(logps, sums, num_tokens, seq_stats, ref_chosen, ref_rejected, p)
    if p.ld:  # the token term (sft, nll) is unweighted: coef = g_seq * w + token coefficient (chosen)
        B = logps.shape[0] // 2
        token = torch.zeros_like(coef)
        token[:B] = out[1]
        if cu is None:
            coef = (coef - token)[:, None] * token_w + token[:, None]
        else:
            seg = _ops.segment_ids(cu, labels.shape[1])
            coef = ((coef - token)[seg] * token_w[0] + token[seg])[None]
    return out[0], coef, lse, logps, num_tokens, seq_stats, rewards, metrics


def _fake_dpo(lse_like, labels, cu, params):
    N, T = labels.shape
    S = _num_seqs(labels, cu)

    def new(*shape, dtype=lse_like.dtype):
        return lse_like.new_empty(shape, dtype=dtype)

    coef = new(N, T) if _head.HeadParams(*params).ld else new(S)
    return (new(), coef, new(N, T), new(S), new(S, dtype=torch.int64), new(4, S), new(S), new(len(_head.METRICS)))


@dpo_forward.register_fake
def _(logits, labels, ref_chosen, ref_rejected, ignore_index, shift, params, cu=None):
    return _fake_dpo(logits.new_empty(0, dtype=_ops._compute_dtype(logits)), labels, cu, params)


# ------------------------------------------------------------------------------ vocabulary-parallel (_vocab)


@torch.library.custom_op("fastdpo::shard_forward", mutates_args=())
def shard_forward(logits: Tensor, labels: Tensor, ignore_index: int, shift: bool, start: int, vocab_size: int,
                  with_stats: bool) -> Tuple[Tensor, Tensor]:
    """A vocabulary shard's pass: (partials (K, N, T) at positions, local labels (N, T) int64), see
    ``fastdpo._vocab``; labels are global ids in [0, vocab_size)."""
    check_label_range(labels, vocab_size, ignore_index)
    return _vocab.shard_forward(logits, labels, ignore_index, shift, start, with_stats)


@shard_forward.register_fake
def _(logits, labels, ignore_index, shift, start, vocab_size, with_stats):
    N, T, _ = logits.shape
    K = _vocab.K_STATS if with_stats else _vocab.K_PLAIN
    return (logits.new_empty((K, N, T), dtype=_ops._compute_dtype(logits)),
            logits.new_empty((N, T), dtype=torch.int64))


@torch.library.custom_op("fastdpo::logps_from_partials", mutates_args=())
def logps_from_partials(gathered: Tensor, labels: Tensor, ignore_index: int, shift: bool, vocab_shard: int,
                        with_stats: bool, cu: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Every shard's partials (P, K, N, T) -> ``logps_forward``'s outputs for the whole vocabulary."""
    token_logps, lse, stats = _vocab.combine_positions(gathered, labels, ignore_index, shift, vocab_shard,
                                                       with_stats)
    logps, num_tokens, _ = _ops.sequence_sums(token_logps, None, labels, ignore_index, shift, cu)
    return token_logps, lse, stats if stats is not None else token_logps.new_empty(0), logps, num_tokens


@logps_from_partials.register_fake
def _(gathered, labels, ignore_index, shift, vocab_shard, with_stats, cu=None):
    N, T = labels.shape
    S = _num_seqs(labels, cu)
    return (gathered.new_empty((N, T)), gathered.new_empty((N, T)),
            gathered.new_empty((4, N, T) if with_stats else (0,)), gathered.new_empty((S,)),
            gathered.new_empty((S,), dtype=torch.int64))


@torch.library.custom_op("fastdpo::dpo_from_partials", mutates_args=())
def dpo_from_partials(gathered: Tensor, labels: Tensor, ref_chosen: Optional[Tensor], ref_rejected: Optional[Tensor],
                      ignore_index: int, shift: bool, vocab_shard: int, params: List[float],
                      cu: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                                                            Tensor]:
    """Every shard's partials (P, K, N, T) -> ``dpo_forward``'s outputs for the whole vocabulary."""
    token_logps, lse, stats = _vocab.combine_positions(gathered, labels, ignore_index, shift, vocab_shard, True)
    return _dpo_tail(token_logps, lse, stats, labels, ref_chosen, ref_rejected, ignore_index, shift, params, cu)


@dpo_from_partials.register_fake
def _(gathered, labels, ref_chosen, ref_rejected, ignore_index, shift, vocab_shard, params, cu=None):
    return _fake_dpo(gathered.new_empty(0), labels, cu, params)


# ------------------------------------------------------------------------------------ fused linear (_linear)


def _empty_if_none(t: Optional[Tensor], like: Tensor) -> Tensor:
    return like.new_empty(0) if t is None else t


@torch.library.custom_op("fastdpo::linear_logps_forward", mutates_args=())
def linear_logps_forward(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, ignore_index: int,
                         shift: bool, opts: List[float], chunk_bytes: int, with_stats: bool, cu: Optional[Tensor] = None
                         ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``sequence_logps`` of ``transform(hidden @ weight.T + bias)`` in chunks of ``chunk_bytes`` of logits (0: the
    default, chosen here at run time, ``fastdpo._linear.chunk_rows``):
    (token_logps (N, T), lse (N * T,) per row, stats (4, N, T) or (0,), logps (N,), num_tokens (N,) int64,
    row counts (N,) int64 on the CPU: what the backward needs to skip the host read)."""
    check_label_range(labels, weight.shape[0], ignore_index)
    token_logps, lse, stats, logps, num_tokens, counts = _linear.sequence_logps_forward(
        hidden, weight, bias, labels, ignore_index=ignore_index, shift=shift,
        opts=_linear.LogitOptions.from_list(opts), chunk_bytes=chunk_bytes or None, with_stats=with_stats, cu=cu)
    return token_logps, lse, _empty_if_none(stats, token_logps), logps, num_tokens, counts


@linear_logps_forward.register_fake
def _(hidden, weight, bias, labels, ignore_index, shift, opts, chunk_bytes, with_stats, cu=None):
    N, T, _ = hidden.shape
    S = _num_seqs(labels, cu)
    dt = torch.float64 if torch.promote_types(hidden.dtype, weight.dtype) == torch.float64 else torch.float32

    def new(*shape, dtype=dt):
        return hidden.new_empty(shape, dtype=dtype)
    return (new(N, T), new(N * T), new(4, N, T) if with_stats else new(0), new(S), new(S, dtype=torch.int64),
            torch.empty(S, dtype=torch.int64, device="cpu"))


@torch.library.custom_op("fastdpo::linear_logps_backward", mutates_args=())
def linear_logps_backward(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, lse: Tensor,
                          coef: Tensor, counts: Tensor, ignore_index: int, shift: bool, opts: List[float],
                          chunk_bytes: int, lean: bool, needs: List[bool], cu: Optional[Tensor] = None
                          ) -> Tuple[Tensor, Tensor, Tensor]:
    """Gradients of ``linear_logps_forward``'s log-probs from ``coef`` (N, T) (d loss / d token log-prob):
    (hidden's, weight's, bias's), each (0,) where ``needs`` says no."""
    grads = _linear.sequence_logps_backward(
        hidden, weight, bias, labels, lse, coef, counts, ignore_index=ignore_index, shift=shift,
        opts=_linear.LogitOptions.from_list(opts), chunk_bytes=chunk_bytes or None, lean=lean, needs=needs, cu=cu)
    return tuple(_empty_if_none(g, hidden) for g in grads)


@linear_logps_backward.register_fake
def _(hidden, weight, bias, labels, lse, coef, counts, ignore_index, shift, opts, chunk_bytes, lean, needs, cu=None):
    return _fake_grads(hidden, weight, bias, needs)


def _fake_grads(hidden, weight, bias, needs):
    shapes = (hidden, weight, bias)
    return tuple(t.new_empty(t.shape) if need and t is not None else hidden.new_empty(0)
                 for t, need in zip(shapes, needs))


@torch.library.custom_op("fastdpo::linear_dpo_forward", mutates_args=())
def linear_dpo_forward(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor,
                       ref_chosen: Optional[Tensor], ref_rejected: Optional[Tensor], ignore_index: int, shift: bool,
                       params: List[float], opts: List[float], chunk_bytes: int, lean: bool, needs: List[bool],
                       pair_local: bool, cu: Optional[Tensor] = None
                       ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The DPO loss of ``transform(hidden @ weight.T + bias)`` and, with it, the gradients of the inputs ``needs``
    marks (each (0,) otherwise): (loss (), logps (2B,), num_tokens (2B,), seq_stats (4, 2B), rewards (2B,),
    metrics (10,), hidden's, weight's, bias's gradients of the loss)."""
    check_label_range(labels, weight.shape[0], ignore_index)
    out = _linear.dpo_forward(hidden, weight, bias, labels, ref_chosen, ref_rejected, _head.HeadParams(*params),
                              ignore_index=ignore_index, shift=shift, opts=_linear.LogitOptions.from_list(opts),
                              chunk_bytes=chunk_bytes or None, lean=lean, needs=needs, pair_local=pair_local, cu=cu)
    return (out.loss, out.logps, out.num_tokens, out.seq_stats, out.rewards, out.metrics,
            *(_empty_if_none(g, hidden) for g in out.grads))


@linear_dpo_forward.register_fake
def _(hidden, weight, bias, labels, ref_chosen, ref_rejected, ignore_index, shift, params, opts, chunk_bytes, lean, needs,
      pair_local, cu=None):
    N = _num_seqs(labels, cu)
    dt = torch.float64 if torch.promote_types(hidden.dtype, weight.dtype) == torch.float64 else torch.float32

    def new(*shape, dtype=dt):
        return hidden.new_empty(shape, dtype=dtype)
    return (new(), new(N), new(N, dtype=torch.int64), new(4, N), new(N), new(len(_head.METRICS)),
            *_fake_grads(hidden, weight, bias, needs))
