"""sequence_logps against a float64 evaluation of the textbook formula, on both backends.

Shapes: the vocabularies of real models (32000 Llama-2/Mistral, 50257 GPT-2, 128256 Llama-3, 151936 Qwen2),
degenerate ones (1, 2, 7: a tile far wider than the row), and 1000 (not a multiple of any block). The
interpreter costs ~1-2 ms per program and vocabulary block, so large vocabularies get few rows.
"""

import pytest
import torch

import fastdpo
from fastdpo import _ops
from helpers import assert_grad_close, logp_tol, reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def make_batch(N, T, V, dtype, mask="random", scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(N, T, V, generator=g) * scale).to(dtype)
    labels = torch.randint(0, V, (N, T), generator=g)
    if mask == "all":
        labels[:] = -100
    elif mask == "random":
        labels[torch.rand(N, T, generator=g) < 0.3] = -100
    elif mask == "prompt":  # prompt masked, then the completion, then right padding
        for n in range(N):
            p = int(torch.randint(0, T, (1,), generator=g))
            labels[n, :p] = -100
            labels[n, T - n % 2:] = -100
    else:
        assert mask == "none"
    return logits, labels


def check(logits, labels, *, shift=True, average=False, seed=1, device=None, **kw):
    """Forward and backward (through both outputs) against the float64 reference. ``device``: fastdpo runs on
    copies there (the GPU lane); ``logits`` may be a strided view (read in place when no device is given)."""
    N, T, V = logits.shape
    g = torch.Generator().manual_seed(seed)
    grad_seq, grad_tok = torch.randn(N, generator=g), torch.randn(N, T, generator=g)
    dev = logits.device if device is None else device
    x = logits.detach().to(dev).clone().requires_grad_(True) if device is not None else \
        logits.detach().clone().requires_grad_(True)
    out = fastdpo.sequence_logps(x, labels.to(dev), shift=shift, average=average, return_token_logps=True, **kw)
    ref_logps, ref_tok, ref_num, ref_grad = reference(logits.cpu(), labels.cpu(), shift=shift, average=average,
                                                      grad_seq=grad_seq, grad_tok=grad_tok)
    assert out.logps.dtype == (torch.float64 if logits.dtype == torch.float64 else torch.float32)
    assert torch.equal(out.num_tokens.cpu(), ref_num)
    tol = logp_tol(logits)
    torch.testing.assert_close(out.token_logps.double().cpu(), ref_tok, rtol=0, atol=tol)
    torch.testing.assert_close(out.logps.double().cpu(), ref_logps, rtol=0, atol=tol * max(T, 1))
    ((out.logps * grad_seq.to(out.logps)).sum() + (out.token_logps * grad_tok.to(out.logps)).sum()).backward()
    coef_max = (grad_seq.abs().max() + grad_tok.abs().max()).item() if N * T else 0.0
    assert x.grad.dtype == logits.dtype and x.grad.shape == logits.shape
    assert_grad_close(x.grad.cpu(), ref_grad, logits.cpu(), coef_max)
    return out, x.grad


@pytest.mark.parametrize("V,N,T", [(1, 3, 7), (2, 3, 7), (7, 3, 7), (1000, 3, 9), (32000, 2, 4), (50257, 2, 3),
                                   (128256, 1, 3), (151936, 1, 3)])
def test_vocab_sizes(backend, V, N, T):
    check(*make_batch(N, T, V, torch.float32))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("V", [7, 1000, 32000])
def test_dtypes(backend, dtype, V):
    check(*make_batch(3 if V < 32000 else 2, 6, V, dtype))


@pytest.mark.parametrize("mask", ["none", "all", "random", "prompt"])
@pytest.mark.parametrize("shift", [True, False])
def test_masks_and_shift(backend, mask, shift):
    logits, labels = make_batch(4, 8, 300, torch.float32, mask=mask)
    out, grad = check(logits, labels, shift=shift)
    if mask == "all":
        assert torch.equal(out.logps, torch.zeros(4)) and torch.equal(out.num_tokens, torch.zeros(4).long())
        assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("average", [False, True])
def test_average(backend, average):
    logits, labels = make_batch(3, 8, 300, torch.float32, mask="prompt")
    labels[1] = -100  # no tokens: mean 0, never NaN
    out, grad = check(logits, labels, average=average)
    assert out.logps[1].item() == 0.0 and not torch.isnan(grad).any()


def test_int32_labels(backend):
    logits, labels = make_batch(2, 5, 300, torch.float32)
    check(logits, labels.int())


