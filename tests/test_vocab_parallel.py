"""Vocabulary-parallel ops (``process_group=``) over gloo, 2 and 3 ranks, on the PyTorch path and on the Triton
kernels (interpreted): every output and gradient held to the single-process op on the whole vocabulary.

Tolerances: both sides compute in fp32 from the same logits; they differ only in how the log-sum-exp and the
statistics are associated (per shard, then combined), a few fp32 ulps of each token's magnitude: ``logp_tol`` per
token, T of them per sequence. Gradients: ``assert_grad_close``'s bound (coef * the same error, one rounding).
"""

import math

import pytest
import torch
import torch.distributed as dist

import fastdpo
from dist_utils import run_ranks
from helpers import logp_tol

VP = 37  # odd; the vocabulary (74, 111) is no power of two
N, T = 4, 9


def _batch(world, dtype=torch.float32, seed=0):
    """Logits of the whole vocabulary (the same on every rank), labels with a prompt, padding and one sequence
    with no completion token; ties across shards for is_top1."""
    V = VP * world
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(N, T, V, generator=g) * 3).to(dtype)
    labels = torch.randint(0, V, (N, T), generator=g)
    labels[:, :2] = -100  # prompt
    labels[1, 7:] = -100  # padding
    labels[3] = -100  # a sequence without completion tokens (a rejected one: pair 1)
    # is_top1 across shards: the label's logit is the row maximum, tied with an entry of an earlier shard (not the
    # first argmax), or of a later shard (first argmax); and one label that is the maximum alone
    for t, (lab, other) in ((2, (V - 1, 0)), (3, (1, V - 2)), (4, (VP + 3, None))):
        row = t - 1  # shift: row t - 1 scores label t
        labels[0, t] = lab
        logits[0, row, lab] = 20.0
        if other is not None:
            logits[0, row, other] = 20.0
    return logits, labels


def _shard(x, rank, dim=-1):
    return x.narrow(dim, rank * VP, VP)


def _close(actual, expected, atol, what):
    torch.testing.assert_close(actual.double(), expected.double(), rtol=1e-5, atol=atol, equal_nan=True, msg=what)


def _grad_close(actual, expected, tol, what):
    torch.testing.assert_close(actual.double(), expected.double(), rtol=2 * torch.finfo(actual.dtype).eps,
                               atol=tol, equal_nan=True, msg=what)


