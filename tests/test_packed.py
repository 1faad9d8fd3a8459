"""Packed (padding-free) batches through every op: ``cu_seqlens`` gives each sequence's tokens in one row, and
every output must equal the padded op's on the same sequences, the gradient at every real token too.

The padded batch is the reference: it is itself held to float64 by the other test files. Both sides compute in
fp32 from the same logits; the per-sequence sums of a packed row run in another order (float64 running sums on
the PyTorch path, one program per segment on the kernels), so values agree to fp32 rounding of the sums (rtol
1e-6 relative to each sequence's magnitude) and per-token values and gradients bit for bit.
"""

import pytest
import torch

import fastdpo
from fastdpo.losses import LOSS_TYPES
from helpers import HostReads

SMOOTHED = {"robust": 0.1, "exo_pair": 1e-3, "aot": 0.1, "aot_unpaired": 0.1, "simpo": 0.1}


def padded_batch(lengths, V=61, dtype=torch.float32, seed=0, prompt=2):
    """(logits (N, T, V), labels (N, T)) for sequences of ``lengths`` tokens (right padding), a prompt of
    ``prompt`` tokens each (masked), logits of varied scales."""
    g = torch.Generator().manual_seed(seed)
    N, T = len(lengths), max(max(lengths), 1)
    logits = (torch.randn(N, T, V, generator=g) * 3).to(dtype)
    labels = torch.randint(0, V, (N, T), generator=g)
    for n, L in enumerate(lengths):
        labels[n, L:] = -100
        labels[n, :min(prompt, L)] = -100
    return logits, labels


def pack(x, lengths):
    """Rows [0, L_n) of each sequence of a padded (N, T, ...) tensor, concatenated: (total, ...), and cu_seqlens."""
    cu = [0]
    for L in lengths:
        cu.append(cu[-1] + L)
    return torch.cat([x[n, :L] for n, L in enumerate(lengths)]), torch.tensor(cu)


def close(a, b, what, rtol=1e-6, atol=1e-6):
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol, equal_nan=True, msg=lambda m: f"{what}: {m}")


LENGTHS = [[7, 0, 1, 9, 4, 2], [1, 1], [12, 3, 0, 0, 5, 8, 6, 1]]


