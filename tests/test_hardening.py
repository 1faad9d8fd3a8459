"""torch.compile, autocast, no_grad, gradient accumulation, NaN isolation and bad input across the public ops."""

import pytest
import torch

import fastdpo
from fastdpo.linear import linear_dpo_loss, linear_sequence_logps


def batch(B=2, T=8, V=120, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2 * B, T, V, generator=g) * 2
    labels = torch.randint(0, V, (2 * B, T), generator=g)
    labels[:, :3] = -100
    return logits, labels, -30 + torch.randn(B, generator=g), -30 + torch.randn(B, generator=g)


def _compiled_equals_eager(step, *args):
    x1 = args[0].clone().requires_grad_(True)
    eager = step(x1, *args[1:])
    eager[0].backward()
    x2 = args[0].clone().requires_grad_(True)
    compiled = torch.compile(step, fullgraph=True)(x2, *args[1:])  # fullgraph: a graph break is an error
    compiled[0].backward()
    # fastdpo's ops are opaque to the compiler: their outputs are eager's, bit for bit. The plain torch arithmetic
    # around them (per-row coefficients, metrics such as the mean reward margin) is fused by Inductor and may
    # round differently in the last bit: the gradient is held to fp32 rounding.
    assert torch.equal(eager[0].detach(), compiled[0].detach())
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-6, atol=1e-9)
    for a, b in zip(eager[1:], compiled[1:]):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-6, atol=1e-7)


def test_torch_compile_fullgraph_dpo_loss(backend):
    torch._dynamo.reset()
    logits, labels, ref_c, ref_r = batch()

    def step(x, labels, ref_c, ref_r):
        out = fastdpo.dpo_loss(x, labels, ref_c, ref_r, beta=0.1, loss_type=["sigmoid", "sft"])
        return out.loss, out.metrics["rewards/margins"], out.chosen_logps
    _compiled_equals_eager(step, logits, labels, ref_c, ref_r)


def test_torch_compile_fullgraph_sequence_logps_inplace():
    torch._dynamo.reset()
    logits, labels, _, _ = batch(seed=1)

    def step(x, labels):
        out = fastdpo.sequence_logps(x * 1.0, labels, average=True, return_token_logps=True)
        return out.logps.sum() + out.token_logps.sum(), out.num_tokens
    _compiled_equals_eager(step, logits, labels)


def test_autocast_bf16(backend):
    """Under CPU autocast the logits ops compute as without it (fp32 internally); the fused-linear GEMM runs
    in bf16 like every autocast matmul, so it matches the logits path of the bf16-rounded logits loosely."""
    logits, labels, ref_c, ref_r = batch(seed=2)
    plain = fastdpo.dpo_loss(logits, labels, ref_c, ref_r)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = fastdpo.dpo_loss(logits, labels, ref_c, ref_r)
        auto_bf16 = fastdpo.dpo_loss(logits.bfloat16(), labels, ref_c, ref_r)
    assert torch.equal(plain.loss, auto.loss)
    ref16 = fastdpo.dpo_loss(logits.bfloat16(), labels, ref_c, ref_r)
    assert torch.equal(ref16.loss, auto_bf16.loss)
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(4, 8, 16, generator=g)
    weight = torch.randn(120, 16, generator=g) / 4
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lin = linear_sequence_logps(hidden, weight, labels)
    ref = fastdpo.sequence_logps(hidden @ weight.t(), labels)
    torch.testing.assert_close(lin.logps, ref.logps, rtol=2e-2, atol=0.1)


def test_gradient_accumulation(backend):
    """Repeated backward of separate calls adds up, as autograd promises (no state shared between calls)."""
    logits, labels, ref_c, ref_r = batch(seed=4)
    x = logits.clone().requires_grad_(True)
    fastdpo.dpo_loss(x, labels, ref_c, ref_r).loss.backward()
    fastdpo.dpo_loss(x, labels, ref_c, ref_r, loss_type="ipo").loss.backward()
    y1, y2 = logits.clone().requires_grad_(True), logits.clone().requires_grad_(True)
    fastdpo.dpo_loss(y1, labels, ref_c, ref_r).loss.backward()
    fastdpo.dpo_loss(y2, labels, ref_c, ref_r, loss_type="ipo").loss.backward()
    torch.testing.assert_close(x.grad, y1.grad + y2.grad, rtol=1e-6, atol=1e-9)


def test_no_grad_keeps_no_graph(backend):
    logits, labels, ref_c, ref_r = batch(seed=5)
    x = logits.clone().requires_grad_(True)
    with torch.no_grad():
        out = fastdpo.dpo_loss(x, labels, ref_c, ref_r)
        lin = linear_dpo_loss(torch.randn(4, 8, 16), torch.randn(120, 16), labels, ref_c, ref_r)
    assert out.loss.grad_fn is None and lin.loss.grad_fn is None


def test_nan_isolated_to_its_sequence(backend):
    logits, labels, ref_c, ref_r = batch(seed=6)
    clean = fastdpo.dpo_loss(logits, labels, ref_c, ref_r)
    logits[1, 4, 7] = float("nan")  # an unmasked row of chosen sequence 1
    out = fastdpo.dpo_loss(logits, labels, ref_c, ref_r)
    assert torch.isnan(out.chosen_logps[1]) and torch.isnan(out.loss)
    assert torch.equal(out.chosen_logps[0], clean.chosen_logps[0])
    assert torch.equal(out.rejected_logps, clean.rejected_logps)