def test_non_contiguous_logits(backend):
    """The HF idiom ``logits[:, :-1]`` (a view with a gap between sequences) and a vocabulary stride of 2."""
    logits, labels = make_batch(3, 9, 1000, torch.float32)
    check(logits[:, :-1], labels[:, 1:], shift=False)
    wide = torch.randn(3, 9, 2000)
    check(wide[..., ::2], labels)
    check(logits.transpose(0, 1).contiguous().transpose(0, 1), labels)  # sequence-major storage


@pytest.mark.parametrize("dtype,big", [(torch.float32, 1e4), (torch.float16, 6e4), (torch.bfloat16, 1e4)])
def test_extreme_logits(backend, dtype, big):
    logits, labels = make_batch(2, 6, 1000, dtype)
    g = torch.Generator().manual_seed(3)
    sign = torch.where(torch.rand(logits.shape, generator=g) < 0.5, -1.0, 1.0)
    logits = (sign * big * torch.rand(logits.shape, generator=g)).to(dtype)
    logits[0, :, 5] = big  # some rows dominated by one huge logit
    labels[0, 1:] = 5
    out, grad = check(logits, labels)
    assert torch.isfinite(out.logps).all() and torch.isfinite(grad).all()


def test_gradcheck_float64():
    """float64 takes the PyTorch path on every backend setting; it computes in float64."""
    logits, labels = make_batch(2, 5, 11, torch.float64, mask="random")
    for average in (False, True):
        for shift in (False, True):
            def f(x):
                out = fastdpo.sequence_logps(x, labels, shift=shift, average=average, return_token_logps=True)
                return out.logps, out.token_logps
            assert torch.autograd.gradcheck(f, (logits.clone().requires_grad_(True),))


def test_offset_past_2_31_elements(backend):
    """Rows that start past 2^31 elements: int32 offsets would wrap. The storage is virtual: only the pages
    written below are touched."""
    V, T = 1000, 3
    stride_n = 2 ** 31 + 4096
    base = torch.empty(stride_n + T * V, dtype=torch.bfloat16)
    logits = base.as_strided((2, T, V), (stride_n, V, 1))
    g = torch.Generator().manual_seed(0)
    logits[0] = torch.randn(T, V, generator=g).bfloat16()
    logits[1] = torch.randn(T, V, generator=g).bfloat16()
    labels = torch.randint(0, V, (2, T), generator=g)
    compact = logits.detach().clone()  # the same values, small offsets
    out, grad = check(logits, labels)
    assert torch.isfinite(out.logps).all()
    out2 = fastdpo.sequence_logps(compact, labels)
    assert torch.equal(out.logps, out2.logps)


def test_bitwise_deterministic(backend):
    logits, labels = make_batch(3, 7, 1000, torch.bfloat16)
    results = []
    for _ in range(2):
        x = logits.clone().requires_grad_(True)
        out = fastdpo.sequence_logps(x, labels, return_token_logps=True)
        (out.logps.sum() + out.token_logps.sum()).backward()
        results.append((out.logps, out.token_logps, x.grad))
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inplace_backward(backend, dtype):
    logits, labels = make_batch(3, 7, 1000, dtype, mask="prompt")
    x = logits.clone().requires_grad_(True)
    fastdpo.sequence_logps(x, labels).logps.sum().backward()
    leaf = logits.clone().requires_grad_(True)
    y = leaf * 1  # logits as a model makes them: a non-leaf whose gradient flows on upstream
    seen = []
    y.register_hook(lambda g: seen.append(g.data_ptr()))
    fastdpo.sequence_logps(y, labels, inplace_backward=True).logps.sum().backward()
    assert torch.equal(x.grad, leaf.grad)
    assert seen == [y.data_ptr()]  # written where the logits were: no second logits-sized buffer


def test_backends_agree_closely():
    logits, labels = make_batch(3, 7, 1000, torch.float32, mask="prompt")
    outs = {}
    for name in ("torch", "triton"):
        import os
        os.environ["FASTDPO_BACKEND"] = name
        try:
            x = logits.clone().requires_grad_(True)
            out = fastdpo.sequence_logps(x, labels)
            out.logps.sum().backward()
            outs[name] = (out.logps, x.grad)
        finally:
            del os.environ["FASTDPO_BACKEND"]
    torch.testing.assert_close(outs["torch"][0], outs["triton"][0], rtol=0, atol=1e-5)
    torch.testing.assert_close(outs["torch"][1], outs["triton"][1], rtol=0, atol=1e-6)


