"""The fused linear as training uses it: gradients only for the inputs that need one (a frozen LM head, as with
LoRA, costs no weight-gradient GEMM and no accumulator; ``no_grad`` costs the forward GEMM alone), as
``torch.library`` custom ops under ``torch.compile(fullgraph=True)``, a second backward with ``retain_graph``,
chunks that are a function of the shapes, lean vocabulary tiles of whole 128-column multiples, and the rows a
CUDA graph capture takes without a host read.

GEMM work is counted with ``torch.utils.flop_counter`` inside the custom ops (``inline_custom_ops``: through the op
boundary a dispatch mode sees one opaque call), in units of one M x H x V GEMM (2 M H V FLOPs, M completion
tokens); what a call allocates is recorded by a dispatch mode on every op's outputs.
"""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import fastdpo
from fastdpo import _linear
from helpers import Allocations, HostReads, inline_custom_ops

B, T, H, V = 3, 10, 16, 300

# The weight gradient accumulates with an in-place addmm_ (a GEMM like any other), which the FLOP counter's
# formulas do not list: counted as addmm.
try:
    from torch.utils.flop_counter import addmm_flop, register_flop_formula
    register_flop_formula(torch.ops.aten.addmm_, get_raw=True)(addmm_flop)  # (addmm_flop is wrapped already)
except (ImportError, RuntimeError):  # already registered (a torch that counts it)
    pass


def inputs(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2 * B, T, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) / 2).to(dtype)
    bias = (torch.randn(V, generator=g) / 4).to(dtype)
    labels = torch.randint(0, V, (2 * B, T), generator=g)
    labels[:, :3] = -100
    labels[1, 7:] = -100
    ref_c, ref_r = -40 + torch.randn(B, generator=g), -40 + torch.randn(B, generator=g)
    return hidden, weight, bias, labels, ref_c, ref_r


def completion_tokens(labels):
    return int((labels[:, 1:] != -100).sum())


def _call(op, h, w, b, labels, ref_c, ref_r, **kw):
    if op == "linear_dpo_loss":
        return fastdpo.linear_dpo_loss(h, w, labels, ref_c, ref_r, b, **kw).loss
    return (fastdpo.linear_sequence_logps(h, w, labels, b, **kw).logps * torch.linspace(-1, 1, 2 * B)).sum()


# (op, lean) -> GEMMs with (hidden, head) trainable / head frozen / hidden frozen / nothing (no_grad)
GEMMS = {("linear_dpo_loss", False): (3, 2, 2, 1), ("linear_dpo_loss", True): (4, 3, 3, 1),
         ("linear_sequence_logps", False): (4, 3, 3, 1), ("linear_sequence_logps", True): (4, 3, 3, 1)}


@pytest.mark.parametrize("op,lean", list(GEMMS))
def test_gradients_only_for_what_requires_them(backend, monkeypatch, op, lean):
    """GEMM FLOPs and allocations per case; the gradients that are computed equal the all-trainable run's."""
    inline_custom_ops(monkeypatch)
    hidden, weight, bias, labels, ref_c, ref_r = inputs()
    M = completion_tokens(labels)
    unit = 2 * M * H * V
    kw = dict(chunk_bytes=14 * V * 4, lean=lean)  # 14-row chunks: every pair (14 rows at most) fits: grouped
    expected = dict(zip(("all", "frozen_head", "frozen_hidden", "no_grad"), GEMMS[(op, lean)]))
    grads = {}
    for case, gemms in expected.items():
        h = hidden.clone().requires_grad_(case in ("all", "frozen_head"))
        w = weight.clone().requires_grad_(case in ("all", "frozen_hidden"))
        b = bias.clone().requires_grad_(case in ("all", "frozen_hidden"))
        with FlopCounterMode(display=False) as flops, Allocations() as spy:
            with torch.no_grad() if case == "no_grad" else torch.enable_grad():
                loss = _call(op, h, w, b, labels, ref_c, ref_r, **kw)
            if loss.requires_grad:
                loss.backward()
        assert flops.get_total_flops() == gemms * unit, (case, flops.get_total_flops() / unit)
        head_sized = V * H in spy.sizes()
        assert head_sized == (case in ("all", "frozen_hidden")), (case, "a V x H tensor" if head_sized else "none")
        hidden_grad_sized = 2 * B * T * H in spy.sizes()
        assert hidden_grad_sized == (case in ("all", "frozen_head")), case
        assert (h.grad is None) == (case not in ("all", "frozen_head"))
        assert (w.grad is None) == (case not in ("all", "frozen_hidden")) and (b.grad is None) == (w.grad is None)
        grads[case] = (h.grad, w.grad, b.grad)
    torch.testing.assert_close(grads["frozen_head"][0], grads["all"][0], rtol=0, atol=0)
    for got, want in zip(grads["frozen_hidden"][1:], grads["all"][1:]):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("op", ["linear_dpo_loss", "linear_sequence_logps"])
