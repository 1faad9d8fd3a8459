"""The fused-linear ops equal the logits path (and TRL's and Liger's fused LM heads) on both backends.

The logits path (``hidden @ W.T`` then ``sequence_logps`` / ``dpo_loss``) is itself held to float64 by
test_sequence_logps.py and test_dpo_loss.py; here both sides compute in fp32 through different GEMM
groupings: values within 1e-5 relative, gradients within 1e-5 of each tensor's largest element.
"""

import pytest
import torch

import fastdpo
from fastdpo.linear import LinearDPOLoss, linear_dpo_loss, linear_sequence_logps

B, T, H, V = 3, 10, 16, 300


def inputs(seed=0, dtype=torch.float32, bias=False):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2 * B, T, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) / 2).to(dtype)
    b = torch.randn(V, generator=g).to(dtype) if bias else None
    labels = torch.randint(0, V, (2 * B, T), generator=g)
    labels[:, :3] = -100
    labels[1, 7:] = -100
    labels[4, 5:] = -100
    ref_c, ref_r = -40 + torch.randn(B, generator=g), -40 + torch.randn(B, generator=g)
    return hidden, weight, b, labels, ref_c, ref_r


def transform(z, logit_scale=1.0, softcap=None, temperature=1.0):
    z = z * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z / temperature


def close(a, b, what):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * max(1.0, b.abs().max().item()),
                               msg=lambda m: f"{what}: {m}")


def leaves(*ts):
    return [None if t is None else t.clone().requires_grad_(True) for t in ts]


TRANSFORMS = [dict(), dict(logit_scale=0.6, softcap=4.0, temperature=1.5), dict(temperature=0.7)]


@pytest.mark.parametrize("kw", TRANSFORMS, ids=["plain", "scale-softcap-temp", "temp"])
@pytest.mark.parametrize("chunk_rows,lean", [(None, False), (4, False), (4, True)], ids=["whole", "chunks", "lean"])
def test_linear_sequence_logps_equals_logits_path(backend, kw, chunk_rows, lean):
    """Lean: the backward in vocabulary tiles (64 columns here: 5 tiles of V = 300, the last partial)."""
    hidden, weight, bias, labels, _, _ = inputs(bias=True)
    cb = {} if chunk_rows is None else {"chunk_bytes": chunk_rows * V * 4 * (2 if kw.get("softcap") else 1)}
    h1, w1, b1 = leaves(hidden, weight, bias)
    out = linear_sequence_logps(h1, w1, labels, b1, return_token_logps=True, return_token_stats=True, lean=lean,
                                **kw, **cb)
    g = torch.randn(2 * B)
    ((out.logps * g).sum() + out.token_logps.sum()).backward()
    h2, w2, b2 = leaves(hidden, weight, bias)
    z = transform(h2 @ w2.t() + b2, **kw)
    ref = fastdpo.sequence_logps(z, labels, return_token_logps=True)
    ((ref.logps * g).sum() + ref.token_logps.sum()).backward()
    close(out.logps, ref.logps, "logps")
    close(out.token_logps, ref.token_logps, "token_logps")
    assert torch.equal(out.num_tokens, ref.num_tokens)
    for a, b, name in ((h1, h2, "hidden"), (w1, w2, "weight"), (b1, b2, "bias")):
        close(a.grad, b.grad, name)
    # per-token stats against their definitions on the logits
    zd = z.detach().double()
    p = torch.softmax(zd, -1)
    tgt = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=0)
    mask = torch.nn.functional.pad(labels[:, 1:] != -100, (1, 0))  # aligned with labels
    rows = torch.nn.functional.pad(labels[:, 1:] != -100, (0, 1))  # the logits rows that score them
    st = out.token_stats
    for name, val in (("entropy", torch.logsumexp(zd, -1) - (p * zd).sum(-1)), ("mean_logits", zd.mean(-1)),
                      ("log_sum_sq_probs", (p * p).sum(-1).log())):
        close(st[name][mask].double(), val[rows], name)
    assert torch.equal(st["is_top1"][mask], (zd.argmax(-1) == tgt)[rows])


LOSSES = [dict(loss_type="sigmoid"), dict(loss_type=["ipo", "sft"], beta=0.3), dict(loss_type="aot"),
          dict(loss_type=["sigmoid", "sft"], use_weighting=True), dict(loss_type="sigmoid", ld_alpha=0.5),
          dict(loss_type="apo_zero", nll_alpha=0.3), dict(loss_type="sigmoid_norm", f_divergence_type="js_divergence")]


