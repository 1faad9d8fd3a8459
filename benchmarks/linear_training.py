"""The fused linear as training runs it: ``python -m benchmarks.linear_training``.

``linear_dpo_loss`` forward + backward with the LM head trainable and frozen (LoRA: only the hidden states need a
gradient), eager and under ``torch.compile(fullgraph=True)``. Per row: the median time, the peak memory beyond the
inputs, the GEMM work (FLOPs counted by ``torch.utils.flop_counter`` inside the op, in units of one M x H x V GEMM,
M completion tokens), the GEMM floor (those FLOPs at the GEMM ceiling measured at the start of the run) and the
share of it reached. On CUDA also two checks, as rows: the default chunk picked inside a loop that has filled
torch's caching allocator (the rows per chunk, and whether the bits equal a fresh state's), and the step captured
in a CUDA graph and replayed (its bits against eager).

    python -m benchmarks.linear_training [--device cpu|cuda] [--shape N,T,H,V] [--dtype D] [--repeats R]
                                         [--no-compile] [--json PATH]

Defaults: CPU 4 x 256 x 256 x 32000 fp32 (the 2-core VM: ~1 minute); CUDA 8 x 2048 x 4096 x 128256 bf16 (the
issue's shape: a Llama-3-8B head). Completion tokens: the last 3/4 of every sequence.
"""

import argparse
import json
import statistics
import time

import torch

from benchmarks.ceilings import measure as measure_ceilings
from benchmarks.runner import peak_extra_bytes


