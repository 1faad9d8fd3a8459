"""Compile every fastdpo kernel, in every variant a launch can produce, for real GPUs, with no GPU.

    python -m fastdpo.aot [--arch 80 90] [--jobs 2] [--dtype fp32 bf16 fp16]

Prints one line per (kernel, variant, architecture), read with the bundled ``cuobjdump`` from the cubin Triton
built (with Triton's own ptxas flags): registers, stack bytes (where spills go; 0 means none), the shared memory
Triton requests (its metadata), and what tells a lean kernel from a heavy one: the SASS of the vocabulary loop's
body (the largest backward branch), as instructions per logit a thread handles, special-function (MUFU: exp2,
log2) instructions per logit, and the barriers (BAR) and warp shuffles (SHFL) per iteration, which block-wide
reductions cost. Exits non-zero on any compile error, any stack use (a spill, or a frame no kernel here should
need), any integer argument Triton could specialise at launch, and any reshape that may reorder the elements of a
tile holding more than one row.

Variants come from the kernel modules themselves, the lists the launchers choose from (``all_meta()`` in
``kernels/logps.py`` and ``kernels/dpo_loss.py``), crossed with the logits' dtypes for the kernels that read
logits. The signature follows each kernel's own declarations: integer and float arguments by their annotation
(never specialised: the AOT check fails any integer argument Triton could turn into a constant or give a
divisibility hint, since that would be a variant of its own), pointers by the module's ``POINTERS``, 16-byte
aligned where the kernel lets Triton specialise them on alignment (the launchers hand those pointers aligned).
Must run without ``TRITON_INTERPRET``.
"""

import argparse
import itertools
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

_DTYPES = {"fp32": "*fp32", "bf16": "*bf16", "fp16": "*fp16"}
_DTYPE_OF = {"torch.float32": "fp32", "torch.bfloat16": "bf16", "torch.float16": "fp16"}
_MODULES = ("logps", "dpo_loss")
_MODULE_OVERRIDE = None  # a module of probe kernels instead (tests/test_aot.py)


def _kernels():
    """{kernel name: (module, every launch configuration)}."""
    import importlib

    mods = ([_MODULE_OVERRIDE] if _MODULE_OVERRIDE is not None else
            [importlib.import_module(f"fastdpo.kernels.{m}") for m in _MODULES])
    out = {}
    for m in mods:
        for name, metas in m.all_meta().items():
            out[name] = (m, metas)
    return out


def _cases(dtypes=tuple(_DTYPES)):
    """(kernel, logits dtype, launch configuration) for every variant; ``dtypes`` narrows the logits' dtypes of
    the kernels that read logits (the others are compiled once, fp32, either way)."""
    for name, (mod, metas) in _kernels().items():
        reads_logits = "x" in mod.POINTERS[name].values()
        for dtype, meta in itertools.product(dtypes if reads_logits else ("fp32",), metas):
            yield (name, dtype, meta)


def _jit_fn(name):
    import triton

    from triton.runtime.interpreter import InterpretedFunction

    mod, _ = _kernels()[name]
    fn = getattr(mod, name)
    while not isinstance(fn, (triton.runtime.JITFunction, InterpretedFunction)):  # @heuristics / @autotune
        fn = fn.fn
    if isinstance(fn, InterpretedFunction):  # TRITON_INTERPRET set: the same function and options, compilable
        fn = triton.runtime.JITFunction(fn.fn, **fn.kwargs)
    return mod, fn


def signature(name: str, dtype: str, meta: dict):
    """(signature, constexprs, attrs) for ``triton.compile``, from the kernel's declarations; raises ValueError
    for an argument that would be specialised at launch."""
    mod, fn = _jit_fn(name)
    pointers = mod.POINTERS[name]
    constexprs = {k: v for k, v in meta.items() if k != "num_warps"}
    sig, attrs = {}, {}
    for i, p in enumerate(fn.params):
        if p.is_constexpr:
            if p.name not in constexprs:
                raise ValueError(f"{name}: constexpr {p.name} missing from the launch configuration")
            sig[p.name] = "constexpr"
        elif p.name in pointers:
            sig[p.name] = _DTYPES[dtype] if pointers[p.name] == "x" else pointers[p.name]
            if not p.do_not_specialize_on_alignment:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif p.annotation_type and (p.do_not_specialize or p.annotation_type[:2] in ("fp", "bf")):  # floats never are
            sig[p.name] = p.annotation_type
        else:
            raise ValueError(f"{name}: argument {p.name} is specialised at launch (value 1 becomes a constant, a "
                             "multiple of 16 a divisibility hint): type it and list it in do_not_specialize")
    return sig, constexprs, attrs


# `tt.reshape %x allow_reorder ... : tensor<4x512xf32> -> ...` (the spelling varies with the Triton version)
_RESHAPE = re.compile(r"tt\.(reshape|cat)\b[^\n]*?:\s*tensor<([0-9x]+)x[a-z]")


def reorder_findings(ir: str) -> list:
    """Lines of a TTIR / TTGIR listing where the compiler may move elements of a tile with more than one row into
    another row: a reshape allowed to reorder (or a cat, which always may) whose source has a leading dimension
    above 1. A reduction after it can then add up elements of different rows (seen on sm_90, Triton 3.9)."""
    out = []
    for line in ir.splitlines():
        m = _RESHAPE.search(line)
        if m is None:
            continue
        if m.group(1) == "reshape" and not re.search(r"allow_?[rR]eorder", line):
            continue
        dims = [int(d) for d in m.group(2).split("x")]
        if len(dims) > 1 and dims[0] > 1:
            out.append(line.strip())
    return out


_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")


