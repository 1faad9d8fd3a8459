"""The DPO loss head, dispatched: every pair's loss, each sequence's coefficient dL/dlogp, the rewards and
TRL's metrics, from per-sequence numbers. One Triton launch on CUDA (``kernels/dpo_loss.py``); the same
hand-derived maths in PyTorch elsewhere. Both are held to the spec (``fastdpo.losses``) by the tests.

The loss options reach the kernel as scalars (``HeadParams``), derived once per distinct ``DPOLossConfig`` and
memoized: nothing is validated, built or copied to the device per call.
"""

import math
from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
import triton

from fastdpo import _backend
from fastdpo.kernels import COMPILE_OPTIONS
from fastdpo.kernels import dpo_loss as _k
from fastdpo.losses import LOSS_TYPES, DPOLossConfig

# TRL 1.16's names of the metrics the head computes, in the order of its ``metrics`` output.
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected", "logits/chosen", "logits/rejected", "entropy", "mean_token_accuracy")
_F_DIV_IDS = {"reverse_kl": 0, "forward_kl": 1, "js_divergence": 2, "alpha_divergence": 3}
_SCALARS = ("beta", "eps", "exo_log_keep", "exo_log_eps", "f_div", "inv_am1", "am1", "tau", "gamma", "nll_alpha",
            "use_weighting", "ld_alpha")


class HeadParams(NamedTuple("_HeadParams", [(n, float) for n in _SCALARS + tuple(f"w_{t}" for t in LOSS_TYPES)])):
    """A ``DPOLossConfig`` as the head's scalars: the kernel's arguments, in order, then one weight per entry of
    ``LOSS_TYPES`` (0: off). ``ld_alpha`` is NaN when LD-DPO is off. A flat tuple of floats, so that a custom
    op can take it as ``List[float]``."""

    @property
    def weights(self) -> Tuple[float, ...]:
        return self[len(_SCALARS):]

    @property
    def ld(self) -> bool:
        return not math.isnan(self.ld_alpha)


_PARAMS = {}  # the config's values -> its HeadParams


def params(cfg: DPOLossConfig) -> HeadParams:
    """The head's scalars for ``cfg`` (memoized on the config's values: a config built per call costs one lookup)."""
    key = (cfg.beta, cfg.loss_types, cfg.weights, cfg.label_smoothing, cfg.f_divergence_type,
           cfg.f_alpha_divergence_coef, cfg.discopop_tau, cfg.simpo_gamma, cfg.nll_alpha, cfg.ld_alpha,
           bool(cfg.use_weighting))
    p = _PARAMS.get(key)
    if p is None:
        if len(_PARAMS) >= 256:
            _PARAMS.clear()
        p = _PARAMS[key] = _params(*key)
    return p


def _params(beta, loss_types, weights, eps, f_divergence_type, a, tau, gamma, nll_alpha, ld_alpha,
            use_weighting) -> HeadParams:
    per_type = dict(zip(loss_types, weights))
    f_div = _F_DIV_IDS[f_divergence_type]
    if f_div == 3 and abs(a - 1.0) < 1e-6:
        f_div = 0  # the alpha -> 1 limit is reverse KL (as TRL)
    return HeadParams(float(beta), float(eps), math.log1p(-eps), math.log(eps) if eps > 0 else 0.0, float(f_div),
                      1.0 / (a - 1.0) if f_div == 3 else 0.0, a - 1.0, float(tau), float(gamma), float(nll_alpha),
                      float(use_weighting), math.nan if ld_alpha is None else float(ld_alpha),
                      *(float(per_type.get(t, 0.0)) for t in LOSS_TYPES))


