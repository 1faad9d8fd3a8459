"""TRL 0.24-0.28's full-logit DPOTrainer through fastdpo after ``patch()`` (and ``FastDPOTrainer``).

Runs only in its own venv (TRL 0.x needs transformers 4.x): ``bash tests/trl0/run.sh`` runs it with TRL 0.28
and again with 0.24. Patched and
unpatched, a step's loss, logged metrics and parameter gradients agree, and 3 AdamW steps give the same logs
and final weights, for TRL 0.28's semantics (ipo on length-averaged log-probs, cDPO label smoothing, rewards
summed over the loss weights, RPO); TRL's own log-prob and loss code never runs while patched. fp32 on CPU:
the two sides differ in the order of their fp32 sums (TRL sums a log-softmax copy, fastdpo an online
log-sum-exp): rtol 1e-5 on a step's loss and metrics, 1e-5 of each tensor's largest entry on its gradients,
1e-4 on logs and weights after 3 steps.
"""

import contextlib

import pytest
import torch
import trl
from packaging.version import Version
from trl.trainer import dpo_trainer as trl_dpo

import fastdpo.integrations.trl as fdt
from fastdpo.integrations._trl_legacy import legacy_config
from trl_utils import (dpo_trainer, lora_policy_config, perturb, preference_dataset, train_three_steps,
                       trainer_step)

assert Version(trl.__version__) < Version("1"), "tests/trl0 runs with TRL 0.x (tests/trl0/run.sh)"
# TRL 0.28 renamed aot_pair to aot_unpaired, and stores f_divergence_type as a string it compares with an Enum
# (so it computes reverse KL whatever the option says); 0.24-0.27 keep the Enum and compute the divergence.
AOT_UNPAIRED = "aot_unpaired" if Version(trl.__version__) >= Version("0.28") else "aot_pair"
F_DIV_IGNORED = Version(trl.__version__) >= Version("0.28")

LOGGED = ["rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
          "logps/rejected", "logits/chosen", "logits/rejected"]
STEP_CONFIGS = [
    dict(loss_type="sigmoid"),
    dict(loss_type="ipo"),
    dict(loss_type="hinge"),
    dict(loss_type="robust", label_smoothing=0.1),
    dict(loss_type="sigmoid", label_smoothing=0.2),  # cDPO
    dict(loss_type=["sigmoid", "sft"], loss_weights=[0.8, 0.5]),  # MPO-style; rewards scaled by 1.3
    dict(loss_type=["sigmoid", "robust"], label_smoothing=0.1),
    dict(loss_type="hinge", rpo_alpha=0.5),
    dict(loss_type=["ipo", "sft"]),
    dict(loss_type="exo_pair"),  # TRL 0.x: label_smoothing 0 -> 1e-3
    dict(loss_type="nca_pair"),
    dict(loss_type="bco_pair"),  # a running mean of the rewards: two stages (the mean needs the log-probs)
    dict(loss_type=["bco_pair", "sigmoid", "sft"], loss_weights=[0.5, 1.0, 0.2], rpo_alpha=0.3),
    dict(loss_type="sppo_hard"),
    dict(loss_type=["aot", AOT_UNPAIRED]),
    dict(loss_type="apo_zero"),
    dict(loss_type="apo_down"),
    dict(loss_type="discopop"),
    dict(loss_type="sigmoid", reference_free=True),
    dict(loss_type="ipo", reference_free=True),
    dict(loss_type="sigmoid", max_length=12, truncation_mode="keep_end"),
    dict(loss_type="sigmoid", max_length=12, truncation_mode="keep_start"),
    dict(loss_type="sigmoid", use_logits_to_keep=True),
]
TRAIN_CONFIGS = [dict(loss_type="sigmoid"), dict(loss_type="ipo"), dict(loss_type="hinge"),
                 dict(loss_type="robust", label_smoothing=0.1), dict(loss_type="bco_pair"),
                 dict(loss_type=["sigmoid", "sft"], loss_weights=[0.8, 0.2])]


def _id(config):
    return "-".join(f"{k}={v}" for k, v in config.items()).replace(" ", "")