def loop_profile(sass: str) -> dict:
    """The body of the largest loop in a SASS listing (from a backward branch to its target): instruction
    count and the MUFU, BAR and SHFL instructions in it. Empty dict when the code has no loop."""
    instrs = [(int(m.group(1), 16), m.group(3), m.group(4)) for m in _SASS_LINE.finditer(sass)]
    best = None
    for addr, op, operands in instrs:
        if op.startswith("BRA"):
            target = re.search(r"0x([0-9a-f]+)", operands)
            if target and int(target.group(1), 16) < addr and (best is None or addr - int(target.group(1), 16) > best[1] - best[0]):
                best = (int(target.group(1), 16), addr)
    if best is None:
        return {}
    body = [op for addr, op, _ in instrs if best[0] <= addr <= best[1]]
    return {"loop_instructions": len(body), "loop_mufu": sum(op.startswith("MUFU") for op in body),
            "loop_bar": sum(op.startswith("BAR") for op in body), "loop_shfl": sum(op.startswith("SHFL") for op in body)}


def compile_one(case, arch: int) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource

    from fastdpo.kernels import COMPILE_OPTIONS

    name, dtype, meta = case
    kernel = _SHORT.get(name, name)
    row = {"kernel": kernel, "dtype": dtype, "config": dict(meta), "arch": f"sm_{arch}"}
    try:
        sig, constexprs, attrs = signature(name, dtype, meta)
        _, fn = _jit_fn(name)
        compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs),
                                  target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": meta["num_warps"], **COMPILE_OPTIONS})
        reorders = reorder_findings(compiled.asm["ttir"]) + reorder_findings(compiled.asm["ttgir"])
        if reorders:
            raise ValueError(f"a reshape may move elements across rows: {reorders[0]}")
        # the cubin Triton built (its own ptxas flags), read once by the bundled cuobjdump: resources and SASS
        cuobjdump = os.path.join(os.path.dirname(get_ptxas(arch).path), "cuobjdump")
        with tempfile.TemporaryDirectory() as tmp:
            cubin = os.path.join(tmp, "k.cubin")
            with open(cubin, "wb") as f:
                f.write(compiled.asm["cubin"])
            out = subprocess.run([cuobjdump, "-res-usage", "-sass", cubin], capture_output=True, text=True,
                                 check=True).stdout
        usage = {m[0]: (int(m[1]), int(m[2]) + int(m[3])) for m in
                 re.findall(r"Function (\S+):\s*REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", out)}
        if compiled.metadata.name not in usage:
            raise ValueError(f"no resource usage for {compiled.metadata.name} in cuobjdump's output")
        row["registers"] = usage[compiled.metadata.name][0]
        # spills live there, and so would a local array or a non-inlined call's frame: none is expected
        row["stack_bytes"] = max(stack for _, stack in usage.values())
        row["shared_bytes"] = compiled.metadata.shared
        loop = loop_profile(out)
        if loop and kernel in ("logps_fwd", "logps_bwd"):  # per logit: a loop iteration covers BLOCK_T x BLOCK_V of them
            per_thread = meta["BLOCK_T"] * meta["BLOCK_V"] / (32 * meta["num_warps"])
            row["instr_per_logit"] = loop["loop_instructions"] / per_thread
            row["mufu_per_logit"] = loop["loop_mufu"] / per_thread
            row["bar_per_iter"] = loop["loop_bar"]
            row["shfl_per_iter"] = loop["loop_shfl"]
        row["ok"] = row["stack_bytes"] == 0
    except Exception as e:  # noqa: BLE001 - reported, and the run fails
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        row["ok"] = False
    return row


_SHORT = {"_sequence_logps_fwd_kernel": "logps_fwd", "_sequence_logps_bwd_kernel": "logps_bwd",
          "_sequence_sums_kernel": "logps_sums", "_dpo_loss_head_kernel": "dpo_head"}


def _compile_star(args):
    return compile_one(*args)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--dtype", nargs="+", choices=list(_DTYPES), default=list(_DTYPES),
                        help="the logits dtypes to compile the logits-reading kernels for (default: all)")
    args = parser.parse_args(argv)
    import triton

    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("fastdpo.aot: unset TRITON_INTERPRET (triton.compile fails under the interpreter)", file=sys.stderr)
        return 2
    work = [(case, arch) for case in _cases(tuple(args.dtype)) for arch in args.arch]
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        rows = list(pool.map(_compile_star, work))
    print(f"{'kernel':<10} {'dtype':<5} {'config':<66} {'arch':<6} {'regs':>4} {'stack':>5} {'smem':>6} "
          f"{'instr/logit':>11} {'mufu/logit':>10} {'bar/it':>6} {'shfl/it':>7}")
    for r in rows:
        cfg = " ".join(f"{k}={v}" for k, v in r["config"].items())
        if "error" in r:
            print(f"{r['kernel']:<10} {r['dtype']:<5} {cfg:<66} {r['arch']:<6} ERROR {r['error']}")
        else:
            loop = (f"{r['instr_per_logit']:>11.2f} {r['mufu_per_logit']:>10.2f} {r['bar_per_iter']:>6} "
                    f"{r['shfl_per_iter']:>7}" if "instr_per_logit" in r else "")
            print(f"{r['kernel']:<10} {r['dtype']:<5} {cfg:<66} {r['arch']:<6} {r['registers']:>4} "
                  f"{r['stack_bytes']:>5} {r['shared_bytes']:>6} {loop}")
    bad = [r for r in rows if not r["ok"]]
    print(f"{len(rows) - len(bad)} of {len(rows)} kernel configurations compiled with no stack use (no spill) "
          f"(logits {' '.join(args.dtype)}; Triton {triton.__version__})")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
