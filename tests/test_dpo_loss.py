"""dpo_loss against a float64 evaluation of the specification (``fastdpo.losses``), on both backends.

The reference runs the textbook log-probs in float64 and the spec's formula, and autograd differentiates it
to the logits; fastdpo computes the same in fp32 with its kernels. Loss tolerance: fp32 relative rounding of
a short chain of exp/log (~1e-6) amplified by the sums over tokens: rtol 1e-5 with an absolute floor from the
log-prob tolerance of the sequences. Gradient: rtol 1e-4 or the storage rounding of the logits' dtype, and
1e-6 of the largest reference element.
"""

import math
import warnings

import pytest
import torch

import fastdpo
from fastdpo import _head
from fastdpo.kernels import dpo_loss as head_kernels
from fastdpo.losses import LOSS_TYPES, DPOLossConfig, dpo_loss_from_logps
from fastdpo.naive import naive_token_logps
from helpers import logp_tol, store_atol, store_rtol

SMOOTHED = {"exo_pair": 1e-3, "robust": 0.1, "aot": 0.05, "aot_unpaired": 0.05, "simpo": 0.1}


def make_pairs(B=3, T=10, V=300, dtype=torch.float32, seed=0, prompt=3):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(2 * B, T, V, generator=g) * 2).to(dtype)
    labels = torch.randint(0, V, (2 * B, T), generator=g)
    labels[:, :prompt] = -100
    for n in range(2 * B):  # ragged right padding: completions of different lengths
        labels[n, T - (n % 3):] = -100
    ref_c = -20 + 3 * torch.randn(B, generator=g)
    ref_r = -20 + 3 * torch.randn(B, generator=g)
    return logits, labels, ref_c, ref_r


def ld_weights(mask, ld_alpha):
    """LD-DPO token weights as TRL 1.16 builds them (float64 reference)."""
    pos = mask.cumsum(1)
    lens = mask.sum(1)
    c, r = lens.chunk(2)
    shared = torch.minimum(c, r).repeat(2)[:, None]
    return ((pos > 0) & (pos <= shared)).double() + ld_alpha * (pos > shared).double()


def reference(logits, labels, ref_c, ref_r, cfg: DPOLossConfig):
    """Float64 (loss, dlogits, chosen_logps, rejected_logps) of the spec, with TRL's LD-DPO and WPO code."""
    x = logits.detach().double().requires_grad_(True)
    tok, mask = naive_token_logps(x, labels, dtype=torch.float64)
    tok.retain_grad()  # dL/d(token log-prob): the coefficient of each row's (onehot - p)
    sums = tok.sum(1)
    logps = (tok * ld_weights(mask, cfg.ld_alpha)).sum(1) if cfg.ld_alpha is not None else sums
    B = logps.shape[0] // 2
    n = mask.sum(1)
    pair_w = None
    if cfg.use_weighting:
        with torch.no_grad():
            logp_all = torch.log_softmax(x, -1)[:, :-1]
            lss = torch.nn.functional.pad(torch.logsumexp(2 * logp_all, -1), (1, 0))
            w = torch.exp(((tok - lss) * mask).sum(1) / n.clamp(min=1))
            pair_w = w[:B] * w[B:]
    refs = (None, None) if ref_c is None else (ref_c.double(), ref_r.double())
    loss = dpo_loss_from_logps(logps[:B], logps[B:], *refs, chosen_tokens=n[:B], rejected_tokens=n[B:],
                               chosen_sums=sums[:B], pair_weights=pair_w, config=cfg)
    loss.backward()
    coef_max = 0.0 if tok.grad is None else tok.grad.abs().nan_to_num(0.0).max().item()
    return loss.detach(), x.grad, logps[:B].detach(), logps[B:].detach(), coef_max