def _inputs(shape, dtype, device, frozen_head: bool):
    N, T, H, V = shape
    g = torch.Generator().manual_seed(0)
    hidden = (torch.randn(N, T, H, generator=g) / H ** 0.5).to(device, dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=g)).to(device, dtype).requires_grad_(not frozen_head)
    labels = torch.randint(0, V, (N, T), generator=g)
    labels[:, : T // 4] = -100
    ref = (-2.0 * T + torch.randn(N, generator=g)).to(device)
    return hidden, weight, labels.to(device), ref[: N // 2], ref[N // 2:]


def _loss(hidden, weight, labels, ref_c, ref_r):
    import fastdpo
    return fastdpo.linear_dpo_loss(hidden, weight, labels, ref_c, ref_r).loss


def _step(fastdpo, loss_fn=_loss):
    """Forward (``loss_fn``: eager or compiled; AOTAutograd compiles its backward) and backward."""
    def step(hidden, weight, labels, ref_c, ref_r):
        loss = loss_fn(hidden, weight, labels, ref_c, ref_r)
        loss.backward()
        return loss.detach()
    return step


def gemm_units(shape, dtype, device, frozen_head: bool) -> float:
    """FLOPs of one forward + backward inside the op, in M x H x V GEMMs."""
    from torch._library.custom_ops import CustomOpDef
    from torch.utils.flop_counter import FlopCounterMode, addmm_flop, register_flop_formula

    import fastdpo
    from fastdpo import _library
    try:  # the weight gradient accumulates with addmm_, which the counter does not list
        register_flop_formula(torch.ops.aten.addmm_, get_raw=True)(addmm_flop)
    except RuntimeError:
        pass
    ops = {n: op for n, op in vars(_library).items() if isinstance(op, CustomOpDef)}
    for n, op in ops.items():  # as plain Python: the counter sees inside
        setattr(_library, n, op._init_fn)
    try:
        hidden, weight, labels, ref_c, ref_r = _inputs(shape, dtype, device, frozen_head)
        with FlopCounterMode(display=False) as flops:
            _step(fastdpo)(hidden, weight, labels, ref_c, ref_r)
    finally:
        for n, op in ops.items():
            setattr(_library, n, op)
    N, T, H, V = shape
    M = int((labels[:, 1:] != -100).sum())
    return flops.get_total_flops() / (2 * M * H * V)


def _time(fn, repeats, cuda):
    fn()
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def measure(shape, dtype, device, repeats, compile_too=True):
    import fastdpo

    cuda = device == "cuda"
    ceil = measure_ceilings(device)
    N, T, H, V = shape
    rows = []
    for frozen in (False, True):
        units = gemm_units(shape, dtype, device, frozen)
        for compiled in ((False, True) if compile_too else (False,)):
            torch._dynamo.reset()
            hidden, weight, labels, ref_c, ref_r = _inputs(shape, dtype, device, frozen)
            M = int((labels[:, 1:] != -100).sum())
            fn = _step(fastdpo, torch.compile(_loss, fullgraph=True) if compiled else _loss)

            def run():
                hidden.grad = weight.grad = None
                return fn(hidden, weight, labels, ref_c, ref_r)
            run()  # compile / warm up outside the measurement
            _, peak = peak_extra_bytes(run, cuda)
            ms = _time(run, repeats, cuda)
            floor_ms = units * 2 * M * H * V / (ceil["gemm_tflops"] * 1e12) * 1e3
            rows.append({"op": "linear_dpo_loss", "head": "frozen" if frozen else "trainable",
                         "mode": "compiled" if compiled else "eager", "shape": list(shape),
                         "dtype": str(dtype).split(".")[-1], "device": _device_name(device),
                         "completion_tokens": M, "gemms": round(units, 3), "ms": ms, "peak_mb": peak / 2 ** 20,
                         "gemm_floor_ms": floor_ms, "floor_share": floor_ms / ms})
            del hidden, weight
    if cuda:
        rows += [_loop_chunk_check(shape, dtype), _graph_check(shape, dtype)]
    return {"ceilings": ceil, "rows": rows}


def _device_name(device):
    return torch.cuda.get_device_name() if device == "cuda" else "cpu"


def _loop_chunk_check(shape, dtype):
    """The default chunk after torch's cache has been filled (a training loop): the rows it picks and the bits."""
    import fastdpo
    from fastdpo import _linear

    N, T, H, V = shape
    elem = torch.empty((), dtype=dtype).element_size()
    fresh_rows = _linear.chunk_rows(torch.device("cuda"), V, elem, softcap=False, lean=False, chunk_bytes=None)
    hidden, weight, labels, ref_c, ref_r = _inputs(shape, dtype, "cuda", False)
    a = _step(fastdpo)(hidden, weight, labels, ref_c, ref_r)
    ga = (hidden.grad.clone(), weight.grad.clone())
    free, _ = torch.cuda.mem_get_info()
    filler = [torch.empty(int(free * 0.8) // 8, dtype=torch.int64, device="cuda")]
    del filler  # the caching allocator keeps the blocks: the driver reports them used
    loop_rows = _linear.chunk_rows(torch.device("cuda"), V, elem, softcap=False, lean=False, chunk_bytes=None)
    hidden.grad = weight.grad = None
    b = _step(fastdpo)(hidden, weight, labels, ref_c, ref_r)
    same = bool(torch.equal(a, b) and torch.equal(ga[0], hidden.grad) and torch.equal(ga[1], weight.grad))
    return {"check": "default chunk inside a loop", "fresh_chunk_rows": fresh_rows, "loop_chunk_rows": loop_rows,
            "driver_free_mb_in_loop": torch.cuda.mem_get_info()[0] / 2 ** 20, "same_bits": same}


def _graph_check(shape, dtype):
    """The forward + backward captured in a CUDA graph (every row through the head: no host read during
    capture) and replayed, against eager."""
    import fastdpo

    hidden, weight, labels, ref_c, ref_r = _inputs(shape, dtype, "cuda", False)
    step = _step(fastdpo)
    eager = step(hidden, weight, labels, ref_c, ref_r)
    eager_grads = (hidden.grad.clone(), weight.grad.clone())
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            hidden.grad = weight.grad = None
            step(hidden, weight, labels, ref_c, ref_r)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    hidden.grad = weight.grad = None
    with torch.cuda.graph(graph):
        loss = step(hidden, weight, labels, ref_c, ref_r)
    graph.replay()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(5):
        graph.replay()
    torch.cuda.synchronize()
    ms = (time.perf_counter() - t0) / 5 * 1e3
    err = max((loss - eager).abs().item(), (hidden.grad.float() - eager_grads[0].float()).abs().max().item(),
              (weight.grad.float() - eager_grads[1].float()).abs().max().item())
    return {"check": "CUDA graph of forward + backward", "replay_ms": ms, "max_abs_diff_vs_eager": err}


def table(result) -> str:
    c = result["ceilings"]
    lines = [f"GEMM ceiling measured: {c['gemm_tflops']:.3g} TFLOP/s ({c['gemm']})", "",
             "| head | mode | shape | dtype | device | completion tokens | GEMMs (M x H x V) | ms | peak MB "
             "| GEMM floor ms | share of floor |", "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        if "check" in r:
            continue
        lines.append(f"| {r['head']} | {r['mode']} | {'x'.join(map(str, r['shape']))} | {r['dtype']} | {r['device']} "
                     f"| {r['completion_tokens']} | {r['gemms']:.2f} | {r['ms']:.1f} | {r['peak_mb']:.0f} "
                     f"| {r['gemm_floor_ms']:.1f} | {100 * r['floor_share']:.0f}% |")
    for r in result["rows"]:
        if "check" in r:
            lines.append(f"- {r['check']}: " + ", ".join(f"{k} {v}" for k, v in r.items() if k != "check"))
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shape", default=None, help="N,T,H,V")
    ap.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    cuda = a.device == "cuda"
    shape = tuple(int(v) for v in (a.shape or ("8,2048,4096,128256" if cuda else "4,256,256,32000")).split(","))
    dtype = getattr(torch, a.dtype or ("bfloat16" if cuda else "float32"))
    if not cuda:
        torch.set_num_threads(max(1, torch.get_num_threads()))
    result = measure(shape, dtype, a.device, a.repeats, compile_too=not a.no_compile)
    print(table(result))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
