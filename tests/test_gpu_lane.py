"""The GPU lane: the kernels compiled for the GPU, held to the same float64 oracles as everywhere, with the GPU's
rounding (bf16 rounds to nearest there), and what only a GPU shows: no synchronising call, CUDA-graph capture,
offsets past 2^32 elements in real memory.

    FASTDPO_TEST_LANE=cuda python -m pytest tests/test_gpu_lane.py      # on a CUDA machine

The lane needs a process without Triton's interpreter, which ``tests/conftest.py`` turns on for every other
run: with ``FASTDPO_TEST_LANE=cuda`` it leaves it off and collects this file alone. In the ordinary run (CPU, CI)
the same checks run on the kernels through the interpreter ("interpreted", at small sizes), so the lane's own
code runs everywhere, and the CUDA cases are collected and reported as skipped with the reason.
"""

import os

import pytest
import torch

import fastdpo
from helpers import logp_tol
from test_dpo_loss import SMOOTHED, make_pairs
from test_dpo_loss import check as check_dpo
from test_sequence_logps import check as check_logps
from test_sequence_logps import make_batch

LANE = os.environ.get("FASTDPO_TEST_LANE", "")
ON_CUDA = LANE == "cuda" and torch.cuda.is_available()
WHY = ("the GPU lane: run FASTDPO_TEST_LANE=cuda python -m pytest tests/test_gpu_lane.py on a CUDA machine"
       if not ON_CUDA else "")
cuda_only = pytest.mark.skipif(not ON_CUDA, reason=WHY or "-")


def interpreted(*values):
    return pytest.param("interpreted", *values, marks=pytest.mark.skipif(LANE == "cuda", reason="the CPU run's lane"))


def cuda(*values):
    return pytest.param("cuda", *values, marks=cuda_only)


LANES = [interpreted(), cuda()]


@pytest.fixture
def on(request, monkeypatch):
    """The device the lane runs fastdpo on: CUDA (compiled kernels), or CPU through the interpreted kernels."""
    if request.param == "interpreted":
        monkeypatch.setenv("FASTDPO_BACKEND", "triton")
        return torch.device("cpu")
    monkeypatch.setenv("FASTDPO_BACKEND", "auto")
    return torch.device("cuda")


SMALL_V = [1, 7, 1000]
LARGE_V = [32000, 128256, 151936, 300007]  # real vocabularies, and one past any block size (CUDA only)


