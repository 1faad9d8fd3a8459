"""fastdpo's primitives as ``torch.library`` custom ops, with fake (meta) implementations.

The autograd Functions call these, so ``torch.compile(..., fullgraph=True)`` sees each primitive as one
opaque node with known output shapes instead of tracing into Triton launches, Python loops over chunks or
host-side checks. The data-dependent label check runs inside the op (eagerly), never in a traced graph.

Layers: kernels -> dispatch (``_ops``, ``_head``) -> these ops -> the autograd Functions -> the user API.
"""

import os
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from fastdpo import _head, _ops, _vocab
from fastdpo.losses import ld_token_weights


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
def logps_forward(logits: Tensor, labels: Tensor, ignore_index: int, shift: bool,
                  with_stats: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(token_logps (N, T) aligned with the labels, lse (N, T) per row, stats (4, N, T) aligned with the labels
    or (0,) without stats, logps (N,) summed per sequence, num_tokens (N,) int64)."""
    check_label_range(labels, logits.shape[2], ignore_index)
    token_logps, lse, stats = _ops.logps_forward(logits, labels, ignore_index, shift, with_stats)
    logps, num_tokens, _ = _ops.sequence_sums(token_logps, None, labels, ignore_index, shift)
    return token_logps, lse, stats if stats is not None else token_logps.new_empty(0), logps, num_tokens


@logps_forward.register_fake
def _(logits, labels, ignore_index, shift, with_stats):
    N, T, _ = logits.shape
    dt = _ops._compute_dtype(logits)
    return (logits.new_empty((N, T), dtype=dt), logits.new_empty((N, T), dtype=dt),
            logits.new_empty((4, N, T) if with_stats else (0,), dtype=dt), logits.new_empty((N,), dtype=dt),
            logits.new_empty((N,), dtype=torch.int64))


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
                ignore_index: int, shift: bool, params: List[float]
                ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The DPO loss of logits (2B, T, V): one pass over the logits, the per-sequence sums, the loss head.

    ``params``: ``fastdpo._head.HeadParams`` of the config. Returns (loss (), coef: dL/dlogp per sequence (2B,),
    or per position (2B, T) with LD-DPO, lse (2B, T) per row, logps (2B,), num_tokens (2B,) int64, seq_stats
    (4, 2B), rewards (2B,), metrics (10,) in ``fastdpo._head.METRICS`` order)."""
    check_label_range(labels, logits.shape[2], ignore_index)
    token_logps, lse, stats = _ops.logps_forward(logits, labels, ignore_index, shift, True)
    return _dpo_tail(token_logps, lse, stats, labels, ref_chosen, ref_rejected, ignore_index, shift, params)


def _dpo_tail(token_logps, lse, stats, labels, ref_chosen, ref_rejected, ignore_index, shift, params):
    """``dpo_forward`` after the pass over the logits: the per-sequence sums and the loss head."""
    p = _head.HeadParams(*params)
    logps, num_tokens, seq_stats = _ops.sequence_sums(token_logps, stats, labels, ignore_index, shift)
    sums = logps
    if p.ld:  # LD-DPO: the tokens past the shorter completion of each pair weigh ld_alpha
        token_w = ld_token_weights(_ops.valid_positions(labels, ignore_index, shift), p.ld_alpha).to(logps.dtype)
        logps = (token_logps * token_w).sum(1)
    out, coef, rewards, metrics = _head.loss_head(logps, sums, num_tokens, seq_stats, ref_chosen, ref_rejected, p)
    if p.ld:  # the token term (sft, nll) is unweighted: coef = g_seq * w + token coefficient (chosen)
        B = logps.shape[0] // 2
        token = torch.zeros_like(coef)
        token[:B] = out[1]
        coef = (coef - token)[:, None] * token_w + token[:, None]
    return out[0], coef, lse, logps, num_tokens, seq_stats, rewards, metrics


@dpo_forward.register_fake
def _(logits, labels, ref_chosen, ref_rejected, ignore_index, shift, params):
    N, T, _ = logits.shape
    dt = _ops._compute_dtype(logits)

    def new(*shape, dtype=dt):
        return logits.new_empty(shape, dtype=dtype)

    coef = new(N, T) if _head.HeadParams(*params).ld else new(N)
    return (new(), coef, new(N, T), new(N), new(N, dtype=torch.int64), new(4, N), new(N), new(len(_head.METRICS)))


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
                        with_stats: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Every shard's partials (P, K, N, T) -> ``logps_forward``'s outputs for the whole vocabulary."""
    token_logps, lse, stats = _vocab.combine_positions(gathered, labels, ignore_index, shift, vocab_shard,
                                                       with_stats)
    logps, num_tokens, _ = _ops.sequence_sums(token_logps, None, labels, ignore_index, shift)
    return token_logps, lse, stats if stats is not None else token_logps.new_empty(0), logps, num_tokens


@logps_from_partials.register_fake
def _(gathered, labels, ignore_index, shift, vocab_shard, with_stats):
    N, T = labels.shape
    return (gathered.new_empty((N, T)), gathered.new_empty((N, T)),
            gathered.new_empty((4, N, T) if with_stats else (0,)), gathered.new_empty((N,)),
            gathered.new_empty((N,), dtype=torch.int64))


@torch.library.custom_op("fastdpo::dpo_from_partials", mutates_args=())
def dpo_from_partials(gathered: Tensor, labels: Tensor, ref_chosen: Optional[Tensor], ref_rejected: Optional[Tensor],
                      ignore_index: int, shift: bool, vocab_shard: int, params: List[float]
                      ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Every shard's partials (P, K, N, T) -> ``dpo_forward``'s outputs for the whole vocabulary."""
    token_logps, lse, stats = _vocab.combine_positions(gathered, labels, ignore_index, shift, vocab_shard, True)
    return _dpo_tail(token_logps, lse, stats, labels, ref_chosen, ref_rejected, ignore_index, shift, params)


@dpo_from_partials.register_fake
def _(gathered, labels, ref_chosen, ref_rejected, ignore_index, shift, vocab_shard, params):
    N, T = labels.shape

    def new(*shape, dtype=gathered.dtype):
        return gathered.new_empty(shape, dtype=dtype)

    coef = new(N, T) if _head.HeadParams(*params).ld else new(N)
    return (new(), coef, new(N, T), new(N), new(N, dtype=torch.int64), new(4, N), new(N), new(len(_head.METRICS)))
