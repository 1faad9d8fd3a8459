"""LLaMA-Factory 0.9.5's DPO through fastdpo: ``fastdpo.integrations.llamafactory.patch()`` against LLaMA-Factory's
own ``CustomDPOTrainer``, end to end through ``llamafactory.train.tuner.run_exp`` (what ``llamafactory-cli train``
calls) with a YAML-equivalent dict: a tiny random Llama and an in-memory tokenizer saved to a temporary folder,
16 preference pairs in LLaMA-Factory's alpaca ranking format, 3 AdamW steps.

Runs in its own venv (``bash tests/llamafactory/run.sh``; LLaMA-Factory pins TRL 0.24 and transformers <= 5.6).
The torchaudio import LLaMA-Factory makes is a stand-in module (see conftest.py).

For every ``pref_loss`` (sigmoid, hinge, ipo, kto_pair, orpo, simpo, and sigmoid with the BCO term), with and
without ``pref_ftx``, full fine-tuning (a perturbed reference model) and LoRA (the reference is the policy with its
adapter disabled): each step's loss and every logged metric, each step's gradient of every trainable parameter,
and the final weights agree with LLaMA-Factory's own run; LLaMA-Factory's ``get_batch_logps`` never runs while
patched. fp32 on CPU; the two sides differ in the order of their fp32 sums (LLaMA-Factory sums a log-softmax copy,
fastdpo an online log-sum-exp; the fused-linear path also multiplies in other tiles): rtol 1e-5 (atol 1e-6) on
losses and metrics; the first step's gradients within 1e-5 of each tensor's largest entry (1e-4 later, from weights
the steps before moved apart by rounding); weights within that plus 5% of the learning rate (AdamW moves a weight
by about lr per step whatever its gradient's size, so a nearly cancelling gradient element's rounding shows at that
scale).
"""

import json
import logging
import os
import subprocess
import sys

import pytest
import torch

import fastdpo.integrations.llamafactory as fdl
from llamafactory.train.dpo import trainer as lf_trainer
from llamafactory.train.tuner import run_exp
from transformers import TrainerCallback
from trl_utils import perturb, preference_dataset, tiny_llama, tiny_tokenizer

LEARNING_RATE = 1e-3
PREF_LOSSES = [dict(pref_loss="sigmoid"), dict(pref_loss="hinge"), dict(pref_loss="ipo"),
               dict(pref_loss="kto_pair"), dict(pref_loss="orpo"), dict(pref_loss="simpo"),
               dict(pref_loss="sigmoid", pref_bco_weight=0.5)]  # "bco": LLaMA-Factory's BCO term, running mean
LORA = dict(finetuning_type="lora", lora_target="q_proj,v_proj", lora_rank=4, lora_alpha=8)
MATRIX = [dict(**loss, **ftx, **tuning) for loss in PREF_LOSSES for ftx in ({}, dict(pref_ftx=0.5))
          for tuning in ({}, LORA)]
EXTRA = [dict(pref_loss="sigmoid", ld_alpha=0.5), dict(pref_loss="ipo", ld_alpha=0.3, pref_ftx=0.2),
         dict(pref_loss="sigmoid", ld_alpha=0.5, **LORA), dict(pref_loss="sigmoid", dpo_label_smoothing=0.2),
         dict(pref_loss="sigmoid", ref_model=None)]  # the default reference: the same checkpoint reloaded


def _id(config):
    tuning = "lora" if config.get("finetuning_type") == "lora" else "full"
    rest = [f"{k}={v}" for k, v in config.items() if k not in LORA and k != "pref_loss"]
    return "-".join([config["pref_loss"], tuning, *rest])


@pytest.fixture(scope="session")
def assets(tmp_path_factory):
    """A tiny Llama (the policy) and a perturbed copy (the reference of full fine-tuning) with their tokenizer,
    and the pairs as a LLaMA-Factory dataset folder."""
    root = tmp_path_factory.mktemp("lf")
    tok = tiny_tokenizer()
    tok.model_input_names = ["input_ids", "attention_mask"]  # as Llama's tokenizers: no token_type_ids
    model = tiny_llama(len(tok))
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    perturb(model)
    model.save_pretrained(root / "ref")
    tok.save_pretrained(root / "ref")
    rows = [{"instruction": r["prompt"], "input": "", "chosen": r["chosen"].strip(), "rejected": r["rejected"].strip()}
            for r in preference_dataset(16)]
    (root / "data").mkdir()
    (root / "data" / "pairs.json").write_text(json.dumps(rows))
    info = {"pairs": {"file_name": "pairs.json", "ranking": True,
                      "columns": {"prompt": "instruction", "query": "input", "chosen": "chosen", "rejected": "rejected"}}}
    (root / "data" / "dataset_info.json").write_text(json.dumps(info))
    return root


