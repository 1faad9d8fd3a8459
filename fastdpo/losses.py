"""The DPO loss family, one readable PyTorch formula per loss type: the specification.

Every formula follows TRL 1.16's ``DPOTrainer._compute_loss`` line by line (plus SimPO from TRL's
``CPOTrainer`` and TRL 0.x's RPO NLL term). The Triton loss head (``kernels/dpo_loss.py``) is held to these
formulas by the tests; on the PyTorch path they run as written, and autograd gives the coefficients.

Notation, per pair i (chosen c, rejected r), all per-sequence sums of token log-probs:
    chosen_logratio = pi_c - ref_c,  rejected_logratio = pi_r - ref_r
    score = f(logratio) with f from ``f_divergence_type`` (reverse_kl: f(x) = x),  d = score_c - score_r
    loss = sum over loss types t of  weight_t * mean_i(loss_t,i * wpo_i)  +  nll_alpha * NLL(chosen)

Differences from TRL 0.x worth knowing: 0.x's ``sigmoid`` applied ``label_smoothing`` (cDPO,
``-(1-e) logsigmoid(z) - e logsigmoid(-z)``); TRL 1.16's ``sigmoid`` ignores it, and so does fastdpo (with a
warning). 0.x's ``rpo_alpha`` is ``nll_alpha`` here.
"""

import math
import warnings
from dataclasses import dataclass, field
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
              "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm", "simpo")
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
# TRL 1.16: only the loss types built on the chosen-rejected score difference take another f-divergence.
F_DIVERGENCE_LOSS_TYPES = {"sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft"}
LABEL_SMOOTHING_LOSS_TYPES = {"robust", "exo_pair", "aot", "aot_unpaired", "simpo"}


@dataclass(frozen=True)
class DPOLossConfig:
    """Every option of the DPO loss family; names and defaults follow TRL 1.16's ``DPOConfig``.

    Attributes:
        beta: the DPO temperature (for ``ipo``, the regulariser tau). Must be > 0.
        loss_type: one name of ``LOSS_TYPES`` or a sequence of them (TRL's multi-loss, e.g. MPO).
        loss_weights: one weight per loss type (default 1.0 each).
        label_smoothing: robust DPO's flip probability (in [0, 0.5)), EXO's epsilon (in (0, 1)), and the
            smoothing of aot / aot_unpaired / simpo.
        f_divergence_type, f_alpha_divergence_coef: the f-DPO regulariser (TRL's names).
        discopop_tau: DiscoPOP's temperature.
        simpo_gamma: SimPO's target margin gamma (``loss_type="simpo"``; reference-free, length-averaged).
        nll_alpha: weight of an NLL term on the chosen completions (RPO; TRL 0.x's ``rpo_alpha``).
        ld_alpha: LD-DPO's weight of the tokens past the shorter completion of each pair (None: off).
        use_weighting: WPO weighting of each pair by its length-normalised sequence probabilities.
    """

    beta: float = 0.1
    loss_type: Union[str, Sequence[str]] = "sigmoid"
    loss_weights: Optional[Sequence[float]] = None
    label_smoothing: float = 0.0
    f_divergence_type: str = "reverse_kl"
    f_alpha_divergence_coef: float = 0.5
    discopop_tau: float = 0.05
    simpo_gamma: float = 0.5
    nll_alpha: float = 0.0
    ld_alpha: Optional[float] = None
    use_weighting: bool = False
    loss_types: Tuple[str, ...] = field(init=False, repr=False)
    weights: Tuple[float, ...] = field(init=False, repr=False)

    def __post_init__(self):
        types = (self.loss_type,) if isinstance(self.loss_type, str) else tuple(self.loss_type)
        if not types:
            raise ValueError("loss_type must name at least one loss type")
        for t in types:
            if t not in LOSS_TYPES:
                raise ValueError(f"unknown loss_type {t!r}; expected one of {LOSS_TYPES}")
        if len(set(types)) != len(types):
            raise ValueError(f"loss_type lists a loss type twice: {types}")
        weights = (1.0,) * len(types) if self.loss_weights is None else tuple(float(w) for w in self.loss_weights)
        if len(weights) != len(types):
            raise ValueError(f"loss_weights has {len(weights)} weights for {len(types)} loss types")
        object.__setattr__(self, "loss_types", types)
        object.__setattr__(self, "weights", weights)
        if not (isinstance(self.beta, (int, float)) and math.isfinite(self.beta) and self.beta > 0):
            raise ValueError(f"beta must be a finite number > 0, got {self.beta!r}")
        if self.f_divergence_type not in F_DIVERGENCES:
            raise ValueError(f"unknown f_divergence_type {self.f_divergence_type!r}; expected one of "
                             f"{F_DIVERGENCES}")
        if self.f_divergence_type != "reverse_kl" and not set(types) <= F_DIVERGENCE_LOSS_TYPES:
            raise ValueError(f"f_divergence_type={self.f_divergence_type!r} is only supported for the loss types "
                             f"{sorted(F_DIVERGENCE_LOSS_TYPES)}, got {list(types)}")
        eps = self.label_smoothing
        if not (0.0 <= eps < 1.0):
            raise ValueError(f"label_smoothing must lie in [0, 1), got {eps}")
        if "robust" in types and not eps < 0.5:
            raise ValueError(f"label_smoothing must lie in [0, 0.5) for the 'robust' loss, got {eps}")
        if "exo_pair" in types and eps == 0.0:
            raise ValueError("label_smoothing must be > 0 for the 'exo_pair' loss (its epsilon); the paper "
                             "recommends 1e-3")
        if eps > 0 and not set(types) & LABEL_SMOOTHING_LOSS_TYPES:
            warnings.warn(f"label_smoothing={eps} has no effect on {list(types)} (TRL 1.16 semantics; TRL 0.x's "
                          "'sigmoid' applied it as cDPO)", UserWarning, stacklevel=3)
        if self.use_weighting and set(types) & {"aot", "aot_unpaired"}:
            raise ValueError("use_weighting (WPO) is not supported with the 'aot' or 'aot_unpaired' losses")
        if self.ld_alpha is not None and not (0.0 <= self.ld_alpha <= 1.0):
            raise ValueError(f"ld_alpha must lie in [0, 1], got {self.ld_alpha}")
        if not self.discopop_tau > 0:
            raise ValueError(f"discopop_tau must be > 0, got {self.discopop_tau}")
        if not self.nll_alpha >= 0:
            raise ValueError(f"nll_alpha must be >= 0, got {self.nll_alpha}")


