"""The device's own ceilings, measured at the start of a benchmark run: what every figure is held to.

    python -m benchmarks.ceilings [--device cpu|cuda]      # prints one JSON line

- ``copy_gbps``: a large device-to-device copy, bytes read plus bytes written per second (the logits ops'
  limit: they move bytes, and their byte model counts reads and writes the same way). 1 GiB on a GPU,
  256 MiB on CPU, median of repeats after a warm-up.
- ``gemm_tflops``: a large matrix product (8192^3 in bf16 on a GPU, 1024^3 in fp32 on CPU), the fused-linear
  op's limit.

Data sheets overstate both (the H100 80GB HBM3's 3.35 TB/s against 3.03 measured); the suite reports the
percentage of each.
"""

import argparse
import json
import statistics
import time

import torch


def _median_ms(fn, device: str, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def measure(device: str) -> dict:
    cuda = device == "cuda"
    copy_bytes = (1 << 30) if cuda else (256 << 20)
    src = torch.randn(copy_bytes // 4, device=device)  # random data: zeros can run faster than real values
    dst = torch.empty_like(src)
    copy_ms = _median_ms(lambda: dst.copy_(src), device, 20 if cuda else 5)
    del src, dst
    n, dtype = (8192, torch.bfloat16) if cuda else (1024, torch.float32)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    gemm_ms = _median_ms(lambda: a @ b, device, 10 if cuda else 5)
    return {"copy_gbps": 2 * copy_bytes / (copy_ms * 1e-3) / 1e9, "copy_bytes": copy_bytes,
            "gemm_tflops": 2 * n ** 3 / (gemm_ms * 1e-3) / 1e12, "gemm": f"{n}^3 {str(dtype).split('.')[-1]}"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)
    print(json.dumps(measure(a.device)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
