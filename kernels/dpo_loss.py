"""The DPO loss head: every pair's loss and each sequence's gradient coefficient, in one launch.

Inputs are per-sequence numbers (B pairs); the output coefficients dL/d logp feed the fused logits backward
(``kernels/logps.py``). The formulas are those of ``fastdpo/losses.py`` (TRL 1.16), differentiated by hand:
with c = pi_c - ref_c, r = pi_r - ref_r, scores s = f(c), f(r) and their derivatives f', d = s_c - s_r,
z = beta * d, logsigmoid(x) = min(x, 0) - log1p(exp(-|x|)):

    sigmoid      L = -logsig(z)                              dL/dd = -beta sig(-z)
    hinge        L = relu(1 - z)                             dL/dd = -beta [1 - z > 0]
    ipo          L = D^2, D = s_c/n_c - s_r/n_r - 1/(2 beta)  dL/ds_c = 2D/n_c, dL/ds_r = -2D/n_r
    exo_pair     L = sig(z)(logsig(z) - log(1-e)) + sig(-z)(logsig(-z) - log e)
                                                             dL/dd = beta sig(z) sig(-z) (z - log(1-e) + log e)
    robust       L = (-(1-e) logsig(z) + e logsig(-z)) / (1-2e)
                                                             dL/dd = beta (-(1-e) sig(-z) - e sig(z)) / (1-2e)
    discopop     L = -logsig(z)(1-m) + exp(-z) m, m = sig(z/tau), m' = m(1-m)/tau, exp(-z) m = exp(-z + logsig(z/tau))
                                                             dL/dz = -sig(-z)(1-m) + logsig(z) m' - exp(-z)(m - m')
    sigmoid_norm L = -logsig(beta D'), D' = s_c/n_c - s_r/n_r
    nca_pair, bco_pair, sppo_hard, apo_zero, apo_down: functions of beta c and beta r directly
    aot, aot_unpaired: smoothed sigmoid of beta * (sorted a - sorted b); the sort and each sequence's rank
        come from torch, the kernel gathers its delta by rank (the ranks are a permutation, so the sum of
        the per-pair losses is the loss)
    simpo        L = smoothed sigmoid of z = beta (pi_c/n_c - pi_r/n_r) - gamma (no reference)
    sft, nll     -sum(chosen log-probs) / sum(chosen tokens): one scalar, the same coefficient everywhere

Inputs are the batch's per-sequence numbers (N = 2B sequences: chosen [0, B), rejected [B, 2B)). One call may
compute the coefficients of a part of the pairs, [p0, p1) (the fused-linear path processes pairs in groups):
the loss is then that part's share, the mean still divides by the batch's pair count and the token terms by
its chosen token count. With ``WITH_METRICS`` the call also writes every pair's rewards and TRL's metrics,
over the whole batch (the last call of a batch, when every log-prob is in).

Each type is weighted by ``loss_weights[t]`` (0: off; a NaN of an unused formula never leaks: selected away
with ``where``), each pair by its WPO weight, and averaged over pairs. One program walks all pairs in a fixed
order: the sums are deterministic.
"""

import triton
import triton.language as tl

LN2 = tl.constexpr(0.6931471805599453)

# Order of the ``loss_weights`` vector: fastdpo.losses.LOSS_TYPES.
# Pairs per block (one pair a thread up to 128 with 4 warps); more pairs loop. 32: the 64-pair block without
# metrics spills 4 bytes on sm_90 under Triton 3.9's ptxas flags (--regAllocOptLevel=2; a register-allocation
# quirk, AOT check), and the head's work is per pair, negligible beside the logits.
MAX_BLOCK_B = 32
NUM_WARPS = 4


def block_b(num_pairs: int) -> int:
    return min(max(triton.next_power_of_2(max(num_pairs, 1)), 16), MAX_BLOCK_B)


def head_meta(num_pairs: int, with_metrics: bool) -> dict:
    """Constexprs and warps of a launch."""
    return {"BLOCK_B": block_b(num_pairs), "WITH_METRICS": bool(with_metrics), "num_warps": NUM_WARPS}