def _logits_cases(rank, world):
    group = dist.group.WORLD
    logits, labels = _batch(world)
    tol = logp_tol(logits)
    # sequence_logps: outputs, statistics and the gradient of a mix of per-sequence and per-token upstream grads
    for shift, average in ((True, False), (False, True)):
        full = logits.clone().requires_grad_()
        part = _shard(logits, rank).clone().requires_grad_()
        kw = dict(shift=shift, average=average, return_token_logps=True, return_token_stats=True)
        a = fastdpo.sequence_logps(full, labels, **kw)
        b = fastdpo.sequence_logps(part, labels, process_group=group, **kw)
        _close(b.logps, a.logps, T * tol, "logps")
        _close(b.token_logps, a.token_logps, tol, "token_logps")
        assert torch.equal(b.num_tokens, a.num_tokens)
        for k in a.token_stats:
            _close(b.token_stats[k], a.token_stats[k], tol, k)
        if shift:  # the ties placed in _batch: first argmax in shard 0, not the label; in a later shard; alone
            assert a.token_stats["is_top1"][0, 2:5].tolist() == [False, True, True]
        w_seq, w_tok = torch.linspace(-1, 1, N), torch.linspace(-0.5, 0.7, N * T).view(N, T)
        ((a.logps * w_seq).sum() + (a.token_logps * w_tok).sum()).backward()
        ((b.logps * w_seq).sum() + (b.token_logps * w_tok).sum()).backward()
        _grad_close(part.grad, _shard(full.grad, rank), 4 * tol, "dlogits")

    # dpo_loss across loss types: loss, log-probs, rewards, every metric, the gradient
    ref_c, ref_r = torch.tensor([-20.0, -25.0]), torch.tensor([-22.0, -21.0])
    configs = [dict(), dict(loss_type="ipo"), dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5]),
               dict(loss_type="aot"), dict(use_weighting=True), dict(ld_alpha=0.5), dict(reference_free=True)]
    for cfg in configs:
        refs = (None, None) if cfg.pop("reference_free", False) else (ref_c, ref_r)
        full = logits.clone().requires_grad_()
        part = _shard(logits, rank).clone().requires_grad_()
        a = fastdpo.dpo_loss(full, labels, *refs, beta=0.1, **cfg)
        b = fastdpo.dpo_loss(part, labels, *refs, beta=0.1, process_group=group, **cfg)
        _close(b.loss, a.loss, T * tol, f"loss {cfg}")
        for name in ("chosen_logps", "rejected_logps", "chosen_rewards", "rejected_rewards"):
            _close(getattr(b, name), getattr(a, name), T * tol, f"{name} {cfg}")
        for k in a.metrics:
            _close(b.metrics[k], a.metrics[k], T * tol, f"{k} {cfg}")
        a.loss.backward()
        b.loss.backward()
        _grad_close(part.grad, _shard(full.grad, rank), 4 * tol, f"dlogits {cfg}")

    # NaN in one rank's shard: the same NaNs as the unsharded op, and nothing else changes
    bad = logits.clone()
    bad[2, 4, VP * (world - 1) + 5] = float("nan")  # last rank's shard; row 4 of sequence 2 (pair 0, rejected)
    a = fastdpo.sequence_logps(bad, labels, return_token_logps=True, return_token_stats=True)
    b = fastdpo.sequence_logps(_shard(bad, rank), labels, return_token_logps=True, return_token_stats=True,
                               process_group=group)
    assert torch.isnan(b.logps).tolist() == [False, False, True, False]
    _close(b.token_logps, a.token_logps, tol, "token_logps with NaN")
    for k in a.token_stats:
        _close(b.token_stats[k], a.token_stats[k], tol, f"{k} with NaN")

    # bf16 logits, the in-place backward
    lb = logits.to(torch.bfloat16)
    full = lb.clone().requires_grad_()
    part = _shard(lb, rank).clone().requires_grad_()
    a = fastdpo.dpo_loss(full, labels, ref_c, ref_r)
    b = fastdpo.dpo_loss(part, labels, ref_c, ref_r, process_group=group)
    _close(b.loss, a.loss, T * logp_tol(lb), "bf16 loss")
    a.loss.backward()
    b.loss.backward()
    torch.testing.assert_close(part.grad.float(), _shard(full.grad, rank).float(), rtol=2 ** -7, atol=1e-6)


