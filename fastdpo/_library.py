"""fastdpo's primitives as ``torch.library`` custom ops, with fake (meta) implementations.

The autograd Functions call these, so ``torch.compile(..., fullgraph=True)`` sees each primitive as one
opaque node with known output shapes instead of tracing into Triton launches, Python loops over chunks or
host-side checks. The data-dependent label check runs inside the op (eagerly), never in a traced graph.
"""

import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from fastdpo import _backend, _ops


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
                  with_stats: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """(row_logps (N, T), lse (N, T), stats (4, N, T), or (0,) without stats)."""
    check_label_range(labels, logits.shape[2], ignore_index)
    rows, lse, stats = _ops.logps_forward(logits, labels, ignore_index, shift, with_stats)
    return rows, lse, stats if stats is not None else rows.new_empty(0)


@logps_forward.register_fake
def _(logits, labels, ignore_index, shift, with_stats):
    N, T, _ = logits.shape
    dt = _ops._compute_dtype(logits)
    rows = logits.new_empty((N, T), dtype=dt)
    return rows, logits.new_empty((N, T), dtype=dt), logits.new_empty((4, N, T) if with_stats else (0,), dtype=dt)


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


@torch.library.custom_op("fastdpo::dpo_loss_head", mutates_args=())
def dpo_loss_head(chosen: Tensor, rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor,
                  chosen_tokens: Tensor, rejected_tokens: Tensor, chosen_sums: Tensor, pair_weights: Tensor,
                  total_chosen_tokens: Tensor, num_pairs: int, beta: float, loss_types: str,
                  loss_weights: List[float], label_smoothing: float, f_divergence_type: str,
                  f_alpha_divergence_coef: float, discopop_tau: float, simpo_gamma: float,
                  nll_alpha: float) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(loss, dL/d chosen, dL/d rejected, dL/d chosen_sums) of the pairs given (a part of a batch of
    ``num_pairs`` pairs). The loss options are those of ``DPOLossConfig`` that the loss head reads;
    ``loss_types`` joined by commas (custom ops take no list of strings)."""
    from fastdpo.dpo import loss_head as impl
    from fastdpo.losses import DPOLossConfig

    with warnings.catch_warnings():  # the caller's config was validated (and warned about) already
        warnings.simplefilter("ignore")
        cfg = DPOLossConfig(beta=beta, loss_type=loss_types.split(","), loss_weights=list(loss_weights),
                            label_smoothing=label_smoothing, f_divergence_type=f_divergence_type,
                            f_alpha_divergence_coef=f_alpha_divergence_coef, discopop_tau=discopop_tau,
                            simpo_gamma=simpo_gamma, nll_alpha=nll_alpha)
    args = (chosen, rejected, ref_chosen, ref_rejected, chosen_tokens, rejected_tokens, chosen_sums, pair_weights,
            cfg, num_pairs, total_chosen_tokens)
    if _backend.use_triton(chosen):
        return tuple(t.contiguous() for t in impl(*args))
    # The PyTorch path differentiates the spec (torch.func). A compiled graph calls this op under dispatch
    # modes (AOTAutograd's custom-op aliasing check) that torch.func's wrapped tensors break; modes and
    # dispatch state are thread-local, so it runs on a worker thread, where both are clean.
    return tuple(t.contiguous() for t in _spec_thread().submit(impl, *args).result())  # strides as the fake


_SPEC_THREAD = None


def _spec_thread():
    global _SPEC_THREAD
    if _SPEC_THREAD is None:
        _SPEC_THREAD = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fastdpo-loss-spec")
    return _SPEC_THREAD


@dpo_loss_head.register_fake
def _(chosen, rejected, ref_chosen, ref_rejected, chosen_tokens, rejected_tokens, chosen_sums, pair_weights,
      total_chosen_tokens, num_pairs, beta, loss_types, loss_weights, label_smoothing, f_divergence_type,
      f_alpha_divergence_coef, discopop_tau, simpo_gamma, nll_alpha):
    return chosen.new_empty(()), torch.empty_like(chosen), torch.empty_like(chosen), torch.empty_like(chosen)


def loss_head_op(chosen, rejected, ref_chosen, ref_rejected, chosen_tokens, rejected_tokens, chosen_sums,
                 pair_weights, cfg, num_pairs: Optional[int] = None, total_chosen_tokens: Optional[Tensor] = None):
    """``fastdpo.dpo.loss_head`` through its custom op."""
    if total_chosen_tokens is None:
        total_chosen_tokens = chosen_tokens.sum()
    return dpo_loss_head(chosen, rejected, ref_chosen, ref_rejected, chosen_tokens, rejected_tokens, chosen_sums,
                         pair_weights, total_chosen_tokens.to(chosen.dtype), num_pairs or chosen.shape[0],
                         float(cfg.beta), ",".join(cfg.loss_types), list(cfg.weights), float(cfg.label_smoothing),
                         cfg.f_divergence_type, float(cfg.f_alpha_divergence_coef), float(cfg.discopop_tau),
                         float(cfg.simpo_gamma), float(cfg.nll_alpha))
