"""An unmodified TRL 1.x DPOTrainer runs through fastdpo after ``patch()`` (and ``FastDPOTrainer``): several
training steps give the same logged loss, rewards/margins and log-probs and the same final weights as TRL's own
code; a step's loss, metrics and parameter gradients agree; TRL's function does not run while patched.

The main venv runs this with TRL 1.16 (its fused LM head); ``tests/trl1/run.sh`` again with 1.15 (the same fused
head, Triton kernels interpreted on CPU) and 1.14 (full logits by default, the chunked head with
``use_liger_kernel=True``: both replaced). fp32 on CPU (``bf16=False``: TRL 1.16 defaults to bf16 autocast, under
which its entropy comes from bf16 logits and fastdpo's from fp32 ones); the two sides differ in the rounding order
of the LM head's or the log-softmax's sums: rtol 1e-5 on a step's numbers, 1e-4 on logs and weights after 3 steps.
"""

import contextlib

import pytest
import torch

trl = pytest.importorskip("trl")

import fastdpo.integrations.trl as fdt  # noqa: E402
from fastdpo.integrations import _trl_chunked  # noqa: E402
from packaging.version import Version  # noqa: E402
from trl_utils import LEARNING_RATE, lora_policy_config, train_three_steps, trainer_step  # noqa: E402

TRL_114 = Version(trl.__version__) < fdt.FUSED_HEAD_TRL  # full logits by default, the chunked head on request

LOGGED = ["rewards/margins", "rewards/chosen", "logps/chosen", "logps/rejected", "logits/chosen",
          "mean_token_accuracy"]
CONFIGS = [dict(loss_type=["sigmoid"]), dict(loss_type=["ipo"]), dict(loss_type=["hinge"]),
           dict(loss_type=["robust"], label_smoothing=0.1),
           dict(loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0]), dict(use_weighting=True)]
if TRL_114:  # TRL 1.14's second path: the chunked LM head (no logits; WPO refused there by TRL)
    # With use_liger_kernel, transformers' Trainer.train also patches Liger's RMSNorm/RoPE/SwiGLU kernels into
    # modeling_llama (globally: later tests would get them), which fail under the CPU interpreter. All switched off:
    # only TRL's chunked DPO path is under test.
    _LIGER_OFF = dict(rope=False, rms_norm=False, swiglu=False, cross_entropy=False, fused_linear_cross_entropy=False)
    CONFIGS += [dict(loss_type=["sigmoid"], use_liger_kernel=True, liger_kernel_config=_LIGER_OFF),
                dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5], use_liger_kernel=True,
                     liger_kernel_config=_LIGER_OFF)]


def _id(config):
    return "+".join(config.get("loss_type", ["sigmoid"])) + "".join(
        f"-{k}" for k in ("use_weighting", "use_liger_kernel") if config.get(k))


def fastdpo_calls():
    return fdt.FusedLogProbFunction.calls + _trl_chunked.calls()


@pytest.fixture
def trl_calls(monkeypatch):
    """Counts calls of TRL's own per-token log-prob code: the chunked log-prob function (its fused LM head;
    TRL 1.14's ``use_liger_kernel`` path) and, in TRL 1.14, its full-logit functions."""
    calls = {"n": 0}

    def spy(fn):
        def counted(*args, **kwargs):
            calls["n"] += 1
            return fn(*args, **kwargs)
        return counted
    if TRL_114:
        from trl.trainer import dpo_trainer
        for name in ("selective_log_softmax_and_entropy", "selective_log_softmax"):
            monkeypatch.setattr(dpo_trainer, name, spy(getattr(dpo_trainer, name)))
        chunked = dpo_trainer._ChunkedLogProbFunction
    else:
        from trl.kernels import chunked_logprob
        chunked = chunked_logprob.ChunkedLogProbFunction
    monkeypatch.setattr(chunked, "forward", staticmethod(spy(chunked.forward)))
    return calls


def _step(tmp_path, config, patch, **kw):
    return trainer_step(tmp_path, config, fdt.patched() if patch else contextlib.nullcontext(), **kw)


def _same_step(a, b):
    torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=1e-6)
    assert set(a[1]) == set(b[1]) and "rewards/margins" in a[1]
    for k in [k for k in LOGGED + ["entropy"] if k in a[1]]:  # TRL 1.14's chunked head logs no logits/*
        torch.testing.assert_close(a[1][k], b[1][k], rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
    for ga, gb in zip(a[2], b[2]):
        torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-6 * max(1.0, gb.abs().max().item()))


@pytest.mark.parametrize("config", CONFIGS, ids=_id)
def test_patched_step_equals_trl(tmp_path, trl_calls, config):
    reference = _step(tmp_path / "trl", config, patch=False)
    assert trl_calls["n"] > 0
    trl_calls["n"] = 0
    before = fastdpo_calls()
    patched = _step(tmp_path / "fastdpo", config, patch=True)
    assert not fdt.is_patched()
    assert trl_calls["n"] == 0, "TRL's own log-prob function ran while patched"
    assert fastdpo_calls() > before
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


@pytest.mark.parametrize("config", CONFIGS, ids=_id)
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
    # AdamW moves a weight by about lr per step whatever its gradient's size: where a gradient element nearly
    # cancels, rounding can change its move by a fraction of lr (TRL 1.15's Triton kernels, interpreted: one element
    # in 2048 off by 1.9e-5 = 2% of lr). 5% of lr on top of the rounding of the weights themselves.
    for k in ref_w:
        torch.testing.assert_close(w[k], ref_w[k], rtol=1e-4,
                                   atol=1e-5 * max(1.0, ref_w[k].abs().max().item()) + 0.05 * LEARNING_RATE,
                                   msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.parametrize("version", ["1.13.0", "1.10.0", "0.23.1", "0.29.1", "0.28.0"])
def test_unsupported_trl_version_is_named(monkeypatch, version):
    """Versions outside [0.24, 0.29) and >= 1.14 raise naming the version; so does a 0.28 whose DPOTrainer lacks
    the methods the 0.x integration replaces (here TRL 1.x's trainer)."""
    import trl

    monkeypatch.setattr(trl, "__version__", version)
    with pytest.raises(RuntimeError, match=version.replace(".", r"\.")):
        fdt.patch()
    assert not fdt.is_patched()


@pytest.mark.skipif(not TRL_114, reason="TRL 1.14 only (tests/trl1/run.sh): later TRLs never build the logits")
def test_trl114_model_that_saves_its_logits_raises_not_silently_wrong(tmp_path, trl_calls):
    """TRL 1.14's full-logit path: dlogits go into the logits' storage by default; a graph that saved the logits
    (an LM head ending in tanh) makes autograd raise, and ``patch(inplace_backward=False)`` gives TRL's step."""
    def tanh_head(trainer):
        for model in (trainer.model, trainer.ref_model):
            model.lm_head.register_forward_hook(lambda module, args, out: torch.tanh(out))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        _step(tmp_path / "inplace", {}, patch=True, prepare=tanh_head)
    reference = _step(tmp_path / "trl", {}, patch=False, prepare=tanh_head)
    trl_calls["n"] = 0
    with fdt.patched(inplace_backward=False):
        separate = _step(tmp_path / "separate", {}, patch=False, prepare=tanh_head)
    assert trl_calls["n"] == 0 and _trl_chunked.INPLACE_BACKWARD
    _same_step(reference, separate)