def _linear_cases(rank, world):
    group = dist.group.WORLD
    _, labels = _batch(world)
    H, V = 8, VP * world
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(N, T, H, generator=g)
    weight = torch.randn(V, H, generator=g)
    bias = torch.randn(V, generator=g) * 0.1
    tol = logp_tol(torch.randn(N, T, V, generator=g) * 4)
    # linear_sequence_logps: chunks of 4 rows; the vocabulary-tiled (lean) backward
    for lean in (False, True):
        hf, hs = hidden.clone().requires_grad_(), hidden.clone().requires_grad_()
        wf, ws = weight.clone().requires_grad_(), _shard(weight, rank, 0).clone().requires_grad_()
        bf, bs = bias.clone().requires_grad_(), _shard(bias, rank, 0).clone().requires_grad_()
        kw = dict(return_token_logps=True, return_token_stats=True, lean=lean)
        a = fastdpo.linear_sequence_logps(hf, wf, labels, bf, chunk_bytes=4 * V * 4, **kw)
        b = fastdpo.linear_sequence_logps(hs, ws, labels, bs, chunk_bytes=4 * VP * 4, process_group=group, **kw)
        _close(b.logps, a.logps, T * tol, "linear logps")
        _close(b.token_logps, a.token_logps, tol, "linear token_logps")
        for k in a.token_stats:
            _close(b.token_stats[k], a.token_stats[k], tol, f"linear {k}")
        w = torch.linspace(-1, 1, N)
        (a.logps * w).sum().backward()
        (b.logps * w).sum().backward()
        _grad_close(hs.grad, hf.grad, 1e-5, "grad hidden")
        _grad_close(ws.grad, _shard(wf.grad, rank, 0), 1e-5, "grad weight")
        _grad_close(bs.grad, _shard(bf.grad, rank, 0), 1e-5, "grad bias")
    # linear_dpo_loss: two loss types, chunked and lean
    ref_c, ref_r = torch.tensor([-20.0, -25.0]), torch.tensor([-22.0, -21.0])
    for cfg, lean in ((dict(), False), (dict(loss_type="aot"), True), (dict(use_weighting=True), False)):
        hf, hs = hidden.clone().requires_grad_(), hidden.clone().requires_grad_()
        wf, ws = weight.clone().requires_grad_(), _shard(weight, rank, 0).clone().requires_grad_()
        a = fastdpo.linear_dpo_loss(hf, wf, labels, ref_c, ref_r, chunk_bytes=4 * V * 4, lean=lean, **cfg)
        b = fastdpo.linear_dpo_loss(hs, ws, labels, ref_c, ref_r, chunk_bytes=4 * VP * 4, lean=lean,
                                    process_group=group, **cfg)
        _close(b.loss, a.loss, T * tol, f"linear loss {cfg}")
        for k in a.metrics:
            _close(b.metrics[k], a.metrics[k], T * tol, f"linear {k} {cfg}")
        a.loss.backward()
        b.loss.backward()
        _grad_close(hs.grad, hf.grad, 1e-5, f"grad hidden {cfg}")
        _grad_close(ws.grad, _shard(wf.grad, rank, 0), 1e-5, f"grad weight {cfg}")


def _uneven_split(rank, world):
    """Rank 0 holds VP entries, the others VP + 1: every rank raises before any kernel runs."""
    logits = torch.randn(2, 5, VP + (rank > 0))
    labels = torch.zeros(2, 5, dtype=torch.long)
    with pytest.raises(ValueError, match="same number of vocabulary entries"):
        fastdpo.dpo_loss(logits, labels, process_group=dist.group.WORLD)
    with pytest.raises(ValueError, match="same number of vocabulary entries"):
        fastdpo.linear_sequence_logps(torch.randn(2, 5, 4), torch.randn(VP + (rank > 0), 4), labels,
                                      process_group=dist.group.WORLD)
    # a label past the whole vocabulary is a ValueError on CPU (as unsharded), naming the global size
    labels[0, 3] = VP * world
    with pytest.raises(ValueError, match=rf"outside \[0, {VP * world}\)"):
        fastdpo.sequence_logps(torch.randn(2, 5, VP), labels, process_group=dist.group.WORLD)


# Three ranks on the PyTorch path, two on the interpreted kernels: what a third rank adds is in the collectives
# and the shard arithmetic, which both backends share; the kernels see one shard per rank either way.
WORLDS = [("torch", 2), ("torch", 3), ("triton", 2)]


@pytest.mark.parametrize("backend,world", WORLDS)
def test_vocab_parallel_logits(world, backend):
    run_ranks(_logits_cases, world, env={"FASTDPO_BACKEND": backend})


@pytest.mark.parametrize("backend,world", WORLDS)
def test_vocab_parallel_linear(world, backend):
    run_ranks(_linear_cases, world, env={"FASTDPO_BACKEND": backend})


def test_vocab_parallel_uneven_split():
    run_ranks(_uneven_split, 2)


def test_process_group_type():
    logits, labels = torch.randn(2, 4, 10), torch.zeros(2, 4, dtype=torch.long)
    with pytest.raises(TypeError, match="process_group must be"):
        fastdpo.sequence_logps(logits, labels, process_group="world")
    with pytest.raises(TypeError, match="process_group must be"):
        fastdpo.linear_dpo_loss(torch.randn(2, 4, 3), torch.randn(10, 3), labels, process_group=0)
    assert math.isfinite(fastdpo.dpo_loss(logits, labels).loss.item())  # None: the ordinary op


