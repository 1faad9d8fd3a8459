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


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_vocab_parallel_logits(world, backend):
    run_ranks(_logits_cases, world, env={"FASTDPO_BACKEND": backend})


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("backend", ["torch", "triton"])
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
    """What crosses the network, counted by spying on the collectives: per call one all-gather of 3 int64 (the
    split check) and one of K fp32 per position (logits ops) or per completion token (fused linear); nothing in
    the logits ops' backward; the fused-linear hidden-state gradient all-reduced once."""
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
        check = ("all_gather", torch.int64, 3)
        fastdpo.sequence_logps(part, labels, process_group=group).logps.sum().backward()
        assert sent == [check, ("all_gather", torch.float32, 2 * N * T)], sent
        sent.clear()
        fastdpo.dpo_loss(part, labels, process_group=group).loss.backward()
        assert sent == [check, ("all_gather", torch.float32, 7 * N * T)], sent
        sent.clear()
        H = 8
        hidden = torch.randn(N, T, H, requires_grad=True)
        weight = torch.randn(VP, H, requires_grad=True)
        M = int((labels[:, 1:] != -100).sum())  # completion tokens
        fastdpo.linear_dpo_loss(hidden, weight, labels, process_group=group).loss.backward()
        assert sent == [check, ("all_gather", torch.float32, 7 * M), ("all_reduce", torch.float32, N * T * H)], sent
    finally:
        vocab._all_gather, vocab.dist.all_reduce = gather, reduce_


def test_vocab_parallel_traffic():
    run_ranks(_traffic, 2)