def test_nan_stays_in_its_sequence(backend):
    logits, labels = make_batch(3, 6, 300, torch.float32, mask="none")
    logits[1, 2, 17] = float("nan")
    logits[2, 3, 4] = float("inf")
    x = logits.clone().requires_grad_(True)
    out = fastdpo.sequence_logps(x, labels)
    assert torch.isnan(out.logps[1]) and torch.isnan(out.logps[2])
    ref_logps, _, _, ref_grad = reference(logits[:1], labels[:1], grad_seq=torch.ones(1))
    torch.testing.assert_close(out.logps[:1].double(), ref_logps, rtol=0, atol=logp_tol(logits) * 6)
    out.logps.sum().backward()
    assert torch.isnan(x.grad[1, 2]).all() and torch.isnan(x.grad[2, 3]).all()
    torch.testing.assert_close(x.grad[:1].double(), ref_grad, rtol=0, atol=1e-6)


def test_nan_in_masked_position_is_ignored(backend):
    """A masked row is never read: its NaN reaches no output and its gradient is 0. (The textbook autograd
    formula would put NaN there: log_softmax's backward multiplies the row's NaN softmax by 0.)"""
    logits, labels = make_batch(2, 6, 300, torch.float32, mask="none")
    labels[0, 3] = -100  # shift: row 2 scores label 3, so row 2 is masked
    clean = logits.clone()
    logits[0, 2] = float("nan")
    x = logits.clone().requires_grad_(True)
    out = fastdpo.sequence_logps(x, labels, return_token_logps=True)
    out.logps.sum().backward()
    assert torch.isfinite(out.logps).all() and torch.isfinite(x.grad).all()
    assert torch.equal(x.grad[0, 2], torch.zeros(300))
    ref_logps, _, _, ref_grad = reference(clean, labels, grad_seq=torch.ones(2))
    torch.testing.assert_close(out.logps.double(), ref_logps, rtol=0, atol=logp_tol(clean) * 6)
    torch.testing.assert_close(x.grad.double(), ref_grad, rtol=0, atol=1e-6)


def test_no_grad_saves_nothing(backend):
    logits, labels = make_batch(2, 5, 300, torch.float32)
    x = logits.clone().requires_grad_(True)
    with torch.no_grad():
        out = fastdpo.sequence_logps(x, labels)
    assert out.logps.grad_fn is None


def test_empty_batch(backend):
    out = fastdpo.sequence_logps(torch.randn(0, 5, 10, requires_grad=True), torch.zeros(0, 5).long())
    assert out.logps.shape == (0,) and out.num_tokens.shape == (0,)


def test_triton_out_of_range_label_gives_nan_not_a_read():
    """On GPU there is no host sync to raise on a bad label: the kernel returns NaN for that token."""
    import os
    os.environ["FASTDPO_BACKEND"] = "triton"
    try:
        logits = torch.randn(1, 4, 50)
        labels = torch.tensor([[0, 3, 10 ** 9, -7]])
        token_logps, _, _ = _ops.logps_forward(logits, labels, -100, True)  # aligned with the labels
    finally:
        del os.environ["FASTDPO_BACKEND"]
    assert token_logps[0, 0] == 0 and torch.isfinite(token_logps[0, 1]) and torch.isnan(token_logps[0, 2:]).all()


@pytest.mark.parametrize("bad,exc,word", [
    (lambda x, y: (x[0], y), ValueError, "logits"),
    (lambda x, y: (x.long(), y), TypeError, "logits"),
    (lambda x, y: (x, y.float()), TypeError, "labels"),
    (lambda x, y: (x, y[:, :-1]), ValueError, "labels"),
    (lambda x, y: (x, torch.full_like(y, 300)), ValueError, "labels"),
    (lambda x, y: (x, torch.full_like(y, -5)), ValueError, "labels"),
    (lambda x, y: (x.numpy(), y), TypeError, "logits"),
])
def test_bad_input(bad, exc, word):
    x, y = bad(*make_batch(2, 5, 300, torch.float32))
    with pytest.raises(exc, match=word):
        fastdpo.sequence_logps(x, y)


