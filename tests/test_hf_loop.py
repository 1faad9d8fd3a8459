"""policy_logps: a Hugging Face causal LM's per-sequence log-probs without its logits, and a DPO step with it."""

import pytest
import torch

pytest.importorskip("transformers")

import fastdpo  # noqa: E402
from fastdpo.naive import naive_sequence_logps  # noqa: E402
from trl_utils import tiny_llama  # noqa: E402


@pytest.mark.parametrize("tie", [False, True])
def test_policy_logps_equals_model_logits(backend, tie):
    model = tiny_llama(64, seed=0, tie=tie)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 64, (4, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :3] = -100
    out = fastdpo.policy_logps(model, ids, mask, labels)
    out.logps.sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    ref = fastdpo.sequence_logps(model(input_ids=ids, attention_mask=mask).logits, labels)
    ref.logps.sum().backward()
    torch.testing.assert_close(out.logps, ref.logps, rtol=1e-5, atol=1e-4)
    for a, (name, p) in zip(grads, model.named_parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-4, atol=1e-5 * max(1.0, p.grad.abs().max().item()),
                                   msg=lambda m, name=name: f"{name}: {m}")


def _lora(model, targets):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0))
    with torch.no_grad():  # LoRA's B starts at 0: make the adapters change the outputs
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.add_(0.1 * torch.randn_like(p))
    return peft_model


def test_policy_logps_peft_lora(backend):
    """A LoRA-wrapped model (real PEFT): the adapters' outputs and gradients, the frozen base gets none; with
    the adapters disabled (how TRL scores the reference of a PEFT policy) the base model's log-probs."""
    torch.manual_seed(0)
    model = _lora(tiny_llama(64, seed=2), ["q_proj", "v_proj", "down_proj"])
    ids = torch.randint(3, 64, (4, 9), generator=torch.Generator().manual_seed(2))
    labels = ids.clone()
    labels[:, :4] = -100
    out = fastdpo.policy_logps(model, ids, None, labels)
    out.logps.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all("lora_" in n for n in grads)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    model.zero_grad()
    ref = naive_sequence_logps(model(input_ids=ids).logits, labels, dtype=torch.float64)[0]
    ref.sum().backward()
    torch.testing.assert_close(out.logps.double(), ref, rtol=1e-5, atol=1e-4)
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-5 * p.grad.abs().max().item(),
                                       msg=lambda m, name=name: f"{name}: {m}")
    with torch.no_grad(), model.disable_adapter():
        base = fastdpo.policy_logps(model, ids, None, labels).logps
        base_ref = naive_sequence_logps(model.get_base_model()(input_ids=ids).logits, labels,
                                        dtype=torch.float64)[0]
    torch.testing.assert_close(base.double(), base_ref, rtol=1e-5, atol=1e-4)
    assert (base - out.logps.detach()).abs().max() > 1e-2  # the adapters mattered


def test_policy_logps_refuses_an_adapter_on_the_lm_head():
    model = _lora(tiny_llama(64, seed=3), ["lm_head"])
    ids = torch.randint(3, 64, (2, 5))
    with pytest.raises(TypeError, match="LM head"):
        fastdpo.policy_logps(model, ids, None, ids)


def test_softcap_config_is_read(backend):
    model = tiny_llama(64, seed=1)
    model.config.final_logit_softcapping = 3.0  # read like Gemma's, as TRL's fused head does
    ids = torch.randint(3, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    out = fastdpo.policy_logps(model, ids, None, ids)
    with torch.no_grad():
        z = model(input_ids=ids).logits
    ref = fastdpo.sequence_logps(3.0 * torch.tanh(z / 3.0), ids)
    torch.testing.assert_close(out.logps, ref.logps, rtol=1e-5, atol=1e-4)