def pair_local(cfg: DPOLossConfig) -> bool:
    """Whether each pair's gradient follows from its own log-probs and the batch's pair and chosen-token counts
    alone: true but for the aot types (a sort over the batch) and WPO with sft (the batch's mean weight)."""
    types = set(cfg.loss_types)
    return not types & {"aot", "aot_unpaired"} and not (cfg.use_weighting and "sft" in types)


def f_divergence_scores(logratios: torch.Tensor, cfg: DPOLossConfig) -> torch.Tensor:
    """f'(exp(logratio)) of the f-DPO paper, as TRL 1.16 computes it."""
    kind = cfg.f_divergence_type
    if kind == "forward_kl":  # f'(t) = 1 - 1/t
        return 1 - torch.exp(-logratios)
    if kind == "js_divergence":  # f'(t) = log(2t / (t + 1))
        return math.log(2) + F.logsigmoid(logratios)
    if kind == "alpha_divergence" and abs(cfg.f_alpha_divergence_coef - 1.0) >= 1e-6:
        a = cfg.f_alpha_divergence_coef  # f'(t) = (t^(a-1) - 1) / (a - 1)
        t = torch.clamp((a - 1.0) * logratios, max=80.0)
        return (torch.exp(t) - 1.0) / (a - 1.0)
    return logratios  # reverse_kl (and alpha -> 1)


