"""An unmodified TRL 1.16 DPOTrainer runs through fastdpo after ``patch()`` (and ``FastDPOTrainer``): several
training steps give the same logged loss, rewards/margins and log-probs and the same final weights as TRL's own
fused LM head; a step's loss, metrics and parameter gradients agree; TRL's function does not run while
patched. fp32 on CPU (``bf16=False``: TRL 1.16 defaults to bf16 autocast, under which its entropy comes from
bf16 logits and fastdpo's from fp32 ones); the two sides differ in the rounding order of the LM head's sums:
rtol 1e-5 on a step's numbers, 1e-4 on logs and weights after 3 steps.
"""

import contextlib

import pytest
import torch

pytest.importorskip("trl")

import fastdpo.integrations.trl as fdt  # noqa: E402
from trl.kernels import chunked_logprob  # noqa: E402
from trl_utils import lora_policy_config, train_three_steps, trainer_step  # noqa: E402

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


def _step(tmp_path, config, patch, **kw):
    return trainer_step(tmp_path, config, fdt.patched() if patch else contextlib.nullcontext(), **kw)


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


def test_patched_peft_policy_without_reference_model(tmp_path, trl_calls):
    """A LoRA policy with ref_model=None (TRL scores the reference through a frozen copy of the adapter): the
    patched step equals TRL's, for the policy and the reference forward alike."""
    reference = _step(tmp_path / "trl", lora_policy_config(), patch=False)
    assert trl_calls["n"] > 0 and abs(reference[1]["rewards/margins"]) > 1e-3
    assert len(reference[2]) == 8  # the LoRA A and B of 2 modules x 2 layers: the base is frozen
    trl_calls["n"] = 0
    patched = _step(tmp_path / "fastdpo", lora_policy_config(), patch=True)
    assert trl_calls["n"] == 0
    _same_step(reference, patched)


def test_fast_dpo_trainer_subclass(tmp_path, trl_calls):
    reference = _step(tmp_path / "trl", {}, patch=False)
    trl_calls["n"] = 0
    fast = _step(tmp_path / "fastdpo", {}, patch=False, cls=fdt.FastDPOTrainer)
    assert trl_calls["n"] == 0 and not fdt.is_patched()
    _same_step(reference, fast)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "+".join(c.get("loss_type", ["sigmoid-wpo"])))
def test_patched_training_equals_trl(tmp_path, trl_calls, config):
    """3 steps of AdamW: same logged loss, margins, log-probs and final weights."""
    ref_logs, ref_w = train_three_steps(tmp_path / "trl", **config)
    trl_calls["n"] = 0
    with fdt.patched():
        logs, w = train_three_steps(tmp_path / "fastdpo", **config)
    assert trl_calls["n"] == 0 and len(logs) == len(ref_logs) == 3
    for la, lb in zip(logs, ref_logs):
        for k in ["loss", "rewards/margins", "logps/chosen", "logps/rejected", "entropy"]:
            torch.testing.assert_close(la[k], lb[k], rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")
    for k in ref_w:
        torch.testing.assert_close(w[k], ref_w[k], rtol=1e-4, atol=1e-5 * max(1.0, ref_w[k].abs().max().item()),
                                   msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.parametrize("version", ["1.10.0", "0.23.1", "0.29.1", "0.28.0"])
def test_unsupported_trl_version_is_named(monkeypatch, version):
    """Versions outside [0.24, 0.29) and >= 1.15 raise naming the version; so does a 0.28 whose DPOTrainer lacks
    the methods the 0.x integration replaces (here TRL 1.16's trainer)."""
    import trl

    monkeypatch.setattr(trl, "__version__", version)
    with pytest.raises(RuntimeError, match=version.replace(".", r"\.")):
        fdt.patch()
    assert not fdt.is_patched()
