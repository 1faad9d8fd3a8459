"""What one call costs the host: the aten ops dispatched and the Triton kernels launched by a forward + backward.

On a GPU every aten op is ~5-10 us of Python and dispatch, and every launch more, so these counts are the CPU
proxy of the fixed cost per call (issue: dpo_loss dispatched 93 top-level ops, ~2.5 ms per call on an H100).
They run on the Triton path under the interpreter, whose own buffer handling inside a launch is excluded: each
kernel launch is wrapped in a profiler range and the ops under it are not counted. The CUDA-only checks (no
synchronising call, CUDA-graph capture) are in the GPU lane, ``tests/test_gpu_lane.py``.
"""

import collections

import pytest
import torch

import fastdpo
from fastdpo.kernels import dpo_loss as head_kernels
from fastdpo.kernels import logps as logps_kernels

KERNELS = [(logps_kernels, "_sequence_logps_fwd_kernel"), (logps_kernels, "_sequence_sums_kernel"),
           (logps_kernels, "_sequence_logps_bwd_kernel"), (head_kernels, "_dpo_loss_head_kernel")]


class _Counted:
    """A kernel whose launches are counted and run inside a profiler range named ``triton_launch``."""

    def __init__(self, kernel, launches, name):
        self.kernel, self.launches, self.name = kernel, launches, name

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches[self.name] += 1
            with torch.profiler.record_function("triton_launch"):
                return self.kernel[grid](*args, **kwargs)
        return launch


def _host_ops(fn, monkeypatch):
    """(aten ops dispatched by ``fn`` outside kernel launches, nested ops not counted; launches per kernel)."""
    launches = collections.Counter()
    for module, name in KERNELS:
        monkeypatch.setattr(module, name, _Counted(getattr(module, name), launches, name))
    fn()  # warm-up: compiles, caches
    launches.clear()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    ops = collections.Counter()
    for e in prof.events():
        if not e.name.startswith("aten::"):
            continue
        parent, nested = e.cpu_parent, False
        while parent is not None:
            if parent.name.startswith("aten::") or parent.name == "triton_launch":
                nested = True
                break
            parent = parent.cpu_parent
        if not nested:
            ops[e.name] += 1
    return ops, launches


def _pairs(B=2, T=16, V=300):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2 * B, T, V, generator=g).requires_grad_(True)
    labels = torch.randint(0, V, (2 * B, T), generator=g)
    labels[:, :4] = -100
    return logits, labels, torch.randn(B, generator=g) - 20, torch.randn(B, generator=g) - 20


def test_dpo_loss_host_cost(monkeypatch):
    """One dpo_loss forward + backward (sigmoid, every TRL metric): 4 launches (forward, per-sequence sums,
    loss head; backward) and a few dozen aten ops, most of them output allocations and views."""
    monkeypatch.setenv("FASTDPO_BACKEND", "triton")
    logits, labels, ref_c, ref_r = _pairs()
    cfg = fastdpo.DPOLossConfig(beta=0.1)

    def step():
        logits.grad = None
        out = fastdpo.dpo_loss(logits, labels, ref_c, ref_r, config=cfg)
        out.loss.backward()
        return out

    ops, launches = _host_ops(step, monkeypatch)
    assert dict(launches) == {"_sequence_logps_fwd_kernel": 1, "_sequence_sums_kernel": 1,
                              "_dpo_loss_head_kernel": 1, "_sequence_logps_bwd_kernel": 1}
    total = sum(ops.values())
    # 7 of them are the CPU-only label-range check; allocations of the 10 outputs; 5 views of the outputs
    assert total <= 32, ops
    assert ops["aten::empty"] + ops["aten::new_empty"] + ops["aten::empty_like"] <= 13, ops
    assert not {"aten::cat", "aten::where", "aten::sum", "aten::mean", "aten::_to_copy", "aten::item",
                "aten::_local_scalar_dense"} & set(ops), ops


def test_sequence_logps_host_cost(monkeypatch):
    monkeypatch.setenv("FASTDPO_BACKEND", "triton")
    logits, labels, _, _ = _pairs()

    def step():
        logits.grad = None
        fastdpo.sequence_logps(logits, labels).logps.sum().backward()

    ops, launches = _host_ops(step, monkeypatch)
    assert dict(launches) == {"_sequence_logps_fwd_kernel": 1, "_sequence_sums_kernel": 1,
                              "_sequence_logps_bwd_kernel": 1}
    assert sum(ops.values()) <= 24, ops
    assert not {"aten::cat", "aten::where", "aten::_to_copy", "aten::item"} & set(ops), ops


def test_no_host_reads(monkeypatch):
    """The CPU proxy of 'no synchronising call': on the kernels' path, dpo_loss and sequence_logps forward +
    backward never read a tensor on the host (.tolist(), .item(), boolean indexing, nonzero). The CPU-only
    label check, which reads the labels by design (it is skipped for CUDA tensors), is switched off."""
    from helpers import HostReads

    monkeypatch.setenv("FASTDPO_BACKEND", "triton")
    monkeypatch.setenv("FASTDPO_CHECK_LABELS", "0")
    logits, labels, ref_c, ref_r = _pairs()
    for loss_type in ("sigmoid", "aot", ["ipo", "sft"]):
        with HostReads(monkeypatch) as spy:
            fastdpo.dpo_loss(logits, labels, ref_c, ref_r, loss_type=loss_type, ld_alpha=0.5).loss.backward()
            fastdpo.sequence_logps(logits, labels, average=True, return_token_stats=True).logps.sum().backward()
        assert spy.reads == [], (loss_type, spy.reads)


def test_config_is_validated_once():
    """The head's scalars are derived from a config once and kept on it: nothing is rebuilt per call."""
    from fastdpo import _head

    cfg = fastdpo.DPOLossConfig(beta=0.3, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5])
    p = _head.params(cfg)
    assert _head.params(cfg) is p
    assert p.beta == 0.3 and p.w_sigmoid == 1.0 and p.w_sft == 0.5 and p.w_ipo == 0.0
    assert cfg == fastdpo.DPOLossConfig(beta=0.3, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5])