def check(logits, labels, ref_c, ref_r, device=None, **options):
    cfg = DPOLossConfig(**options)
    dev = logits.device if device is None else device  # the GPU lane runs fastdpo on device copies
    x = logits.to(dev).clone().requires_grad_(True)
    refs = (None, None) if ref_c is None else (ref_c.to(dev), ref_r.to(dev))
    out = fastdpo.dpo_loss(x, labels.to(dev), *refs, config=cfg)
    out.loss.backward()
    ref_loss, ref_grad, ref_chosen, ref_rejected, coef_max = reference(logits, labels, ref_c, ref_r, cfg)
    T = labels.shape[1]
    seq_tol = logp_tol(logits) * T
    torch.testing.assert_close(out.chosen_logps.double().cpu(), ref_chosen, rtol=0, atol=seq_tol)
    torch.testing.assert_close(out.rejected_logps.double().cpu(), ref_rejected, rtol=0, atol=seq_tol)
    # the loss moves by at most |dL/dlogp| * seq_tol per sequence, plus fp32 rounding of the loss itself
    dl = ref_grad.abs().sum((1, 2)).max().item()
    torch.testing.assert_close(out.loss.double().cpu(), ref_loss, rtol=1e-5, atol=dl * seq_tol + 1e-6,
                               equal_nan=True)  # 'sft' with no chosen token: an empty mean, NaN in both
    gmax = ref_grad.abs().max().item()
    # fp32 coefficients (rtol 1e-4 covers their exp/log chains); coef * (onehot - p) with p from an fp32
    # log-sum-exp (absolute error coef * 2 logp_tol: at a target with p near 1 the difference cancels); then one
    # rounding to the logits' dtype
    torch.testing.assert_close(x.grad.double().cpu(), ref_grad, rtol=max(1e-4, store_rtol(logits.dtype)),
                               atol=1e-6 * max(gmax, 1e-3) + coef_max * 2 * logp_tol(logits)
                               + store_atol(logits.dtype))
    return out, x.grad


def test_sft_without_chosen_tokens(backend):
    """'sft' over a batch whose chosen completions hold no token: the mean of nothing, NaN as TRL's
    ``-logps[mask].mean()``, and no gradient (TRL's is zero too); found by the fuzz."""
    logits = torch.tensor([[[0.0160], [-0.0552]], [[0.0396], [-0.1062]]])
    labels = torch.full((2, 2), -100)
    out, grad = check(logits, labels, None, None, loss_type="sft", beta=0.01)
    assert out.loss.isnan() and torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_every_loss_type(backend, loss_type):
    check(*make_pairs(), loss_type=loss_type, label_smoothing=SMOOTHED.get(loss_type, 0.0))


@pytest.mark.parametrize("f_div,alpha", [("forward_kl", 0.5), ("js_divergence", 0.5), ("alpha_divergence", 0.5),
                                         ("alpha_divergence", 1.0), ("alpha_divergence", -3.0)])
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "robust"])
def test_f_divergences(backend, f_div, alpha, loss_type):
    logits, labels, ref_c, ref_r = make_pairs(seed=1)
    # reference log-probs near the policy's: the regime f-DPO runs in (exp of the log-ratio stays finite)
    with torch.no_grad():
        lp = fastdpo.sequence_logps(logits, labels).logps
    ref_c, ref_r = lp[:3] + torch.tensor([0.5, -1.0, 2.0]), lp[3:] + torch.tensor([-0.3, 1.2, 0.1])
    check(logits, labels, ref_c, ref_r, loss_type=loss_type, f_divergence_type=f_div, f_alpha_divergence_coef=alpha,
          label_smoothing=0.1 if loss_type == "robust" else 0.0, beta=0.5)


def test_alpha_divergence_clamp(backend):
    """(alpha - 1) * logratio past 80 is clamped like TRL: finite loss, zero gradient through that score."""
    logits, labels, _, _ = make_pairs(seed=2)
    with torch.no_grad():
        lp = fastdpo.sequence_logps(logits, labels).logps
    check(logits, labels, lp[:3] + 100.0, lp[3:] - 1.0, loss_type="sigmoid", f_divergence_type="alpha_divergence",
          f_alpha_divergence_coef=2.0)


def test_multi_loss_and_nll(backend):
    """TRL's multi-loss (MPO's sigmoid + bco_pair + sft with weights) and an RPO-style NLL term."""
    check(*make_pairs(seed=3), loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0])
    check(*make_pairs(seed=4), loss_type="sigmoid", nll_alpha=0.5)
    check(*make_pairs(seed=5), loss_type=["ipo", "aot", "apo_down"], label_smoothing=0.1)


@pytest.mark.parametrize("ld_alpha", [0.0, 0.3, 1.0])
def test_ld_alpha(backend, ld_alpha):
    check(*make_pairs(seed=6), loss_type=["sigmoid", "sft"], ld_alpha=ld_alpha)


def test_wpo_weighting(backend):
    check(*make_pairs(seed=7), loss_type=["sigmoid", "ipo"], use_weighting=True)


