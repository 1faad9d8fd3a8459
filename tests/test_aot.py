"""The AOT check (``python -m fastdpo.aot``): every kernel variant a launch can produce compiles for sm_80 and
sm_90 with zero spills, no integer argument is left to Triton's launch-time specialisation, and no reshape may
move elements across the rows of a tile; the launches of real calls use exactly the variants it compiles.

``triton.compile`` fails under the interpreter, which conftest turns on: compiling runs in a subprocess without
it."""

import collections
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import triton

import fastdpo
from fastdpo import aot
from fastdpo.kernels import dpo_loss as head_kernels
from fastdpo.kernels import logps as logps_kernels


def _env():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    return env


# README's run compiles, for both architectures, the variants bf16 training launches (bf16 logits; the kernels that
# read no logits have one dtype): 70 of the 170 compiles, a minute of the run's CPU time spared. CI's
# tests/aot_tritons.sh runs this test with FASTDPO_AOT_FULL=1 (every dtype) against the venv's Triton and the two
# others GPU users run.
AOT_DTYPES = ["fp32", "bf16", "fp16"] if os.environ.get("FASTDPO_AOT_FULL") == "1" else ["bf16"]
# Instructions per logit of the unaligned forward's loop: 40, except Triton 3.7's 2 x 512 tile (41.5, bf16).
UNALIGNED_LIMIT = 44 if triton.__version__.startswith("3.7.") else 40


