"""conftest's speed-up of Triton's interpreter (tests/interpreter_patch_once.py) is in place, skips the repeated
patching of ``triton.language`` inside a launch, and changes no result: fastdpo's kernels give the same bits with
the interpreter as shipped."""

import torch

import fastdpo
import interpreter_patch_once


def _run():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 7, 300, generator=g).requires_grad_()
    labels = torch.randint(0, 300, (4, 7), generator=g)
    labels[:, :2] = -100
    ref = torch.randn(2, generator=g) - 20
    out = fastdpo.dpo_loss(logits, labels, ref, ref + 1, loss_type=["sigmoid", "sft"])
    out.loss.backward()
    return out.loss.detach(), out.metrics["rewards/margins"], logits.grad


def test_same_bits_as_the_shipped_interpreter(monkeypatch):
    monkeypatch.setenv("FASTDPO_BACKEND", "triton")
    assert interpreter_patch_once.install()  # this Triton's interpreter has the layout the speed-up expects
    before = interpreter_patch_once.skipped()
    fast = _run()
    assert interpreter_patch_once.skipped() > before  # the kernels' helper calls were spared the patching
    with interpreter_patch_once.disabled():
        before = interpreter_patch_once.skipped()
        shipped = _run()
        assert interpreter_patch_once.skipped() == before
    for a, b in zip(fast, shipped):
        assert torch.equal(a, b)