@pytest.mark.parametrize("loss_type", ["sigmoid", "simpo", "sigmoid_norm"])
def test_reference_free(backend, loss_type):
    logits, labels, _, _ = make_pairs(seed=8)
    check(logits, labels, None, None, loss_type=loss_type, beta=2.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_logits(backend, dtype):
    logits, labels, ref_c, ref_r = make_pairs(dtype=dtype, seed=9)
    x = logits.clone().requires_grad_(True)
    out = fastdpo.dpo_loss(x, labels, ref_c, ref_r, beta=0.1)
    out.loss.backward()
    ref_loss, ref_grad, _, _, _ = reference(logits, labels, ref_c, ref_r, DPOLossConfig(beta=0.1))
    torch.testing.assert_close(out.loss.double(), ref_loss, rtol=1e-5, atol=1e-6)
    assert x.grad.dtype == dtype
    # one rounding to the storage dtype (a full ulp for bf16 under the interpreter, see helpers.py)
    ulp = {torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}[dtype]
    torch.testing.assert_close(x.grad.double(), ref_grad, rtol=ulp, atol=1e-7)


@pytest.mark.parametrize("beta", [1e-3, 0.1, 1.0, 10.0])
@pytest.mark.parametrize("gap", [-1e3, -30.0, 0.0, 30.0, 1e3])
def test_loss_head_extremes(backend, beta, gap):
    """Policy-reference gaps of +-1e3 and betas from 1e-3 to 10: loss and coefficients finite wherever the
    float64 formula is, and equal to it. Every loss type together, and each alone."""
    g = torch.Generator().manual_seed(int(abs(gap)) + int(beta * 1000))
    B = 5
    chosen = -50 + 5 * torch.randn(B, generator=g)
    rejected = -50 + 5 * torch.randn(B, generator=g)
    ref_c, ref_r = chosen - gap, rejected + gap
    nc = torch.randint(1, 40, (B,), generator=g)
    nr = torch.randint(1, 40, (B,), generator=g)
    logps, counts = torch.cat([chosen, rejected]), torch.cat([nc, nr])
    for types in [list(LOSS_TYPES)] + [[t] for t in LOSS_TYPES]:
        cfg = DPOLossConfig(beta=beta, loss_type=types, label_smoothing=0.1 if set(types) & set(SMOOTHED) else 0.0)
        out, coef, _, _ = _head.loss_head(logps, logps, counts, torch.zeros(4, 2 * B), ref_c, ref_r,
                                          _head.params(cfg), with_metrics=False)
        leaves = [t.double().requires_grad_(True) for t in (chosen, rejected)]
        ref = dpo_loss_from_logps(leaves[0], leaves[1], ref_c.double(), ref_r.double(), chosen_tokens=nc.double(),
                                  rejected_tokens=nr.double(), chosen_sums=leaves[0], config=cfg)
        ref_grads = [torch.zeros(B, dtype=torch.float64) if g is None else g
                     for g in torch.autograd.grad(ref, leaves, allow_unused=True)]
        for a, b in zip((out[0], coef[:B], coef[B:]), (ref, *ref_grads)):
            b = b.detach()
            assert torch.equal(torch.isfinite(a), torch.isfinite(b)), (types, a, b)
            fin = torch.isfinite(b)
            torch.testing.assert_close(a.double()[fin], b[fin], rtol=2e-5, atol=1e-6 * max(1.0, b[fin].abs().max()
                                                                                         .item() if fin.any() else 1))


def test_metrics_match_trl_definitions(backend):
    logits, labels, ref_c, ref_r = make_pairs(seed=10)
    logits[0, 4, int(labels[0, 5])] = 50.0  # a chosen token that is the argmax
    out = fastdpo.dpo_loss(logits, labels, ref_c, ref_r, beta=0.2)
    x = logits.double()
    tok, mask = naive_token_logps(x, labels, dtype=torch.float64)
    lp = tok.sum(1)
    cr, rr = 0.2 * (lp[:3] - ref_c.double()), 0.2 * (lp[3:] - ref_r.double())
    rows = torch.nn.functional.pad(mask[:, 1:], (0, 1))  # logits rows that score a completion token
    p = torch.softmax(x, -1)
    ent = torch.logsumexp(x, -1) - (p * x).sum(-1)
    tgt = torch.nn.functional.pad(labels[:, 1:], (0, 1))
    top1 = (x.argmax(-1) == tgt) & rows
    expect = {
        "rewards/chosen": cr.mean(), "rewards/rejected": rr.mean(), "rewards/accuracies": (cr > rr).double().mean(),
        "rewards/margins": (cr - rr).mean(), "logps/chosen": lp[:3].mean(), "logps/rejected": lp[3:].mean(),
        "logits/chosen": x.mean(-1)[:3][rows[:3]].mean(), "logits/rejected": x.mean(-1)[3:][rows[3:]].mean(),
        "entropy": ent[rows].mean(), "mean_token_accuracy": top1[:3].sum().double() / rows[:3].sum(),
    }
    assert set(out.metrics) == set(expect)
    for k, v in expect.items():
        torch.testing.assert_close(out.metrics[k].double(), v, rtol=1e-5, atol=1e-5, msg=k)
    assert out.metrics["mean_token_accuracy"] > 0
    torch.testing.assert_close(out.chosen_rewards.double(), cr, rtol=1e-5, atol=1e-5)


def test_module_equals_function_and_inplace(backend):
    logits, labels, ref_c, ref_r = make_pairs(seed=11)
    x = logits.clone().requires_grad_(True)
    fastdpo.dpo_loss(x, labels, ref_c, ref_r, loss_type="ipo", beta=0.3).loss.backward()
    leaf = logits.clone().requires_grad_(True)
    y = leaf * 1
    module = fastdpo.DPOLoss(loss_type="ipo", beta=0.3, inplace_backward=True)
    out = module(y, labels, ref_c, ref_r)
    out.loss.backward()
    assert torch.equal(x.grad, leaf.grad)
    assert "ipo" in repr(module)


def test_bitwise_deterministic_and_scaled_backward(backend):
    logits, labels, ref_c, ref_r = make_pairs(seed=12)
    grads = []
    for scale in (1.0, 1.0, 3.0):
        x = logits.clone().requires_grad_(True)
        (fastdpo.dpo_loss(x, labels, ref_c, ref_r, loss_type=["sigmoid", "aot"]).loss * scale).backward()
        grads.append(x.grad)
    assert torch.equal(grads[0], grads[1])
    torch.testing.assert_close(grads[2], 3 * grads[0], rtol=1e-6, atol=0)


@pytest.mark.parametrize("options,exc,word", [
    (dict(loss_type="exo_pair"), ValueError, "label_smoothing"),
    (dict(loss_type="robust", label_smoothing=0.5), ValueError, "label_smoothing"),
    (dict(beta=0.0), ValueError, "beta"),
    (dict(beta=-1.0), ValueError, "beta"),
    (dict(beta=float("nan")), ValueError, "beta"),
    (dict(loss_type="dpo"), ValueError, "loss_type"),
    (dict(loss_type=[]), ValueError, "loss_type"),
    (dict(loss_type=["sigmoid", "ipo"], loss_weights=[1.0]), ValueError, "loss_weights"),
    (dict(f_divergence_type="kl"), ValueError, "f_divergence_type"),
    (dict(loss_type="bco_pair", f_divergence_type="forward_kl"), ValueError, "f_divergence_type"),
    (dict(loss_type="aot", use_weighting=True), ValueError, "use_weighting"),
    (dict(ld_alpha=1.5), ValueError, "ld_alpha"),
    (dict(label_smoothing=-0.1), ValueError, "label_smoothing"),
])
def test_invalid_options(options, exc, word):
    logits, labels, ref_c, ref_r = make_pairs()
    with pytest.raises(exc, match=word):
        fastdpo.dpo_loss(logits, labels, ref_c, ref_r, **options)


@pytest.mark.parametrize("case,exc,word", [
    ("odd_rows", ValueError, "2B rows"),
    ("one_ref", ValueError, "ref_"),
    ("ref_shape", ValueError, "ref_chosen_logps"),
    ("ref_dtype", TypeError, "ref_rejected_logps"),
    ("ref_type", TypeError, "ref_chosen_logps"),
])
def test_invalid_inputs(case, exc, word):
    logits, labels, ref_c, ref_r = make_pairs()
    if case == "odd_rows":
        logits, labels = logits[:5], labels[:5]
    elif case == "one_ref":
        ref_r = None
    elif case == "ref_shape":
        ref_c = ref_c[:2]
    elif case == "ref_dtype":
        ref_r = ref_r.long()
    elif case == "ref_type":
        ref_c = ref_c.tolist()
    with pytest.raises(exc, match=word):
        fastdpo.dpo_loss(logits, labels, ref_c, ref_r)


def test_label_smoothing_ignored_by_sigmoid_warns():
    logits, labels, ref_c, ref_r = make_pairs()
    with pytest.warns(UserWarning, match="cDPO"):
        out = fastdpo.dpo_loss(logits, labels, ref_c, ref_r, label_smoothing=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plain = fastdpo.dpo_loss(logits, labels, ref_c, ref_r)
    assert torch.equal(out.loss, plain.loss)


def test_no_tokens_in_a_sequence(backend):
    """A pair whose completions are fully masked: log-probs 0, finite loss, zero gradient in its rows."""
    logits, labels, ref_c, ref_r = make_pairs(seed=13)
    labels[1] = -100
    labels[4] = -100
    out, grad = check(logits, labels, ref_c, ref_r, loss_type="sigmoid_norm")
    assert out.chosen_logps[1] == 0 and torch.isfinite(out.loss)
    assert torch.equal(grad[1], torch.zeros_like(grad[1])) and torch.equal(grad[4], torch.zeros_like(grad[4]))
    assert math.isfinite(out.metrics["logits/chosen"].item())


def _head_inputs(B, seed=0):
    g = torch.Generator().manual_seed(seed)
    chosen = -50 + 5 * torch.randn(B, generator=g)
    rejected = -50 + 5 * torch.randn(B, generator=g)
    ref_c = chosen - torch.randn(B, generator=g)
    ref_r = rejected + torch.randn(B, generator=g)
    counts = torch.randint(1, 40, (2 * B,), generator=g)
    # (4, 2B) sums over each completion: mean logit, entropy, log sum p^2 (WPO), top-1 hits
    seq_stats = torch.stack([torch.randn(2 * B, generator=g) * counts, torch.rand(2 * B, generator=g) * counts,
                             -torch.rand(2 * B, generator=g) * counts,
                             torch.randint(0, 2, (2 * B,), generator=g) * 1.0])
    return torch.cat([chosen, rejected]), counts, seq_stats, ref_c, ref_r


M = head_kernels.MAX_BLOCK_B


@pytest.mark.parametrize("wpo", [False, True])  # aot's rank gathers cross blocks; WPO (no aot) weighs each pair
@pytest.mark.parametrize("B", [1, 16, 17, M, M + 1, 2 * M + 6])  # one block of each size, then two and three blocks
def test_loss_head_over_several_blocks_of_pairs(monkeypatch, B, wpo):
    """Both passes of the head kernel loop over blocks of at most ``MAX_BLOCK_B`` pairs; the fused-linear path
    runs it on pair groups [p0, p1) that start and end inside a block. Every other head test holds at most 5
    pairs (one block). Triton (interpreted) against the float64 spec for the loss and coefficients, and against
    the PyTorch head for the rewards and metrics."""
    logps, counts, seq_stats, ref_c, ref_r = _head_inputs(B)
    types = [t for t in LOSS_TYPES if not (wpo and t.startswith("aot"))]
    cfg = DPOLossConfig(beta=0.1, loss_type=types, label_smoothing=0.1, use_weighting=wpo, nll_alpha=0.3)
    p = _head.params(cfg)
    bounds = sorted({0, min(5, B), min(B, M + 3), B})  # groups crossing block edges
    runs = {}
    for backend in ("triton", "torch"):
        monkeypatch.setenv("FASTDPO_BACKEND", backend)
        loss, coef = torch.zeros((), dtype=torch.float64), torch.full((2 * B,), float("nan"))
        for p0, p1 in zip(bounds, bounds[1:]):  # as fastdpo._linear._PairHead.run: metrics with the last group
            out, c, rewards, metrics = _head.loss_head(logps, logps, counts, seq_stats, ref_c, ref_r, p,
                                                       pairs=(p0, p1), with_metrics=p1 == B)
            loss += out[0].double()
            coef[p0:p1], coef[B + p0:B + p1] = c[p0:p1], c[B + p0:B + p1]
        runs[backend] = (loss, coef, rewards, metrics)

    # the float64 spec: loss and dL/dlogp (WPO weights detached, as TRL)
    leaves = [t.double().requires_grad_(True) for t in (logps[:B], logps[B:])]
    n = counts.double().clamp(min=1)
    w = torch.exp((logps.double() - seq_stats[2].double()) / n)
    ref = dpo_loss_from_logps(*leaves, ref_c.double(), ref_r.double(), chosen_tokens=counts[:B].double(),
                              rejected_tokens=counts[B:].double(), chosen_sums=leaves[0],
                              pair_weights=(w[:B] * w[B:]).detach() if wpo else None, config=cfg)
    ref_coef = torch.cat(torch.autograd.grad(ref, leaves))
    loss, coef, rewards, metrics = runs["triton"]
    torch.testing.assert_close(loss, ref.detach(), rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(coef.double(), ref_coef, rtol=1e-4, atol=1e-6 * ref_coef.abs().max().item())
    _, _, want_rewards, want_metrics = runs["torch"]
    torch.testing.assert_close(rewards, want_rewards, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(metrics, want_metrics, rtol=1e-5, atol=1e-6)