def lf_args(assets, out, **config):
    """What a LLaMA-Factory DPO YAML holds, as a dict."""
    args = dict(stage="dpo", do_train=True, model_name_or_path=str(assets / "model"), ref_model=str(assets / "ref"),
                finetuning_type="full", dataset="pairs", dataset_dir=str(assets / "data"), template="empty",
                cutoff_len=64, overwrite_cache=True, output_dir=str(out), overwrite_output_dir=True,
                per_device_train_batch_size=4, learning_rate=LEARNING_RATE, max_steps=3, logging_steps=1,
                save_strategy="no", report_to="none", seed=0, plot_loss=False, bf16=False)
    if config.get("finetuning_type") == "lora":
        args["ref_model"] = None  # LLaMA-Factory's LoRA reference: the policy with its adapter disabled
    args.update(config)
    return {k: v for k, v in args.items() if v is not None}


class Recorder(TrainerCallback):
    """Each step's gradients, the logged rows and the final weights of a run."""

    def __init__(self):
        self.grads, self.logs, self.weights = [], None, None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.logs = [h for h in state.log_history if "loss" in h]
        self.weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.dtype = next(model.parameters()).dtype


@pytest.fixture
def lf_calls(monkeypatch):
    """Counts calls of LLaMA-Factory's own log-prob function (its CustomDPOTrainer imported it by name)."""
    calls = {"n": 0}
    original = lf_trainer.get_batch_logps

    def spy(*args, **kwargs):
        calls["n"] += 1
        return original(*args, **kwargs)
    monkeypatch.setattr(lf_trainer, "get_batch_logps", spy)
    return calls


def train(assets, out, config, **patch_options):
    """A run_exp run, patched with ``patch_options`` unless None: its Recorder."""
    recorder = Recorder()
    if patch_options.pop("unpatched", False):
        run_exp(lf_args(assets, out, **config), callbacks=[recorder])
    else:
        with fdl.patched(**patch_options):
            run_exp(lf_args(assets, out, **config), callbacks=[recorder])
        assert not fdl.is_patched()
    assert recorder.dtype == torch.float32 and len(recorder.logs) == len(recorder.grads) == 3
    return recorder


def same_run(a, b):
    for step, (la, lb) in enumerate(zip(a.logs, b.logs)):
        assert set(la) == set(lb)
        for k in la:
            torch.testing.assert_close(la[k], lb[k], rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"step {step} {k}: {m}")
    for step, (ga, gb) in enumerate(zip(a.grads, b.grads)):
        assert ga.keys() == gb.keys()
        # step 0: the same weights, fp32 rounding (1e-5 of each tensor's largest entry); later steps start from
        # weights AdamW has moved apart by the rounding above (measured 1.4e-5 of the largest entry at step 2)
        scale = 1e-5 if step == 0 else 1e-4
        for k in ga:
            torch.testing.assert_close(ga[k], gb[k], rtol=1e-4, atol=scale * gb[k].abs().max().item(),
                                       msg=lambda m, k=k: f"step {step} grad {k}: {m}")
    for k in b.weights:
        torch.testing.assert_close(a.weights[k], b.weights[k], rtol=1e-4,
                                   atol=1e-5 * max(1.0, b.weights[k].abs().max().item()) + 0.05 * LEARNING_RATE,
                                   msg=lambda m, k=k: f"weight {k}: {m}")


_REFERENCE = {}


def reference_run(assets, tmp_path, config, lf_calls):
    """LLaMA-Factory's own run of ``config`` (once per config: the fused-linear and logits tests share it)."""
    key = _id(config)
    if key not in _REFERENCE:
        lf_calls["n"] = 0
        _REFERENCE[key] = train(assets, tmp_path / "lf", config, unpatched=True)
        assert lf_calls["n"] > 0
        last = _REFERENCE[key].logs[-1]
        assert abs(last["rewards/margins"]) > 1e-3 and abs(last["loss"]) > 1e-3  # not a comparison of zeros
        if config.get("pref_loss") == "orpo":
            assert {"sft_loss", "odds_ratio_loss"} <= set(last)
    return _REFERENCE[key]


