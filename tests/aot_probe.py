"""Kernels the AOT check must refuse (``tests/test_aot.py``): a reordering reshape of a tile with several rows
before a reduction (the row-mixing bug the log-prob kernel once had), and an integer argument left to Triton's
launch-time specialisation. ``@triton.jit`` functions must live in a real file."""

import triton
import triton.language as tl

# Triton 3.10 removes ``can_reorder``; the probe (and the bug class it stands for) goes with it.
CAN_REORDER = tuple(int(p) for p in triton.__version__.split(".")[:2]) < (3, 10)


@triton.jit(do_not_specialize=["n"])
def reorder_rows(x_ptr, out_ptr, n: tl.int32, ROWS: tl.constexpr, COLS: tl.constexpr, REORDER: tl.constexpr):
    """Row sums of a (ROWS, COLS) fp32 tile through per-thread groups of 4, as the kernel once did."""
    r = tl.arange(0, ROWS)
    c = tl.arange(0, COLS)
    x = tl.load(x_ptr + r[:, None] * COLS + c[None, :])
    lanes = tl.sum(tl.reshape(x, (ROWS, COLS // 4, 4), can_reorder=REORDER), 2)
    tl.store(out_ptr + r, tl.sum(lanes, 1) + n)


@triton.jit
def specialised(x_ptr, out_ptr, stride):
    tl.store(out_ptr, tl.load(x_ptr + stride))


POINTERS = {"reorder_rows": {"x_ptr": "*fp32", "out_ptr": "*fp32"},
            "specialised": {"x_ptr": "*fp32", "out_ptr": "*fp32"}}


def all_meta():
    return {"reorder_rows": [{"ROWS": 4, "COLS": 512, "REORDER": True, "num_warps": 8}],
            "specialised": [{"num_warps": 4}]}
