"""Bugs a review of the kernels, the fused linear and the packed ops found (each test failed before its fix):
mixed dtypes under autocast reaching an fp32-accumulating GEMM, lean gradients under CUDA-graph capture, the chunk
chosen while torch.compile traces (CUDA queries that stop tracing on a GPU), offsets no host check sees (a GPU's
cu_seqlens) giving plausible numbers, an input refused on one rank of a vocabulary-parallel call leaving the others
in the agreement collective, in-place backward into overlapping logits, and a batch without completion tokens."""

import pytest
import torch
import torch.distributed as dist

import fastdpo
from fastdpo import _checks, _linear
from dist_utils import run_ranks

B, T, H, V = 2, 8, 8, 40


def inputs(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2 * B, T, H, generator=g).to(dtype)
    weight = torch.randn(V, H, generator=g).to(dtype)
    labels = torch.randint(0, V, (2 * B, T), generator=g)
    labels[:, :2] = -100
    return hidden, weight, labels


@pytest.mark.parametrize("lean", [False, True])
def test_autocast_accumulations_get_one_dtype(backend, monkeypatch, lean):
    """Under autocast with an fp32 head the chunk's logits (and dlogits) come out bf16 while the hidden rows stay
    fp32; every fp32-accumulating GEMM must get inputs of one dtype (on CUDA ``addmm(out_dtype=)`` refuses mixed
    ones), and the result must equal the bf16 GEMMs' within bf16 rounding."""
    seen = []
    gemm = _linear._gemm_into

    def spy(out, a, b):
        seen.append((a.dtype, b.dtype))
        return gemm(out, a, b)
    monkeypatch.setattr(_linear, "_gemm_into", spy)
    hidden, weight, labels = inputs()
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fastdpo.linear_dpo_loss(h, w, labels, chunk_bytes=6 * V * 4, lean=lean)
    out.loss.backward()
    assert seen and all(a == b for a, b in seen), seen
    assert torch.isfinite(h.grad).all() and torch.isfinite(w.grad).all()


@pytest.mark.parametrize("op", ["linear_dpo_loss", "linear_sequence_logps"])
def test_lean_gradients_under_capture(backend, monkeypatch, op):
    """While a CUDA graph is captured every row goes through the head; in lean mode the prompt and padding rows
    must still score nothing (they once got -coef * exp(z) as gradient)."""
    monkeypatch.setenv("FASTDPO_CHECK_LABELS", "0")
    hidden, weight, labels = inputs(seed=1)
    runs = []
    for capture in (False, True):
        monkeypatch.setattr(_linear, "capturing", lambda labels, _c=capture: _c)
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        if op == "linear_dpo_loss":
            loss = fastdpo.linear_dpo_loss(h, w, labels, lean=True).loss
        else:
            loss = (fastdpo.linear_sequence_logps(h, w, labels, lean=True).logps * torch.arange(1.0, 5.0)).sum()
        loss.backward()
        runs.append((loss.detach(), h.grad, w.grad))
    for a, b in zip(*runs):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_chunk_is_chosen_inside_the_op_not_while_tracing(monkeypatch):
    """The chunk size is picked inside the custom op, at run time: on a GPU it queries the allocator and whether a
    graph is being captured, calls torch.compile cannot trace (they return no tensor)."""
    torch._dynamo.reset()
    chunk_rows = _linear.chunk_rows

    def guarded(*args, **kwargs):
        assert not torch.compiler.is_compiling(), "the chunk size was chosen while tracing"
        return chunk_rows(*args, **kwargs)
    monkeypatch.setattr(_linear, "chunk_rows", guarded)
    hidden, weight, labels = inputs(seed=2)

    def loss_fn(h, w):
        return fastdpo.linear_dpo_loss(h, w, labels).loss
    h = hidden.clone().requires_grad_()
    loss = torch.compile(loss_fn, fullgraph=True)(h, weight)
    loss.backward()
    assert torch.isfinite(h.grad).all()