def patched_run(assets, tmp_path, config, lf_calls, path, **options):
    lf_calls["n"] = 0
    before = dict(fdl.calls)
    run = train(assets, tmp_path / "fastdpo", config, **options)
    assert lf_calls["n"] == 0, "LLaMA-Factory's get_batch_logps ran while patched"
    forwards = 3 * (1 if config.get("pref_loss") in ("orpo", "simpo") else 2)  # policy (+ reference) per step
    assert fdl.calls[path] - before.get(path, 0) == forwards
    return run


@pytest.mark.parametrize("config", MATRIX + EXTRA, ids=_id)
def test_fused_linear_path_equals_llamafactory(assets, tmp_path, lf_calls, config):
    reference = reference_run(assets, tmp_path, config, lf_calls)
    same_run(patched_run(assets, tmp_path, config, lf_calls, "linear"), reference)


LOGITS_CONFIGS = ([dict(**loss, pref_ftx=0.5) for loss in PREF_LOSSES]
                  + [dict(pref_loss="sigmoid", **LORA), dict(pref_loss="orpo", **LORA)] + EXTRA[:3])


@pytest.mark.parametrize("config", LOGITS_CONFIGS, ids=_id)
def test_logits_path_equals_llamafactory(assets, tmp_path, lf_calls, config):
    """``patch(fused_linear=False)``: the model's logits through ``fastdpo.sequence_logps`` (dlogits in place)."""
    reference = reference_run(assets, tmp_path, config, lf_calls)
    same_run(patched_run(assets, tmp_path, config, lf_calls, "logits", fused_linear=False), reference)


@pytest.mark.parametrize("fused_linear", [True, False], ids=["linear", "logits"])
def test_triton_kernels_equal_llamafactory(assets, tmp_path, lf_calls, monkeypatch, fused_linear):
    """The same runs on fastdpo's Triton kernels (interpreted on CPU) in place of its PyTorch path."""
    config = dict(pref_loss="ipo", pref_ftx=0.5, ld_alpha=0.3)
    reference = reference_run(assets, tmp_path, config, lf_calls)
    monkeypatch.setenv("FASTDPO_BACKEND", "triton")
    path = "linear" if fused_linear else "logits"
    same_run(patched_run(assets, tmp_path, config, lf_calls, path, fused_linear=fused_linear), reference)


def test_lm_head_adapter_falls_back_to_the_logits_path_logged(assets, tmp_path, lf_calls, monkeypatch, caplog):
    """LoRA with ``additional_target: lm_head`` (PEFT wraps the head): the fused-linear path would skip the wrapper,
    so the logits path runs, with a logged reason; the run is LLaMA-Factory's."""
    config = dict(pref_loss="sigmoid", additional_target="lm_head", **LORA)
    reference = reference_run(assets, tmp_path, config, lf_calls)
    monkeypatch.setattr(fdl, "_logged", set())
    with caplog.at_level(logging.WARNING, logger=fdl.__name__):
        run = patched_run(assets, tmp_path, config, lf_calls, "logits")
    assert any("logits path" in r.getMessage() and "LM head" in r.getMessage() for r in caplog.records)
    same_run(run, reference)


def test_yaml_run_through_the_command_line(assets, tmp_path, lf_calls, monkeypatch):
    """``python -m fastdpo.integrations.llamafactory train config.yaml`` (here its ``main``, in this process): the
    YAML read by LLaMA-Factory, trained through fastdpo, the same logged losses as LLaMA-Factory's own run."""
    import yaml

    config = dict(pref_loss="sigmoid", pref_ftx=0.5)
    reference = reference_run(assets, tmp_path, config, lf_calls)
    path = tmp_path / "dpo.yaml"
    path.write_text(yaml.safe_dump(lf_args(assets, tmp_path / "cli", **config)))
    monkeypatch.delenv("FORCE_TORCHRUN", raising=False)
    lf_calls["n"] = 0
    before = fdl.calls["linear"]
    try:
        assert fdl.main(["train", str(path)]) == 0
    finally:
        fdl.unpatch()
    assert lf_calls["n"] == 0 and fdl.calls["linear"] - before == 6
    logged = [json.loads(line) for line in (tmp_path / "cli" / "trainer_log.jsonl").read_text().splitlines()]
    losses = [row["loss"] for row in logged if "loss" in row]
    torch.testing.assert_close(losses, [row["loss"] for row in reference.logs], rtol=1e-4, atol=1e-6)