def pair_losses(loss_type: str, cfg: DPOLossConfig, chosen_logps, rejected_logps, ref_chosen_logps,
                ref_rejected_logps, chosen_tokens, rejected_tokens, chosen_sums) -> torch.Tensor:
    """Per-pair loss (B,) of one loss type. ``*_tokens`` are the completion lengths; ``chosen_sums`` the
    chosen log-probs without LD-DPO weighting (what ``sft`` averages)."""
    beta, eps = cfg.beta, cfg.label_smoothing
    logsig = F.logsigmoid
    chosen_logratios = chosen_logps - ref_chosen_logps
    rejected_logratios = rejected_logps - ref_rejected_logps
    chosen_scores = f_divergence_scores(chosen_logratios, cfg)
    rejected_scores = f_divergence_scores(rejected_logratios, cfg)
    delta = chosen_scores - rejected_scores
    nc, nr = chosen_tokens.clamp(min=1), rejected_tokens.clamp(min=1)

    if loss_type == "sigmoid":
        return -logsig(beta * delta)
    if loss_type == "hinge":
        return torch.relu(1 - beta * delta)
    if loss_type == "ipo":  # length-normalised, as TRL (confirmed with the IPO authors)
        return (chosen_scores / nc - rejected_scores / nr - 1 / (2 * beta)) ** 2
    if loss_type == "exo_pair":
        z = beta * delta
        return (torch.sigmoid(z) * (logsig(z) - math.log1p(-eps))
                + torch.sigmoid(-z) * (logsig(-z) - math.log(eps)))
    if loss_type == "nca_pair":
        cr, rr = beta * chosen_logratios, beta * rejected_logratios
        return -logsig(cr) - 0.5 * logsig(-cr) - 0.5 * logsig(-rr)
    if loss_type == "robust":
        z = beta * delta
        return (-(1 - eps) * logsig(z) + eps * logsig(-z)) / (1 - 2 * eps)
    if loss_type == "bco_pair":
        return -logsig(beta * chosen_logratios) - logsig(-beta * rejected_logratios)
    if loss_type == "sppo_hard":
        return (chosen_logratios - 0.5 / beta) ** 2 + (rejected_logratios + 0.5 / beta) ** 2
    if loss_type in ("aot", "aot_unpaired"):
        if loss_type == "aot":
            a = torch.sort(chosen_logps - rejected_logps, dim=0, stable=True)[0]
            b = torch.sort(ref_chosen_logps - ref_rejected_logps, dim=0, stable=True)[0]
        else:
            a = torch.sort(chosen_logratios, dim=0, stable=True)[0]
            b = torch.sort(rejected_logratios, dim=0, stable=True)[0]
        z = beta * (a - b)
        return -logsig(z) * (1 - eps) - logsig(-z) * eps
    if loss_type == "apo_zero":
        return (1 - torch.sigmoid(beta * chosen_logratios)) + torch.sigmoid(beta * rejected_logratios)
    if loss_type == "apo_down":
        return torch.sigmoid(beta * chosen_logratios) + (1 - torch.sigmoid(beta * (chosen_logratios
                                                                                    - rejected_logratios)))
    if loss_type == "discopop":
        z = beta * delta
        modulation = torch.sigmoid(z / cfg.discopop_tau)
        # exp(-z) * modulation, in log space: for z << 0 exp(-z) overflows fp32 while the product is finite
        return -logsig(z) * (1 - modulation) + torch.exp(-z + logsig(z / cfg.discopop_tau))
    if loss_type == "sigmoid_norm":
        return -logsig(beta * (chosen_scores / nc - rejected_scores / nr))
    if loss_type == "simpo":  # reference-free: length-averaged policy log-probs and a margin gamma
        z = beta * (chosen_logps / nc - rejected_logps / nr) - cfg.simpo_gamma
        return -logsig(z) * (1 - eps) - logsig(-z) * eps
    raise ValueError(f"unknown loss_type {loss_type!r}")


def ld_token_weights(valid_pos: torch.Tensor, ld_alpha: float) -> torch.Tensor:
    """LD-DPO (2B, T): 1 for completion tokens within the shorter completion of the pair, ``ld_alpha`` past it,
    0 off the completion (TRL 1.16). ``valid_pos`` (2B, T) bool marks the completion tokens."""
    pos = valid_pos.cumsum(1)
    lens = valid_pos.sum(1)
    chosen_lens, rejected_lens = lens.chunk(2)
    shared = torch.minimum(chosen_lens, rejected_lens).repeat(2)
    w = torch.where(pos <= shared[:, None], 1.0, ld_alpha)
    return torch.where(valid_pos, w, 0.0)