@pytest.mark.parametrize("op", ["dpo_loss", "dpo_loss_ld", "linear_sequence_logps", "linear_dpo_loss"])
def test_untrusted_offsets_never_give_plausible_numbers(backend, monkeypatch, op):
    """cu_seqlens whose values no host check reads (as on a GPU, simulated by switching the CPU check off): NaN in
    what they touch, or a ValueError where the call reads the counts to the host anyway (the fused linear); never a
    finite loss from a decreasing offset."""
    monkeypatch.setattr(_checks, "_check_cu_values", lambda cu, total: None)
    total = 16
    g = torch.Generator().manual_seed(3)
    logits, hidden, weight = torch.randn(total, V, generator=g), torch.randn(total, H, generator=g), \
        torch.randn(V, H, generator=g)
    labels = torch.randint(0, V, (total,), generator=g)
    cu = torch.tensor([0, 8, 4, 12, 16])  # decreasing
    if op.startswith("linear"):
        with pytest.raises(ValueError, match="cu_seqlens"):
            if op == "linear_dpo_loss":
                fastdpo.linear_dpo_loss(hidden, weight, labels, cu_seqlens=cu)
            else:
                fastdpo.linear_sequence_logps(hidden, weight, labels, cu_seqlens=cu)
        return
    out = fastdpo.dpo_loss(logits, labels, cu_seqlens=cu, **(dict(ld_alpha=0.5) if op == "dpo_loss_ld" else {}))
    assert torch.isnan(out.loss)


def _refused(rank, world):
    """An input refused on one rank only (here its cu_seqlens values): every rank raises, none waits."""
    group = dist.group.WORLD
    total, Vp = 12, 5
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(total, Vp * world, generator=g)
    labels = torch.randint(0, Vp * world, (total,), generator=g)
    cu = torch.tensor([0, 6, 12]) if rank == 0 else torch.tensor([0, 7, 6])
    with pytest.raises(ValueError):
        fastdpo.dpo_loss(logits[:, rank * Vp:(rank + 1) * Vp], labels, cu_seqlens=cu, process_group=group)
    ref = torch.zeros(1) if rank == 0 else torch.zeros(2)  # a reference of the wrong shape on one rank
    with pytest.raises(ValueError):
        fastdpo.dpo_loss(logits[None, :, rank * Vp:(rank + 1) * Vp].expand(2, total, Vp), labels[None].expand(2, total),
                         ref, ref, process_group=group)
    hidden, weight = torch.randn(2, 6, 4, generator=g), torch.randn(Vp, 4, generator=g)
    lab = torch.randint(0, Vp * world, (2, 6), generator=g)
    with pytest.raises(ValueError):
        fastdpo.linear_dpo_loss(hidden, weight, lab, ref, ref, process_group=group)
    # the group still works
    out = fastdpo.dpo_loss(logits[:, rank * Vp:(rank + 1) * Vp], labels, cu_seqlens=torch.tensor([0, 6, 12]),
                           process_group=group)
    assert torch.isfinite(out.loss)


def test_an_input_refused_on_one_rank_hangs_no_other():
    run_ranks(_refused, 2, timeout=300)


def test_inplace_backward_into_overlapping_logits_is_refused(backend):
    """An expanded (overlapping) logits tensor cannot take its own gradient: refused before any kernel runs."""
    g = torch.Generator().manual_seed(5)
    row = torch.randn(1, 6, 47, generator=g)
    labels = torch.randint(0, 47, (3, 6), generator=g)
    with pytest.raises(ValueError, match="inplace_backward"):
        fastdpo.sequence_logps(row.expand(3, 6, 47), labels, inplace_backward=True)
    with pytest.raises(ValueError, match="inplace_backward"):
        fastdpo.dpo_loss(row.expand(2, 6, 47), labels[:2], inplace_backward=True)


@pytest.mark.parametrize("case", ["T=1", "all masked"])
@pytest.mark.parametrize("lean", [False, True])
def test_fused_linear_without_completion_tokens(backend, case, lean):
    """No completion token at all (T = 1 with shift, or every label masked): the loss of empty sequences and zero
    gradients, as the logits path gives."""
    g = torch.Generator().manual_seed(6)
    Tc = 1 if case == "T=1" else 5
    hidden = torch.randn(2, Tc, 4, generator=g, requires_grad=True)
    weight = torch.randn(7, 4, generator=g, requires_grad=True)
    labels = torch.randint(0, 7, (2, Tc), generator=g) if case == "T=1" else torch.full((2, Tc), -100)
    out = fastdpo.linear_dpo_loss(hidden, weight, labels, lean=lean)
    ref = fastdpo.dpo_loss(hidden @ weight.t(), labels)
    torch.testing.assert_close(out.loss, ref.loss)
    out.loss.backward()
    assert (hidden.grad == 0).all() and (weight.grad == 0).all()
    lp = fastdpo.linear_sequence_logps(hidden.detach().requires_grad_(), weight, labels, lean=lean)
    assert (lp.logps == 0).all() and (lp.num_tokens == 0).all()
