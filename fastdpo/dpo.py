"""The fused DPO loss: logits of preference pairs in, loss and metrics out; backward straight to dlogits.

Forward: one pass over the logits (log-probs, log-sum-exp and the metrics' per-token statistics), then the
loss head (every pair's loss and dL/dlogp of each sequence, one launch). Backward: one pass that writes
dlogits = coef[row] * (onehot - softmax) from the saved log-sum-exp. Saved for backward: O(N x T).
"""

import math
from dataclasses import dataclass
from typing import Dict, Optional

import torch

from fastdpo import _backend, _library, _ops
from fastdpo._checks import check_logits_labels
from fastdpo.kernels import dpo_loss as _k
from fastdpo.logps import logps_backward
from fastdpo.losses import LOSS_TYPES, DPOLossConfig, dpo_loss_from_logps

_F_DIV_IDS = {"reverse_kl": 0, "forward_kl": 1, "js_divergence": 2, "alpha_divergence": 3}


@dataclass
class DPOLossOutput:
    loss: torch.Tensor  # () differentiable
    chosen_logps: torch.Tensor  # (B,) detached
    rejected_logps: torch.Tensor  # (B,)
    chosen_rewards: torch.Tensor  # (B,) beta * (policy - reference), detached
    rejected_rewards: torch.Tensor  # (B,)
    metrics: Dict[str, torch.Tensor]  # 0-dim tensors under TRL's names; .item() them when logging


# ---------------------------------------------------------------------------------------------- loss head


def loss_head(chosen, rejected, ref_chosen, ref_rejected, chosen_tokens, rejected_tokens, chosen_sums,
              pair_weights, cfg: DPOLossConfig, num_pairs=None, total_chosen_tokens=None):
    """(loss, dL/d chosen, dL/d rejected, dL/d chosen_sums), all from per-sequence (B,) tensors. With
    ``num_pairs`` and ``total_chosen_tokens`` these pairs are a part of a batch: the loss is their share."""
    if total_chosen_tokens is None:
        total_chosen_tokens = chosen_tokens.sum()
    if _backend.use_triton(chosen):
        return _triton_loss_head(chosen, rejected, ref_chosen, ref_rejected, chosen_tokens, rejected_tokens,
                                 chosen_sums, pair_weights, cfg, num_pairs or chosen.numel(), total_chosen_tokens)
    def spec(c, r, sums):
        return dpo_loss_from_logps(c, r, ref_chosen, ref_rejected, chosen_tokens=chosen_tokens,
                                   rejected_tokens=rejected_tokens, chosen_sums=sums, pair_weights=pair_weights,
                                   num_pairs=num_pairs, total_chosen_tokens=total_chosen_tokens, config=cfg)
    # torch.func rather than autograd: it also runs inside a custom op, below the autograd dispatch key
    grads, loss = torch.func.grad_and_value(spec, argnums=(0, 1, 2))(chosen, rejected, chosen_sums)
    return (loss, *grads)


