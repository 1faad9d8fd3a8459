"""Fused linear: per-sequence log-probs and the DPO loss from hidden states and the LM head, never building the
logits of more than one chunk of tokens. The autograd Functions and the user API; the implementation (chunk loop,
GEMM counts, what is allocated) is ``fastdpo._linear``, reached through the custom ops of ``fastdpo._library`` (so
``torch.compile(fullgraph=True)`` sees each call as one opaque node), or directly for a vocabulary shard (whose
collectives the ops cannot carry).

Gradients are computed only for the inputs that need one (a frozen LM head, as with LoRA, gets no weight-gradient
GEMM and no accumulator), and none at all under ``torch.no_grad()``. ``linear_dpo_loss`` computes its gradients
in the forward (the loss is known there); its backward scales them by the upstream gradient, out of place, so a
second backward (``retain_graph=True``) gives the same gradients again.
"""

from dataclasses import dataclass
from typing import Any, Optional

import torch

from fastdpo import _head, _library, _linear, _ops, _vocab
from fastdpo._checks import LABEL_DTYPES, check_cu_seqlens, packed_shapes, reject_dtensor
from fastdpo._library import check_label_range
from fastdpo._linear import DEFAULT_CHUNK_BYTES, DEFAULT_CHUNK_TOKENS, LogitOptions  # noqa: F401 (public names)
from fastdpo.dpo import DPOLossOutput, _reference, dpo_output
from fastdpo.logps import SequenceLogps, _mean_scale, sequence_coef
from fastdpo.losses import DPOLossConfig, pair_local


@dataclass(frozen=True)
class LinearOptions:
    """What a fused-linear call needs besides its tensors: label conventions (as ``sequence_logps``), the logit
    transform, the chunk's byte budget (None: ``fastdpo._linear.chunk_rows``'s default), the lean backward, the
    vocabulary's process group; with the DPO loss, its config; with the log-probs, ``average`` and the
    statistics."""

    ignore_index: int = -100
    shift: bool = True
    logits: LogitOptions = LogitOptions()
    chunk_bytes: Optional[int] = None
    lean: bool = False
    process_group: Any = None
    config: Optional[DPOLossConfig] = None
    average: bool = False
    with_stats: bool = False