@pytest.mark.parametrize("lengths", LENGTHS)
@pytest.mark.parametrize("shift", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sequence_logps_packed_equals_padded(backend, lengths, shift, dtype):
    logits, labels = padded_batch(lengths, dtype=dtype)
    N = len(lengths)
    w = torch.linspace(-1, 1, N)
    x = logits.clone().requires_grad_()
    a = fastdpo.sequence_logps(x, labels, shift=shift, return_token_logps=True, return_token_stats=True)
    ((a.logps * w).sum() + (a.token_logps * 0.3).sum()).backward()
    packed, cu = pack(logits, lengths)
    packed_labels, _ = pack(labels, lengths)
    for unsqueeze in (False, True):
        xp = (packed[None] if unsqueeze else packed).clone().requires_grad_()
        lp = packed_labels[None] if unsqueeze else packed_labels
        b = fastdpo.sequence_logps(xp, lp, shift=shift, cu_seqlens=cu, return_token_logps=True,
                                   return_token_stats=True)
        ((b.logps * w).sum() + (b.token_logps * 0.3).sum()).backward()
        assert b.logps.shape == (N,) and b.token_logps.shape == lp.shape
        assert torch.equal(b.num_tokens, a.num_tokens)
        close(b.logps, a.logps, "logps")
        assert torch.equal(b.token_logps.reshape(-1), pack(a.token_logps, lengths)[0])
        for k in a.token_stats:
            assert torch.equal(b.token_stats[k].reshape(-1), pack(a.token_stats[k], lengths)[0]), k
        assert torch.equal(xp.grad.reshape(packed.shape), pack(x.grad, lengths)[0])
    # a segment's last token scores nothing: no gradient crosses a boundary
    if shift:
        ends = cu[1:] - 1
        ends = ends[cu[1:] > cu[:-1]]
        assert (xp.grad.reshape(packed.shape)[ends] == 0).all()


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_dpo_loss_packed_equals_padded(backend, loss_type):
    lengths = [7, 0, 9, 1, 4, 2]  # 3 pairs: a chosen of length 0, a rejected of length 1
    logits, labels = padded_batch(lengths, seed=1)
    ref_c, ref_r = torch.tensor([-9.0, -12.0, -7.0]), torch.tensor([-10.0, -8.0, -11.0])
    kw = dict(loss_type=loss_type, label_smoothing=SMOOTHED.get(loss_type, 0.0), beta=0.2)
    refs = (None, None) if loss_type == "simpo" else (ref_c, ref_r)
    x = logits.clone().requires_grad_()
    a = fastdpo.dpo_loss(x, labels, *refs, **kw)
    a.loss.backward()
    packed, cu = pack(logits, lengths)
    xp = packed.clone().requires_grad_()
    b = fastdpo.dpo_loss(xp, pack(labels, lengths)[0], *refs, cu_seqlens=cu, **kw)
    b.loss.backward()
    close(b.loss, a.loss, "loss")
    for name in ("chosen_logps", "rejected_logps", "chosen_rewards", "rejected_rewards"):
        close(getattr(b, name), getattr(a, name), name)
    for k in a.metrics:
        close(b.metrics[k], a.metrics[k], k)
    close(xp.grad, pack(x.grad, lengths)[0], "dlogits", rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("options", [dict(ld_alpha=0.5), dict(use_weighting=True, loss_type=["sigmoid", "sft"]),
                                     dict(nll_alpha=0.3, loss_type="ipo")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dpo_loss_packed_options(backend, options, dtype):
    lengths = [8, 3, 1, 6, 9, 5, 0, 2]  # 4 pairs
    logits, labels = padded_batch(lengths, seed=2, dtype=dtype)
    ref_c, ref_r = -10 + torch.arange(4.0), -11 + torch.arange(4.0) * 0.5
    x = logits.clone().requires_grad_()
    a = fastdpo.dpo_loss(x, labels, ref_c, ref_r, **options)
    a.loss.backward()
    packed, cu = pack(logits, lengths)
    xp = packed.clone().requires_grad_()
    b = fastdpo.dpo_loss(xp, pack(labels, lengths)[0], ref_c, ref_r, cu_seqlens=cu, **options)
    b.loss.backward()
    close(b.loss, a.loss, "loss")
    for k in a.metrics:
        close(b.metrics[k], a.metrics[k], k)
    tol = 1e-6 if dtype == torch.float32 else 2 ** -7  # the coefficient from sums in another order; bf16 rounding
    torch.testing.assert_close(xp.grad.float(), pack(x.grad, lengths)[0].float(), rtol=tol, atol=1e-7)


@pytest.mark.parametrize("lean", [False, True])
@pytest.mark.parametrize("loss", [dict(), dict(loss_type="aot", label_smoothing=0.1), dict(ld_alpha=0.3)])
def test_linear_dpo_loss_packed_equals_padded(backend, lean, loss):
    lengths = [9, 1, 0, 6, 7, 3]
    H, V = 8, 61
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(len(lengths), max(lengths), H, generator=g)
    weight = torch.randn(V, H, generator=g)
    _, labels = padded_batch(lengths, V=V, seed=3)
    ref_c, ref_r = torch.tensor([-9.0, -12.0, -7.0]), torch.tensor([-10.0, -8.0, -11.0])
    for chunk_bytes in (4 * V * 4, None):  # chunks of 4 rows (two-pass), one chunk (grouped)
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        a = fastdpo.linear_dpo_loss(h, w, labels, ref_c, ref_r, chunk_bytes=chunk_bytes, lean=lean, **loss)
        a.loss.backward()
        packed, cu = pack(hidden, lengths)
        hp, wp = packed.clone().requires_grad_(), weight.clone().requires_grad_()
        b = fastdpo.linear_dpo_loss(hp, wp, pack(labels, lengths)[0], ref_c, ref_r, cu_seqlens=cu,
                                    chunk_bytes=chunk_bytes, lean=lean, **loss)
        b.loss.backward()
        close(b.loss, a.loss, "loss")
        for k in a.metrics:
            close(b.metrics[k], a.metrics[k], k)
        close(hp.grad, pack(h.grad, lengths)[0], "grad hidden", atol=1e-7)
        close(wp.grad, w.grad, "grad weight", atol=1e-7)


def test_linear_sequence_logps_packed_equals_padded(backend):
    lengths = [9, 1, 0, 6, 7]
    H, V = 8, 61
    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(len(lengths), max(lengths), H, generator=g)
    weight = torch.randn(V, H, generator=g)
    bias = torch.randn(V, generator=g)
    _, labels = padded_batch(lengths, V=V, seed=4)
    wseq = torch.linspace(-1, 2, len(lengths))
    h, w, bb = (t.clone().requires_grad_() for t in (hidden, weight, bias))
    a = fastdpo.linear_sequence_logps(h, w, labels, bb, return_token_logps=True, return_token_stats=True,
                                      average=True, chunk_bytes=3 * V * 4)
    (a.logps * wseq).sum().backward()
    packed, cu = pack(hidden, lengths)
    hp, wp, bp = packed.clone().requires_grad_(), weight.clone().requires_grad_(), bias.clone().requires_grad_()
    b = fastdpo.linear_sequence_logps(hp, wp, pack(labels, lengths)[0], bp, cu_seqlens=cu, return_token_logps=True,
                                      return_token_stats=True, average=True, chunk_bytes=3 * V * 4)
    (b.logps * wseq).sum().backward()
    close(b.logps, a.logps, "logps")
    assert torch.equal(b.num_tokens, a.num_tokens)
    assert torch.equal(b.token_logps, pack(a.token_logps, lengths)[0])
    for k in a.token_stats:
        assert torch.equal(b.token_stats[k], pack(a.token_stats[k], lengths)[0]), k
    close(hp.grad, pack(h.grad, lengths)[0], "grad hidden", atol=1e-7)
    close(wp.grad, w.grad, "grad weight", atol=1e-7)
    close(bp.grad, bb.grad, "grad bias", atol=1e-7)


def test_packed_kernels_read_no_offsets_to_the_host(monkeypatch):
    """On the kernels' path (CUDA) a packed dpo_loss reads nothing to the host: the segment sums and the
    per-position coefficients come from ``cu_seqlens`` on the device. (The CPU-only checks of the labels and of
    the offsets' values, which read them by design, are off here; the GPU lane runs it under
    ``set_sync_debug_mode("error")``.)"""
    from fastdpo import _checks
    monkeypatch.setenv("FASTDPO_BACKEND", "triton")
    monkeypatch.setenv("FASTDPO_CHECK_LABELS", "0")
    monkeypatch.setattr(_checks, "_check_cu_values", lambda cu, total: None)
    lengths = [5, 3, 4, 6]
    logits, labels = padded_batch(lengths, seed=5)
    packed, cu = pack(logits, lengths)
    xp = packed.requires_grad_()
    with HostReads(monkeypatch) as spy:
        out = fastdpo.dpo_loss(xp, pack(labels, lengths)[0], cu_seqlens=cu, ld_alpha=0.5)
        out.loss.backward()
    assert spy.reads == [], spy.reads


def test_segment_sums_are_deterministic_and_poison_bad_offsets(monkeypatch):
    """The packed per-sequence sums: the same bits on every run; offsets the kernel cannot trust (on a GPU they
    are not checked on the host) give NaN for the sequences they touch, never a read outside the row."""
    from fastdpo import _ops
    monkeypatch.setenv("FASTDPO_BACKEND", "triton")
    total = 40
    tok = torch.randn(1, total)
    labels = torch.randint(0, 5, (1, total))
    cu = torch.tensor([0, 10, 10, 25, 40])
    a = _ops.sequence_sums(tok, None, labels, -100, False, cu)
    b = _ops.sequence_sums(tok, None, labels, -100, False, cu)
    assert all(torch.equal(x, y) for x, y in zip(a[:2], b[:2]))
    torch.testing.assert_close(a[0], torch.stack([tok[0, 0:10].sum(), tok[0, :0].sum(), tok[0, 10:25].sum(),
                                                  tok[0, 25:40].sum()]))
    for bad, poisoned in ((torch.tensor([0, 10, 8, 25, 40]), [1]), (torch.tensor([0, 10, 10, 25, 41]), [3]),
                          (torch.tensor([2, 10, 10, 25, 40]), [0]), (torch.tensor([0, 10, 10, 25, 39]), [3])):
        s, n, _ = _ops.sequence_sums(tok, None, labels, -100, False, bad)
        assert torch.isnan(s[poisoned]).all() and (n[poisoned] == -1).all(), bad
        others = [i for i in range(4) if i not in poisoned]
        assert torch.isfinite(s[others]).all()


@pytest.mark.parametrize("call", ["sequence_logps", "dpo_loss", "linear_sequence_logps", "linear_dpo_loss"])
@pytest.mark.parametrize("case,exc,word", [
    ("2d", ValueError, "1-D"), ("float", TypeError, "int32 or int64"), ("list", TypeError, "torch.Tensor"),
    ("start", ValueError, "start at 0"), ("decreasing", ValueError, "non-decreasing"),
    ("last", ValueError, "token count"), ("odd", ValueError, "even"), ("refs", ValueError, "ref_chosen_logps"),
    ("shape", ValueError, "packed"), ("empty", ValueError, "at least 2"), ("device", ValueError, "cu_seqlens is on")])
def test_bad_cu_seqlens(call, case, exc, word):
    """Bad ``cu_seqlens`` raise naming it (or the argument at fault) before any kernel runs."""
    total, V, H = 12, 11, 4
    logits, labels = torch.randn(total, V), torch.randint(0, V, (total,))
    hidden, weight = torch.randn(total, H), torch.randn(V, H)
    cu = {"2d": torch.tensor([[0, 6, 12]]), "float": torch.tensor([0.0, 6.0, 12.0]), "list": [0, 6, 12],
          "start": torch.tensor([1, 6, 12]), "decreasing": torch.tensor([0, 7, 6, 9, 12]),
          "last": torch.tensor([0, 6, 11]), "odd": torch.tensor([0, 4, 8, 12]), "refs": torch.tensor([0, 6, 12]),
          "shape": torch.tensor([0, 6, 12]), "empty": torch.tensor([0]),
          "device": torch.tensor([0, 6, 12], device="meta")}[case]
    pairs = call in ("dpo_loss", "linear_dpo_loss")
    if case == "odd" and not pairs:
        pytest.skip("an odd sequence count is fine without pairs")
    if case == "refs" and not pairs:
        pytest.skip("no reference log-probs without pairs")
    refs = (torch.zeros(2), torch.zeros(2)) if case == "refs" else ()
    if case == "shape":
        logits, labels, hidden = logits[None, None], labels[None, None], hidden[None, None]
    with pytest.raises(exc, match=word):
        if call == "sequence_logps":
            fastdpo.sequence_logps(logits, labels, cu_seqlens=cu)
        elif call == "dpo_loss":
            fastdpo.dpo_loss(logits, labels, *refs, cu_seqlens=cu)
        elif call == "linear_sequence_logps":
            fastdpo.linear_sequence_logps(hidden, weight, labels, cu_seqlens=cu)
        else:
            fastdpo.linear_dpo_loss(hidden, weight, labels, *refs, cu_seqlens=cu)