@pytest.mark.parametrize("call,exc,word", [
    (lambda l, y, c, r: fastdpo.dpo_loss(l[:0], y[:0]), ValueError, "B >= 1"),
    (lambda l, y, c, r: fastdpo.dpo_loss(l, y, c.to(torch.float64)[None], r), ValueError, "ref_chosen_logps"),
    (lambda l, y, c, r: fastdpo.dpo_loss(l, y, c, r, beta="0.1"), ValueError, "beta"),
    (lambda l, y, c, r: fastdpo.dpo_loss(l, y, c, r, config=fastdpo.DPOLossConfig(), beta=0.2), TypeError,
     "config"),
    (lambda l, y, c, r: fastdpo.sequence_logps(l, y, ignore_index=None), TypeError, "ignore_index"),
    (lambda l, y, c, r: fastdpo.sequence_logps(l.long(), y), TypeError, "logits"),
    (lambda l, y, c, r: fastdpo.dpo_loss(l, y.float(), c, r), TypeError, "labels"),
    (lambda l, y, c, r: linear_dpo_loss(l, torch.randn(5, 7), y, c, r), ValueError, "hidden size"),
])
def test_bad_input_named(call, exc, word):
    logits, labels, ref_c, ref_r = batch()
    with pytest.raises(exc, match=word):
        call(logits, labels, ref_c, ref_r)


def test_label_check_switch(monkeypatch, backend):
    """FASTDPO_CHECK_LABELS=0 skips the CPU label check: a bad label then gives NaN (never a read out of
    bounds), as on GPU."""
    logits, labels, _, _ = batch(seed=7)
    labels[0, 5] = 10_000
    with pytest.raises(ValueError, match="labels"):
        fastdpo.sequence_logps(logits, labels)
    monkeypatch.setenv("FASTDPO_CHECK_LABELS", "0")
    x = logits.clone().requires_grad_(True)
    out = fastdpo.sequence_logps(x, labels)
    assert torch.isnan(out.logps[0]) and torch.isfinite(out.logps[1:]).all()
    out.logps[1:].sum().backward()  # no crash in backward either; the other sequences' gradient is exact
    assert torch.isfinite(x.grad[1:]).all()


def test_cpu_chunking_does_not_change_bits(monkeypatch):
    """The PyTorch path's chunk size changes the schedule only: the same bits for any chunk size."""
    from fastdpo import _ops

    monkeypatch.setenv("FASTDPO_BACKEND", "torch")
    logits, labels, ref_c, ref_r = batch(B=3, T=20, V=3000, seed=8)
    results = []
    for elems in (3000, 7 * 3000, 1 << 20):
        monkeypatch.setattr(_ops, "_TORCH_CHUNK_ELEMS", elems)
        x = logits.clone().requires_grad_(True)
        out = fastdpo.dpo_loss(x, labels, ref_c, ref_r)
        out.loss.backward()
        results.append((out.loss, out.chosen_logps, out.metrics["entropy"], x.grad))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


@pytest.mark.parametrize("coef_dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_logps_backward_op_with_expanded_coefficient(backend, coef_dtype):
    """``torch.ops.fastdpo.logps_backward`` with a per-sequence coefficient broadcast over positions (stride 0) in
    another dtype than fp32: the kernel must read the fp32 copy through that copy's own strides (it once read it
    through the original's, off by up to 2.98)."""
    logits, labels, _, _ = batch()
    N, T, V = logits.shape
    token_logps, lse, _, _, _ = torch.ops.fastdpo.logps_forward(logits, labels, -100, True, False)
    per_seq = torch.linspace(-1.5, 2.0, N).to(coef_dtype)
    expanded = per_seq[:, None].expand(N, T)  # strides (1, 0)
    got = torch.ops.fastdpo.logps_backward(logits, labels, lse, expanded, -100, True)
    want = torch.ops.fastdpo.logps_backward(logits, labels, lse, expanded.float().contiguous(), -100, True)
    assert torch.equal(got, want)


def test_torch_backend_allocates_on_the_logits_device(monkeypatch):
    """The PyTorch path allocates every buffer on the logits' device: it once made a chunk buffer with
    ``torch.empty(shape, dtype=...)`` and no device, so CUDA half logits crashed (the GPU lane runs that case). On
    CPU every factory call made from fastdpo's code without a ``device`` is recorded."""
    import sys

    monkeypatch.setenv("FASTDPO_BACKEND", "torch")
    missing = []
    for name in ("empty", "zeros", "ones", "full", "arange", "tensor"):
        orig = getattr(torch, name)

        def factory(*args, _orig=orig, _name=name, **kwargs):
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if caller.startswith("fastdpo") and "device" not in kwargs:
                missing.append(f"{caller}: torch.{_name}")
            return _orig(*args, **kwargs)
        monkeypatch.setattr(torch, name, factory)
    logits, labels, ref_c, ref_r = batch()
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        x = logits.to(dtype).requires_grad_(True)
        fastdpo.dpo_loss(x, labels, ref_c, ref_r).loss.backward()
        fastdpo.sequence_logps(x, labels, return_token_stats=True).logps.sum().backward()
    assert not missing, sorted(set(missing))


def test_import_leaves_warning_filters_alone():
    """Importing fastdpo (and its kernels) must not change the user's global warning filters (its dependencies,
    imported first, may)."""
    import subprocess
    import sys
    code = ("import warnings, torch, triton, triton.language, numpy, sympy; before = list(warnings.filters); "
            "import fastdpo, fastdpo.kernels.logps, "
            "fastdpo.kernels.dpo_loss, fastdpo.linear, fastdpo.integrations.trl; "
            "assert list(warnings.filters) == before, [f for f in warnings.filters if f not in before]; print('ok')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