def _check_linear(hidden, weight, labels, bias, o: LinearOptions):
    """Everything but the labels' range (checked once the vocabulary size is known)."""
    for name, t in (("hidden", hidden), ("weight", weight), ("labels", labels)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    for name, t in (("hidden", hidden), ("weight", weight), ("bias", bias)):
        reject_dtensor(name, t, "a sharded LM head (FSDP2's fully_shard) is gathered for the call by "
                       "fastdpo.policy_logps / fastdpo.policy_dpo_loss, which run inside the model's forward; or pass "
                       "weight.full_tensor(grad_placements=...) with the gradient placement your parallelism needs "
                       "(FSDP2: [Partial('avg')]); a vocabulary-parallel head takes its local rows and process_group=")
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be 3-D (N, T, H), got shape {tuple(hidden.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (V, H), got shape {tuple(weight.shape)}")
    if not hidden.dtype.is_floating_point or not weight.dtype.is_floating_point:
        raise TypeError(f"hidden and weight must be floating point, got {hidden.dtype} and {weight.dtype}")
    if weight.shape[1] != hidden.shape[2]:
        raise ValueError(f"weight has hidden size {weight.shape[1]} but hidden has {hidden.shape[2]}")
    if labels.dtype not in LABEL_DTYPES:
        raise TypeError(f"labels must be int64 or int32, got {labels.dtype}")
    if tuple(labels.shape) != tuple(hidden.shape[:2]):
        raise ValueError(f"labels must have shape (N, T) = {tuple(hidden.shape[:2])}, got {tuple(labels.shape)}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must be a tensor of shape ({weight.shape[0]},)")
    for name, t in (("weight", weight), ("labels", labels), ("bias", bias)):
        if t is not None and t.device != hidden.device:
            raise ValueError(f"{name} is on {t.device} but hidden on {hidden.device}")
    if not isinstance(o.ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(o.ignore_index).__name__}")
    if not isinstance(o.logits, LogitOptions):
        raise TypeError(f"logits options must be a LogitOptions, got {type(o.logits).__name__}")
    if o.chunk_bytes is not None and not (isinstance(o.chunk_bytes, int) and o.chunk_bytes > 0):
        raise ValueError(f"chunk_bytes must be a positive int or None, got {o.chunk_bytes!r}")


_N_AGREE = 6  # the numbers Shard's agreement sends: statistics, three needs-grad flags, hidden size, dtype


def _needs(hidden, weight, bias):
    """Which of hidden, weight, bias need a gradient: none under no_grad."""
    if not torch.is_grad_enabled():
        return (False, False, False)
    return tuple(isinstance(t, torch.Tensor) and t.requires_grad for t in (hidden, weight, bias))


def _shard(hidden, weight, labels, o: LinearOptions, needs, cu=None):
    """After every other check (a rank that raised there would leave the others waiting in the collective): the
    vocabulary shard (its ranks agree on everything that sizes or gates a collective), or None without a group;
    then the labels' range over the whole vocabulary (CPU labels; inside the op without a group)."""
    if o.process_group is None:
        return None
    shard = _linear.Shard(o.process_group, hidden, weight, labels, ignore_index=o.ignore_index, shift=o.shift,
                          with_stats=o.with_stats or o.config is not None, needs=needs, cu=cu)
    check_label_range(labels, shard.vocab_size, o.ignore_index)
    return shard


def _logps_forward(hidden, weight, bias, labels, cu, o: LinearOptions, needs):
    """The checked forward: (token_logps, lse per row, stats or (0,), logps, num_tokens, row counts (CPU), shard)."""
    _check_linear(hidden, weight, labels, bias, o)
    shard = _shard(hidden, weight, labels, o, needs, cu)
    if shard is None:
        outs = _library.linear_logps_forward(hidden, weight, bias, labels, o.ignore_index, o.shift, o.logits.as_list(),
                                             o.chunk_bytes or 0, o.with_stats, cu)
    else:
        outs = list(_linear.sequence_logps_forward(hidden, weight, bias, labels, ignore_index=o.ignore_index,
                                                   shift=o.shift, opts=o.logits, chunk_bytes=o.chunk_bytes,
                                                   with_stats=o.with_stats, shard=shard, cu=cu))
        outs[2] = outs[0].new_empty(0) if outs[2] is None else outs[2]
    return (*outs, shard)


class LinearSequenceLogpsFunction(torch.autograd.Function):
    """``(hidden, weight, bias, labels, cu_seqlens or None, options: LinearOptions) -> (logps (S,), token_logps
    (N, T), num_tokens (S,), stats (4, N, T) or (0,))``; logps and token_logps are differentiable with respect to
    hidden, weight and bias (each only if it requires a gradient). With ``cu_seqlens``, one packed row (N = 1;
    ``packed_linear_inputs`` makes its hidden states and labels) of S segments."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, cu, o: LinearOptions):
        needs = ctx.needs_input_grad[:3]
        token_logps, lse, stats, logps, num_tokens, counts, shard = _logps_forward(
            hidden, weight, bias, labels, cu, o, needs)
        if o.average:
            logps = logps * _mean_scale(num_tokens, logps.dtype)
        ctx.mark_non_differentiable(num_tokens, stats)
        ctx.set_materialize_grads(False)
        if any(needs):
            ctx.save_for_backward(hidden, weight, bias, labels, lse, num_tokens, counts, cu)
        ctx.call = (o, shard, needs)
        return logps, token_logps, num_tokens, stats

    @staticmethod
    def backward(ctx, grad_logps, grad_token_logps, *_):
        hidden, weight, bias, labels, lse, num_tokens, counts, cu = ctx.saved_tensors
        o, shard, needs = ctx.call
        coef = sequence_coef(labels, num_tokens, grad_logps, grad_token_logps, o.average, cu)
        if shard is None:
            grads = _library.linear_logps_backward(hidden, weight, bias, labels, lse, coef, counts, o.ignore_index,
                                                   o.shift, o.logits.as_list(), o.chunk_bytes or 0, o.lean,
                                                   list(needs), cu)
            grads = [g if need else None for g, need in zip(grads, needs)]
        else:
            grads = _linear.sequence_logps_backward(hidden, weight, bias, labels, lse, coef, counts,
                                                    ignore_index=o.ignore_index, shift=o.shift, opts=o.logits,
                                                    chunk_bytes=o.chunk_bytes, lean=o.lean, needs=needs, shard=shard,
                                                    cu=cu)
        return (*grads, None, None, None)


def packed_linear_inputs(hidden, labels, cu_seqlens, ignore_index: int, shift: bool, *, pairs: bool):
    """A packed batch for the fused linear: hidden (total, H) or (1, total, H) -> (1, total, H) (a view), labels
    (total,) or (1, total) -> (1, total) with each segment's first position masked when shifting."""
    hidden = packed_shapes("hidden", hidden, 1)
    labels = packed_shapes("labels", labels, 0)
    if tuple(labels.shape) != tuple(hidden.shape[:2]):
        raise ValueError(f"labels must have the packed hidden states' token count {hidden.shape[1]}, got shape "
                         f"{tuple(labels.shape)}")
    check_cu_seqlens(cu_seqlens, labels.shape[1], hidden.device, pairs=pairs)
    if shift:
        labels = _ops.mask_segment_starts(labels, cu_seqlens, ignore_index)
    return hidden, labels


def linear_sequence_logps(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                          bias: Optional[torch.Tensor] = None, *, ignore_index: int = -100, shift: bool = True,
                          average: bool = False, logit_scale: float = 1.0, softcap: Optional[float] = None,
                          temperature: float = 1.0, return_token_logps: bool = False,
                          return_token_stats: bool = False, chunk_bytes: Optional[int] = None,
                          lean: bool = False, process_group=None,
                          cu_seqlens: Optional[torch.Tensor] = None) -> SequenceLogps:
    """``sequence_logps(transform(hidden @ weight.T + bias), labels)`` without building the logits.

    Args:
        hidden: (N, T, H); weight: (V, H) (the LM head, tied embeddings included); bias: (V,) or None.
        logit_scale, softcap, temperature: see ``LogitOptions``.
        return_token_stats: also return ``token_stats``, per-token (N, T) ``entropy``, ``mean_logits``,
            ``log_sum_sq_probs`` and ``is_top1`` (TRL's fused LM head outputs; not differentiable).
        chunk_bytes: the logits buffer of one chunk of tokens; None: 128 MiB on CPU, 4096 tokens' logits on a GPU
            (at least 128 MiB, at most 1/16 of its memory), see ``fastdpo._linear.chunk_rows``.
        lean: backward in vocabulary tiles, each writing its rows of the weight gradient once, in the weight's
            dtype: no fp32 copy of the weight gradient, the same GEMM count.
        process_group: vocabulary-parallel (Megatron's column-parallel LM head): ``weight`` (and ``bias``) hold rows
            [r * Vp, (r + 1) * Vp) of the head on rank r, ``hidden`` and ``labels`` (global ids) are the same on every
            rank. Every rank gets the unsharded outputs; the weight gradient is the local rows', the hidden-state
            gradient the full one (summed over the group). Communication: one all-gather of 2 fp32 per completion
            token (7 with the statistics) in forward, one all-reduce of the hidden-state gradient in backward.
        cu_seqlens: a packed batch (padding-free): hidden (total, H) or (1, total, H), labels (total,) or
            (1, total), sequence s its tokens [cu_seqlens[s], cu_seqlens[s + 1]), as in ``sequence_logps``.
    """
    with _vocab.agreement(process_group, _N_AGREE):
        o = LinearOptions(ignore_index=ignore_index, shift=shift,
                          logits=LogitOptions(logit_scale, softcap, temperature), chunk_bytes=chunk_bytes, lean=lean,
                          process_group=process_group, average=average, with_stats=return_token_stats)
    shape = labels.shape if isinstance(labels, torch.Tensor) else None
    with _vocab.agreement(process_group, _N_AGREE):  # an input refused here is refused on every rank
        if cu_seqlens is not None:
            hidden, labels = packed_linear_inputs(hidden, labels, cu_seqlens, ignore_index, shift, pairs=False)
        if any(_needs(hidden, weight, bias)):
            logps, token_logps, num_tokens, stats = LinearSequenceLogpsFunction.apply(hidden, weight, bias, labels,
                                                                                      cu_seqlens, o)
        else:  # nothing needs a gradient: no autograd node, nothing saved
            token_logps, _, stats, logps, num_tokens, *_ = _logps_forward(hidden, weight, bias, labels, cu_seqlens,
                                                                          o, (False, False, False))
            if average:
                logps = logps * _mean_scale(num_tokens, logps.dtype)
    if cu_seqlens is not None:
        token_logps = token_logps.view(shape)
        stats = stats.view(4, *shape) if return_token_stats else stats
    return SequenceLogps(logps, num_tokens, token_logps if return_token_logps else None,
                         _ops.named_token_stats(stats) if return_token_stats else None)


def _check_pairs(hidden, weight, ref_chosen_logps, ref_rejected_logps, config, cu=None):
    """(ref_chosen, ref_rejected) in the compute dtype, or both None; raises on bad pairs or references."""
    if not isinstance(config, DPOLossConfig):
        raise TypeError(f"config must be a DPOLossConfig, got {type(config).__name__}")
    N = hidden.shape[0] if cu is None else cu.shape[0] - 1
    if N % 2 or N == 0:
        raise ValueError(f"hidden must hold 2B rows (chosen [0, B), rejected [B, 2B)) with B >= 1, got {N} rows")
    if (ref_chosen_logps is None) != (ref_rejected_logps is None):
        raise ValueError("give both ref_chosen_logps and ref_rejected_logps, or neither (reference-free)")
    if ref_chosen_logps is None:
        return None, None
    cdt = torch.float64 if torch.promote_types(hidden.dtype, weight.dtype) == torch.float64 else torch.float32
    like = hidden.new_empty(0, dtype=cdt)
    return (_reference(ref_chosen_logps, "ref_chosen_logps", N // 2, like, cdt),
            _reference(ref_rejected_logps, "ref_rejected_logps", N // 2, like, cdt))


def _dpo(hidden, weight, bias, labels, ref_c, ref_r, cu, o: LinearOptions, needs):
    """The checked call: (loss, logps, num_tokens, seq_stats, rewards, metrics, grads (3, None where not needed))."""
    _check_linear(hidden, weight, labels, bias, o)
    ref_c, ref_r = _check_pairs(hidden, weight, ref_c, ref_r, o.config, cu)
    p = _head.params(o.config)
    shard = _shard(hidden, weight, labels, o, needs, cu)
    if shard is None:
        *outs, gh, gw, gb = _library.linear_dpo_forward(
            hidden, weight, bias, labels, ref_c, ref_r, o.ignore_index, o.shift, list(p), o.logits.as_list(),
            o.chunk_bytes or 0, o.lean, list(needs), pair_local(o.config), cu)
        grads = [g if need else None for g, need in zip((gh, gw, gb), needs)]
        return (*outs, grads)
    out = _linear.dpo_forward(hidden, weight, bias, labels, ref_c, ref_r, p, ignore_index=o.ignore_index,
                              shift=o.shift, opts=o.logits, chunk_bytes=o.chunk_bytes, lean=o.lean, needs=needs,
                              pair_local=pair_local(o.config), shard=shard, cu=cu)
    return out.loss, out.logps, out.num_tokens, out.seq_stats, out.rewards, out.metrics, list(out.grads)


class LinearDPOLossFunction(torch.autograd.Function):
    """``(hidden, weight, bias, labels, ref_chosen, ref_rejected, cu_seqlens or None, options: LinearOptions with
    its config) ->
    (loss, logps (2B,), num_tokens (2B,), seq_stats (4, 2B), rewards (2B,), metrics (10,))``, as
    ``FusedDPOLossFunction``. Forward computes the gradients of the inputs that need one (the loss is known
    there); backward scales them by the upstream gradient (a new tensor: a second backward sees them unchanged)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ref_chosen_logps, ref_rejected_logps, cu, o: LinearOptions):
        needs = ctx.needs_input_grad[:3]
        *outs, grads = _dpo(hidden, weight, bias, labels, ref_chosen_logps, ref_rejected_logps, cu, o, needs)
        loss, logps, num_tokens, seq_stats, rewards, metrics = outs
        ctx.save_for_backward(*(g for g in grads if g is not None))
        ctx.needs = needs
        ctx.mark_non_differentiable(logps, num_tokens, seq_stats, rewards, metrics)
        ctx.set_materialize_grads(False)
        return loss, logps, num_tokens, seq_stats, rewards, metrics

    @staticmethod
    def backward(ctx, grad_loss, *_):
        saved = iter(ctx.saved_tensors)
        grads = [next(saved) if need else None for need in ctx.needs]
        if grad_loss is not None:
            grads = [None if g is None else g * grad_loss.to(g.dtype) for g in grads]
        else:
            grads = [None] * 3
        return (*grads, None, None, None, None, None)


def linear_dpo_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                    ref_chosen_logps: Optional[torch.Tensor] = None, ref_rejected_logps: Optional[torch.Tensor] = None,
                    bias: Optional[torch.Tensor] = None, *, config: Optional[DPOLossConfig] = None,
                    ignore_index: int = -100, shift: bool = True, logit_scale: float = 1.0,
                    softcap: Optional[float] = None, temperature: float = 1.0,
                    chunk_bytes: Optional[int] = None, lean: bool = False, process_group=None,
                    cu_seqlens: Optional[torch.Tensor] = None, **options) -> DPOLossOutput:
    """``dpo_loss`` of ``transform(hidden @ weight.T + bias)`` without building the logits; same options and
    output (every ``DPOLossConfig`` field as a keyword, or ``config=``).

    Args:
        hidden: (2B, T, H), rows [0, B) chosen, [B, 2B) rejected; weight: (V, H); bias: (V,) or None.
        logit_scale, softcap, temperature: see ``LogitOptions``.
        chunk_bytes: the logits buffer of one chunk (a group of whole pairs where they fit); None: 128 MiB on CPU,
            4096 tokens' logits on a GPU (at least 128 MiB, at most 1/16 of its memory).
        lean: the memory-lean setting: log-probs of every chunk first, then the gradients in vocabulary tiles over
            all tokens: one GEMM more than the default, and no fp32 copy of the weight gradient (beyond the inputs
            and gradients: one chunk of logits, the completion rows' hidden states and an fp32 (tokens, H)
            accumulator).
        process_group: vocabulary-parallel, as in ``linear_sequence_logps`` (``weight`` holds this rank's rows of
            the head); every rank gets the unsharded loss and metrics. Always the two-pass mode: the loss needs
            every shard's partials, gathered once after the last chunk.
        cu_seqlens: a packed batch (padding-free): hidden (total, H) or (1, total, H) of 2B segments, chosen
            [0, B) then rejected [B, 2B), labels (total,) or (1, total), as in ``dpo_loss``.

    Gradients flow only to the inputs that require one: a frozen head (LoRA) costs 2 GEMMs instead of 3 and holds
    no weight-gradient accumulator; under ``torch.no_grad()`` only the forward GEMM runs.
    """
    with _vocab.agreement(process_group, _N_AGREE):  # an input refused here is refused on every rank
        if config is None:
            config = DPOLossConfig(**options)
        elif options:
            raise TypeError(f"pass either config or loss options, not both: {sorted(options)}")
        o = LinearOptions(ignore_index=ignore_index, shift=shift,
                          logits=LogitOptions(logit_scale, softcap, temperature), chunk_bytes=chunk_bytes, lean=lean,
                          process_group=process_group, config=config)
        needs = _needs(hidden, weight, bias)
        if cu_seqlens is not None:
            hidden, labels = packed_linear_inputs(hidden, labels, cu_seqlens, ignore_index, shift, pairs=True)
        if any(needs):
            loss, logps, _, _, rewards, metrics = LinearDPOLossFunction.apply(
                hidden, weight, bias, labels, ref_chosen_logps, ref_rejected_logps, cu_seqlens, o)
        else:  # nothing needs a gradient: the forward GEMM alone, no autograd node
            loss, logps, _, _, rewards, metrics, _ = _dpo(hidden, weight, bias, labels, ref_chosen_logps,
                                                          ref_rejected_logps, cu_seqlens, o, needs)
    return dpo_output(loss, logps, rewards, metrics)


class LinearDPOLoss(torch.nn.Module):
    """``LinearDPOLoss(beta=..., loss_type=...)(hidden, weight, labels, ref_chosen, ref_rejected, bias)``."""

    def __init__(self, *, ignore_index: int = -100, shift: bool = True, logit_scale: float = 1.0,
                 softcap: Optional[float] = None, temperature: float = 1.0, chunk_bytes: Optional[int] = None,
                 lean: bool = False, process_group=None, **options):
        super().__init__()
        self.config = DPOLossConfig(**options)
        self.kwargs = dict(ignore_index=ignore_index, shift=shift, logit_scale=logit_scale, softcap=softcap,
                           temperature=temperature, chunk_bytes=chunk_bytes, lean=lean, process_group=process_group)

    def forward(self, hidden, weight, labels, ref_chosen_logps=None, ref_rejected_logps=None,
                bias=None, *, cu_seqlens=None) -> DPOLossOutput:
        return linear_dpo_loss(hidden, weight, labels, ref_chosen_logps, ref_rejected_logps, bias,
                               config=self.config, cu_seqlens=cu_seqlens, **self.kwargs)

    def extra_repr(self) -> str:
        return repr(self.config)