@pytest.mark.parametrize("on,V", [interpreted(v) for v in SMALL_V] + [cuda(v) for v in SMALL_V + LARGE_V],
                         indirect=["on"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shift", [True, False])
def test_sequence_logps(on, V, dtype, shift):
    N, T = (3, 7) if V <= 1000 else (2, 5)
    check_logps(*make_batch(N, T, V, dtype, mask="random"), shift=shift, device=on)


SMALL_VOCABS = list(range(2, 34)) + [63, 64, 100, 255, 256, 257, 500, 511, 512, 513, 700, 1000, 1023, 1024]


@pytest.mark.parametrize("on", LANES, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_small_vocabularies_rows_of_very_different_scales(on, dtype):
    """V = 2..1024 take the multi-row tiles (4 x 512, 2 x 1024): rows of scales 0.01 to 30 side by side in one
    tile, so that an element of one row summed into another (a reordering reshape once did that on sm_90) shows.
    Interpreted: a few sizes (the interpreter keeps element order anyway; the AOT check guards the GPU code)."""
    vocabs = SMALL_VOCABS if on.type == "cuda" else [2, 33, 512, 1000]
    scales = torch.tensor([0.01, 30.0, 1.0, 10.0, 0.1, 3.0]).view(1, 6, 1)
    for V in vocabs:
        logits, labels = make_batch(4, 6, V, torch.float32, mask="random", seed=V)
        out, _ = check_logps((logits * scales).to(dtype), labels, device=on, return_token_stats=True)
        x = (logits * scales).to(dtype).double()
        ent = torch.logsumexp(x, -1) - (torch.softmax(x, -1) * x).sum(-1)
        valid = labels[:, 1:] != -100
        torch.testing.assert_close(out.token_stats["entropy"][:, 1:].cpu().double(),
                                   torch.where(valid, ent[:, :-1], 0.0), rtol=1e-4, atol=1e-4, msg=f"V={V}")
        top1 = x.argmax(-1)[:, :-1] == labels[:, 1:]
        assert torch.equal(out.token_stats["is_top1"][:, 1:].cpu(), top1 & valid), f"V={V}"


@pytest.mark.parametrize("on", LANES, indirect=True)
def test_minus_inf_vocabulary_blocks(on):
    """A row's first vocabulary block all -inf (the online log-sum-exp once gave NaN there), a middle block, and
    a padded vocabulary's tail: finite where the label's logit is finite, equal to float64."""
    V = 9000 if on.type == "cpu" else 128256
    for masked in (slice(0, 8192), slice(4096, 12288 if V > 12288 else 8000), slice(V - 300, V)):
        logits, _ = make_batch(2, 4, V, torch.float32, mask="none")
        logits[..., masked] = float("-inf")
        g = torch.Generator().manual_seed(1)
        labels = torch.randint(0, masked.start, (2, 4), generator=g) if masked.start > 0 else \
            torch.randint(masked.stop, V, (2, 4), generator=g)
        for dtype in (torch.float32, torch.bfloat16):
            out, grad = check_logps(logits.to(dtype), labels, device=on, return_token_stats=True)
            assert torch.isfinite(out.logps).all() and torch.isfinite(grad).all()
            # the mean logit of a row holding -inf is -inf, as the oracle's (and TRL's) mean; the rest are finite
            assert all(torch.isfinite(out.token_stats[k]).all() for k in ("entropy", "log_sum_sq_probs"))


@pytest.mark.parametrize("on", LANES, indirect=True)
def test_vocabulary_major_logits(on):
    """Vocabulary-major logits (strides (T, 1, N * T)): the variant without ALIGNED, int64 column offsets."""
    logits, labels = make_batch(3, 5, 1000, torch.float32, mask="random")
    vmajor = logits.permute(2, 0, 1).contiguous().permute(1, 2, 0)
    out = fastdpo.sequence_logps(vmajor.to(on), labels.to(on), return_token_logps=True)
    ref = fastdpo.sequence_logps(logits.to(on), labels.to(on), return_token_logps=True)
    torch.testing.assert_close(out.token_logps, ref.token_logps, rtol=0, atol=logp_tol(logits))


@cuda_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_torch_backend_on_cuda(monkeypatch, dtype):
    """FASTDPO_BACKEND=torch with CUDA tensors (the PyTorch path once allocated a chunk on the CPU and crashed)."""
    monkeypatch.setenv("FASTDPO_BACKEND", "torch")
    check_logps(*make_batch(3, 7, 1000, dtype, mask="random"), device=torch.device("cuda"))
    check_dpo(*make_pairs(seed=5), device=torch.device("cuda"))


@cuda_only
def test_vocabulary_major_offsets_past_2_32_elements():
    """Vocabulary-major bf16 logits 16 x 2048 x 128256 (4.2e9 elements, 8.4 GB): entry v of a row lies
    v * 32768 elements in, past 2^31 from v = 65536; forward reads and in-place backward writes there."""
    N, T, V = 16, 2048, 128256
    base = torch.empty(V, N * T, dtype=torch.bfloat16, device="cuda")
    logits = base.t().view(N, T, V)
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(2, V, generator=g).to(torch.bfloat16)
    labels = torch.full((N, T), -100, dtype=torch.long)
    labels[15, 2046] = 127000  # row (15, 2045) scores it: the last rows, the farthest entries
    labels[15, 2047] = 100
    logits[15, 2045:2047] = rows.cuda()
    x = logits.requires_grad_(True)
    out = fastdpo.sequence_logps(x, labels.cuda(), inplace_backward=True, return_token_logps=True)
    ref = torch.log_softmax(rows.double(), -1)[[0, 1], [127000, 100]]
    torch.testing.assert_close(out.token_logps[15, 2046:].double().cpu(), ref, rtol=0, atol=logp_tol(rows))
    out.logps.sum().backward()
    grad = logits.detach()[15, 2045:2047].float().cpu()
    p = torch.softmax(rows.double(), -1)
    want = -p
    want[0, 127000] += 1
    want[1, 100] += 1
    torch.testing.assert_close(grad.double(), want, rtol=2 ** -7, atol=1e-6)
    del base, logits, x


@pytest.mark.parametrize("on", LANES, indirect=True)
def test_sequence_logps_strided_views(on):
    """``logits[:, :-1]`` with ``labels[:, 1:]`` read in place, and a vocabulary stride of 2, on the device."""
    logits, labels = make_batch(3, 9, 1000, torch.float32, mask="random")
    x = logits.to(on).requires_grad_(True)
    out = fastdpo.sequence_logps(x[:, :-1], labels.to(on)[:, 1:], shift=False)
    out.logps.sum().backward()
    ref = fastdpo.naive.naive_sequence_logps(logits[:, :-1].double(), labels[:, 1:], shift=False,
                                             dtype=torch.float64)[0]
    torch.testing.assert_close(out.logps.double().cpu(), ref, rtol=0, atol=logp_tol(logits) * 9)
    assert (x.grad[:, -1] == 0).all()
    wide = torch.zeros(3, 9, 2000, device=on)
    wide[..., ::2] = logits.to(on)
    strided = fastdpo.sequence_logps(wide[..., ::2], labels.to(on)).logps
    plain = fastdpo.sequence_logps(logits.to(on), labels.to(on)).logps
    assert torch.equal(strided, plain)


@pytest.mark.parametrize("on", LANES, indirect=True)
@pytest.mark.parametrize("loss_type", fastdpo.LOSS_TYPES)
def test_dpo_loss_every_loss_type(on, loss_type):
    check_dpo(*make_pairs(), device=on, loss_type=loss_type, label_smoothing=SMOOTHED.get(loss_type, 0.0))


@pytest.mark.parametrize("on", LANES, indirect=True)
@pytest.mark.parametrize("options", [dict(loss_type=["sigmoid", "sft"], use_weighting=True),
                                     dict(loss_type="sigmoid", ld_alpha=0.5), dict(loss_type="ipo", nll_alpha=0.2)])
def test_dpo_loss_wpo_ld_nll(on, options):
    check_dpo(*make_pairs(seed=3), device=on, **options)


@pytest.mark.parametrize("on", LANES, indirect=True)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dpo_loss_half_precision(on, dtype):
    logits, labels, ref_c, ref_r = make_pairs(seed=4, V=2000)
    check_dpo(logits.to(dtype), labels, ref_c, ref_r, device=on)


@pytest.mark.parametrize("on", LANES, indirect=True)
@pytest.mark.parametrize("lean", [False, True])
def test_linear_dpo_loss_equals_logits_path(on, lean):
    g = torch.Generator().manual_seed(0)
    B, T, H, V = 3, 10, 16, 300
    hidden = torch.randn(2 * B, T, H, generator=g).to(on).requires_grad_(True)
    weight = (torch.randn(V, H, generator=g) / 2).to(on).requires_grad_(True)
    labels = torch.randint(0, V, (2 * B, T), generator=g)
    labels[:, :3] = -100
    labels = labels.to(on)
    ref_c, ref_r = (-40 + torch.randn(B, generator=g)).to(on), (-40 + torch.randn(B, generator=g)).to(on)
    out = fastdpo.linear_dpo_loss(hidden, weight, labels, ref_c, ref_r, chunk_bytes=4 * V * 4, lean=lean)
    gh, gw = torch.autograd.grad(out.loss, (hidden, weight))
    ref = fastdpo.dpo_loss(hidden @ weight.t(), labels, ref_c, ref_r)
    rh, rw = torch.autograd.grad(ref.loss, (hidden, weight))
    for a, b in ((out.loss, ref.loss), (gh, rh), (gw, rw)):  # fp32 through other GEMM groupings
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * max(1.0, b.abs().max().item()))


@pytest.mark.parametrize("on", LANES, indirect=True)
def test_nan_isolation_and_determinism(on):
    """A NaN logit in one sequence's completion makes that sequence's outputs and gradient row NaN and leaves the
    others exact; two runs give the same bits."""
    logits, labels = make_batch(4, 8, 1000, torch.float32, mask="none")
    logits[1, 3, 17] = float("nan")
    runs = []
    for _ in range(2):
        x = logits.to(on).requires_grad_(True)
        out = fastdpo.sequence_logps(x, labels.to(on))
        out.logps.sum().backward()
        runs.append((out.logps.cpu(), x.grad.cpu()))
    (lp, grad), (lp2, grad2) = runs
    assert torch.equal(lp.nan_to_num(7.0), lp2.nan_to_num(7.0)) and torch.equal(grad.nan_to_num(7.0),
                                                                                 grad2.nan_to_num(7.0))
    assert torch.isnan(lp[1]) and torch.isfinite(lp[[0, 2, 3]]).all()
    assert torch.isnan(grad[1, 3]).all() and torch.isfinite(grad[[0, 2, 3]]).all()
    clean = fastdpo.sequence_logps(logits[[0, 2, 3]].to(on), labels[[0, 2, 3]].to(on)).logps.cpu()
    assert torch.equal(lp[[0, 2, 3]], clean)


@cuda_only
def test_offsets_past_2_32_elements():
    """Rows whose logits start past 2^32 elements (8.6 GB of bf16, in real memory): forward and backward read
    and write them at their true offsets."""
    T, V = 33600, 128256  # 4.31e9 elements
    logits = torch.empty(1, T, V, dtype=torch.bfloat16, device="cuda")
    tail = torch.randn(1, 4, V, dtype=torch.float32).to(torch.bfloat16)
    logits[:, -4:] = tail.cuda()
    labels = torch.full((1, T), -100, dtype=torch.long)
    labels[0, -3:] = torch.randint(0, V, (3,))
    logits.requires_grad_(True)
    out = fastdpo.sequence_logps(logits, labels.cuda())  # only rows T-4 .. T-2 are read
    out.logps.sum().backward()
    ref = fastdpo.naive.naive_sequence_logps(tail.double(), labels[:, -4:], dtype=torch.float64)[0]
    torch.testing.assert_close(out.logps.double().cpu(), ref, rtol=0, atol=logp_tol(tail) * 4)
    g = logits.grad[0, -4:-1].float()
    assert torch.isfinite(g).all() and (g.sum(-1).abs() < 1e-2).all()  # each row's gradient sums to ~0
    assert (logits.grad[0, -1] == 0).all() and (logits.grad[0, : T - 4].count_nonzero() == 0)


def _pairs_on_cuda(dtype=torch.bfloat16):
    logits, labels, ref_c, ref_r = make_pairs(B=4, T=64, V=32000)
    return logits.to("cuda", dtype).requires_grad_(True), labels.cuda(), ref_c.cuda(), ref_r.cuda()


@cuda_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_no_synchronising_call(dtype):
    """dpo_loss and sequence_logps, forward and backward, never block the host on the device."""
    logits, labels, ref_c, ref_r = _pairs_on_cuda(dtype)
    fastdpo.dpo_loss(logits, labels, ref_c, ref_r).loss.backward()  # compile outside the checked region
    fastdpo.sequence_logps(logits, labels).logps.sum().backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fastdpo.dpo_loss(logits, labels, ref_c, ref_r).loss.backward()
        fastdpo.sequence_logps(logits, labels).logps.sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@cuda_only
def test_dpo_step_captured_in_a_cuda_graph():
    """A dpo_loss forward + backward replays from a CUDA graph with the eager results."""
    logits, labels, ref_c, ref_r = _pairs_on_cuda()

    def step():
        logits.grad = None
        out = fastdpo.dpo_loss(logits, labels, ref_c, ref_r)
        out.loss.backward()
        return out.loss, out.metrics["rewards/margins"], logits.grad

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    eager = [t.clone() for t in step()]
    graph = torch.cuda.CUDAGraph()
    logits.grad = None
    with torch.cuda.graph(graph):
        static = step()
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(static, eager):
        assert torch.equal(a, b)


@cuda_only
def test_vocab_parallel_on_a_one_gpu_nccl_group(tmp_path):
    """process_group= over NCCL: a group of one GPU holds the whole vocabulary, so every output and gradient is
    the ordinary op's (the multi-rank maths is held to the single-process op over gloo in test_vocab_parallel)."""
    import torch.distributed as dist

    dist.init_process_group("nccl", init_method=f"file://{tmp_path}/init", rank=0, world_size=1)
    try:
        g = dist.new_group([0])
        logits, labels = make_batch(4, 64, 32000, torch.bfloat16, mask="prompt")
        logits, labels = logits.cuda(), labels.cuda()
        ref_c, ref_r = torch.tensor([-20.0, -25.0], device="cuda"), torch.tensor([-22.0, -21.0], device="cuda")
        outs = []
        for group in (None, g):
            x = logits.clone().requires_grad_()
            out = fastdpo.dpo_loss(x, labels, ref_c, ref_r, process_group=group)
            out.loss.backward()
            outs.append((out.loss, out.metrics, x.grad))
        (la, ma, ga), (lb, mb, gb) = outs
        torch.testing.assert_close(lb, la, rtol=1e-5, atol=1e-5)
        for k in ma:
            torch.testing.assert_close(mb[k], ma[k], rtol=1e-5, atol=1e-4, msg=k)
        torch.testing.assert_close(gb.float(), ga.float(), rtol=2 ** -7, atol=1e-6)
    finally:
        dist.destroy_process_group()


@cuda_only
def test_trl_patch_under_accelerate_fsdp2(tmp_path):
    """TRL's DPOTrainer with accelerate's FSDP2 on one GPU, as shipped and patched: the same logs and weights."""
    from dist_utils import run_ranks
    from test_data_parallel import _trl_ranks

    run_ranks(_trl_ranks, 1, str(tmp_path), True, init=False,
              env={"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FASTDPO_BACKEND": "auto"})


@pytest.mark.parametrize("on", LANES, indirect=True)
@pytest.mark.parametrize("frozen_head", [False, True])
def test_linear_dpo_loss_compiled_equals_eager(on, frozen_head):
    """torch.compile(fullgraph=True) of the fused-linear loss (its backward compiled by AOTAutograd): eager's
    results; with a frozen head, no weight gradient."""
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(6)
    B, T, H, V = 2, 16, 32, 1000
    hidden = torch.randn(2 * B, T, H, generator=g).to(on)
    weight = (torch.randn(V, H, generator=g) / 4).to(on)
    labels = torch.randint(0, V, (2 * B, T), generator=g)
    labels[:, :4] = -100
    labels = labels.to(on)

    def loss_fn(h, w):
        return fastdpo.linear_dpo_loss(h, w, labels, chunk_bytes=12 * V * 4).loss
    runs = []
    for fn in (loss_fn, torch.compile(loss_fn, fullgraph=True)):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_(not frozen_head)
        loss = fn(h, w)
        loss.backward()
        runs.append((loss.detach(), h.grad, w.grad))
    torch.testing.assert_close(runs[1][0], runs[0][0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(runs[1][1], runs[0][1], rtol=1e-5, atol=1e-6)
    assert (runs[0][2] is None) == (runs[1][2] is None) == frozen_head


@cuda_only
def test_linear_dpo_step_captured_in_a_cuda_graph():
    """The fused-linear DPO forward + backward captured in a CUDA graph (every row through the head during
    capture: no host read) and replayed: eager's loss and gradients within fp32 rounding; and the backward of
    linear_sequence_logps never synchronises (its row counts come from the forward, in host memory)."""
    g = torch.Generator().manual_seed(7)
    B, T, H, V = 4, 128, 256, 32000
    hidden = (torch.randn(2 * B, T, H, generator=g) / 16).cuda().requires_grad_()
    weight = torch.randn(V, H, generator=g).cuda().requires_grad_()
    labels = torch.randint(0, V, (2 * B, T), generator=g)
    labels[:, :32] = -100
    labels = labels.cuda()

    def step():
        hidden.grad = weight.grad = None
        loss = fastdpo.linear_dpo_loss(hidden, weight, labels).loss
        loss.backward()
        return loss.detach(), hidden.grad, weight.grad

    eager = [t.clone() for t in step()]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = step()
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(static, eager):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * max(1.0, b.abs().max().item()))

    out = fastdpo.linear_sequence_logps(hidden, weight, labels)  # forward: one host read, by design
    loss = out.logps.sum()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("on", LANES, indirect=True)
def test_packed_equals_padded(on):
    """A packed batch (cu_seqlens) through dpo_loss and linear_dpo_loss on the device: the padded batch's loss
    and gradients; on CUDA the logits path does it without a synchronising call."""
    from test_packed import pack, padded_batch

    lengths = [40, 0, 33, 1, 17, 25]
    logits, labels = padded_batch(lengths, V=1000, seed=11)
    ref_c, ref_r = torch.tensor([-50.0, -60.0, -40.0]).to(on), torch.tensor([-55.0, -45.0, -42.0]).to(on)
    x = logits.to(on).clone().requires_grad_()
    a = fastdpo.dpo_loss(x, labels.to(on), ref_c, ref_r, ld_alpha=0.5)
    a.loss.backward()
    packed, cu = pack(logits, lengths)
    xp = packed.to(on).clone().requires_grad_()
    plabels, cu = pack(labels, lengths)[0].to(on), cu.to(on)
    if on.type == "cuda":
        fastdpo.dpo_loss(xp, plabels, ref_c, ref_r, cu_seqlens=cu, ld_alpha=0.5).loss.backward()  # compile first
        xp.grad = None
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
    try:
        b = fastdpo.dpo_loss(xp, plabels, ref_c, ref_r, cu_seqlens=cu, ld_alpha=0.5)
        b.loss.backward()
    finally:
        if on.type == "cuda":
            torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(b.loss, a.loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(xp.grad.cpu(), pack(x.grad.cpu(), lengths)[0], rtol=1e-5, atol=1e-9)
    g = torch.Generator().manual_seed(12)
    hidden, weight = torch.randn(len(lengths), max(lengths), 16, generator=g), torch.randn(1000, 16, generator=g)
    h = hidden.to(on).clone().requires_grad_()
    a = fastdpo.linear_dpo_loss(h, weight.to(on), labels.to(on), ref_c, ref_r)
    a.loss.backward()
    hp = pack(hidden, lengths)[0].to(on).clone().requires_grad_()
    b = fastdpo.linear_dpo_loss(hp, weight.to(on), plabels, ref_c, ref_r, cu_seqlens=cu)
    b.loss.backward()
    torch.testing.assert_close(b.loss, a.loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hp.grad.cpu(), pack(h.grad.cpu(), lengths)[0], rtol=1e-5, atol=1e-6)