def all_meta() -> dict:
    """Every configuration ``head_meta`` can return (what the AOT check compiles)."""
    out, b = [], 16
    while b <= MAX_BLOCK_B:
        out += [head_meta(b, True), head_meta(b, False)]
        b *= 2
    return {"_dpo_loss_head_kernel": out}


_PTRS = ("logps_ptr", "sums_ptr", "counts_ptr", "seq_stats_ptr", "ref_chosen_ptr", "ref_rejected_ptr",
         "aot_delta_ptr", "aot_rank_ptr", "aotu_delta_ptr", "aotu_rank_c_ptr", "aotu_rank_r_ptr", "loss_ptr",
         "coef_ptr", "rewards_ptr", "metrics_ptr")
# Per-sequence numbers are fp32 whatever the logits' dtype; counts and ranks int64.
POINTERS = {"_dpo_loss_head_kernel": {p: "*i64" if p in ("counts_ptr", "aot_rank_ptr", "aotu_rank_c_ptr",
                                                                "aotu_rank_r_ptr") else "*fp32" for p in _PTRS}}
# No argument is specialised at launch (a batch of one pair would make num_pairs and p1 constants, a reference
# model has_ref, each a variant of its own): the constexprs of ``head_meta`` are the only variants.
_INTS = ["num_pairs", "p0", "p1", "has_ref", "f_div", "use_weighting"]


@triton.jit
def _log1p_small(u):
    """log(1 + u) for u in [0, 1], accurate where 1 + u rounds to 1 (libdevice's log1p does not run in the
    interpreter)."""
    w = 1.0 + u
    return tl.where(w == 1.0, u, tl.log(w) * u / (w - 1.0))


@triton.jit
def _logsig(x):
    return tl.minimum(x, 0.0) - _log1p_small(tl.exp(-tl.abs(x)))


@triton.jit
def _smoothed(z, eps):
    """-(1 - eps) logsig(z) - eps logsig(-z) and its derivative in z."""
    loss = -(1.0 - eps) * _logsig(z) - eps * _logsig(-z)
    grad = -(1.0 - eps) * tl.sigmoid(-z) + eps * tl.sigmoid(z)
    return loss, grad


@triton.jit
def _f_divergence(x, f_div, inv_am1, am1):
    """Score f(x) and f'(x): 0 reverse_kl, 1 forward_kl, 2 js_divergence, 3 alpha_divergence."""
    e = tl.exp(-x)
    t = am1 * x
    tc = tl.minimum(t, 80.0)
    et = tl.exp(tc)
    score = tl.where(f_div == 0, x, tl.where(f_div == 1, 1.0 - e, tl.where(f_div == 2, LN2 + _logsig(x),
                                                                         (et - 1.0) * inv_am1)))
    deriv = tl.where(f_div == 0, 1.0, tl.where(f_div == 1, e, tl.where(f_div == 2, tl.sigmoid(-x),
                                                                     tl.where(t <= 80.0, et, 0.0))))
    return score, deriv


