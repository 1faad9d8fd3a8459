"""fastdpo.dpo_loss equals Liger-Kernel's LigerFusedLinearDPOLoss for every loss type Liger supports.

Liger takes hidden states and the LM head and aligns targets with positions (no shift); fastdpo gets the
logits ``hidden @ W.T`` with ``shift=False``. Both compute in fp32: loss and log-probs within rtol 1e-5,
gradients of hidden states and LM head within 1e-5 of each tensor's largest element.
"""

import pytest
import torch

pytest.importorskip("liger_kernel")

import fastdpo  # noqa: E402
from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss  # noqa: E402

LIGER_TYPES = {"sigmoid": 0.0, "hinge": 0.0, "exo_pair": 1e-3, "nca_pair": 0.0, "robust": 0.1, "bco_pair": 0.0,
               "sppo_hard": 0.0, "apo_zero": 0.0, "apo_down": 0.0, "discopop": 0.0}


def _inputs(seed=0, B=3, T=12, H=32, V=500):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2 * B, T, H, generator=g)
    weight = torch.randn(V, H, generator=g) / H ** 0.5 * 3
    target = torch.randint(0, V, (2 * B, T), generator=g)
    target[:, :4] = -100
    target[1, 9:] = -100
    ref_hidden = hidden + 0.3 * torch.randn(2 * B, T, H, generator=g)
    ref_weight = weight + 0.05 * torch.randn(V, H, generator=g)
    return hidden, weight, target, ref_hidden, ref_weight


# every Liger loss type, and its NLL term (compute_nll_loss, alpha) on two of them: it does not depend on the type
CASES = [(t, False) for t in sorted(LIGER_TYPES)] + [("sigmoid", True), ("robust", True)]


@pytest.mark.parametrize("loss_type,nll", CASES)
def test_matches_liger_fused_linear_dpo(backend, loss_type, nll):
    hidden, weight, target, ref_hidden, ref_weight = _inputs()
    eps = LIGER_TYPES[loss_type]

    h1, w1 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    liger = LigerFusedLinearDPOLoss(beta=0.2, loss_type=loss_type, label_smoothing=eps, compiled=False,
                                    compute_nll_loss=nll, alpha=0.5)
    loss_l, aux = liger(w1, h1, target, None, ref_hidden, ref_weight, None)
    loss_l.backward()

    h2, w2 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    with torch.no_grad():
        ref = fastdpo.sequence_logps(ref_hidden @ ref_weight.t(), target, shift=False).logps
    out = fastdpo.dpo_loss(h2 @ w2.t(), target, ref[:3], ref[3:], shift=False, beta=0.2, loss_type=loss_type,
                           label_smoothing=eps, nll_alpha=0.5 if nll else 0.0)
    out.loss.backward()

    torch.testing.assert_close(out.loss, loss_l.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.chosen_logps, aux[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.rejected_logps, aux[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.chosen_rewards, aux[5], rtol=1e-5, atol=1e-6)
    for a, b in ((h2.grad, h1.grad), (w2.grad, w1.grad)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * b.abs().max().item())
