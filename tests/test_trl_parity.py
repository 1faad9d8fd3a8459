"""fastdpo.dpo_loss equals what the real TRL 1.x DPOTrainer computes and logs, for every loss type it accepts: TRL 1.16
in the main venv, 1.14.1, 1.14.2 and 1.15.0 through tests/trl1/run.sh (the PyTorch path there).

One trainer (tiny random Llama, in-memory tokenizer, 16 pairs, offline) gives one batch; for each
configuration TRL's own ``_compute_loss`` runs on it, then fastdpo on the same model's logits with the
reference model's log-probs. Loss, every logged metric and the gradient of every parameter must agree.
TRL computes in fp32 through its chunked fused LM head, fastdpo through its kernels: the tolerance is fp32
rounding of differently ordered sums (rtol 1e-4 on the loss and metrics; parameter gradients within 1e-3
relative, or 1e-5 of the tensor's largest element where elements nearly cancel).
"""

import pytest
import torch

trl = pytest.importorskip("trl")  # a test dependency: skipped only where someone installs without [test]

import fastdpo  # noqa: E402
from trl_utils import dpo_trainer  # noqa: E402

CONFIGS = [
    dict(loss_type=["sigmoid"]),
    dict(loss_type=["hinge"], beta=0.5),
    dict(loss_type=["ipo"], beta=0.3),
    dict(loss_type=["exo_pair"], label_smoothing=1e-3),
    dict(loss_type=["nca_pair"]),
    dict(loss_type=["robust"], label_smoothing=0.1),
    dict(loss_type=["bco_pair"]),
    dict(loss_type=["sppo_hard"]),
    dict(loss_type=["aot"], label_smoothing=0.05),
    dict(loss_type=["aot_unpaired"]),
    dict(loss_type=["apo_zero"]),
    dict(loss_type=["apo_down"]),
    dict(loss_type=["discopop"], discopop_tau=0.05),
    dict(loss_type=["sft"]),
    dict(loss_type=["sigmoid_norm"]),
    dict(loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0]),
    dict(loss_type=["sigmoid"], f_divergence_type="forward_kl"),
    dict(loss_type=["ipo"], f_divergence_type="js_divergence"),
    dict(loss_type=["sigmoid"], f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.3),
    dict(loss_type=["sigmoid", "sft"], ld_alpha=0.5),
    dict(loss_type=["sigmoid"], use_weighting=True),
]
METRICS = ["rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected", "logits/chosen", "logits/rejected", "entropy", "mean_token_accuracy"]


@pytest.fixture(scope="module")
def trainers(tmp_path_factory):
    """Built on first use, per value of use_weighting: TRL sets up its fused LM head's outputs (WPO's log sum
    p^2) at construction. Same seeds: the same model, reference and batch."""
    made = {}

    def get(use_weighting: bool):
        if use_weighting not in made:
            trainer = dpo_trainer(tmp_path_factory.mktemp("trl"), use_weighting=use_weighting)
            torch.manual_seed(1)
            with torch.no_grad():  # move the policy away from its reference copy: rewards and margins not ~0
                for p in trainer.model.parameters():
                    p.add_(0.05 * torch.randn_like(p))
            trainer.model.train()
            made[use_weighting] = trainer, next(iter(trainer.get_train_dataloader()))
        return made[use_weighting]
    return get


def _apply(trainer, cfg):
    """Set a DPOConfig-like configuration on the trainer (its _compute_loss reads these attributes)."""
    args = trainer.args
    trainer.loss_types = cfg["loss_type"]
    trainer.loss_weights = cfg.get("loss_weights") or [1.0] * len(cfg["loss_type"])
    trainer.beta = args.beta = cfg.get("beta", 0.1)
    trainer.label_smoothing = cfg.get("label_smoothing", 0.0)
    trainer.f_divergence_type = cfg.get("f_divergence_type", "reverse_kl")
    trainer.f_alpha_divergence_coef = cfg.get("f_alpha_divergence_coef", 0.5)
    trainer.ld_alpha = cfg.get("ld_alpha")
    trainer.use_weighting = cfg.get("use_weighting", False)
    args.discopop_tau = cfg.get("discopop_tau", 0.05)
    trainer._metrics["train"].clear()


def _fastdpo_ref_logps(trainer, batch, labels, ld_alpha):
    with torch.no_grad():
        logits = trainer.ref_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        out = fastdpo.sequence_logps(logits, labels, return_token_logps=True)
    if ld_alpha is None:
        return out.logps.chunk(2)
    mask = labels != -100  # LD-DPO: weight ld_alpha past the shorter completion of each pair
    pos = mask.cumsum(1)
    shared = torch.minimum(*mask.sum(1).chunk(2)).repeat(2)[:, None]
    w = torch.where(pos <= shared, 1.0, ld_alpha)
    return (out.token_logps * w).sum(1).chunk(2)


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "+".join(c["loss_type"]) + "".join(
    f"-{k}" for k in c if k not in ("loss_type", "loss_weights", "label_smoothing", "beta", "discopop_tau")))
def test_matches_trl_dpo_trainer(trainers, cfg, backend):
    trainer, batch = trainers(cfg.get("use_weighting", False))
    model = trainer.model
    _apply(trainer, cfg)
    model.zero_grad()
    trl_loss = trainer._compute_loss(model, batch, False)
    trl_loss.backward()
    trl_grads = [p.grad.clone() for p in model.parameters()]
    trl_metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    model.zero_grad()
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    ref_c, ref_r = _fastdpo_ref_logps(trainer, batch, labels, cfg.get("ld_alpha"))
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    options = {k: v for k, v in cfg.items()}
    out = fastdpo.dpo_loss(logits, labels, ref_c, ref_r, **options)
    out.loss.backward()

    torch.testing.assert_close(out.loss, trl_loss.detach(), rtol=1e-4, atol=1e-5)
    for k in METRICS:
        torch.testing.assert_close(out.metrics[k].item(), trl_metrics[k], rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")
    for (name, p), g in zip(model.named_parameters(), trl_grads):
        # elements that nearly cancel carry the absolute rounding of the tensor's largest terms
        torch.testing.assert_close(p.grad, g, rtol=1e-3, atol=1e-5 * max(1.0, g.abs().max().item()), msg=lambda m, name=name: f"{name}: {m}")
