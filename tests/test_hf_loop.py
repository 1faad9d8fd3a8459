"""policy_logps: a Hugging Face causal LM's per-sequence log-probs without its logits, and a DPO step with it."""

import pytest
import torch

pytest.importorskip("transformers")

import fastdpo  # noqa: E402
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


def test_softcap_config_is_read(backend):
    model = tiny_llama(64, seed=1)
    model.config.final_logit_softcapping = 3.0  # read like Gemma's, as TRL's fused head does
    ids = torch.randint(3, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    out = fastdpo.policy_logps(model, ids, None, ids)
    with torch.no_grad():
        z = model(input_ids=ids).logits
    ref = fastdpo.sequence_logps(3.0 * torch.tanh(z / 3.0), ids)
    torch.testing.assert_close(out.logps, ref.logps, rtol=1e-5, atol=1e-4)