def test_command_line_refuses_what_it_would_not_patch(monkeypatch, capsys):
    assert fdl.main([]) == 2 and "usage" in capsys.readouterr().err
    monkeypatch.setenv("FORCE_TORCHRUN", "1")
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert fdl.main(["train", "x.yaml"]) == 2 and "torchrun" in capsys.readouterr().err
    monkeypatch.setenv("USE_V1", "1")
    assert fdl.main(["train", "x.yaml"]) == 2 and "USE_V1" in capsys.readouterr().err
    assert not fdl.is_patched()


def test_patch_unpatch_and_options():
    original = lf_trainer.CustomDPOTrainer.concatenated_forward
    fdl.patch()
    fdl.patch(inplace_backward=False)  # idempotent; the options change
    assert fdl.is_patched() and lf_trainer.CustomDPOTrainer.concatenated_forward is fdl.concatenated_forward
    assert fdl._OPTIONS["inplace_backward"] is False
    fdl.unpatch()
    assert lf_trainer.CustomDPOTrainer.concatenated_forward is original and not fdl.is_patched()
    with pytest.raises(TypeError, match="fused_linear"):
        fdl.patch(fused_linear="yes")
    with pytest.raises(TypeError, match="inplace_backward"):
        fdl.patch(inplace_backward=1)
    with pytest.raises(TypeError):
        fdl.patch(False)  # keyword-only
    assert not fdl.is_patched()


@pytest.mark.parametrize("version", ["0.9.3", "0.9.6", "0.10.0"])
def test_unsupported_llamafactory_version_is_named(monkeypatch, version):
    real = fdl.metadata.version
    monkeypatch.setattr(fdl.metadata, "version", lambda name: version if name == "llamafactory" else real(name))
    with pytest.raises(RuntimeError, match=version.replace(".", r"\.")):
        fdl.patch()
    assert not fdl.is_patched()


def test_encoder_decoder_runs_llamafactory_own_code(monkeypatch, caplog):
    """The one case fastdpo hands back whole: LLaMA-Factory's concatenated_forward runs, logged."""
    seen = []
    monkeypatch.setattr(fdl, "_ORIGINAL", lambda *args: seen.append(args) or "theirs")
    monkeypatch.setattr(fdl, "_logged", set())
    trainer = type("T", (), {"is_encoder_decoder": True})()
    with caplog.at_level(logging.WARNING, logger=fdl.__name__):
        assert fdl.concatenated_forward(trainer, "model", {"x": 1}, True) == "theirs"
    assert seen == [(trainer, "model", {"x": 1}, True)] and "encoder-decoder" in caplog.text


def test_importing_fastdpo_does_not_import_llamafactory(tmp_path):
    code = ("import sys, fastdpo, fastdpo.integrations.llamafactory; "
            "assert 'llamafactory' not in sys.modules and 'trl' not in sys.modules, sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True, env=dict(os.environ, PYTHONPATH=""), cwd=tmp_path)


def test_wrappers_other_than_ddp_and_peft_take_the_logits_path():
    """A wrapper that forwards attribute look-ups to the model (as DeepSpeed's engine does) would hand
    policy_logps the wrapper: the fused-linear path is refused with the wrapper named."""
    class Engine(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

        def __getattr__(self, name):
            try:
                return super().__getattr__(name)
            except AttributeError:
                return getattr(self.module, name)
    model = tiny_llama(len(tiny_tokenizer()))
    trainer = type("T", (), {"is_fsdp_enabled": False})()
    batch = {"input_ids": None, "attention_mask": None}
    assert fdl._linear_blocker(trainer, model, batch) is None
    assert "Engine" in fdl._linear_blocker(trainer, Engine(model), batch)
    assert "token_type_ids" in fdl._linear_blocker(trainer, model, dict(batch, token_type_ids=None))