def _traffic(rank, world):
    """What crosses the network, counted by spying on the collectives: per call one all-gather of a few int64 (the
    ranks' agreement check, whatever the batch's size) and one of K fp32 per position (logits ops) or per
    completion token (fused linear); nothing in the logits ops' backward; the fused-linear hidden-state gradient
    all-reduced once."""
    import fastdpo._vocab as vocab

    sent = []
    gather, reduce_ = vocab._all_gather, dist.all_reduce

    def spy_gather(out, src, group):
        sent.append(("all_gather", src.dtype, src.numel()))
        return gather(out, src, group)

    def spy_reduce(x, group=None):
        sent.append(("all_reduce", x.dtype, x.numel()))
        return reduce_(x, group=group)
    vocab._all_gather, vocab.dist.all_reduce = spy_gather, spy_reduce
    try:
        group = dist.group.WORLD
        logits, labels = _batch(world)
        part = _shard(logits, rank).clone().requires_grad_()
        def check(entry):  # the agreement check: int64, a fixed size (no term in N, T or V)
            return entry[:2] == ("all_gather", torch.int64) and entry[2] <= 32
        fastdpo.sequence_logps(part, labels, process_group=group).logps.sum().backward()
        assert check(sent[0]) and sent[1:] == [("all_gather", torch.float32, 2 * N * T)], sent
        sent.clear()
        fastdpo.dpo_loss(part, labels, process_group=group).loss.backward()
        assert check(sent[0]) and sent[1:] == [("all_gather", torch.float32, 7 * N * T)], sent
        sent.clear()
        H = 8
        hidden = torch.randn(N, T, H, requires_grad=True)
        weight = torch.randn(VP, H, requires_grad=True)
        M = int((labels[:, 1:] != -100).sum())  # completion tokens
        fastdpo.linear_dpo_loss(hidden, weight, labels, process_group=group).loss.backward()
        assert check(sent[0]) and sent[1:] == [("all_gather", torch.float32, 7 * M),
                                               ("all_reduce", torch.float32, N * T * H)], sent
    finally:
        vocab._all_gather, vocab.dist.all_reduce = gather, reduce_


def test_vocab_parallel_traffic():
    run_ranks(_traffic, 2)


def _disagree(rank, world):
    """Ranks that disagree on what sizes or gates a collective: the same ValueError on every rank, before any
    collective but the agreement check, and the group still usable after (nothing is left waiting)."""
    group = dist.group.WORLD
    logits, labels = _batch(world)
    H = 8
    g = torch.Generator().manual_seed(3)
    hidden, weight = torch.randn(N, T, H, generator=g), torch.randn(VP, H, generator=g)
    other = labels.clone()
    if rank == 1:  # the same shape, other values: the fused linear's all-gather would be sized differently
        other[0, 2:] = -100
    with pytest.raises(ValueError, match="same labels"):
        fastdpo.linear_dpo_loss(hidden, weight, other, process_group=group)
    with pytest.raises(ValueError, match="same labels"):
        fastdpo.dpo_loss(_shard(logits, rank), other, process_group=group)
    with pytest.raises(ValueError, match="same labels"):
        fastdpo.linear_sequence_logps(hidden, weight, other, process_group=group)
    # a label out of range on one rank only: it differs, so every rank raises
    bad = labels.clone()
    if rank == 0:
        bad[0, 5] = VP * world + 7
    with pytest.raises(ValueError, match="same labels"):
        fastdpo.sequence_logps(_shard(logits, rank), bad, process_group=group)
    # ... and out of range on every rank: the range error, on every rank (checked with the agreement)
    bad[0, 5] = VP * world + 7
    with pytest.raises(ValueError, match=rf"outside \[0, {VP * world}\)"):
        fastdpo.linear_dpo_loss(hidden, weight, bad, process_group=group)
    # a gradient wanted on some ranks only: the backward's all-reduce would run there alone
    h = hidden.clone().requires_grad_(rank == 0)
    with pytest.raises(ValueError, match="requiring a gradient"):
        fastdpo.linear_dpo_loss(h, weight, labels, process_group=group)
    with pytest.raises(ValueError, match="requiring a gradient"):
        fastdpo.linear_sequence_logps(h, weight, labels, process_group=group)
    # statistics on some ranks only: the all-gather's size differs
    with pytest.raises(ValueError, match="options"):
        fastdpo.sequence_logps(_shard(logits, rank), labels, return_token_stats=rank == 0, process_group=group)
    # other ignore_index / shift on one rank
    with pytest.raises(ValueError, match="ignore_index, shift"):
        fastdpo.sequence_logps(_shard(logits, rank), labels, shift=rank == 0, process_group=group)
    # the group still works: nobody was left inside a collective
    out = fastdpo.linear_dpo_loss(hidden.clone().requires_grad_(), weight, labels, process_group=group)
    out.loss.backward()
    assert torch.isfinite(out.loss)