def _ranks(values: torch.Tensor):
    """Stable sort of (B,) values: (sorted values, rank of each element)."""
    sorted_vals, order = torch.sort(values, stable=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(values.numel(), device=values.device)
    return sorted_vals, rank


def _triton_loss_head(chosen, rejected, ref_chosen, ref_rejected, chosen_tokens, rejected_tokens, chosen_sums,
                      pair_weights, cfg: DPOLossConfig, num_pairs: int, total_chosen_tokens):
    B = chosen.numel()
    f32 = dict(dtype=torch.float32, device=chosen.device)
    per_type = dict(zip(cfg.loss_types, cfg.weights))
    weights = torch.tensor([per_type.get(t, 0.0) for t in LOSS_TYPES], **f32)  # one host-to-device copy
    dummy_rank = torch.zeros(1, dtype=torch.int64, device=chosen.device)
    aot_delta, aot_rank = weights, dummy_rank
    aotu_delta, aotu_rank_c, aotu_rank_r = weights, dummy_rank, dummy_rank
    if "aot" in cfg.loss_types:  # the sort runs in torch; the kernel gathers each pair's delta by rank
        a, aot_rank = _ranks(chosen - rejected)
        aot_delta = a - torch.sort(ref_chosen - ref_rejected, stable=True)[0]
    if "aot_unpaired" in cfg.loss_types:
        a, aotu_rank_c = _ranks(chosen - ref_chosen)
        b, aotu_rank_r = _ranks(rejected - ref_rejected)
        aotu_delta = a - b
    totals = torch.stack([total_chosen_tokens.to(torch.float32), pair_weights.sum().to(torch.float32)])
    loss = torch.empty(1, **f32)
    grads = [torch.empty(B, **f32) for _ in range(3)]
    eps = cfg.label_smoothing
    a = cfg.f_alpha_divergence_coef
    f_div = _F_DIV_IDS[cfg.f_divergence_type]
    if f_div == 3 and abs(a - 1.0) < 1e-6:
        f_div = 0  # the alpha -> 1 limit is reverse KL (as TRL)
    _k._dpo_loss_head_kernel[(1,)](
        chosen, rejected, ref_chosen, ref_rejected, chosen_tokens, rejected_tokens, chosen_sums, pair_weights,
        aot_delta, aot_rank, aotu_delta, aotu_rank_c, aotu_rank_r, weights, totals,
        loss, *grads,
        B, num_pairs, float(cfg.beta), float(eps), math.log1p(-eps), math.log(eps) if eps > 0 else 0.0, f_div,
        1.0 / (a - 1.0) if f_div == 3 else 0.0, a - 1.0, float(cfg.discopop_tau), float(cfg.simpo_gamma),
        float(cfg.nll_alpha),
        BLOCK_B=_k.block_b(B), num_warps=_k.NUM_WARPS)
    return (loss[0], *grads)


# ------------------------------------------------------------------------------------------ the Function


def _ld_token_weights(valid_pos: torch.Tensor, ld_alpha: float) -> torch.Tensor:
    """LD-DPO (N, T): 1 for completion tokens within the shorter completion of the pair, ld_alpha past it."""
    pos = valid_pos.cumsum(1)
    lens = valid_pos.sum(1)
    chosen_lens, rejected_lens = lens.chunk(2)
    shared = torch.minimum(chosen_lens, rejected_lens).repeat(2)
    w = torch.where(pos <= shared[:, None], 1.0, ld_alpha)
    return torch.where(valid_pos, w, 0.0)


def _reference(ref, name, B, like):
    if not isinstance(ref, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(ref).__name__}")
    if ref.shape != (B,):
        raise ValueError(f"{name} must have shape ({B},) (one per pair), got {tuple(ref.shape)}")
    if not ref.dtype.is_floating_point:
        raise TypeError(f"{name} must be floating point, got {ref.dtype}")
    if ref.device != like.device:
        raise ValueError(f"{name} is on {ref.device} but logits on {like.device}")
    return ref.detach().to(like.dtype).contiguous()


class FusedDPOLossFunction(torch.autograd.Function):
    """``(logits, labels, ref_chosen_logps, ref_rejected_logps, config, ignore_index, shift, inplace_backward)
    -> (loss, logps (2B,), num_tokens (2B,), stats (4, 2B))``. Only ``loss`` is differentiable; its backward
    is one kernel writing dlogits (into the logits' storage with ``inplace_backward``)."""

    @staticmethod
    def forward(ctx, logits, labels, ref_chosen_logps, ref_rejected_logps, config: DPOLossConfig,
                ignore_index=-100, shift=True, inplace_backward=False):
        check_logits_labels(logits, labels, ignore_index)
        if not isinstance(config, DPOLossConfig):
            raise TypeError(f"config must be a DPOLossConfig, got {type(config).__name__}")
        N = logits.shape[0]
        if N % 2 or N == 0:
            raise ValueError(f"logits must hold 2B rows (chosen [0, B), rejected [B, 2B)) with B >= 1, got {N} rows")
        B = N // 2
        if (ref_chosen_logps is None) != (ref_rejected_logps is None):
            raise ValueError("give both ref_chosen_logps and ref_rejected_logps, or neither (reference-free)")

        row_logps, lse, stats = _library.logps_forward(logits, labels, ignore_index, shift, True)
        cdt = row_logps.dtype
        valid_rows = _ops.row_labels(labels, ignore_index, shift)[1]
        valid_pos = _ops.rows_to_positions(valid_rows, shift)
        tok = _ops.rows_to_positions(row_logps, shift)  # (N, T) aligned with labels, 0 where masked
        num_tokens = valid_pos.sum(1)
        sums = tok.sum(1)
        token_w = _ld_token_weights(valid_pos, config.ld_alpha) if config.ld_alpha is not None else None
        logps = (tok * token_w).sum(1) if token_w is not None else sums
        if ref_chosen_logps is None:
            ref_c = ref_r = torch.zeros(B, dtype=cdt, device=logits.device)
        else:
            ref_c = _reference(ref_chosen_logps, "ref_chosen_logps", B, row_logps)
            ref_r = _reference(ref_rejected_logps, "ref_rejected_logps", B, row_logps)
        counts = num_tokens.to(cdt)
        pair_w = torch.ones(B, dtype=cdt, device=logits.device)
        if config.use_weighting:  # WPO: exp(mean over the completion of log p - log sum p^2), per sequence
            lss = stats[_ops.LOG_SUM_SQ_PROBS].sum(1)
            w = torch.exp((sums - lss) / counts.clamp(min=1))
            pair_w = w[:B] * w[B:]
        loss, g_c, g_r, g_sums = _library.loss_head_op(logps[:B], logps[B:], ref_c, ref_r, counts[:B], counts[B:],
                                                       sums[:B], pair_w, config)

        if ctx.needs_input_grad[0]:
            g_seq = torch.cat([g_c, g_r])
            coef = g_seq[:, None] * token_w if token_w is not None else g_seq[:, None].expand(N, labels.shape[1])
            coef = coef + torch.cat([g_sums, torch.zeros_like(g_sums)])[:, None]
            coef_rows = torch.where(valid_rows, _ops.positions_to_rows(coef, shift), 0.0)
            ctx.save_for_backward(logits, labels, lse, coef_rows)
        ctx.options = (ignore_index, shift, inplace_backward)
        seq_stats = stats.sum(2)  # (4, N): per-sequence sums over completion tokens
        ctx.mark_non_differentiable(logps, num_tokens, seq_stats)
        ctx.set_materialize_grads(False)
        return loss, logps, num_tokens, seq_stats

    @staticmethod
    def backward(ctx, grad_loss, *_):
        if grad_loss is None:
            return (None,) * 8
        logits, labels, lse, coef_rows = ctx.saved_tensors
        ignore_index, shift, inplace = ctx.options
        dlogits = logps_backward(logits, labels, lse, coef_rows * grad_loss, ignore_index, shift, inplace)
        return dlogits, None, None, None, None, None, None, None


def _safe_div(a, b):
    return torch.where(b > 0, a / b.clamp(min=1), 0.0)


def dpo_loss(logits: torch.Tensor, labels: torch.Tensor, ref_chosen_logps: Optional[torch.Tensor] = None,
             ref_rejected_logps: Optional[torch.Tensor] = None, *, config: Optional[DPOLossConfig] = None,
             ignore_index: int = -100, shift: bool = True, inplace_backward: bool = False,
             **options) -> DPOLossOutput:
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

    Returns:
        ``DPOLossOutput``: loss, log-probs and rewards per pair, and ``metrics`` under TRL's names
        (rewards/chosen, rewards/rejected, rewards/accuracies, rewards/margins, logps/chosen, logps/rejected,
        logits/chosen, logits/rejected, entropy, mean_token_accuracy) as 0-dim tensors: no host sync.
    """
    if config is None:
        config = DPOLossConfig(**options)
    elif options:
        raise TypeError(f"pass either config or loss options, not both: {sorted(options)}")
    loss, logps, num_tokens, seq_stats = FusedDPOLossFunction.apply(
        logits, labels, ref_chosen_logps, ref_rejected_logps, config, ignore_index, shift, inplace_backward)
    return dpo_output(config, loss, logps, num_tokens, seq_stats, ref_chosen_logps, ref_rejected_logps)


def dpo_output(config, loss, logps, num_tokens, seq_stats, ref_chosen_logps, ref_rejected_logps) -> DPOLossOutput:
    """Rewards and TRL's metrics from what the fused Functions return (no host sync)."""
    B = logps.shape[0] // 2
    chosen, rejected = logps[:B], logps[B:]
    zeros = torch.zeros_like(chosen)
    ref_c = zeros if ref_chosen_logps is None else ref_chosen_logps.detach().to(chosen)
    ref_r = zeros if ref_rejected_logps is None else ref_rejected_logps.detach().to(chosen)
    chosen_rewards = config.beta * (chosen - ref_c)
    rejected_rewards = config.beta * (rejected - ref_r)
    counts = num_tokens.to(chosen.dtype)
    mean_logit, entropy, _, top1 = seq_stats
    metrics = {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).to(chosen.dtype).mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "logps/chosen": chosen.mean(),
        "logps/rejected": rejected.mean(),
        "logits/chosen": _safe_div(mean_logit[:B].sum(), counts[:B].sum()),
        "logits/rejected": _safe_div(mean_logit[B:].sum(), counts[B:].sum()),
        "entropy": _safe_div(entropy.sum(), counts.sum()),
        "mean_token_accuracy": _safe_div(top1[:B].sum(), counts[:B].sum()),
    }
    return DPOLossOutput(loss, chosen, rejected, chosen_rewards, rejected_rewards, metrics)


class DPOLoss(torch.nn.Module):
    """``DPOLoss(beta=0.1, loss_type="sigmoid", ...)(logits, labels, ref_chosen_logps, ref_rejected_logps)``:
    ``dpo_loss`` with its options fixed at construction."""

    def __init__(self, *, ignore_index: int = -100, shift: bool = True, inplace_backward: bool = False,
                 **options):
        super().__init__()
        self.config = DPOLossConfig(**options)
        self.ignore_index, self.shift, self.inplace_backward = ignore_index, shift, inplace_backward

    def forward(self, logits, labels, ref_chosen_logps=None, ref_rejected_logps=None) -> DPOLossOutput:
        return dpo_loss(logits, labels, ref_chosen_logps, ref_rejected_logps, config=self.config,
                        ignore_index=self.ignore_index, shift=self.shift, inplace_backward=self.inplace_backward)

    def extra_repr(self) -> str:
        return repr(self.config)
