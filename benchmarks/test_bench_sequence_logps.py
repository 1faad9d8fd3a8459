"""The suite's cases through pytest-benchmark: ``pytest benchmarks/ --benchmark-only``.

Times only (peak memory: ``python -m benchmarks``). Shapes are CPU-sized;
on a CUDA machine the same cases run on the GPU.
"""

import pytest
import torch

from benchmarks import cases as C

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPE = (8, 512, 32000) if DEVICE == "cpu" else (16, 1024, 128256)
DTYPE = "float32" if DEVICE == "cpu" else "bfloat16"

CASES = [{"op": op, "impl": impl, "N": SHAPE[0], "T": SHAPE[1], "V": SHAPE[2], "dtype": DTYPE, "device": DEVICE,
          "variant": ""} for op in C.OPS for impl in C.IMPLS]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c['op']}-{c['impl']}")
def test_bench(benchmark, case):
    why = C.unavailable(case)
    if why:
        pytest.skip(why)
    run = C.build(case)
    sync = torch.cuda.synchronize if DEVICE == "cuda" else (lambda: None)

    def step():
        run()
        sync()
    benchmark.pedantic(step, rounds=3, warmup_rounds=1)
