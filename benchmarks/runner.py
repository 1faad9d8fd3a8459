"""Runs one benchmark case in this process and prints one JSON line: median time and peak extra memory.

    python -m benchmarks.runner '<case json>' --repeats 5 --warmup 1

Peak extra memory is what the op allocates beyond its inputs: on CUDA ``max_memory_allocated`` minus the
memory held before the call; on CPU the process's resident high-water mark (VmHWM, reset through
/proc/self/clear_refs) minus its resident size before the call. Each case runs in a fresh process, so no
allocator cache from another case distorts it. Memory is read on the first call (after compiling, for
compiled implementations), times on the later ones.
"""

import argparse
import json
import statistics
import time

import torch

from benchmarks import cases as C


def _rss_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_extra_bytes(fn, cuda: bool):
    """Runs ``fn`` once: (its result, the memory it allocated at its peak beyond what was held before). CUDA:
    ``max_memory_allocated``; CPU: the resident high-water mark, reset, minus the resident size before (clamped
    at 0: RSS can shrink between the two reads)."""
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        out = fn()
        torch.cuda.synchronize()
        return out, max(0, torch.cuda.max_memory_allocated() - before)
    before = _rss_bytes("VmRSS")
    _reset_peak_rss()
    out = fn()
    return out, max(0, _rss_bytes("VmHWM") - before)


def measure(case, repeats: int, warmup: int) -> dict:
    cuda = case["device"] == "cuda"
    run = C.build(case)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if case["impl"].endswith("compiled"):  # compile first: the compiler's own memory is not the op's
        run()
        sync()
    out, peak = peak_extra_bytes(run, cuda)
    del out
    for _ in range(max(0, warmup - 1)):
        run()
    times = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            sync()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            run()
            times.append((time.perf_counter() - t0) * 1e3)
    med = statistics.median(times)
    extra = {}
    if cuda:  # (the bandwidth has a name of its own: it once overwrote the measured peak memory)
        sheet_gbps = C.peak_gbps(torch.cuda.get_device_name())
        if sheet_gbps and C.bytes_moved(case):
            extra["percent_of_peak_bw"] = 100 * C.bytes_moved(case) / (med * 1e-3) / 1e9 / sheet_gbps
    return {**extra, **case, "median_ms": med, "min_ms": min(times), "repeats": repeats, "peak_mem_bytes": int(peak),
            "bytes_moved": C.bytes_moved(case), "achieved_gbps": C.bytes_moved(case) / (med * 1e-3) / 1e9,
            "flops": C.flops(case), "achieved_tflops": C.flops(case) / (med * 1e-3) / 1e12}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("case")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=0)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    print(json.dumps(measure(json.loads(a.case), a.repeats, a.warmup)))


if __name__ == "__main__":
    main()
