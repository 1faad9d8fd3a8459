"""Compile every fastdpo kernel, in every configuration the dispatcher can choose, for real GPUs, with no GPU.

    python -m fastdpo.aot [--arch 80 90] [--jobs 2]

Prints one line per (kernel, configuration, architecture): registers, spill bytes and shared memory, read
from the bundled ``ptxas -v`` on the generated PTX, and what tells a lean kernel from a heavy one: the SASS of
the vocabulary loop's body (the largest backward branch of the cubin, read with the bundled ``cuobjdump``),
as instructions per logit a thread handles, special-function (MUFU: exp2, log2) instructions per logit, and
the barriers (BAR) and warp shuffles (SHFL) per iteration, which block-wide reductions cost. Exits non-zero on
any compile error or spill.

Configurations: logits dtype x tile (``kernels.logps.all_tile_configs``) x flags for the log-prob kernels,
the per-sequence sums with and without statistics, every pair block size of the DPO loss head
(``kernels.dpo_loss.all_block_sizes``) with and without metrics. Launch-time specialisations are mirrored:
pointers 16-byte aligned, the vocabulary size and the logits' row strides divisible by 16, the vocabulary
stride equal to 1 (contiguous last dimension): the case real models produce. Must run without
``TRITON_INTERPRET``.
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
_DIVISIBLE_INTS = ("V", "stride_xn", "stride_xt", "stride_gn", "stride_gt")


def _cases():
    from fastdpo.kernels import logps as k

    for dtype, with_stats in itertools.product(_DTYPES, (True, False)):
        for tile in k.all_tile_configs(with_stats):
            yield ("logps_fwd", dtype, tile, {"WITH_STATS": with_stats})
    for dtype, tile in itertools.product(_DTYPES, k.all_tile_configs()):
        yield ("logps_bwd", dtype, tile, {})
    yield ("logps_sums", "fp32", {"BLOCK": k.SUMS_BLOCK, "num_warps": k.SUMS_NUM_WARPS}, {"WITH_STATS": True})
    yield ("logps_sums", "fp32", {"BLOCK": k.SUMS_BLOCK, "num_warps": k.SUMS_NUM_WARPS}, {"WITH_STATS": False})
    from fastdpo.kernels import dpo_loss as d

    for block_b, metrics in itertools.product(d.all_block_sizes(), (True, False)):
        # per-sequence numbers are fp32 whatever the logits' dtype
        yield ("dpo_head", "fp32", {"BLOCK_B": block_b, "num_warps": d.NUM_WARPS}, {"WITH_METRICS": metrics})


def _signature(kernel: str, dtype: str):
    x = _DTYPES[dtype]
    if kernel == "dpo_head":
        ptrs = {name: "*fp32" for name in ("logps_ptr", "sums_ptr", "seq_stats_ptr", "ref_chosen_ptr",
                                            "ref_rejected_ptr", "aot_delta_ptr", "aotu_delta_ptr", "loss_ptr",
                                            "coef_ptr", "rewards_ptr", "metrics_ptr")}
        ptrs.update({name: "*i64" for name in ("counts_ptr", "aot_rank_ptr", "aotu_rank_c_ptr", "aotu_rank_r_ptr")})
        ints = {name: "i32" for name in ("num_pairs", "p0", "p1", "has_ref", "f_div", "use_weighting")}
        floats = ("beta", "eps", "exo_log_keep", "exo_log_eps", "inv_am1", "am1", "tau", "gamma", "nll_alpha",
                  *(f"w{i}" for i in range(16)))
        return ptrs, {**ints, **{name: "fp32" for name in floats}}
    if kernel == "logps_sums":
        ptrs = {"token_logps_ptr": "*fp32", "stats_ptr": "*fp32", "labels_ptr": "*i64", "logps_ptr": "*fp32",
                "num_tokens_ptr": "*i64", "seq_stats_ptr": "*fp32"}
        return ptrs, {name: "i32" for name in ("N", "T", "NT", "stride_ln", "stride_lt", "ignore_index", "shift")}
    if kernel == "logps_fwd":
        ptrs = {"logits_ptr": x, "labels_ptr": "*i64", "token_logps_ptr": "*fp32", "lse_ptr": "*fp32",
                "stats_ptr": "*fp32"}
        ints = ["n_rows", "T", "V", "stride_xn", "stride_xt", "stride_ln", "stride_lt", "ignore_index", "shift",
                "with_max"]
    else:
        ptrs = {"logits_ptr": x, "labels_ptr": "*i64", "lse_ptr": "*fp32", "coef_ptr": "*fp32", "dlogits_ptr": x}
        ints = ["n_rows", "T", "V", "stride_xn", "stride_xt", "stride_ln", "stride_lt", "stride_gn", "stride_gt",
                "stride_cn", "stride_ct", "ignore_index", "shift"]
    return ptrs, {name: "i32" for name in ints}


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

    from fastdpo.kernels import logps as k

    kernel, dtype, tile, flags = case
    from fastdpo.kernels import dpo_loss as d

    fn = {"logps_fwd": k._sequence_logps_fwd_kernel, "logps_bwd": k._sequence_logps_bwd_kernel,
          "logps_sums": k._sequence_sums_kernel, "dpo_head": d._dpo_loss_head_kernel}[kernel]
    while not isinstance(fn, triton.runtime.JITFunction):  # unwrap @heuristics / @autotune, if any
        fn = fn.fn
    ptrs, ints = _signature(kernel, dtype)
    constexprs = {key: val for key, val in tile.items() if key != "num_warps"}
    constexprs.update(flags)
    if kernel in ("logps_fwd", "logps_bwd"):
        constexprs["stride_xv"] = 1
    if kernel == "logps_bwd":
        constexprs["stride_gv"] = 1
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in ptrs:
            signature[name] = ptrs[name]
        else:
            signature[name] = ints[name]
    attrs = {(fn.arg_names.index(p),): [["tt.divisibility", 16]] for p in ptrs}
    # Triton specialises integer arguments divisible by 16 at launch: the vocabularies of real models are
    # (32000, 128256, 151936, 262144), and so are the row strides of their logits. Mirrored here, it is what
    # lets the compiler prove rows 16-byte aligned and load 8 bf16 logits per instruction.
    attrs.update({(fn.arg_names.index(i),): [["tt.divisibility", 16]] for i in _DIVISIBLE_INTS if i in ints})
    row = {"kernel": kernel, "dtype": dtype, "config": {**tile, **flags}, "arch": f"sm_{arch}"}
    try:
        compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                                  target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": tile["num_warps"], "num_stages": 1})
        ptxas = get_ptxas(arch).path
        gpu = "sm_90a" if arch == 90 else f"sm_{arch}"
        with tempfile.TemporaryDirectory() as tmp:
            ptx = os.path.join(tmp, "k.ptx")
            with open(ptx, "w") as f:
                f.write(compiled.asm["ptx"])
            out = subprocess.run([ptxas, "-v", f"--gpu-name={gpu}", ptx, "-o", os.path.join(tmp, "k.cubin")],
                                 capture_output=True, text=True, check=True).stderr
            cubin = os.path.join(tmp, "k.cubin")
            sass = subprocess.run([os.path.join(os.path.dirname(ptxas), "cuobjdump"), "-sass", cubin],
                                  capture_output=True, text=True, check=True).stdout
        row["registers"] = int(re.search(r"Used (\d+) registers", out).group(1))
        row["spill_bytes"] = sum(int(v) for v in re.findall(r"(\d+) bytes spill (?:stores|loads)", out))
        row["shared_bytes"] = compiled.metadata.shared
        loop = loop_profile(sass)
        if loop and kernel in ("logps_fwd", "logps_bwd"):  # per logit: a loop iteration covers BLOCK_T x BLOCK_V of them
            per_thread = tile["BLOCK_T"] * tile["BLOCK_V"] / (32 * tile["num_warps"])
            row["instr_per_logit"] = loop["loop_instructions"] / per_thread
            row["mufu_per_logit"] = loop["loop_mufu"] / per_thread
            row["bar_per_iter"] = loop["loop_bar"]
            row["shfl_per_iter"] = loop["loop_shfl"]
        row["ok"] = row["spill_bytes"] == 0
    except Exception as e:  # noqa: BLE001 - reported, and the run fails
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        row["ok"] = False
    return row


def _compile_star(args):
    return compile_one(*args)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("fastdpo.aot: unset TRITON_INTERPRET (triton.compile fails under the interpreter)", file=sys.stderr)
        return 2
    work = [(case, arch) for case in _cases() for arch in args.arch]
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        rows = list(pool.map(_compile_star, work))
    print(f"{'kernel':<10} {'dtype':<5} {'config':<50} {'arch':<6} {'regs':>4} {'spill':>5} {'smem':>6} "
          f"{'instr/logit':>11} {'mufu/logit':>10} {'bar/it':>6} {'shfl/it':>7}")
    for r in rows:
        cfg = " ".join(f"{k}={v}" for k, v in r["config"].items())
        if "error" in r:
            print(f"{r['kernel']:<10} {r['dtype']:<5} {cfg:<50} {r['arch']:<6} ERROR {r['error']}")
        else:
            loop = (f"{r['instr_per_logit']:>11.2f} {r['mufu_per_logit']:>10.2f} {r['bar_per_iter']:>6} "
                    f"{r['shfl_per_iter']:>7}" if "instr_per_logit" in r else "")
            print(f"{r['kernel']:<10} {r['dtype']:<5} {cfg:<50} {r['arch']:<6} {r['registers']:>4} "
                  f"{r['spill_bytes']:>5} {r['shared_bytes']:>6} {loop}")
    bad = [r for r in rows if not r["ok"]]
    print(f"{len(rows) - len(bad)} of {len(rows)} kernel configurations compiled without spills")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
