"""conftest's speed-up of Triton's interpreter (tests/interpreter_patch_once.py) is in place, skips the repeated
patching of ``triton.language`` inside a launch, and changes no result: fastdpo's kernels give the same bits with
the interpreter as shipped."""

import pytest
import torch
import triton
import triton.language as tl

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




# a jit helper whose module binds neither triton.language nor triton.language.core, called from a kernel
_scope = {"triton": triton}
exec("def _helper(x):\n    return triton.language.maximum(x, 0.0)\n", _scope)
_helper = triton.jit(_scope["_helper"])


@triton.jit
def _calls_helper(x_ptr):
    offs = tl.arange(0, 4)
    tl.store(x_ptr + offs, _helper(tl.load(x_ptr + offs)))


def test_a_helper_that_sees_no_language_module_is_refused_as_shipped():
    """Triton's interpreter asserts that a jit function sees triton.language; the speed-up must not skip that
    check for a helper called inside a launch."""
    with pytest.raises(Exception, match="triton.language must be visible"):
        _calls_helper[(1,)](torch.zeros(4))