def test_aot_compiles_without_spills():
    proc = subprocess.run([sys.executable, "-m", "fastdpo.aot", "--arch", "80", "90", "--dtype", *AOT_DTYPES],
                          env=_env(), capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    summary = proc.stdout.splitlines()[-1] if proc.stdout else ""
    print(summary)  # "N of N kernel configurations compiled ... (logits ...; Triton X)": tests/aot_tritons.sh reads it
    assert summary.endswith(f"(logits {' '.join(AOT_DTYPES)}; Triton {triton.__version__})"), summary
    rows = [line.split() for line in proc.stdout.splitlines() if line.split()[:1] in (["logps_fwd"], ["logps_bwd"], ["dpo_head"])]
    assert {r[0] for r in rows} == {"logps_fwd", "logps_bwd", "dpo_head"}
    assert {"sm_80", "sm_90"} <= {tok for r in rows for tok in r}
    assert "ERROR" not in proc.stdout
    assert len([line for line in proc.stdout.splitlines() if "sm_90" in line]) == len(list(aot._cases(AOT_DTYPES)))
    assert {r[1] for r in rows} == set(AOT_DTYPES) | {"fp32"}
    for r in rows:  # ... arch regs spill smem [instr/logit mufu/logit bar/it shfl/it]
        i = next(j for j, tok in enumerate(r) if tok.startswith("sm_"))
        assert r[i + 2] == "0", f"stack use (a spill) reported: {' '.join(r)}"
        if r[0] == "logps_fwd":
            # the vocabulary loop reduces one row maximum per block (two barriers, three on Triton 3.6); the
            # sums stay per lane until after the loop. The statistics once cost 12 barriers per block.
            assert int(r[i + 6]) <= 3, f"block-wide reductions in the loop: {' '.join(r)}"
            # ALIGNED, one row per program (real vocabularies): the statistics once cost 23 instructions per logit
            # there; small vocabularies' 2-D tiles carry an address per element; without ALIGNED every logit is a
            # scalar load with a 64-bit address (and small tiles: 1 x 1024, 2 x 512). Measured maxima, sm_80
            # (aligned one-row / aligned 2-D / unaligned): Triton 3.9.0 18.9 / 24.5 / 37.5, 3.7.1 20.6 / 25.0 /
            # 41.5 (the bf16 2 x 512 tile), 3.6.0 20.5 / 23.4 / 36.5.
            line = " ".join(r)
            limit = (22 if "BLOCK_T=1 " in line else 26) if "ALIGNED=True" in line else UNALIGNED_LIMIT
            assert float(r[i + 4]) < limit, f"a heavy loop body: {line}"


_PROBE = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    import aot_probe
    from fastdpo import aot
    aot._MODULE_OVERRIDE = aot_probe
    case = ("reorder_rows", "fp32", aot_probe.all_meta()["reorder_rows"][0])
    print("reorder:", aot.compile_one(case, 90).get("error", "none"))
    case = ("specialised", "fp32", aot_probe.all_meta()["specialised"][0])
    print("specialised:", aot.compile_one(case, 90).get("error", "none"))
""")


def test_aot_refuses_row_mixing_and_launch_specialisation():
    """The check itself: a reordering reshape of a 4 x 512 fp32 tile (the log-prob kernel's old row sums) is
    refused, and so is an integer argument Triton may specialise. Mutation-checked: without the reorder scan the
    first probe compiles cleanly."""
    import aot_probe
    if not aot_probe.CAN_REORDER:
        pytest.skip("this Triton has no reordering reshape")
    code = _PROBE.format(tests=os.path.dirname(__file__))
    proc = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = dict(line.split(": ", 1) for line in proc.stdout.splitlines() if ": " in line)
    assert "may move elements across rows" in out["reorder"], out
    assert "tensor<4x512xf32" in out["reorder"]
    assert "specialised at launch" in out["specialised"], out


def test_reorder_findings_reads_the_ir():
    rows = "%5 = tt.reshape %4 allow_reorder : tensor<4x512xf32, #blocked> -> tensor<4x128x4xf32, #blocked1>"
    one_row = "%5 = tt.reshape %4 allow_reorder : tensor<1x512xf32, #blocked> -> tensor<1x128x4xf32, #blocked1>"
    kept = "%5 = tt.reshape %4 efficient_layout : tensor<4x128x1x4xf32, #b> -> tensor<4x128x4xf32, #s>"
    assert aot.reorder_findings(rows) == [rows]
    assert aot.reorder_findings(one_row + "\n" + kept) == []


class _Recorded:
    """A kernel whose launches are recorded: (name, bound arguments, launch configuration)."""

    def __init__(self, kernel, name, log):
        self.kernel, self.name, self.log = kernel, name, log

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.log.append((self.name, args, dict(kwargs)))
            return self.kernel[grid](*args, **kwargs)
        return launch


def test_every_launch_is_a_compiled_variant(monkeypatch):
    """Real calls (aligned, unaligned, vocabulary-major and odd-vocabulary logits, every dtype, B = 1 with and
    without a reference, the fused linear and a vocabulary shard's statistics) launch only what the AOT check
    compiles: their constexprs are in the kernel module's ``all_meta()``, and the signature Triton would
    specialise them to (types of every argument, 16-byte alignment of the pointers it specialises on) is the one
    ``fastdpo.aot.signature`` compiles."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.nvidia.compiler import CUDABackend

    monkeypatch.setenv("FASTDPO_BACKEND", "triton")
    log = []
    kernels = {}
    for mod in (logps_kernels, head_kernels):
        for name in mod.all_meta():
            kernels[name] = mod
            monkeypatch.setattr(mod, name, _Recorded(getattr(mod, name), name, log))

    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for V in (7, 1000, 4096, 50257 // 16):
            x = (torch.randn(3, 5, V, generator=g) * 2).to(dtype).requires_grad_()
            labels = torch.randint(0, V, (3, 5), generator=g)
            fastdpo.sequence_logps(x, labels, return_token_stats=True).logps.sum().backward()
            fastdpo.sequence_logps(x[:, :-1], labels[:, 1:], shift=False).logps.sum().backward()
            fastdpo.sequence_logps(x.detach()[..., 1:], labels.clamp(max=V - 2))  # an unaligned base
            vmajor = x.detach().permute(2, 0, 1).contiguous().permute(1, 2, 0)
            fastdpo.sequence_logps(vmajor, labels)
        pairs = (torch.randn(2, 4, 1000, generator=g) * 2).to(dtype).requires_grad_()
        lab = torch.randint(0, 1000, (2, 4), generator=g)
        fastdpo.dpo_loss(pairs, lab).loss.backward()  # B = 1, reference-free
        fastdpo.dpo_loss(pairs, lab, torch.tensor([-3.0]), torch.tensor([-4.0])).loss.backward()
    many = torch.randn(2 * 20, 3, 7, generator=g, requires_grad=True)  # 20 pairs: the head's 32-pair block
    fastdpo.dpo_loss(many, torch.randint(0, 7, (2 * 20, 3), generator=g)).loss.backward()
    h = torch.randn(2, 6, 8, generator=g, requires_grad=True)
    fastdpo.linear_dpo_loss(h, torch.randn(100, 8, generator=g), torch.randint(0, 100, (2, 6), generator=g),
                            chunk_bytes=100 * 4 * 3).loss.backward()
    from fastdpo import _ops
    _ops.logps_forward(torch.randn(2, 3, 64, generator=g), torch.randint(0, 64, (2, 3), generator=g), -100, True,
                       with_stats=True, with_max=True)

    monkeypatch.undo()
    seen = collections.Counter()
    from fastdpo.kernels import COMPILE_OPTIONS

    for name, args, kwargs in log:
        mod = kernels[name]
        meta = dict(kwargs)
        # every launch passes the compile options AOT compiles with (FMA contraction on, whatever the environment)
        assert {k: meta.pop(k, None) for k in COMPILE_OPTIONS} == dict(COMPILE_OPTIONS), (name, kwargs)
        assert meta in mod.all_meta()[name], f"{name}: launch configuration {meta} is not compiled by AOT"
        _, fn = aot._jit_fn(name)
        params = [p for p in fn.params if not p.is_constexpr]
        assert len(params) == len(args), name
        dtype = next((aot._DTYPE_OF[str(a.dtype)] for p, a in zip(params, args)
                      if mod.POINTERS[name].get(p.name) == "x"), "fp32")
        sig, _, attrs = aot.signature(name, dtype, meta)
        for i, (p, a) in enumerate(zip(params, args)):
            idx = fn.arg_names.index(p.name)
            if isinstance(a, torch.Tensor):
                ty, align = native_specialize_impl(CUDABackend, a, False, True, not p.do_not_specialize_on_alignment)
                assert ty == sig[p.name], (name, p.name, ty, sig[p.name])
                if not p.do_not_specialize_on_alignment:  # AOT compiles it 16-byte aligned
                    assert align == "D" and (idx,) in attrs, (name, p.name, a.data_ptr() % 16)
            else:
                assert p.annotation_type == sig[p.name] and (p.do_not_specialize or isinstance(a, float)), \
                    (name, p.name)
        seen[(name, meta.get("ALIGNED"))] += 1
        if "BLOCK_B" in meta:
            seen[("BLOCK_B", meta["BLOCK_B"])] += 1
    # both forward and backward variants were exercised, and the loss head
    assert {k for k in seen} >= {("_sequence_logps_fwd_kernel", True), ("_sequence_logps_fwd_kernel", False),
                                 ("_sequence_logps_bwd_kernel", True), ("_sequence_logps_bwd_kernel", False),
                                 ("_dpo_loss_head_kernel", None), ("_sequence_sums_kernel", None),
                                 ("BLOCK_B", 16), ("BLOCK_B", head_kernels.MAX_BLOCK_B)}, seen


@pytest.mark.parametrize("value,fusion", [("1", False), ("true", False), ("0", True), ("", True)])
def test_fp_fusion_is_on_unless_force_disabled(value, fusion):
    """Launches pass FMA contraction on whatever TRITON_DEFAULT_FP_FUSION says; TRITON_FORCE_DISABLE_FP_FUSION
    still turns it off, on every Triton (3.6 and 3.7 have no such variable: fastdpo reads it)."""
    env = {**_env(), "TRITON_FORCE_DISABLE_FP_FUSION": value, "TRITON_DEFAULT_FP_FUSION": "0"}
    code = "from fastdpo.kernels import COMPILE_OPTIONS; print(COMPILE_OPTIONS['enable_fp_fusion'])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == str(fusion)