def loss_head(logps: torch.Tensor, sums: torch.Tensor, counts: torch.Tensor, seq_stats: torch.Tensor,
              ref_chosen: Optional[torch.Tensor], ref_rejected: Optional[torch.Tensor], p: HeadParams, *,
              pairs: Optional[Tuple[int, int]] = None, with_metrics: bool = True):
    """The head over a batch of B pairs.

    Args:
        logps: (2B,) policy log-probs, chosen [0, B) then rejected [B, 2B) (LD-DPO weighted when on).
        sums: (2B,) the unweighted sums (``logps`` itself without LD-DPO): the sft / nll terms read them.
        counts: (2B,) int64 completion tokens. seq_stats: (4, 2B) per-sequence sums of the token statistics.
        ref_chosen, ref_rejected: (B,) reference log-probs in the compute dtype, or both None.
        pairs: compute the loss and coefficients of pairs [p0, p1) only (default: all): the loss is then
            their share of the batch's loss. The other coefficients are left unwritten.
        with_metrics: also compute the rewards of every pair and TRL's metrics (every log-prob must be in).

    Returns:
        (out (2,): the loss and the token coefficient -(sft weight + nll_alpha) / chosen tokens, already
        included in the chosen coefficients; coef (2B,) dL/dlogp; rewards (2B,); metrics (10,), ``METRICS``).
        ``rewards`` and ``metrics`` are unwritten without ``with_metrics``.
    """
    B = logps.shape[0] // 2
    p0, p1 = (0, B) if pairs is None else pairs
    aot = _aot_inputs(logps, ref_chosen, ref_rejected, p)
    if _backend.use_triton(logps):
        return _triton_head(logps, sums, counts, seq_stats, ref_chosen, ref_rejected, p, p0, p1, with_metrics, aot)
    return _torch_head(logps, sums, counts, seq_stats, ref_chosen, ref_rejected, p, p0, p1, with_metrics, aot)


