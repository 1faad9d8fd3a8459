"""The fused DPO loss: logits of preference pairs in, loss and metrics out; backward straight to dlogits.

Forward, one custom op (``fastdpo::dpo_forward``): one pass over the logits (log-probs, log-sum-exp and the
metrics' per-token statistics), the per-sequence sums, then the loss head (every pair's loss, dL/dlogp of each
sequence, the rewards and TRL's metrics): three launches. Backward: one pass that writes
dlogits = coef[sequence] * (onehot - softmax) from the saved log-sum-exp. Saved for backward: O(N x T).
"""

from dataclasses import dataclass
from typing import Dict, Optional

import torch

from fastdpo import _head, _library, _ops, _vocab
from fastdpo._checks import check_inplace, check_logits_labels
from fastdpo.logps import logps_backward, packed_inputs, shard_pass
from fastdpo.losses import DPOLossConfig


@dataclass
class DPOLossOutput:
    loss: torch.Tensor  # () differentiable
    chosen_logps: torch.Tensor  # (B,) detached
    rejected_logps: torch.Tensor  # (B,)
    chosen_rewards: torch.Tensor  # (B,) beta * (policy - reference), detached
    rejected_rewards: torch.Tensor  # (B,)
    metrics: Dict[str, torch.Tensor]  # 0-dim tensors under TRL's names; .item() them when logging


def _reference(ref, name, B, like, dtype):
    if not isinstance(ref, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(ref).__name__}")
    if ref.shape != (B,):
        raise ValueError(f"{name} must have shape ({B},) (one per pair), got {tuple(ref.shape)}")
    if not ref.dtype.is_floating_point:
        raise TypeError(f"{name} must be floating point, got {ref.dtype}")
    if ref.device != like.device:
        raise ValueError(f"{name} is on {ref.device} but logits on {like.device}")
    if ref.dtype != dtype or not ref.is_contiguous():
        ref = ref.to(dtype).contiguous()
    return ref.detach() if ref.requires_grad else ref


class FusedDPOLossFunction(torch.autograd.Function):
    """``(logits, labels, ref_chosen_logps, ref_rejected_logps, config, ignore_index, shift, inplace_backward)
    -> (loss, logps (2B,), num_tokens (2B,), seq_stats (4, 2B), rewards (2B,), metrics (10,))``. Only ``loss``
    is differentiable; its backward is one kernel writing dlogits (into the logits' storage with
    ``inplace_backward``). ``metrics`` follows ``fastdpo._head.METRICS``; ``seq_stats`` holds per-sequence
    sums of mean logit, entropy, log sum p^2 and top-1 hits."""

    @staticmethod
    def forward(ctx, logits, labels, ref_chosen_logps, ref_rejected_logps, config: DPOLossConfig,
                ignore_index=-100, shift=True, inplace_backward=False, process_group=None, cu_seqlens=None):
        """``cu_seqlens``: a packed row of 2B segments (``fastdpo.logps.packed_inputs`` makes its logits and labels)."""
        check_logits_labels(logits, labels, ignore_index)
        check_inplace(logits, inplace_backward)
        if not isinstance(config, DPOLossConfig):
            raise TypeError(f"config must be a DPOLossConfig, got {type(config).__name__}")
        N = logits.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
        if N % 2 or N == 0:
            raise ValueError(f"logits must hold 2B rows (chosen [0, B), rejected [B, 2B)) with B >= 1, got {N} rows")
        B = N // 2
        if (ref_chosen_logps is None) != (ref_rejected_logps is None):
            raise ValueError("give both ref_chosen_logps and ref_rejected_logps, or neither (reference-free)")
        if ref_chosen_logps is not None:
            cdt = torch.float64 if logits.dtype == torch.float64 else torch.float32
            ref_chosen_logps = _reference(ref_chosen_logps, "ref_chosen_logps", B, logits, cdt)
            ref_rejected_logps = _reference(ref_rejected_logps, "ref_rejected_logps", B, logits, cdt)
        params = list(_head.params(config))
        if process_group is None:
            loss, coef, lse, logps, num_tokens, seq_stats, rewards, metrics = _library.dpo_forward(
                logits, labels, ref_chosen_logps, ref_rejected_logps, ignore_index, shift, params, cu_seqlens)
        else:  # vocabulary-parallel (see fastdpo._vocab): the backward runs on local labels with the global lse
            gathered, local = shard_pass(logits, labels, ignore_index, shift, True, process_group, cu_seqlens)
            loss, coef, lse, logps, num_tokens, seq_stats, rewards, metrics = _library.dpo_from_partials(
                gathered, labels, ref_chosen_logps, ref_rejected_logps, ignore_index, shift, logits.shape[2], params,
                cu_seqlens)
            labels, ignore_index = local, _vocab.LOCAL_IGNORE
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(logits, labels, lse, coef, cu_seqlens)
        ctx.options = (ignore_index, shift, inplace_backward)
        ctx.mark_non_differentiable(logps, num_tokens, seq_stats, rewards, metrics)
        ctx.set_materialize_grads(False)
        return loss, logps, num_tokens, seq_stats, rewards, metrics

    @staticmethod
    def backward(ctx, grad_loss, *_):
        if grad_loss is None:
            return (None,) * 10
        logits, labels, lse, coef, cu = ctx.saved_tensors
        ignore_index, shift, inplace = ctx.options
        coef = coef * grad_loss
        if coef.dim() == 1:  # one coefficient per sequence: broadcast over its positions (stride 0), or gathered
            coef = (coef[:, None].expand(labels.shape) if cu is None
                    else coef[_ops.segment_ids(cu, labels.shape[1])][None])
        dlogits = logps_backward(logits, labels, lse, coef, ignore_index, shift, inplace)
        return dlogits, None, None, None, None, None, None, None, None, None