def ld_token_weights_packed(valid_pos: torch.Tensor, cu: torch.Tensor, ld_alpha: float) -> torch.Tensor:
    """``ld_token_weights`` for a packed row: ``valid_pos`` (total,) bool, sequences the segments [cu[s], cu[s + 1])
    (chosen [0, B), rejected [B, 2B)); the same weights, position for position, as the padded batch."""
    total = valid_pos.numel()
    cu = cu.long().clamp(0, total)
    seg = (torch.searchsorted(cu, torch.arange(total, device=cu.device), right=True) - 1).clamp(0, cu.numel() - 2)
    cs = torch.cat([cu.new_zeros(1), valid_pos.long().cumsum(0)])
    pos = cs[1:] - cs[cu[:-1]][seg]  # the index of each completion token within its sequence, from 1
    lens = cs[cu[1:]] - cs[cu[:-1]]
    chosen_lens, rejected_lens = lens.chunk(2)
    shared = torch.minimum(chosen_lens, rejected_lens).repeat(2)
    w = torch.where(pos <= shared[seg], 1.0, ld_alpha)
    return torch.where(valid_pos, w, 0.0)


def token_nll(chosen_sums, total_chosen_tokens) -> torch.Tensor:
    """Token-level mean NLL of the chosen completions: TRL's ``sft`` loss (the same for every pair, so its mean
    over pairs is itself) and RPO's NLL term."""
    return -chosen_sums.sum() / total_chosen_tokens


def dpo_loss_from_logps(chosen_logps, rejected_logps, ref_chosen_logps=None, ref_rejected_logps=None, *,
                        chosen_tokens=None, rejected_tokens=None, chosen_sums=None, pair_weights=None,
                        num_pairs=None, total_chosen_tokens=None, config: Optional[DPOLossConfig] = None,
                        **options) -> torch.Tensor:
    """The DPO loss (a scalar) from per-sequence log-probs (B,): the specification every path is held to.

    Args:
        chosen_logps, rejected_logps: policy log-probs (B,), summed over completion tokens (LD-DPO weighted
            when ``ld_alpha`` is set).
        ref_chosen_logps, ref_rejected_logps: reference log-probs (B,); both None: reference-free (zeros).
        chosen_tokens, rejected_tokens: completion lengths (B,), needed by ipo, sigmoid_norm, simpo, sft and
            nll_alpha.
        chosen_sums: chosen log-probs without LD-DPO weighting (default: ``chosen_logps``).
        pair_weights: WPO weights (B,), detached (``use_weighting``); None: 1.
        num_pairs, total_chosen_tokens: the batch's pair count and chosen token count when these pairs are a
            part of it (the loss is then this part's share of the batch loss; default: these pairs are all).
        config / options: a ``DPOLossConfig`` or its fields as keywords.
    """
    cfg = config if config is not None else DPOLossConfig(**options)
    if ref_chosen_logps is None:
        ref_chosen_logps = torch.zeros_like(chosen_logps)
        ref_rejected_logps = torch.zeros_like(rejected_logps)
    if chosen_sums is None:
        chosen_sums = chosen_logps
    ones = torch.ones_like(chosen_logps)
    chosen_tokens = ones if chosen_tokens is None else chosen_tokens.to(chosen_logps.dtype)
    rejected_tokens = ones if rejected_tokens is None else rejected_tokens.to(chosen_logps.dtype)
    num_pairs = chosen_logps.shape[0] if num_pairs is None else num_pairs
    total_chosen_tokens = chosen_tokens.sum() if total_chosen_tokens is None else total_chosen_tokens
    loss = chosen_logps.new_zeros(())
    token_weight = cfg.nll_alpha
    for loss_type, weight in zip(cfg.loss_types, cfg.weights):
        if loss_type == "sft":  # per pair: the token-level NLL times the pair's WPO weight; mean over pairs
            token_weight = token_weight + weight * (1.0 if pair_weights is None else pair_weights.mean())
            continue
        per_pair = pair_losses(loss_type, cfg, chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                               chosen_tokens, rejected_tokens, chosen_sums)
        if pair_weights is not None:
            per_pair = per_pair * pair_weights
        loss = loss + per_pair.sum() / num_pairs * weight
    if token_weight:
        loss = loss + token_weight * token_nll(chosen_sums, total_chosen_tokens)
    return loss