def test_vocab_parallel_ranks_that_disagree():
    run_ranks(_disagree, 2, timeout=300)


def _top1_small_scales(rank, world):
    """Every label the argmax of its row, logits at scales where ``logp + lse`` no longer reproduces the logit bit
    for bit: is_top1 and the token accuracy must equal the single-process op's (all hits), on both paths."""
    group = dist.group.WORLD
    V = VP * world
    for scale in (3.0, 0.3, 0.05):
        g = torch.Generator().manual_seed(7)
        logits = torch.randn(N, T, V, generator=g) * scale
        labels = torch.full((N, T), -100)
        labels[:, 1:] = logits[:, :-1].argmax(-1)  # shift: row t scores label t + 1
        a = fastdpo.sequence_logps(logits, labels, return_token_stats=True)
        b = fastdpo.sequence_logps(_shard(logits, rank), labels, return_token_stats=True, process_group=group)
        hits = a.token_stats["is_top1"][:, 1:]
        assert hits.all(), f"scale {scale}: the single-process op misses {int((~hits).sum())}"
        assert torch.equal(b.token_stats["is_top1"], a.token_stats["is_top1"]), f"scale {scale}"
        out = fastdpo.dpo_loss(_shard(logits, rank), labels, process_group=group)
        assert out.metrics["mean_token_accuracy"].item() == 1.0, scale
        # the fused linear: logits = hidden @ weight.T with a head whose argmax is each label
        H = 16
        hidden = torch.randn(N, T, H, generator=g)
        weight = torch.randn(V, H, generator=g) * scale
        z = hidden @ weight.t()
        lab = torch.full((N, T), -100)
        lab[:, 1:] = z[:, :-1].argmax(-1)
        c = fastdpo.linear_sequence_logps(hidden, _shard(weight, rank, 0), lab, return_token_stats=True,
                                          process_group=group)
        assert c.token_stats["is_top1"][:, 1:].all(), f"linear, scale {scale}"


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_vocab_parallel_top1_at_small_scales(backend):
    run_ranks(_top1_small_scales, 2, env={"FASTDPO_BACKEND": backend})


def _masked_shard(rank, world):
    """A row whose whole shard on one rank is -inf (a padded vocabulary, a constrained-decoding mask): finite
    and equal to the single-process op wherever the label's logit is finite; a -inf label gives -inf."""
    group = dist.group.WORLD
    logits, labels = _batch(world)
    logits[:, 3:6, :VP] = float("-inf")  # rows 3..5: rank 0's shard all -inf
    labels[:, 4:7] = VP + 1  # their labels (positions 4..6 with shift) in rank 1's shard: finite
    labels[2, 5] = 2  # one label inside the -inf shard: -inf
    full = logits.clone().requires_grad_()
    part = _shard(logits, rank).clone().requires_grad_()
    kw = dict(return_token_logps=True, return_token_stats=True)
    a = fastdpo.sequence_logps(full, labels, **kw)
    b = fastdpo.sequence_logps(part, labels, process_group=group, **kw)
    finite = torch.ones(N, T, dtype=torch.bool)
    finite[2, 5] = False
    assert torch.isfinite(a.token_logps[finite]).all() and torch.isfinite(b.token_logps[finite]).all()
    assert a.token_logps[2, 5] == float("-inf") and b.token_logps[2, 5] == float("-inf")
    tol = logp_tol(logits)
    _close(b.token_logps, a.token_logps, tol, "token_logps")
    for k in ("entropy", "log_sum_sq_probs", "is_top1"):
        _close(b.token_stats[k][finite], a.token_stats[k][finite], tol, k)
    w = torch.tensor([1.0, -1.0, 0.0, 0.5])  # sequence 2 (holding the -inf label) gets no gradient
    (a.logps * w).sum().backward()
    (b.logps * w).sum().backward()
    assert torch.isfinite(part.grad).all()
    _grad_close(part.grad, _shard(full.grad, rank), 4 * tol, "dlogits")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_vocab_parallel_masked_shard(backend):
    run_ranks(_masked_shard, 2, env={"FASTDPO_BACKEND": backend})