@pytest.fixture
def trl_calls(monkeypatch):
    """Counts calls of TRL 0.28's own log-prob and loss code."""
    calls = {"n": 0}
    original_lsm, original_loss = trl_dpo.selective_log_softmax, trl_dpo.DPOTrainer.dpo_loss

    def lsm(*args, **kwargs):
        calls["n"] += 1
        return original_lsm(*args, **kwargs)

    def loss(*args, **kwargs):
        calls["n"] += 1
        return original_loss(*args, **kwargs)
    monkeypatch.setattr(trl_dpo, "selective_log_softmax", lsm)
    monkeypatch.setattr(trl_dpo.DPOTrainer, "dpo_loss", loss)
    return calls


def _step(tmp_path, config, patch, **kw):
    return trainer_step(tmp_path, config, fdt.patched() if patch else contextlib.nullcontext(), **kw)


def _same_step(a, b):
    torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=1e-6)
    assert sorted(a[1]) == sorted(b[1])
    for k in a[1]:
        torch.testing.assert_close(a[1][k], b[1][k], rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
    for ga, gb in zip(a[2], b[2]):
        # relative to each tensor's largest entry: measured up to 6e-6 (discopop's chain of exps)
        torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-5 * gb.abs().max().item())


@pytest.mark.parametrize("config", STEP_CONFIGS, ids=_id)
def test_patched_step_equals_trl(tmp_path, trl_calls, config):
    reference = _step(tmp_path / "trl", config, patch=False)
    assert trl_calls["n"] > 0
    trl_calls["n"] = 0
    patched = _step(tmp_path / "fastdpo", config, patch=True)
    assert not fdt.is_patched()
    assert trl_calls["n"] == 0, "TRL's own log-prob or loss code ran while patched"
    assert set(LOGGED) <= set(reference[1])
    assert abs(reference[1]["rewards/margins"]) > 1e-3  # the comparison is not between zeros
    _same_step(reference, patched)


def test_patched_step_on_the_triton_kernels(tmp_path, monkeypatch, trl_calls):
    """The same step with fastdpo's Triton kernels (interpreted on CPU) in place of its PyTorch path."""
    config = dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.3], label_smoothing=0.1)
    reference = _step(tmp_path / "trl", config, patch=False)
    trl_calls["n"] = 0
    monkeypatch.setenv("FASTDPO_BACKEND", "triton")
    patched = _step(tmp_path / "fastdpo", config, patch=True)
    assert trl_calls["n"] == 0
    _same_step(reference, patched)


@pytest.mark.parametrize("loss_type", ["sigmoid", "robust", "hinge"])
def test_js_divergence_as_trl_0_24_to_0_27_compute_it(tmp_path, trl_calls, loss_type):
    """TRL 0.24-0.27 keep ``f_divergence_type`` as an Enum and compute the JS divergence (0.28 stores a string
    and silently computes reverse KL: fastdpo raises there). Their loss code is 0.28's: the Enum set on a 0.28
    trainer runs it."""
    def js(trainer):
        trainer.f_divergence_type = trl_dpo.FDivergenceType.JS_DIVERGENCE
    config = dict(loss_type=loss_type, label_smoothing=0.1 if loss_type == "robust" else 0.0)
    reference = _step(tmp_path / "trl", config, patch=False, prepare=js)
    plain = _step(tmp_path / "plain", config, patch=False)
    assert abs(reference[0] - plain[0]) > 1e-3  # JS is not reverse KL here
    trl_calls["n"] = 0
    patched = _step(tmp_path / "fastdpo", config, patch=True, prepare=js)
    assert trl_calls["n"] == 0
    _same_step(reference, patched)


def test_patched_peft_policy_without_reference_model(tmp_path, trl_calls):
    """A LoRA policy with ref_model=None: TRL 0.x scores the reference with the adapters disabled
    (``null_ref_context``), through the patched ``concatenated_forward``. The step equals TRL's."""
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


