"""TRL >= 1.15 ``DPOConfig(padding_free=True)`` under ``fastdpo.integrations.trl.patch()``: the forwards run packed
(one row, no padding) and the loss, every logged metric and every parameter gradient equal ``padding_free=False``
within fp32 rounding (the packed and padded model forwards sum the same terms in other orders: rtol 1e-4 on loss
and metrics; gradients 1e-3 relative or 1e-5 of the tensor's largest element), for every loss type TRL accepts.
"""

import pytest
import torch

trl = pytest.importorskip("trl")

from packaging.version import Version  # noqa: E402

if Version(trl.__version__) < Version("1.15"):
    pytest.skip("padding_free under the patch needs TRL >= 1.15 (its fused LM head)", allow_module_level=True)

import fastdpo.integrations.trl as fdt  # noqa: E402
from fastdpo.integrations import _trl_packed  # noqa: E402
from test_trl_parity import CONFIGS, METRICS, _apply  # noqa: E402
from trl_utils import LEARNING_RATE, dpo_trainer, lora_policy_config, perturb, train_three_steps  # noqa: E402


@pytest.fixture(scope="module")
def trainers(tmp_path_factory):
    made = {}

    def get(use_weighting: bool):
        if use_weighting not in made:
            with fdt.patched():
                trainer = dpo_trainer(tmp_path_factory.mktemp("trl"), use_weighting=use_weighting, padding_free=True)
            perturb(trainer.model)
            trainer.model.train()
            made[use_weighting] = trainer, next(iter(trainer.get_train_dataloader()))
        return made[use_weighting]
    return get


def _step(trainer, batch, padding_free):
    trainer.args.padding_free = padding_free
    trainer.model.zero_grad()
    trainer._metrics["train"].clear()
    before = _trl_packed.calls
    loss = trainer._compute_loss(trainer.model, batch, False)
    loss.backward()
    ran_packed = _trl_packed.calls - before
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return loss.detach(), metrics, [p.grad.clone() for p in trainer.model.parameters()], ran_packed


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "+".join(c["loss_type"]) + "".join(
    f"-{k}" for k in c if k not in ("loss_type", "loss_weights", "label_smoothing", "beta", "discopop_tau")))
def test_padding_free_matches_padded(trainers, cfg):
    trainer, batch = trainers(cfg.get("use_weighting", False))
    assert (batch["attention_mask"] == 0).any(), "the batch must hold padding for the test to mean anything"
    _apply(trainer, cfg)
    with fdt.patched():
        loss, metrics, grads, packed_calls = _step(trainer, batch, True)
        ref_loss, ref_metrics, ref_grads, padded_calls = _step(trainer, batch, False)
    assert packed_calls == 2 and padded_calls == 0  # policy and reference forwards ran packed
    torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=1e-5)
    assert metrics.keys() == ref_metrics.keys() and set(METRICS) <= metrics.keys()
    for k in set(metrics) - {"num_tokens"}:  # num_tokens is TRL's running total: this batch counted twice
        torch.testing.assert_close(metrics[k], ref_metrics[k], rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")
    for (name, _), g, r in zip(trainer.model.named_parameters(), grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-3, atol=1e-5 * max(1.0, r.abs().max().item()),
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_packed_forward_sees_no_padding(trainers):
    """The backbone is called with one row holding exactly the batch's real tokens and no attention mask."""
    trainer, batch = trainers(False)
    seen = []
    hook = trainer.model.model.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append((kwargs["input_ids"].shape, kwargs.get("attention_mask"),
                                               kwargs.get("position_ids"))), with_kwargs=True)
    try:
        with fdt.patched():
            _step(trainer, batch, True)
    finally:
        hook.remove()
    total = int(batch["attention_mask"].sum())
    assert seen and all(shape == (1, total) and mask is None and pos is not None for shape, mask, pos in seen)


@pytest.mark.parametrize("extra", [dict(), dict(precompute_ref_log_probs=True), "lora"],
                         ids=["ref-model", "precompute-ref", "lora"])
def test_padding_free_trains_like_padded(tmp_path, extra):
    """Three optimizer steps of TRL's own train loop: the logged rows and the final weights of padding_free=True
    equal padding_free=False (both patched)."""
    runs = {}
    for padding_free in (False, True):
        config = lora_policy_config() if extra == "lora" else dict(extra)
        with fdt.patched():
            runs[padding_free] = train_three_steps(tmp_path / str(padding_free), padding_free=padding_free,
                                                   **config)
    (logs, weights), (ref_logs, ref_weights) = runs[True], runs[False]
    assert len(logs) == len(ref_logs) == 3
    for row, ref in zip(logs, ref_logs):
        assert row.keys() == ref.keys()
        for k in ref:
            torch.testing.assert_close(float(row[k]), float(ref[k]), rtol=1e-4, atol=1e-5,
                                       msg=lambda m, k=k: f"{k}: {m}")
    # AdamW moves a weight by about lr per step whatever its gradient's size: where a gradient element nearly
    # cancels, rounding can change its move by a fraction of lr (as in test_trl_integration): 5% of lr
    for k in ref_weights:
        torch.testing.assert_close(weights[k], ref_weights[k], rtol=1e-4,
                                   atol=1e-5 * max(1.0, ref_weights[k].abs().max().item()) + 0.05 * LEARNING_RATE,
                                   msg=lambda m, k=k: f"{k}: {m}")


def test_nested_packing_contexts(trainers):
    """A trainer subclass calling one patched method inside another enters the packing context twice: the forward
    is wrapped once (wrapped twice it received position_ids twice and raised), and restored after."""
    trainer, batch = trainers(False)
    lm = trainer.model
    before = lm.__dict__.get("forward")
    with fdt.patched():
        with _trl_packed._packed_forwards(trainer), _trl_packed._packed_forwards(trainer):
            _, _, _, packed_calls = _step(trainer, batch, True)
    assert packed_calls == 2 and lm.__dict__.get("forward") is before


def test_unpatched_trl_still_falls_back(tmp_path):
    """Without the patch TRL's own behaviour stands: it pads."""
    fdt.unpatch()
    trainer = dpo_trainer(tmp_path, padding_free=True)
    assert trainer.padding_free is False
    before = _trl_packed.calls
    trainer._compute_loss(trainer.model, next(iter(trainer.get_train_dataloader())), False)
    assert _trl_packed.calls == before
