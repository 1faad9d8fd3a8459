"""An unmodified TRL 1.16 DPOTrainer runs through fastdpo after ``patch()`` (and ``FastDPOTrainer``): the loss,
every logged metric and every parameter gradient of a step equal TRL's own fused LM head's, TRL's function
does not run while patched, and patched training runs and logs the same first step.

Not asserted yet: equal weights after several steps. Inside ``trainer.train()`` TRL's own fused head returns an
entropy up to 0.02 off its float64 value (fastdpo's: 1e-6), and the step's gradient norm differs by 5e-4
relative, although the same function on the same inputs outside the training loop agrees with fastdpo to
1e-7. Until that is understood, the trajectories are compared at step 1 only.
"""

import contextlib

import pytest
import torch

pytest.importorskip("trl")

import fastdpo.integrations.trl as fdt  # noqa: E402
from trl.kernels import chunked_logprob  # noqa: E402
from trl_utils import dpo_trainer  # noqa: E402

LOGGED = ["rewards/margins", "rewards/chosen", "logps/chosen", "logps/rejected", "logits/chosen",
          "mean_token_accuracy"]
CONFIGS = [dict(loss_type=["sigmoid"]), dict(loss_type=["ipo"]), dict(loss_type=["hinge"]),
           dict(loss_type=["robust"], label_smoothing=0.1),
           dict(loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0]), dict(use_weighting=True)]


@pytest.fixture
def trl_calls(monkeypatch):
    """Counts calls of TRL's own chunked log-prob function."""
    calls = {"n": 0}
    original = chunked_logprob.ChunkedLogProbFunction.forward

    def spy(*args, **kwargs):
        calls["n"] += 1
        return original(*args, **kwargs)
    monkeypatch.setattr(chunked_logprob.ChunkedLogProbFunction, "forward", staticmethod(spy))
    return calls


def _step(tmp_path, config, patch, cls=None):
    """One loss + backward of a DPOTrainer on its first batch: (loss, metrics, parameter gradients)."""
    ctx = fdt.patched() if patch else contextlib.nullcontext()
    with ctx:
        trainer = dpo_trainer(tmp_path, **config)
        if cls is not None:
            trainer.__class__ = cls
        torch.manual_seed(1)
        with torch.no_grad():  # policy away from its reference: rewards and margins are not ~0
            for p in trainer.model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        batch = next(iter(trainer.get_train_dataloader()))
        trainer.model.train()
        loss = trainer._compute_loss(trainer.model, batch, False)
        loss.backward()
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return loss.detach(), metrics, [p.grad.clone() for p in trainer.model.parameters()]


def _same_step(a, b):
    torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=1e-6)
    for k in LOGGED + ["entropy"]:
        torch.testing.assert_close(a[1][k], b[1][k], rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
    for ga, gb in zip(a[2], b[2]):
        torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-6 * max(1.0, gb.abs().max().item()))


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "+".join(c.get("loss_type", ["sigmoid-wpo"])))
def test_patched_step_equals_trl(tmp_path, trl_calls, config):
    reference = _step(tmp_path / "trl", config, patch=False)
    assert trl_calls["n"] > 0
    trl_calls["n"] = 0
    before = fdt.FusedLogProbFunction.calls
    patched = _step(tmp_path / "fastdpo", config, patch=True)
    assert not fdt.is_patched()
    assert trl_calls["n"] == 0, "TRL's own log-prob function ran while patched"
    assert fdt.FusedLogProbFunction.calls > before
    _same_step(reference, patched)


def test_fast_dpo_trainer_subclass(tmp_path, trl_calls):
    reference = _step(tmp_path / "trl", {}, patch=False)
    trl_calls["n"] = 0
    fast = _step(tmp_path / "fastdpo", {}, patch=False, cls=fdt.FastDPOTrainer)
    assert trl_calls["n"] == 0 and not fdt.is_patched()
    _same_step(reference, fast)


def test_patched_training_runs(tmp_path, trl_calls):
    """trainer.train() for 3 steps under the patch: TRL's function never runs; the first logged step equals
    TRL's (later steps: see the module docstring)."""
    def train(path):
        trainer = dpo_trainer(path, max_steps=3, learning_rate=1e-3, optim="sgd")
        trainer.train()
        return [h for h in trainer.state.log_history if "loss" in h]
    reference = train(tmp_path / "trl")
    trl_calls["n"] = 0
    with fdt.patched():
        logs = train(tmp_path / "fastdpo")
    assert trl_calls["n"] == 0 and len(logs) == 3
    for k in ["loss", "logps/chosen", "logps/rejected", "rewards/margins", "logits/chosen"]:
        torch.testing.assert_close(logs[0][k], reference[0][k], rtol=1e-5, atol=1e-6)
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in logs)


def test_unsupported_trl_version_is_named(monkeypatch):
    import trl

    monkeypatch.setattr(trl, "__version__", "0.28.0")
    with pytest.raises(RuntimeError, match="0.28.0"):
        fdt.patch()