@pytest.mark.parametrize("loss", LOSSES, ids=lambda d: "-".join(str(v) for v in d.values()))
@pytest.mark.parametrize("chunk_rows,lean", [(None, False), (4, False), (11, False), (4, True)],
                         ids=["whole", "two-pass", "grouped", "lean"])
def test_linear_dpo_loss_equals_logits_path(backend, loss, chunk_rows, lean):
    """Grouped mode (chunks of whole pairs), two-pass mode (pairs longer than the chunk, and the aot / WPO+sft
    losses), one chunk for everything, and the lean mode (backward in vocabulary tiles): all equal dpo_loss on
    the logits."""
    hidden, weight, bias, labels, ref_c, ref_r = inputs(seed=1, bias=True)
    cb = {} if chunk_rows is None else {"chunk_bytes": chunk_rows * V * 4}
    h1, w1, b1 = leaves(hidden, weight, bias)
    out = linear_dpo_loss(h1, w1, labels, ref_c, ref_r, b1, lean=lean, **cb, **loss)
    (2.5 * out.loss).backward()
    h2, w2, b2 = leaves(hidden, weight, bias)
    ref = fastdpo.dpo_loss(h2 @ w2.t() + b2, labels, ref_c, ref_r, **loss)
    (2.5 * ref.loss).backward()
    close(out.loss, ref.loss, "loss")
    close(out.chosen_logps, ref.chosen_logps, "chosen_logps")
    for k in ref.metrics:
        close(out.metrics[k], ref.metrics[k], k)
    for a, b, name in ((h1, h2, "hidden"), (w1, w2, "weight"), (b1, b2, "bias")):
        close(a.grad, b.grad, name)


def test_softcap_and_reference_free_dpo(backend):
    hidden, weight, _, labels, _, _ = inputs(seed=2)
    kw = dict(logit_scale=0.5, softcap=3.0, temperature=1.2)
    h1, w1 = leaves(hidden, weight)
    out = linear_dpo_loss(h1, w1, labels, loss_type="simpo", beta=2.0, chunk_bytes=12 * V * 8, **kw)
    out.loss.backward()
    h2, w2 = leaves(hidden, weight)
    ref = fastdpo.dpo_loss(transform(h2 @ w2.t(), **kw), labels, loss_type="simpo", beta=2.0)
    ref.loss.backward()
    close(out.loss, ref.loss, "loss")
    close(h1.grad, h2.grad, "hidden")
    close(w1.grad, w2.grad, "weight")


def test_fp32_head_bf16_hidden_and_tied_embeddings(backend):
    """An fp32 LM head with bf16 hidden states computes in fp32; a weight tied to the embedding gets both
    gradients (autograd adds the embedding's)."""
    hidden, weight, _, labels, ref_c, ref_r = inputs(seed=3)
    hb = hidden.bfloat16()
    emb = weight.clone().requires_grad_(True)
    ids = torch.randint(0, V, (4,))
    h1 = hb.clone().requires_grad_(True)
    (linear_dpo_loss(h1, emb, labels, ref_c, ref_r).loss + emb[ids].sum()).backward()
    h2 = hb.clone().requires_grad_(True)
    emb2 = weight.clone().requires_grad_(True)
    (fastdpo.dpo_loss(h2.float() @ emb2.t(), labels, ref_c, ref_r).loss + emb2[ids].sum()).backward()
    assert h1.grad.dtype == torch.bfloat16 and emb.grad.dtype == torch.float32
    close(emb.grad, emb2.grad, "weight")
    torch.testing.assert_close(h1.grad, h2.grad, rtol=2 ** -7, atol=1e-5)