def _packed(rank, world):
    """A packed batch (cu_seqlens) on a vocabulary shard: the single-process packed op's outputs and gradients."""
    from test_packed import pack, padded_batch
    group = dist.group.WORLD
    lengths = [6, 0, 9, 1, 4, 3]
    logits, labels = padded_batch(lengths, V=VP * world, seed=8)
    packed, cu = pack(logits, lengths)
    plabels = pack(labels, lengths)[0]
    tol = logp_tol(logits)
    ref_c, ref_r = torch.tensor([-9.0, -12.0, -7.0]), torch.tensor([-10.0, -8.0, -11.0])
    for cfg in (dict(), dict(ld_alpha=0.5)):
        full = packed.clone().requires_grad_()
        part = _shard(packed, rank).clone().requires_grad_()
        a = fastdpo.dpo_loss(full, plabels, ref_c, ref_r, cu_seqlens=cu, **cfg)
        b = fastdpo.dpo_loss(part, plabels, ref_c, ref_r, cu_seqlens=cu, process_group=group, **cfg)
        _close(b.loss, a.loss, 10 * tol, f"packed loss {cfg}")
        for k in a.metrics:
            _close(b.metrics[k], a.metrics[k], 10 * tol, f"packed {k} {cfg}")
        a.loss.backward()
        b.loss.backward()
        _grad_close(part.grad, _shard(full.grad, rank), 4 * tol, "packed dlogits")
    a = fastdpo.sequence_logps(packed, plabels, cu_seqlens=cu, return_token_logps=True)
    b = fastdpo.sequence_logps(_shard(packed, rank), plabels, cu_seqlens=cu, return_token_logps=True,
                               process_group=group)
    _close(b.logps, a.logps, 10 * tol, "packed logps")
    H = 8
    g = torch.Generator().manual_seed(9)
    hidden, weight = torch.randn(packed.shape[0], H, generator=g), torch.randn(VP * world, H, generator=g)
    hf, hs = hidden.clone().requires_grad_(), hidden.clone().requires_grad_()
    a = fastdpo.linear_dpo_loss(hf, weight, plabels, ref_c, ref_r, cu_seqlens=cu)
    b = fastdpo.linear_dpo_loss(hs, _shard(weight, rank, 0), plabels, ref_c, ref_r, cu_seqlens=cu,
                                process_group=group)
    _close(b.loss, a.loss, 10 * tol, "packed linear loss")
    a.loss.backward()
    b.loss.backward()
    _grad_close(hs.grad, hf.grad, 1e-5, "packed linear grad hidden")
    # other offsets on one rank: the same ValueError on every rank
    other = cu.clone()
    if rank == 1:
        other[2] -= 1
        other[1] = min(int(other[1]), int(other[2]))
    with pytest.raises(ValueError, match="same (labels|cu_seqlens)"):  # (masked segment starts differ too)
        fastdpo.dpo_loss(_shard(packed, rank), plabels, ref_c, ref_r, cu_seqlens=other, process_group=group)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_vocab_parallel_packed(backend):
    run_ranks(_packed, 2, env={"FASTDPO_BACKEND": backend}, timeout=300)