@pytest.mark.parametrize("config", TRAIN_CONFIGS, ids=_id)
def test_patched_training_equals_trl(tmp_path, trl_calls, config):
    """3 steps of AdamW: the same logs and final weights."""
    ref_logs, ref_w = train_three_steps(tmp_path / "trl", **config)
    trl_calls["n"] = 0
    with fdt.patched():
        logs, w = train_three_steps(tmp_path / "fastdpo", **config)
    assert trl_calls["n"] == 0 and len(logs) == len(ref_logs) == 3
    for la, lb in zip(logs, ref_logs):
        for k in ["loss"] + LOGGED:
            torch.testing.assert_close(la[k], lb[k], rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")
    for k in ref_w:
        torch.testing.assert_close(w[k], ref_w[k], rtol=1e-4, atol=1e-5 * max(1.0, ref_w[k].abs().max().item()),
                                   msg=lambda m, k=k: f"{k}: {m}")


def test_precomputed_reference_and_evaluation(tmp_path, trl_calls):
    """``precompute_ref_log_probs`` (TRL's reference pass goes through the patched ``concatenated_forward``) and
    ``evaluate()`` (``prediction_step``): the same stored columns and eval metrics as TRL's own code."""
    def run(path, patch):
        with fdt.patched() if patch else contextlib.nullcontext():
            trainer = dpo_trainer(path, eval_dataset=preference_dataset(8, seed=1), precompute_ref_log_probs=True,
                                  loss_type="ipo", per_device_eval_batch_size=4)
            perturb(trainer.model)
            trainer.get_train_dataloader()  # fills the ref_* columns
            return trainer.train_dataset, trainer.evaluate()
    ref_data, ref_eval = run(tmp_path / "trl", False)
    trl_calls["n"] = 0
    data, evaluated = run(tmp_path / "fastdpo", True)
    assert trl_calls["n"] == 0
    for col in ("ref_chosen_logps", "ref_rejected_logps"):
        torch.testing.assert_close(torch.tensor(data[col]), torch.tensor(ref_data[col]), rtol=1e-5, atol=1e-6)
    keys = [k for k in ref_eval if k.startswith("eval_") and k.split("_", 1)[1] in LOGGED + ["loss"]]
    assert len(keys) == len(LOGGED) + 1
    for k in keys:
        torch.testing.assert_close(evaluated[k], ref_eval[k], rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.parametrize("config,word", [
    (dict(ld_alpha=0.5), "ld_alpha"),
    (dict(use_weighting=True), "use_weighting"),
    (dict(loss_type=["ipo", "sigmoid"]), "'ipo'"),
    (dict(f_divergence_type="alpha_divergence"), "alpha_divergence"),
    *([(dict(f_divergence_type="js_divergence"), "computes reverse KL")] if F_DIV_IGNORED else []),
    (dict(reference_free=True, loss_type="nca_pair"), "reference_free"),
    (dict(padding_free=True), "padding_free"),
], ids=lambda x: x if isinstance(x, str) else None)
def test_unsupported_options_are_named(tmp_path, monkeypatch, config, word):
    """Options whose TRL 0.x semantics fastdpo does not reproduce: a ValueError naming them, before the model
    runs; never a silently different loss."""
    trainer = dpo_trainer(tmp_path, **config)
    batch = next(iter(trainer.get_train_dataloader()))
    forwards = {"n": 0}

    def count(*args, **kwargs):
        forwards["n"] += 1
    trainer.model.register_forward_pre_hook(count)
    with fdt.patched(), pytest.raises(ValueError, match=word):
        trainer.compute_loss(trainer.model, batch)
    assert forwards["n"] == 0


def test_enum_js_divergence_with_ipo_is_named(tmp_path):
    """TRL 0.24-0.27's JS divergence (an Enum) with ipo: TRL applies it to length-averaged log-ratios, fastdpo's
    ipo to sums; a ValueError, not a different loss."""
    trainer = dpo_trainer(tmp_path, loss_type="ipo")
    trainer.f_divergence_type = trl_dpo.FDivergenceType.JS_DIVERGENCE
    with pytest.raises(ValueError, match="js_divergence"):
        legacy_config(trainer)


def test_aot_pair_is_the_old_name_of_aot_unpaired(tmp_path):
    trainer = dpo_trainer(tmp_path, loss_type=AOT_UNPAIRED)
    config, _ = legacy_config(trainer)
    trainer.loss_type = ["aot_unpaired" if AOT_UNPAIRED == "aot_pair" else "aot_pair"]
    assert legacy_config(trainer)[0] == config and config.loss_types == ("aot_unpaired",)


def test_unpatch_restores_trl():
    original = (trl_dpo.DPOTrainer.concatenated_forward, trl_dpo.DPOTrainer.get_batch_loss_metrics)
    fdt.patch()
    fdt.patch()  # idempotent
    assert fdt.is_patched() and trl_dpo.DPOTrainer.concatenated_forward is not original[0]
    fdt.unpatch()
    assert (trl_dpo.DPOTrainer.concatenated_forward, trl_dpo.DPOTrainer.get_batch_loss_metrics) == original
    assert not fdt.is_patched()


def _tanh_head(trainer):
    """An LM head ending in tanh: tanh's backward reads its saved output, the logits fastdpo would overwrite."""
    for model in (trainer.model, trainer.ref_model):
        model.lm_head.register_forward_hook(lambda module, args, out: torch.tanh(out))


def test_inplace_backward_is_the_same_step(tmp_path, monkeypatch):
    """The default writes dlogits into the logits' storage: the same bits as a separate gradient buffer."""
    from fastdpo.integrations import _trl_legacy

    inplace = _step(tmp_path / "inplace", {}, patch=True)
    monkeypatch.setattr(_trl_legacy, "INPLACE_BACKWARD", False)
    separate = _step(tmp_path / "separate", {}, patch=True)
    assert torch.equal(inplace[0], separate[0])
    assert all(torch.equal(a, b) for a, b in zip(inplace[2], separate[2]))


def test_model_that_saves_its_logits_raises_not_silently_wrong(tmp_path, trl_calls):
    """In-place dlogits on a graph that saved the logits: autograd's version check raises. With
    patch(inplace_backward=False) the step is TRL's."""
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        _step(tmp_path / "inplace", {}, patch=True, prepare=_tanh_head)
    reference = _step(tmp_path / "trl", {}, patch=False, prepare=_tanh_head)
    trl_calls["n"] = 0
    with fdt.patched(inplace_backward=False):
        separate = _step(tmp_path / "separate", {}, patch=False, prepare=_tanh_head)
    from fastdpo.integrations import _trl_legacy
    assert _trl_legacy.INPLACE_BACKWARD and trl_calls["n"] == 0
    _same_step(reference, separate)


def test_bf16_model_against_float64(tmp_path):
    """A bf16 model: TRL 0.28 computes its log-probs and loss in bf16 (its numbers are bf16-rounded); fastdpo
    reads the bf16 logits and computes in fp32. Against a float64 evaluation of the same bf16 logits, fastdpo's
    loss is within fp32 rounding (1e-5 relative) and closer than TRL's."""
    from fastdpo.integrations._trl_legacy import _forward

    def bf16(trainer):
        trainer.model.to(torch.bfloat16)
        trainer.ref_model.to(torch.bfloat16)
    trl_loss = _step(tmp_path / "trl", {}, patch=False, prepare=bf16)[0]
    fast_loss, metrics, grads = _step(tmp_path / "fastdpo", {}, patch=True, prepare=bf16)
    assert all(g.dtype == torch.bfloat16 and torch.isfinite(g).all() for g in grads)

    trainer = dpo_trainer(tmp_path / "exact")  # the same weights as inside _step, rebuilt
    bf16(trainer)
    perturb(trainer.model)
    with torch.no_grad():
        batch = next(iter(trainer.get_train_dataloader()))

        def logps(model):
            logits, labels, _, B = _forward(trainer, model, batch)
            lp = torch.log_softmax(logits.double(), -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
            s = torch.where(labels != -100, lp, 0.0).sum(1)
            return s[:B], s[B:]
        (pc, pr), (rc, rr) = logps(trainer.model), logps(trainer.ref_model)
    exact = -torch.nn.functional.logsigmoid(trainer.beta * ((pc - rc) - (pr - rr))).mean()
    torch.testing.assert_close(fast_loss.double(), exact, rtol=1e-5, atol=0)
    assert (fast_loss.double() - exact).abs() < (trl_loss.double() - exact).abs()
    torch.testing.assert_close(torch.tensor(metrics["logps/chosen"], dtype=torch.float64), pc.mean(), rtol=1e-5,
                               atol=0)
