"""Runs benchmark cases in this process, one after another, and prints one JSON line per case as it finishes:
median time and peak extra memory.

    python -m benchmarks.runner '<case json, or a JSON list of cases>' --repeats 5 --warmup 1

The suite starts one process per implementation (imports, Triton's and torch.compile's caches are paid once),
and each case still measures in isolation: its inputs are built, then freed with everything else it made before
the next case starts. Peak extra memory is what the op allocates beyond its inputs: on CUDA
``max_memory_allocated`` minus the memory held before the call (the caching allocator's reserve does not count);
on CPU the process's resident high-water mark (VmHWM, reset through /proc/self/clear_refs) minus its resident
size before the call, after returning freed heap pages to the system (``malloc_trim``), so what the call
allocates is freshly mapped and counted. Memory is read on the first
call (after compiling, for compiled implementations: the compiler's own memory is not the op's), times on the
later ones; ``--repeats 0`` times that first call instead (the minute-long CPU cases).
"""

import argparse
import ctypes
import gc
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


def _libc():
    # (glibc's mmap threshold is left dynamic: fixing it would map and unmap every multi-MiB temporary of a
    # chunked CPU op on every call, and time page faults instead of the op)
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


_LIBC = _libc()


def release_memory(cuda: bool) -> None:
    """What earlier cases freed goes back to the system, so the next case's resident size starts clean."""
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    elif _LIBC is not None:
        _LIBC.malloc_trim(0)


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
    release_memory(False)
    before = _rss_bytes("VmRSS")
    _reset_peak_rss()
    out = fn()
    return out, max(0, _rss_bytes("VmHWM") - before)


def measure(case, repeats: int, warmup: int) -> dict:
    cuda = case["device"] == "cuda"
    release_memory(cuda)
    run = C.build(case)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if case["impl"].endswith("compiled"):  # compile first: the compiler's own memory is not the op's
        run()
        sync()
    t0 = time.perf_counter()
    out, peak = peak_extra_bytes(run, cuda)
    first_ms = (time.perf_counter() - t0) * 1e3
    del out
    for _ in range(max(0, warmup - 1)):
        run()
    times = [] if repeats else [first_ms]
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
    return {**extra, **case, "median_ms": med, "min_ms": min(times), "repeats": len(times), "peak_mem_bytes": int(peak),
            "bytes_moved": C.bytes_moved(case), "achieved_gbps": C.bytes_moved(case) / (med * 1e-3) / 1e9,
            "flops": C.flops(case), "achieved_tflops": C.flops(case) / (med * 1e-3) / 1e12}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("cases", help="one case (a JSON object) or several (a JSON list), each with an optional "
                                 "\"repeats\" of its own")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=0)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    cases = json.loads(a.cases)
    for case in cases if isinstance(cases, list) else [cases]:
        repeats = case.pop("repeats", a.repeats)
        try:
            row = measure(case, repeats, a.warmup)
        except Exception as e:  # noqa: BLE001  (one case failing must not lose the others' rows)
            row = {**case, "skipped": f"failed: {type(e).__name__}: {str(e)[:200]}"}
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