def test_triton_backend_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("FASTDPO_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        fastdpo.sequence_logps(torch.randn(1, 3, 10), torch.zeros(1, 3).long())



def test_forward_stats(backend):
    """The per-token statistics of logps_forward(with_stats=True) against float64 (TRL's definitions)."""
    logits, labels = make_batch(3, 7, 1000, torch.float32, mask="random")
    labels[0, 2] = int(logits[0, 1].argmax())  # some rows whose label is the argmax
    labels[1, 4] = int(logits[1, 3].argmax())
    logits[2, 0, 10:20] = float("-inf")  # a padded vocabulary: entropy stays finite
    _, lse, stats = _ops.logps_forward(logits, labels, -100, True, with_stats=True)
    stats = _ops.positions_to_rows(stats.flatten(0, 1), True).view(stats.shape)  # row t scores position t + 1
    rlab, valid = _ops.row_labels(labels, -100, True)
    x = logits.double()
    p = torch.softmax(x, -1)
    plogx = torch.where(p > 0, p * x, 0.0)
    ref = torch.stack([x.mean(-1), torch.logsumexp(x, -1) - plogx.sum(-1), (p * p).sum(-1).log(),
                       (x.argmax(-1) == rlab).double()])
    ref = torch.where(valid, ref, 0.0)
    torch.testing.assert_close(stats[:3].double(), ref[:3], rtol=1e-5, atol=1e-5)
    assert torch.equal(stats[3].double(), ref[3]) and stats[3].sum() >= 2
    assert torch.isfinite(stats).all()


def test_is_top1_ties_take_the_first_index(backend):
    """A label tied with an earlier maximum is not top-1 (argmax returns the first maximum), as in TRL."""
    logits = torch.zeros(1, 4, 50)
    logits[0, 0, [3, 9]] = 5.0  # row 0 scores label 1 (shift): a tie between index 3 and 9
    logits[0, 1, [3, 9]] = 5.0
    logits[0, 2, 7] = 5.0
    labels = torch.tensor([[0, 9, 3, 7]])
    _, _, stats = _ops.logps_forward(logits, labels, -100, True, with_stats=True)
    assert stats[_ops.IS_TOP1, 0].tolist() == [0.0, 0.0, 1.0, 1.0]  # aligned with the labels (rows 0-2 -> 1-3)


@pytest.mark.parametrize("shift", [True, False])
def test_return_token_stats(backend, shift):
    """sequence_logps(return_token_stats=True): the same statistics, aligned with the labels like token_logps,
    and the gradient is that of the plain call."""
    logits, labels = make_batch(3, 7, 500, torch.float32, mask="prompt")
    labels[:, 5] = logits[:, 4 if shift else 5].argmax(-1)  # some labels are the top-1 token
    x = logits.double()
    p = torch.softmax(x, -1)
    ref = {"mean_logits": x.mean(-1), "entropy": torch.logsumexp(x, -1) - (p * x).sum(-1),
           "log_sum_sq_probs": (p * p).sum(-1).log()}
    valid = labels != -100
    if shift:  # position t (its label) is scored by the logits of t - 1
        ref = {k: torch.cat([torch.zeros(3, 1, dtype=v.dtype), v[:, :-1]], 1) for k, v in ref.items()}
        valid[:, 0] = False
    top1 = x.argmax(-1)
    top1 = torch.cat([torch.full((3, 1), -1), top1[:, :-1]], 1) if shift else top1
    out, grad = check(logits, labels, shift=shift, return_token_stats=True)
    plain, plain_grad = check(logits, labels, shift=shift)
    assert torch.equal(grad, plain_grad) and plain.token_stats is None
    for name, val in ref.items():
        torch.testing.assert_close(out.token_stats[name].double(), torch.where(valid, val, 0.0), rtol=1e-5,
                                   atol=1e-5)
    assert torch.equal(out.token_stats["is_top1"], valid & (top1 == labels))
    assert out.token_stats["is_top1"].sum() == 3
    assert not out.token_stats["entropy"].requires_grad


def _oracle_stats(logits, labels, shift=True):
    """float64 per-row (lse, entropy, log sum p^2) of the rows that score a label, and their token log-probs."""
    x = logits.double()
    lse = torch.logsumexp(x, -1)
    p = torch.softmax(x, -1)
    ent = lse - torch.where(p > 0, p * x, 0.0).sum(-1)
    return lse, ent, (p * p).sum(-1).log()


@pytest.mark.parametrize("V,masked", [(9000, slice(0, 8192)), (9000, slice(0, 8500)), (300, slice(0, 250)),
                                      (20000, slice(4096, 12288))])
def test_minus_inf_blocks(backend, V, masked):
    """Whole vocabulary blocks of -inf (the first block, a middle one, most of a small row): the online
    log-sum-exp once formed -inf - (-inf) = NaN there. Wherever the label's logit is finite the outputs are finite
    and equal the float64 oracle's; a -inf label gives a -inf log-prob, as log_softmax does, and its sequence
    nothing else."""
    logits, labels = make_batch(2, 4, V, torch.float32, mask="none")
    logits[..., masked] = float("-inf")
    g = torch.Generator().manual_seed(5)
    labels = torch.randint(masked.stop, V, (2, 4), generator=g)  # finite targets
    out, grad = check(logits, labels, return_token_stats=True)
    assert torch.isfinite(out.logps).all() and torch.isfinite(grad).all()
    _, ent, sq = _oracle_stats(logits, labels)
    stats = out.token_stats
    torch.testing.assert_close(stats["entropy"][:, 1:].double(), ent[:, :-1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats["log_sum_sq_probs"][:, 1:].double(), sq[:, :-1], rtol=1e-5, atol=1e-5)
    # a target inside the masked range: -inf for that token, the rest of the batch unchanged
    bad = labels.clone()
    bad[0, 2] = masked.start
    res = fastdpo.sequence_logps(logits, bad, return_token_logps=True)
    assert res.token_logps[0, 2] == float("-inf") and res.logps[0] == float("-inf")
    assert torch.equal(res.logps[1], out.logps[1].detach())
    loss = fastdpo.dpo_loss(logits, bad).loss  # a chosen of log-prob -inf: the pair's loss is not finite
    assert not torch.isfinite(loss)


def test_minus_inf_everywhere_is_nan_like_log_softmax(backend):
    """A row with no finite logit has no distribution: NaN, as log_softmax gives; other rows are untouched."""
    logits, labels = make_batch(2, 3, 600, torch.float32, mask="none")
    logits[1, 0] = float("-inf")
    out = fastdpo.sequence_logps(logits, labels, return_token_logps=True)
    ref = torch.log_softmax(logits[1, 0].double(), -1)[labels[1, 1]]
    assert torch.isnan(ref) and torch.isnan(out.token_logps[1, 1])
    assert torch.isfinite(out.logps[0])


@pytest.mark.parametrize("dtype", DTYPES)
def test_small_vocabularies_rows_of_different_scales(backend, dtype):
    """V = 2..1024 take the multi-row tiles; rows of very different scales in one tile would show any mixing of
    rows inside a reduction (a reordering reshape on the GPU once added row t + 2 into row t's sums)."""
    for V in (2, 3, 17, 100, 511, 512, 513, 1000, 1024):
        logits, labels = make_batch(3, 6, V, torch.float32, mask="random", seed=V)
        scales = torch.tensor([0.01, 1.0, 30.0, 3.0, 0.1, 10.0]).view(1, 6, 1)
        logits = (logits * scales).to(dtype)
        out, _ = check(logits, labels, return_token_stats=True)
        _, ent, _ = _oracle_stats(logits, labels)
        torch.testing.assert_close(out.token_stats["entropy"][:, 1:].double(), torch.where(
            out.num_tokens.new_ones(()).bool() & (labels[:, 1:] != -100), ent[:, :-1], 0.0), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vocabulary_major_offsets_past_2_32(backend, dtype):
    """Vocabulary-major logits (the transpose of the usual layout): entry v of a row lies v * stride elements
    from entry 0, past 2^32 elements here; the forward reads and the in-place backward writes there. In int32
    these offsets wrap. The storage is virtual: only the pages holding the few rows' logits are touched."""
    N, T, V = 2, 3, 9
    stride = 2 ** 29 + 7  # (V - 1) * stride > 2^32
    base = torch.empty(V * stride, dtype=dtype)
    logits = base.view(V, stride)[:, :N * T].t().view(N, T, V)  # strides (T, 1, stride)
    assert logits.stride() == (T, 1, stride)
    g = torch.Generator().manual_seed(0)
    values = (torch.randn(N, T, V, generator=g) * 3).to(dtype)
    logits.copy_(values)
    labels = torch.randint(0, V, (N, T), generator=g)
    labels[0, 1] = V - 1  # the farthest entry is a target
    out, grad = check(logits, labels, return_token_stats=True)
    compact = fastdpo.sequence_logps(values, labels, return_token_logps=True, return_token_stats=True)
    if backend == "triton":  # the kernel reads the same values in the same order whatever the layout
        assert torch.equal(out.token_logps, compact.token_logps)
    else:  # torch's CPU reductions order a strided row differently: fp32 rounding apart
        torch.testing.assert_close(out.token_logps, compact.token_logps, rtol=1e-6, atol=1e-6)
    # in place: the gradient is written through the same far offsets
    x = logits.requires_grad_(True)
    res = fastdpo.sequence_logps(x, labels, inplace_backward=True)
    res.logps.sum().backward()
    y = values.clone().requires_grad_(True)
    fastdpo.sequence_logps(y, labels).logps.sum().backward()
    assert torch.equal(logits.detach().clone(), y.grad)