def dpo_loss(logits: torch.Tensor, labels: torch.Tensor, ref_chosen_logps: Optional[torch.Tensor] = None,
             ref_rejected_logps: Optional[torch.Tensor] = None, *, config: Optional[DPOLossConfig] = None,
             ignore_index: int = -100, shift: bool = True, inplace_backward: bool = False,
             process_group=None, cu_seqlens: Optional[torch.Tensor] = None, **options) -> DPOLossOutput:
    """The DPO loss of a concatenated batch of preference pairs, fused with its backward.

    Args:
        logits: (2B, T, V) float32, bfloat16 or float16; rows [0, B) chosen, [B, 2B) rejected (TRL's layout).
        labels: (2B, T) int; ``ignore_index`` marks prompt and padding.
        ref_chosen_logps, ref_rejected_logps: (B,) reference log-probs (precomputed, or from a reference
            forward under no_grad); both None: reference-free.
        config: a ``DPOLossConfig``; or its fields as keywords: ``beta=0.1, loss_type="sigmoid",
            loss_weights, label_smoothing, f_divergence_type, f_alpha_divergence_coef, discopop_tau,
            simpo_gamma, nll_alpha, ld_alpha, use_weighting`` (TRL 1.16's names and semantics).
        shift, ignore_index, inplace_backward: as in ``sequence_logps``.
        process_group: vocabulary-parallel, as in ``sequence_logps``: ``logits`` is this rank's vocabulary shard;
            every rank gets the unsharded loss, log-probs, rewards and metrics (one all-gather of 7 fp32 per token).
        cu_seqlens: a packed batch (padding-free), as in ``sequence_logps``: logits (total, V) or (1, total, V) of
            2B segments, chosen [0, B) then rejected [B, 2B) (the order of the padded batch's rows). The loss,
            log-probs, rewards, metrics and the gradient at every real token equal the padded batch's.

    Returns:
        ``DPOLossOutput``: loss, log-probs and rewards per pair, and ``metrics`` under TRL's names
        (rewards/chosen, rewards/rejected, rewards/accuracies, rewards/margins, logps/chosen, logps/rejected,
        logits/chosen, logits/rejected, entropy, mean_token_accuracy) as 0-dim tensors: no host sync.
    """
    with _vocab.agreement(process_group, 1):  # an input refused here is refused on every rank
        if config is None:
            config = DPOLossConfig(**options)
        elif options:
            raise TypeError(f"pass either config or loss options, not both: {sorted(options)}")
        if cu_seqlens is not None:
            logits, labels = packed_inputs(logits, labels, cu_seqlens, ignore_index, shift, pairs=True)
        loss, logps, _, _, rewards, metrics = FusedDPOLossFunction.apply(
            logits, labels, ref_chosen_logps, ref_rejected_logps, config, ignore_index, shift, inplace_backward,
            process_group, cu_seqlens)
    return dpo_output(loss, logps, rewards, metrics)


def dpo_output(loss, logps, rewards, metrics) -> DPOLossOutput:
    """The user's view of what the fused Functions return (views only: no kernel, no host sync)."""
    B = logps.shape[0] // 2
    return DPOLossOutput(loss, logps[:B], logps[B:], rewards[:B], rewards[B:],
                         dict(zip(_head.METRICS, metrics.unbind(0))))


class DPOLoss(torch.nn.Module):
    """``DPOLoss(beta=0.1, loss_type="sigmoid", ...)(logits, labels, ref_chosen_logps, ref_rejected_logps)``:
    ``dpo_loss`` with its options fixed at construction."""

    def __init__(self, *, ignore_index: int = -100, shift: bool = True, inplace_backward: bool = False,
                 process_group=None, **options):
        super().__init__()
        self.config = DPOLossConfig(**options)
        self.ignore_index, self.shift, self.inplace_backward = ignore_index, shift, inplace_backward
        self.process_group = process_group

    def forward(self, logits, labels, ref_chosen_logps=None, ref_rejected_logps=None, *,
                cu_seqlens=None) -> DPOLossOutput:
        return dpo_loss(logits, labels, ref_chosen_logps, ref_rejected_logps, config=self.config,
                        ignore_index=self.ignore_index, shift=self.shift, inplace_backward=self.inplace_backward,
                        process_group=self.process_group, cu_seqlens=cu_seqlens)

    def extra_repr(self) -> str:
        return repr(self.config)