def test_second_backward_with_retain_graph(backend, op):
    """``backward(retain_graph=True)`` twice: the second adds the same gradients again (the saved gradients are
    scaled out of place, never in place)."""
    hidden, weight, bias, labels, ref_c, ref_r = inputs(seed=1)
    h, w, b = (t.clone().requires_grad_() for t in (hidden, weight, bias))
    loss = _call(op, h, w, b, labels, ref_c, ref_r, chunk_bytes=8 * V * 4)
    loss.backward(retain_graph=True)
    first = [t.grad.clone() for t in (h, w, b)]
    (2.0 * loss).backward()  # a different upstream gradient, on the same graph
    for t, g in zip((h, w, b), first):
        torch.testing.assert_close(t.grad, 3 * g, rtol=1e-6, atol=1e-7)


def _compiled_step(op, lean):
    def step(h, w, b, labels, ref_c, ref_r):
        loss = _call(op, h, w, b, labels, ref_c, ref_r, chunk_bytes=8 * V * 4, lean=lean)
        return loss
    return step


@pytest.mark.parametrize("op", ["linear_dpo_loss", "linear_sequence_logps"])
@pytest.mark.parametrize("frozen_head", [False, True])
def test_torch_compile_fullgraph(backend, op, frozen_head):
    """``torch.compile(fullgraph=True)`` of a forward and backward through the fused linear: no graph break (the
    ops are custom ops with fake implementations; the host read of the token counts happens inside the op, at
    run time), and the results of eager."""
    torch._dynamo.reset()
    hidden, weight, bias, labels, ref_c, ref_r = inputs(seed=2)
    runs = []
    for compiled in (False, True):
        h, w, b = hidden.clone().requires_grad_(), weight.clone().requires_grad_(not frozen_head), bias.clone()
        step = _compiled_step(op, False)
        fn = torch.compile(step, fullgraph=True) if compiled else step
        loss = fn(h, w, b, labels, ref_c, ref_r)
        loss.backward()
        runs.append((loss.detach(), h.grad, w.grad))
    (l0, h0, w0), (l1, h1, w1) = runs
    torch.testing.assert_close(l1, l0, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(h1, h0, rtol=1e-6, atol=1e-7)
    assert (w0 is None) == (w1 is None) == frozen_head
    if w0 is not None:
        torch.testing.assert_close(w1, w0, rtol=1e-6, atol=1e-7)


def test_default_chunk_is_a_function_of_the_shapes(monkeypatch):
    """On a GPU the default chunk depends on the vocabulary, the dtype and the device's size, not on the memory
    free at the call (a training loop that filled torch's cache gets the chunking, hence the bits, of a fresh
    process); only a chunk that cannot fit in what the allocator can still give is halved, with a warning."""
    GiB = 2 ** 30

    class Props:
        total_memory = 80 * GiB
    state = {"free": 60 * GiB, "reserved": 0, "allocated": 0}
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: Props())
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d: (state["free"], 80 * GiB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda d: state["reserved"])
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda d: state["allocated"])
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda d: state.get("fraction", 1.0))
    dev = torch.device("cuda", 0)
    kw = dict(softcap=False, lean=False, chunk_bytes=None)
    fresh = _linear.chunk_rows(dev, 128256, 2, **kw)
    assert fresh == _linear.DEFAULT_CHUNK_TOKENS
    # deep in a loop: the driver has 1 GiB free, the caching allocator holds 40 GiB of which 38 unused
    state.update(free=1 * GiB, reserved=40 * GiB, allocated=2 * GiB)
    assert _linear.chunk_rows(dev, 128256, 2, **kw) == fresh
    assert _linear.chunk_rows(dev, 128256, 2, softcap=False, lean=True, chunk_bytes=None) == fresh // 2
    # a small card: at most 1/16 of its memory, at least 128 MiB
    Props.total_memory = 8 * GiB
    assert _linear.chunk_rows(dev, 128256, 2, **kw) == (8 * GiB // 16) // (128256 * 2)
    # nothing left to give: halved until it fits, and said
    Props.total_memory = 80 * GiB
    state.update(free=100 * 2 ** 20, reserved=0, allocated=0)
    with pytest.warns(RuntimeWarning, match="does not fit"):
        small = _linear.chunk_rows(dev, 128256, 2, **kw)
    assert small * 128256 * 2 <= 100 * 2 ** 20 and small > 0
    # a process held to 1% of the card (set_per_process_memory_fraction): its share is what can be given
    state.update(free=60 * GiB, fraction=0.01)
    with pytest.warns(RuntimeWarning, match="does not fit"):
        capped = _linear.chunk_rows(dev, 128256, 2, **kw)
    assert capped * 128256 * 2 <= 0.01 * 80 * GiB


def test_lean_tiles_are_multiples_of_128_columns(monkeypatch):
    widths = []
    tile_logits = _linear.Head.tile_logits

    def spy(self, h, v0, v1):
        widths.append(v1 - v0)
        return tile_logits(self, h, v0, v1)
    monkeypatch.setattr(_linear.Head, "tile_logits", spy)
    hidden, weight, bias, labels, ref_c, ref_r = inputs(seed=3)
    Vb = 1000
    w = torch.randn(Vb, H).requires_grad_()
    lab = labels.clamp(max=Vb - 1)
    for chunk_bytes in (7 * Vb * 4, 40 * Vb * 4, 10 ** 7):
        widths.clear()
        fastdpo.linear_dpo_loss(hidden.requires_grad_(), w, lab, ref_c, ref_r, lean=True,
                                chunk_bytes=chunk_bytes).loss.backward()
        assert widths and all(x % 128 == 0 for x in widths[:-1]) and sum(widths) == Vb, widths


@pytest.mark.parametrize("op", ["linear_dpo_loss", "linear_sequence_logps"])
def test_rows_under_cuda_graph_capture_need_no_host_read(monkeypatch, op):
    """While a CUDA graph is captured (simulated here; the GPU lane captures a real one) every row goes through
    the head, prompt and padding ones scoring nothing: no host read at all on the kernels' path (what runs on
    CUDA), the same results within fp32 rounding (other GEMM shapes and chunk boundaries)."""
    monkeypatch.setenv("FASTDPO_BACKEND", "triton")
    monkeypatch.setenv("FASTDPO_CHECK_LABELS", "0")
    hidden, weight, bias, labels, ref_c, ref_r = inputs(seed=4)
    runs = []
    for capture in (False, True):
        monkeypatch.setattr(_linear, "capturing", lambda labels, _c=capture: _c)
        h, w, b = (t.clone().requires_grad_() for t in (hidden, weight, bias))
        with HostReads(monkeypatch) as spy:
            loss = _call(op, h, w, b, labels, ref_c, ref_r, chunk_bytes=8 * V * 4)
            loss.backward()
        runs.append((loss.detach(), h.grad, w.grad, b.grad, list(spy.reads)))
    assert runs[1][4] == [] and runs[0][4] != []
    for a, c in zip(runs[0][:4], runs[1][:4]):
        torch.testing.assert_close(c, a, rtol=1e-5, atol=1e-6)