def test_module_and_determinism(backend):
    hidden, weight, _, labels, ref_c, ref_r = inputs(seed=4)
    grads = []
    for _ in range(2):
        h, w = leaves(hidden, weight)
        LinearDPOLoss(loss_type="robust", label_smoothing=0.1, chunk_bytes=11 * V * 4)(h, w, labels, ref_c,
                                                                                       ref_r).loss.backward()
        grads.append((h.grad, w.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


def test_no_grad_and_eval(backend):
    hidden, weight, _, labels, ref_c, ref_r = inputs(seed=5)
    with torch.no_grad():
        out = linear_dpo_loss(hidden, weight, labels, ref_c, ref_r)
    ref = fastdpo.dpo_loss(hidden @ weight.t(), labels, ref_c, ref_r)
    close(out.loss, ref.loss.detach(), "loss")
    assert out.loss.grad_fn is None


def test_matches_trl_chunked_logprob_function(backend):
    """TRL 1.16's fused LM head (_ChunkedLogProbFunction): per-token log-probs and every optional output."""
    trl_utils = pytest.importorskip("trl.trainer.utils")
    hidden, weight, bias, labels, _, _ = inputs(seed=6, bias=True)
    kw = dict(logit_scale=0.8, softcap=5.0, temperature=1.3)
    mask = labels[:, 1:] != -100
    h = hidden[:, :-1][mask]
    out = trl_utils._ChunkedLogProbFunction.apply(h, weight, bias, labels[:, 1:][mask], kw["temperature"], 64,
                                                  kw["softcap"], kw["logit_scale"],
                                                  ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1"))
    ours = linear_sequence_logps(hidden, weight, labels, bias, return_token_logps=True, return_token_stats=True,
                                 **kw)
    pos = torch.nn.functional.pad(mask, (1, 0))
    close(ours.token_logps[pos], out[0], "log_probs")
    for i, name in ((1, "entropy"), (2, "log_sum_sq_probs"), (3, "mean_logits")):
        close(ours.token_stats[name][pos], out[i], name)
    assert torch.equal(ours.token_stats["is_top1"][pos], out[4])


def test_matches_liger_fused_linear_dpo(backend):
    liger = pytest.importorskip("liger_kernel.chunked_loss")
    hidden, weight, _, labels, _, _ = inputs(seed=7)
    ref_hidden = hidden + 0.2
    target = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)  # Liger aligns targets with positions
    h1, w1 = leaves(hidden, weight)
    loss_fn = liger.LigerFusedLinearDPOLoss(beta=0.2, loss_type="bco_pair", compiled=False)
    loss_l, aux = loss_fn(w1, h1, target, None, ref_hidden, weight, None)
    loss_l.backward()
    with torch.no_grad():
        ref = linear_sequence_logps(ref_hidden, weight, labels).logps
    h2, w2 = leaves(hidden, weight)
    out = linear_dpo_loss(h2, w2, labels, ref[:B], ref[B:], beta=0.2, loss_type="bco_pair")
    out.loss.backward()
    close(out.loss, loss_l.detach(), "loss")
    close(out.chosen_logps, aux[0], "chosen_logps")
    close(h1.grad, h2.grad, "hidden")
    close(w1.grad, w2.grad, "weight")


@pytest.mark.parametrize("case,exc,word", [
    ("hidden_2d", ValueError, "hidden"),
    ("h_mismatch", ValueError, "hidden size"),
    ("labels_shape", ValueError, "labels"),
    ("bias_shape", ValueError, "bias"),
    ("odd_rows", ValueError, "2B rows"),
    ("bad_label", ValueError, "labels"),
    ("temperature", ValueError, "temperature"),
    ("weight_type", TypeError, "weight"),
])
def test_bad_input(case, exc, word):
    hidden, weight, bias, labels, ref_c, ref_r = inputs()
    kw = {}
    if case == "hidden_2d":
        hidden = hidden[0]
    elif case == "h_mismatch":
        weight = weight[:, :-1]
    elif case == "labels_shape":
        labels = labels[:, :-1]
    elif case == "bias_shape":
        bias = torch.zeros(V + 1)
    elif case == "odd_rows":
        hidden, labels = hidden[:5], labels[:5]
    elif case == "bad_label":
        labels = labels.clone()
        labels[0, 5] = V
    elif case == "temperature":
        kw = {"temperature": 0.0}
    elif case == "weight_type":
        weight = weight.numpy()
    with pytest.raises(exc, match=word):
        linear_dpo_loss(hidden, weight, labels, ref_c, ref_r, bias, **kw)


def test_weight_gradient_accumulates_in_fp32_whatever_the_chunking(backend):
    """bf16 hidden states and LM head: each chunk's weight-gradient product is formed and summed in fp32 and
    rounded to bf16 once, at the end, so its error against float64 does not depend on the chunking. (When each
    chunk's product was rounded to bf16 before reaching the fp32 accumulator, the error grew from one chunk to
    4-row chunks here: 1.10x on the PyTorch path, 1.05x through the interpreted kernels.) Both runs round the same
    dlogits to bf16 before the GEMM; the fp32 sums differ only in their last bits, far below bf16's rounding, so
    the errors agree to 1% (measured: equal)."""
    g = torch.Generator().manual_seed(3)
    Bq, Tq, Hq, Vq = 4, 24, 32, 256
    hidden = torch.randn(2 * Bq, Tq, Hq, generator=g).bfloat16()
    weight = (torch.randn(Vq, Hq, generator=g) / 3).bfloat16()
    bias = torch.randn(Vq, generator=g).bfloat16()
    labels = torch.randint(0, Vq, (2 * Bq, Tq), generator=g)
    labels[:, :4] = -100
    ref_c, ref_r = -60 + torch.randn(Bq, generator=g), -60 + torch.randn(Bq, generator=g)

    h64, w64, b64 = (t.double().requires_grad_(True) for t in (hidden, weight, bias))
    loss = fastdpo.dpo_loss(h64 @ w64.t() + b64, labels, ref_c, ref_r).loss
    ref_gw, ref_gb = torch.autograd.grad(loss, (w64, b64))

    def errors(chunk_rows, lean=False):
        h, w, b = leaves(hidden, weight, bias)
        out = linear_dpo_loss(h, w, labels, ref_c, ref_r, b, chunk_bytes=chunk_rows * Vq * 2, lean=lean)
        out.loss.backward()
        assert w.grad.dtype == torch.bfloat16
        return [((grad.double() - ref).norm() / ref.norm()).item() for grad, ref in ((w.grad, ref_gw),
                                                                                     (b.grad, ref_gb))]

    one = errors(2 * Bq * Tq)  # every completion token in one chunk
    for rows, lean in ((16, False), (4, False), (4, True)):  # 10 and 40 chunks; vocabulary tiles of 64
        many = errors(rows, lean)
        for e_one, e_many in zip(one, many):
            assert e_many <= 1.01 * e_one, (rows, lean, one, many)
            assert e_one < 2 ** -7  # bf16-sized, not more


def test_default_chunk_rows():
    """The default chunk: 128 MiB of logits on CPU, whatever the memory state (a function of the shapes alone)."""
    from fastdpo._linear import DEFAULT_CHUNK_BYTES, chunk_rows

    kw = dict(softcap=False, lean=False, chunk_bytes=None)
    assert chunk_rows(torch.device("cpu"), 128256, 2, **kw) == DEFAULT_CHUNK_BYTES // (128256 * 2)
    assert chunk_rows(torch.device("cpu"), 128256, 2, softcap=True, lean=False, chunk_bytes=None) == \
        DEFAULT_CHUNK_BYTES // (128256 * 4)
    assert chunk_rows(torch.device("cpu"), 1000, 4, softcap=False, lean=False, chunk_bytes=12000) == 3


@pytest.mark.parametrize("lean", [False, True])
def test_lean_holds_no_fp32_weight_gradient(backend, lean, monkeypatch):
    """The lean setting never creates an fp32 tensor of the LM head's size (the default keeps one: the weight
    gradient's accumulator); both give the logits path's gradients (test above)."""
    from helpers import Allocations, inline_custom_ops

    inline_custom_ops(monkeypatch)
    hidden, weight, _, labels, ref_c, ref_r = inputs(seed=4, dtype=torch.bfloat16)
    h, w = leaves(hidden, weight)
    with Allocations() as spy:
        linear_dpo_loss(h, w, labels, ref_c, ref_r, chunk_bytes=4 * V * 2, lean=lean).loss.backward()
    assert (V * H in spy.sizes(torch.float32)) != lean


@pytest.mark.parametrize("op", ["linear_dpo_loss", "linear_sequence_logps"])
def test_one_host_sync_per_call(monkeypatch, op):
    """On the kernels' path (what runs on CUDA), forward + backward read the device once (each sequence's
    completion-row count): no other .tolist(), .item(), boolean indexing or nonzero of unknown size. The backward
    of ``linear_sequence_logps`` reads those counts again from the CPU tensor the forward returned them in (host
    memory: no synchronisation; the GPU lane runs that backward under ``set_sync_debug_mode("error")``). The
    CPU-only label check, which reads the labels by design, is switched off here; the PyTorch path, for CPU
    tensors, reads host memory freely."""
    from helpers import HostReads

    from fastdpo import _library
    monkeypatch.setenv("FASTDPO_BACKEND", "triton")
    monkeypatch.setenv("FASTDPO_CHECK_LABELS", "0")
    counts = []
    forward = _library.linear_logps_forward

    def spy_forward(*args):
        out = forward(*args)
        counts.append(out[-1].data_ptr())
        return out
    monkeypatch.setattr(_library, "linear_logps_forward", spy_forward)
    hidden, weight, bias, labels, ref_c, ref_r = inputs(seed=5, bias=True)
    h, w, b = leaves(hidden, weight, bias)
    with HostReads(monkeypatch) as spy:
        if op == "linear_dpo_loss":
            loss = linear_dpo_loss(h, w, labels, ref_c, ref_r, b, chunk_bytes=11 * V * 4).loss
        else:
            loss = linear_sequence_logps(h, w, labels, b, chunk_bytes=11 * V * 4).logps.sum()
        loss.backward()
    if op == "linear_dpo_loss":
        assert spy.reads == ["tolist"], spy.reads
    else:
        assert spy.reads == ["tolist", "tolist"] and spy.tensors[1] == counts[0], (spy.reads, spy.tensors, counts)