@triton.jit(do_not_specialize=_INTS, do_not_specialize_on_alignment=list(_PTRS))
def _dpo_loss_head_kernel(
    # per-sequence inputs, (N,) fp32, N = 2 * num_pairs: chosen [0, B), rejected [B, 2B)
    logps_ptr,  # policy log-probs (LD-DPO weighted when on)
    sums_ptr,  # unweighted log-prob sums (the sft / nll terms); logps_ptr itself without LD-DPO
    counts_ptr,  # completion tokens, int64
    seq_stats_ptr,  # (4, N): sums of mean logit, entropy, log sum p^2, top-1 hits over each completion
    ref_chosen_ptr, ref_rejected_ptr,  # (B,) fp32 reference log-probs (read only when has_ref)
    aot_delta_ptr, aot_rank_ptr,  # aot: sorted(pi_c - pi_r) - sorted(ref_c - ref_r), rank of each pair (int64)
    aotu_delta_ptr, aotu_rank_c_ptr, aotu_rank_r_ptr,  # aot_unpaired: sorted(c) - sorted(r), ranks
    # outputs
    loss_ptr,  # (2,) fp32: the loss of pairs [p0, p1) (their share of the batch loss), the token coefficient
    coef_ptr,  # (N,) fp32: dL/d logp of each sequence of pairs [p0, p1), the token term included (chosen)
    rewards_ptr,  # (N,) fp32, WITH_METRICS: beta * (logp - ref)
    metrics_ptr,  # (10,) fp32, WITH_METRICS: TRL's metrics (see fastdpo._head.METRICS)
    # scalars
    num_pairs: tl.int32, p0: tl.int32, p1: tl.int32, has_ref: tl.int32,
    beta: tl.float32, eps: tl.float32, exo_log_keep: tl.float32, exo_log_eps: tl.float32, f_div: tl.int32,
    inv_am1: tl.float32, am1: tl.float32, tau: tl.float32, gamma: tl.float32, nll_alpha: tl.float32,
    use_weighting: tl.int32,
    # loss weights in LOSS_TYPES order (0: off)
    w0: tl.float32, w1: tl.float32, w2: tl.float32, w3: tl.float32, w4: tl.float32, w5: tl.float32,
    w6: tl.float32, w7: tl.float32, w8: tl.float32, w9: tl.float32, w10: tl.float32, w11: tl.float32,
    w12: tl.float32, w13: tl.float32, w14: tl.float32, w15: tl.float32,
    BLOCK_B: tl.constexpr,
    WITH_METRICS: tl.constexpr,
):
    offs0 = tl.arange(0, BLOCK_B)
    B = num_pairs
    ref_lanes = (offs0 * 0 + has_ref) != 0  # a lane mask: reference-free calls read no reference
    # Pass 1, every pair of the batch: its chosen token count and WPO weight sum (the sft term's divisors),
    # and with WITH_METRICS the rewards and the metrics' sums, in a fixed order.
    n_acc = tl.zeros((BLOCK_B,), tl.float32)
    w_acc = tl.zeros((BLOCK_B,), tl.float32)
    rc_acc = tl.zeros((BLOCK_B,), tl.float32)
    rr_acc = tl.zeros((BLOCK_B,), tl.float32)
    acc_acc = tl.zeros((BLOCK_B,), tl.float32)
    pc_acc = tl.zeros((BLOCK_B,), tl.float32)
    pr_acc = tl.zeros((BLOCK_B,), tl.float32)
    nr_acc = tl.zeros((BLOCK_B,), tl.float32)
    lc_acc = tl.zeros((BLOCK_B,), tl.float32)
    lr_acc = tl.zeros((BLOCK_B,), tl.float32)
    ent_acc = tl.zeros((BLOCK_B,), tl.float32)
    top_acc = tl.zeros((BLOCK_B,), tl.float32)
    for b0 in range(0, B, BLOCK_B):
        offs = b0 + offs0
        m = offs < B
        n_acc += tl.load(counts_ptr + offs, mask=m, other=0).to(tl.float32)
        if use_weighting != 0:
            w_acc += _wpo_weight(sums_ptr, counts_ptr, seq_stats_ptr, offs, m, B)
        else:
            w_acc += tl.where(m, 1.0, 0.0)
        if WITH_METRICS:
            pc = tl.load(logps_ptr + offs, mask=m, other=0.0)
            pr = tl.load(logps_ptr + B + offs, mask=m, other=0.0)
            rc = beta * (pc - tl.load(ref_chosen_ptr + offs, mask=m & ref_lanes, other=0.0))
            rr = beta * (pr - tl.load(ref_rejected_ptr + offs, mask=m & ref_lanes, other=0.0))
            tl.store(rewards_ptr + offs, rc, mask=m)
            tl.store(rewards_ptr + B + offs, rr, mask=m)
            rc_acc += tl.where(m, rc, 0.0)
            rr_acc += tl.where(m, rr, 0.0)
            acc_acc += tl.where(m & (rc > rr), 1.0, 0.0)
            pc_acc += pc
            pr_acc += pr
            nr_acc += tl.load(counts_ptr + B + offs, mask=m, other=0).to(tl.float32)
            lc_acc += tl.load(seq_stats_ptr + offs, mask=m, other=0.0)
            lr_acc += tl.load(seq_stats_ptr + B + offs, mask=m, other=0.0)
            ent_acc += tl.load(seq_stats_ptr + 2 * B + offs, mask=m, other=0.0)
            ent_acc += tl.load(seq_stats_ptr + 3 * B + offs, mask=m, other=0.0)
            top_acc += tl.load(seq_stats_ptr + 6 * B + offs, mask=m, other=0.0)
    N_tok = tl.sum(n_acc, 0)
    W = tl.sum(w_acc, 0)
    if WITH_METRICS:
        n_rej = tl.sum(nr_acc, 0)
        tl.store(metrics_ptr + 0, tl.sum(rc_acc, 0) / B)
        tl.store(metrics_ptr + 1, tl.sum(rr_acc, 0) / B)
        tl.store(metrics_ptr + 2, tl.sum(acc_acc, 0) / B)
        tl.store(metrics_ptr + 3, (tl.sum(rc_acc, 0) - tl.sum(rr_acc, 0)) / B)
        tl.store(metrics_ptr + 4, tl.sum(pc_acc, 0) / B)
        tl.store(metrics_ptr + 5, tl.sum(pr_acc, 0) / B)
        tl.store(metrics_ptr + 6, tl.where(N_tok > 0, tl.sum(lc_acc, 0) / tl.maximum(N_tok, 1.0), 0.0))
        tl.store(metrics_ptr + 7, tl.where(n_rej > 0, tl.sum(lr_acc, 0) / tl.maximum(n_rej, 1.0), 0.0))
        n_all = N_tok + n_rej
        tl.store(metrics_ptr + 8, tl.where(n_all > 0, tl.sum(ent_acc, 0) / tl.maximum(n_all, 1.0), 0.0))
        tl.store(metrics_ptr + 9, tl.where(N_tok > 0, tl.sum(top_acc, 0) / tl.maximum(N_tok, 1.0), 0.0))

    # sft: L = -S / N for every pair, times its WPO weight, averaged over pairs: -S / N * W / num_pairs
    token_w = tl.where(w13 != 0.0, w13 * W / num_pairs, 0.0) + nll_alpha
    has_token_terms = token_w != 0.0
    token_grad = tl.where(has_token_terms, -token_w / N_tok, 0.0)

    # Pass 2, pairs [p0, p1): losses and coefficients.
    acc = tl.zeros((BLOCK_B,), tl.float32)
    s_acc = tl.zeros((BLOCK_B,), tl.float32)
    for b0 in range(p0, p1, BLOCK_B):
        offs = b0 + offs0
        m = offs < p1
        pc = tl.load(logps_ptr + offs, mask=m, other=0.0)
        pr = tl.load(logps_ptr + B + offs, mask=m, other=0.0)
        c = pc - tl.load(ref_chosen_ptr + offs, mask=m & ref_lanes, other=0.0)
        r = pr - tl.load(ref_rejected_ptr + offs, mask=m & ref_lanes, other=0.0)
        nc = tl.maximum(tl.load(counts_ptr + offs, mask=m, other=1).to(tl.float32), 1.0)
        nr = tl.maximum(tl.load(counts_ptr + B + offs, mask=m, other=1).to(tl.float32), 1.0)
        sc, dsc = _f_divergence(c, f_div, inv_am1, am1)
        sr, dsr = _f_divergence(r, f_div, inv_am1, am1)
        z = beta * (sc - sr)
        sig_pos = tl.sigmoid(z)
        sig_neg = tl.sigmoid(-z)
        ls_pos = _logsig(z)
        ls_neg = _logsig(-z)
        loss = tl.zeros((BLOCK_B,), tl.float32)
        gd = tl.zeros((BLOCK_B,), tl.float32)  # dL/dd, d = s_c - s_r
        gsc = tl.zeros((BLOCK_B,), tl.float32)  # dL/ds_c beyond gd
        gsr = tl.zeros((BLOCK_B,), tl.float32)
        gc = tl.zeros((BLOCK_B,), tl.float32)  # dL/dpi_c beyond the score terms
        gr = tl.zeros((BLOCK_B,), tl.float32)

        # sigmoid
        loss += tl.where(w0 != 0.0, w0 * -ls_pos, 0.0)
        gd += tl.where(w0 != 0.0, w0 * -beta * sig_neg, 0.0)
        # hinge
        loss += tl.where(w1 != 0.0, w1 * tl.maximum(1.0 - z, 0.0), 0.0)
        gd += tl.where(w1 != 0.0, tl.where(1.0 - z > 0.0, -w1 * beta, 0.0), 0.0)
        # ipo
        D = sc / nc - sr / nr - 0.5 / beta
        loss += tl.where(w2 != 0.0, w2 * D * D, 0.0)
        gsc += tl.where(w2 != 0.0, w2 * 2.0 * D / nc, 0.0)
        gsr += tl.where(w2 != 0.0, -w2 * 2.0 * D / nr, 0.0)
        # exo_pair
        loss += tl.where(w3 != 0.0, w3 * (sig_pos * (ls_pos - exo_log_keep) + sig_neg * (ls_neg - exo_log_eps)), 0.0)
        gd += tl.where(w3 != 0.0, w3 * beta * sig_pos * sig_neg * (z - exo_log_keep + exo_log_eps), 0.0)
        # nca_pair
        bc = beta * c
        br = beta * r
        loss += tl.where(w4 != 0.0, w4 * (-_logsig(bc) - 0.5 * _logsig(-bc) - 0.5 * _logsig(-br)), 0.0)
        gc += tl.where(w4 != 0.0, w4 * beta * (-tl.sigmoid(-bc) + 0.5 * tl.sigmoid(bc)), 0.0)
        gr += tl.where(w4 != 0.0, w4 * beta * 0.5 * tl.sigmoid(br), 0.0)
        # robust
        loss += tl.where(w5 != 0.0, w5 * (-(1.0 - eps) * ls_pos + eps * ls_neg) / (1.0 - 2.0 * eps), 0.0)
        gd += tl.where(w5 != 0.0, w5 * beta * (-(1.0 - eps) * sig_neg - eps * sig_pos) / (1.0 - 2.0 * eps), 0.0)
        # bco_pair
        loss += tl.where(w6 != 0.0, w6 * (-_logsig(bc) - _logsig(-br)), 0.0)
        gc += tl.where(w6 != 0.0, -w6 * beta * tl.sigmoid(-bc), 0.0)
        gr += tl.where(w6 != 0.0, w6 * beta * tl.sigmoid(br), 0.0)
        # sppo_hard
        ec = c - 0.5 / beta
        er = r + 0.5 / beta
        loss += tl.where(w7 != 0.0, w7 * (ec * ec + er * er), 0.0)
        gc += tl.where(w7 != 0.0, w7 * 2.0 * ec, 0.0)
        gr += tl.where(w7 != 0.0, w7 * 2.0 * er, 0.0)
        # aot: delta at this pair's rank of pi_c - pi_r
        if_aot = m & ((tl.zeros((BLOCK_B,), tl.float32) + w8) != 0.0)  # a lane mask, not a scalar
        rank = tl.load(aot_rank_ptr + offs, mask=if_aot, other=0)
        la, ga = _smoothed(beta * tl.load(aot_delta_ptr + rank, mask=if_aot, other=0.0), eps)
        loss += tl.where(if_aot, w8 * la, 0.0)
        gc += tl.where(if_aot, w8 * beta * ga, 0.0)
        gr += tl.where(if_aot, -w8 * beta * ga, 0.0)
        # aot_unpaired: chosen at its rank of c, rejected at its rank of r
        if_aotu = m & ((tl.zeros((BLOCK_B,), tl.float32) + w9) != 0.0)
        rank_c = tl.load(aotu_rank_c_ptr + offs, mask=if_aotu, other=0)
        rank_r = tl.load(aotu_rank_r_ptr + offs, mask=if_aotu, other=0)
        lu, gu = _smoothed(beta * tl.load(aotu_delta_ptr + rank_c, mask=if_aotu, other=0.0), eps)
        _, gu_r = _smoothed(beta * tl.load(aotu_delta_ptr + rank_r, mask=if_aotu, other=0.0), eps)
        loss += tl.where(if_aotu, w9 * lu, 0.0)
        gc += tl.where(if_aotu, w9 * beta * gu, 0.0)
        gr += tl.where(if_aotu, -w9 * beta * gu_r, 0.0)
        # apo_zero
        sbc = tl.sigmoid(bc)
        sbr = tl.sigmoid(br)
        loss += tl.where(w10 != 0.0, w10 * (1.0 - sbc + sbr), 0.0)
        gc += tl.where(w10 != 0.0, -w10 * beta * sbc * (1.0 - sbc), 0.0)
        gr += tl.where(w10 != 0.0, w10 * beta * sbr * (1.0 - sbr), 0.0)
        # apo_down
        su = tl.sigmoid(beta * (c - r))
        loss += tl.where(w11 != 0.0, w11 * (sbc + 1.0 - su), 0.0)
        gc += tl.where(w11 != 0.0, w11 * beta * (sbc * (1.0 - sbc) - su * (1.0 - su)), 0.0)
        gr += tl.where(w11 != 0.0, w11 * beta * su * (1.0 - su), 0.0)
        # discopop
        mod = tl.sigmoid(z / tau)
        dmod = mod * (1.0 - mod) / tau
        ez_mod = tl.exp(-z + _logsig(z / tau))  # exp(-z) * m without overflowing exp(-z) for z << 0
        loss += tl.where(w12 != 0.0, w12 * (-ls_pos * (1.0 - mod) + ez_mod), 0.0)
        # exp(-z) (m - m') = exp(-z) m (1 - (1 - m) / tau)
        gd += tl.where(w12 != 0.0, w12 * beta * (-sig_neg * (1.0 - mod) + ls_pos * dmod
                                                  - ez_mod * (1.0 - (1.0 - mod) / tau)), 0.0)
        # sigmoid_norm
        zn = beta * (sc / nc - sr / nr)
        gn = -beta * tl.sigmoid(-zn)
        loss += tl.where(w14 != 0.0, w14 * -_logsig(zn), 0.0)
        gsc += tl.where(w14 != 0.0, w14 * gn / nc, 0.0)
        gsr += tl.where(w14 != 0.0, -w14 * gn / nr, 0.0)
        # simpo (reference-free)
        lsim, gsim = _smoothed(beta * (pc / nc - pr / nr) - gamma, eps)
        loss += tl.where(w15 != 0.0, w15 * lsim, 0.0)
        gc += tl.where(w15 != 0.0, w15 * beta * gsim / nc, 0.0)
        gr += tl.where(w15 != 0.0, -w15 * beta * gsim / nr, 0.0)

        s_acc += tl.load(sums_ptr + offs, mask=m, other=0.0)
        if use_weighting != 0:
            pair_w = _wpo_weight(sums_ptr, counts_ptr, seq_stats_ptr, offs, m, B)
        else:
            pair_w = tl.where(m, 1.0, 0.0)
        scale = pair_w / num_pairs  # WPO weight, mean over pairs
        acc += tl.where(m, loss * scale, 0.0)
        grad_c = ((gd + gsc) * dsc + gc) * scale + token_grad
        grad_r = ((gsr - gd) * dsr + gr) * scale
        tl.store(coef_ptr + offs, grad_c, mask=m)
        tl.store(coef_ptr + B + offs, grad_r, mask=m)
    token_loss = tl.where(has_token_terms, token_w * (-tl.sum(s_acc, 0) / N_tok), 0.0)
    tl.store(loss_ptr, tl.sum(acc, 0) + token_loss)
    tl.store(loss_ptr + 1, token_grad)


@triton.jit
def _wpo_weight(sums_ptr, counts_ptr, seq_stats_ptr, offs, m, B):
    """WPO: the pair's exp(mean over the completion of log p - log sum p^2), chosen times rejected."""
    nc = tl.maximum(tl.load(counts_ptr + offs, mask=m, other=1).to(tl.float32), 1.0)
    nr = tl.maximum(tl.load(counts_ptr + B + offs, mask=m, other=1).to(tl.float32), 1.0)
    lc = tl.load(sums_ptr + offs, mask=m, other=0.0) - tl.load(seq_stats_ptr + 4 * B + offs, mask=m, other=0.0)
    lr = tl.load(sums_ptr + B + offs, mask=m, other=0.0) - tl.load(seq_stats_ptr + 5 * B + offs, mask=m, other=0.0)
    return tl.where(m, tl.exp(lc / nc) * tl.exp(lr / nr), 0.0)