def _ranks(values: torch.Tensor):
    """Stable sort of (B,) values: (sorted values, rank of each element)."""
    sorted_vals, order = torch.sort(values, stable=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(values.numel(), device=values.device)
    return sorted_vals, rank


def _aot_inputs(logps, ref_chosen, ref_rejected, p: HeadParams):
    """The aot types pair each pair's rank in one sort with the same rank in another: the sorts run in torch,
    the head gathers each pair's delta by its rank. None for each type that is off."""
    if not (p.w_aot or p.w_aot_unpaired):
        return None, None
    B = logps.shape[0] // 2
    chosen, rejected = logps[:B], logps[B:]
    ref_c = torch.zeros_like(chosen) if ref_chosen is None else ref_chosen
    ref_r = torch.zeros_like(chosen) if ref_rejected is None else ref_rejected
    aot = aotu = None
    if p.w_aot:
        a, rank = _ranks(chosen - rejected)
        aot = (a - torch.sort(ref_c - ref_r, stable=True)[0], rank)
    if p.w_aot_unpaired:
        a, rank_c = _ranks(chosen - ref_c)
        b, rank_r = _ranks(rejected - ref_r)
        aotu = (a - b, rank_c, rank_r)
    return aot, aotu


# ----------------------------------------------------------------------------------------------- Triton


def _triton_head(logps, sums, counts, seq_stats, ref_c, ref_r, p: HeadParams, p0, p1, with_metrics, aot_in):
    N = logps.shape[0]
    f32 = dict(dtype=torch.float32, device=logps.device)
    out = torch.empty(2, **f32)
    coef = torch.empty(N, **f32)
    rewards = torch.empty(N, **f32) if with_metrics else coef
    metrics = torch.empty(len(METRICS), **f32) if with_metrics else coef
    aot, aotu = aot_in
    aot_delta, aot_rank = aot if aot is not None else (logps, counts)  # unread placeholders when off
    aotu_delta, aotu_rank_c, aotu_rank_r = aotu if aotu is not None else (logps, counts, counts)
    has_ref = ref_c is not None
    _k._dpo_loss_head_kernel[(1,)](
        logps, sums, counts, seq_stats, ref_c if has_ref else logps, ref_r if has_ref else logps,
        aot_delta, aot_rank, aotu_delta, aotu_rank_c, aotu_rank_r,
        out, coef, rewards, metrics,
        N // 2, p0, p1, int(has_ref),
        p.beta, p.eps, p.exo_log_keep, p.exo_log_eps, int(p.f_div), p.inv_am1, p.am1, p.tau, p.gamma, p.nll_alpha,
        int(p.use_weighting), *p.weights,
        **_k.head_meta(N // 2, with_metrics), **COMPILE_OPTIONS)
    return out, coef, rewards, metrics


# ---------------------------------------------------------------------------------------------- PyTorch


def _smoothed(z, eps):
    """-(1 - eps) logsig(z) - eps logsig(-z) and its derivative in z."""
    return (-(1.0 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z),
            -(1.0 - eps) * torch.sigmoid(-z) + eps * torch.sigmoid(z))


def _f_divergence(x, p: HeadParams):
    """Score f(x) and f'(x) of the f-divergence (the kernel's ``_f_divergence``)."""
    kind = int(p.f_div)
    if kind == 1:
        e = torch.exp(-x)
        return 1.0 - e, e
    if kind == 2:
        return math.log(2.0) + F.logsigmoid(x), torch.sigmoid(-x)
    if kind == 3:
        t = p.am1 * x
        et = torch.exp(t.clamp(max=80.0))
        return (et - 1.0) * p.inv_am1, torch.where(t <= 80.0, et, 0.0)
    return x, torch.ones_like(x)


def _wpo_weights(sums, counts, seq_stats, B):
    w = torch.exp((sums - seq_stats[2]) / counts.clamp(min=1))
    return w[:B] * w[B:]


def _torch_head(logps, sums, counts, seq_stats, ref_c, ref_r, p: HeadParams, p0, p1, with_metrics, aot_in):
    """The kernel's maths, line for line, in PyTorch (any float dtype); unused loss types are skipped."""
    N = logps.shape[0]
    B = N // 2
    dt = logps.dtype
    counts = counts.to(dt)
    zeros = logps.new_zeros(B)
    ref_c = zeros if ref_c is None else ref_c
    ref_r = zeros if ref_r is None else ref_r
    n_tok = counts[:B].sum()
    W = _wpo_weights(sums, counts, seq_stats, B).sum() if p.use_weighting else float(B)
    rewards = logps.new_zeros(N)
    metrics = logps.new_zeros(len(METRICS))
    if with_metrics:
        rewards = p.beta * (logps - torch.cat([ref_c, ref_r]))
        rc, rr = rewards[:B], rewards[B:]
        n_rej, n_all = counts[B:].sum(), counts.sum()

        def ratio(a, b):
            return torch.where(b > 0, a / b.clamp(min=1), 0.0)

        metrics = torch.stack([rc.mean(), rr.mean(), (rc > rr).to(dt).mean(), (rc - rr).mean(),
                               logps[:B].mean(), logps[B:].mean(), ratio(seq_stats[0, :B].sum(), n_tok),
                               ratio(seq_stats[0, B:].sum(), n_rej), ratio(seq_stats[1].sum(), n_all),
                               ratio(seq_stats[3, :B].sum(), n_tok)])
    token_w = (p.w_sft * W / B if p.w_sft else 0.0) + p.nll_alpha
    token_grad = -token_w / n_tok if token_w else logps.new_zeros(())

    sl, sr_ = slice(p0, p1), slice(B + p0, B + p1)
    pc, pr = logps[sl], logps[sr_]
    c, r = pc - ref_c[sl], pr - ref_r[sl]
    nc, nr = counts[sl].clamp(min=1), counts[sr_].clamp(min=1)
    beta, eps = p.beta, p.eps
    sc, dsc = _f_divergence(c, p)
    s_r, dsr = _f_divergence(r, p)
    z = beta * (sc - s_r)
    sig_pos, sig_neg = torch.sigmoid(z), torch.sigmoid(-z)
    ls_pos, ls_neg = F.logsigmoid(z), F.logsigmoid(-z)
    bc, br = beta * c, beta * r
    loss = torch.zeros_like(c)
    gd, gsc, gsr, gc, gr = (torch.zeros_like(c) for _ in range(5))  # dL/dd, dL/ds_c, dL/ds_r, dL/dpi_c, dL/dpi_r
    w = p
    if w.w_sigmoid:
        loss = loss + w.w_sigmoid * -ls_pos
        gd = gd - w.w_sigmoid * beta * sig_neg
    if w.w_hinge:
        loss = loss + w.w_hinge * torch.relu(1.0 - z)
        gd = gd + torch.where(1.0 - z > 0, -w.w_hinge * beta, 0.0)
    if w.w_ipo:
        D = sc / nc - s_r / nr - 0.5 / beta
        loss = loss + w.w_ipo * D * D
        gsc = gsc + w.w_ipo * 2.0 * D / nc
        gsr = gsr - w.w_ipo * 2.0 * D / nr
    if w.w_exo_pair:
        loss = loss + w.w_exo_pair * (sig_pos * (ls_pos - p.exo_log_keep) + sig_neg * (ls_neg - p.exo_log_eps))
        gd = gd + w.w_exo_pair * beta * sig_pos * sig_neg * (z - p.exo_log_keep + p.exo_log_eps)
    if w.w_nca_pair:
        loss = loss + w.w_nca_pair * (-F.logsigmoid(bc) - 0.5 * F.logsigmoid(-bc) - 0.5 * F.logsigmoid(-br))
        gc = gc + w.w_nca_pair * beta * (-torch.sigmoid(-bc) + 0.5 * torch.sigmoid(bc))
        gr = gr + w.w_nca_pair * beta * 0.5 * torch.sigmoid(br)
    if w.w_robust:
        loss = loss + w.w_robust * (-(1.0 - eps) * ls_pos + eps * ls_neg) / (1.0 - 2.0 * eps)
        gd = gd + w.w_robust * beta * (-(1.0 - eps) * sig_neg - eps * sig_pos) / (1.0 - 2.0 * eps)
    if w.w_bco_pair:
        loss = loss + w.w_bco_pair * (-F.logsigmoid(bc) - F.logsigmoid(-br))
        gc = gc - w.w_bco_pair * beta * torch.sigmoid(-bc)
        gr = gr + w.w_bco_pair * beta * torch.sigmoid(br)
    if w.w_sppo_hard:
        ec, er = c - 0.5 / beta, r + 0.5 / beta
        loss = loss + w.w_sppo_hard * (ec * ec + er * er)
        gc = gc + w.w_sppo_hard * 2.0 * ec
        gr = gr + w.w_sppo_hard * 2.0 * er
    aot, aotu = aot_in
    if aot is not None:
        delta, rank = aot
        la, ga = _smoothed(beta * delta[rank[sl]], eps)
        loss = loss + w.w_aot * la
        gc = gc + w.w_aot * beta * ga
        gr = gr - w.w_aot * beta * ga
    if aotu is not None:
        delta, rank_c, rank_r = aotu
        lu, gu = _smoothed(beta * delta[rank_c[sl]], eps)
        _, gu_r = _smoothed(beta * delta[rank_r[sl]], eps)
        loss = loss + w.w_aot_unpaired * lu
        gc = gc + w.w_aot_unpaired * beta * gu
        gr = gr - w.w_aot_unpaired * beta * gu_r
    if w.w_apo_zero or w.w_apo_down:
        sbc, sbr = torch.sigmoid(bc), torch.sigmoid(br)
    if w.w_apo_zero:
        loss = loss + w.w_apo_zero * (1.0 - sbc + sbr)
        gc = gc - w.w_apo_zero * beta * sbc * (1.0 - sbc)
        gr = gr + w.w_apo_zero * beta * sbr * (1.0 - sbr)
    if w.w_apo_down:
        su = torch.sigmoid(beta * (c - r))
        loss = loss + w.w_apo_down * (sbc + 1.0 - su)
        gc = gc + w.w_apo_down * beta * (sbc * (1.0 - sbc) - su * (1.0 - su))
        gr = gr + w.w_apo_down * beta * su * (1.0 - su)
    if w.w_discopop:
        tau = p.tau
        mod = torch.sigmoid(z / tau)
        dmod = mod * (1.0 - mod) / tau
        ez_mod = torch.exp(-z + F.logsigmoid(z / tau))  # exp(-z) * m without overflowing exp(-z) for z << 0
        loss = loss + w.w_discopop * (-ls_pos * (1.0 - mod) + ez_mod)
        gd = gd + w.w_discopop * beta * (-sig_neg * (1.0 - mod) + ls_pos * dmod - ez_mod * (1.0 - (1.0 - mod) / tau))
    if w.w_sigmoid_norm:
        zn = beta * (sc / nc - s_r / nr)
        gn = -beta * torch.sigmoid(-zn)
        loss = loss + w.w_sigmoid_norm * -F.logsigmoid(zn)
        gsc = gsc + w.w_sigmoid_norm * gn / nc
        gsr = gsr - w.w_sigmoid_norm * gn / nr
    if w.w_simpo:
        lsim, gsim = _smoothed(beta * (pc / nc - pr / nr) - p.gamma, eps)
        loss = loss + w.w_simpo * lsim
        gc = gc + w.w_simpo * beta * gsim / nc
        gr = gr - w.w_simpo * beta * gsim / nr

    pair_w = _wpo_weights(sums, counts, seq_stats, B)[sl] if p.use_weighting else 1.0
    scale = pair_w / B
    total = (loss * scale).sum()
    if token_w:
        total = total + token_w * (-sums[sl].sum() / n_tok)
    coef = logps.new_zeros(N)
    coef[sl] = ((gd + gsc) * dsc + gc) * scale + token_grad
    coef[sr_] = ((gsr - gd) * dsr + gr) * scale
    out = torch.stack([total, torch.as_tensor(token_grad, dtype=dt)])
    return out, coef, rewards, metrics
