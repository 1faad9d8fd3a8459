"""Which implementation runs a call: the Triton kernels or the PyTorch implementation of the same maths.

``FASTDPO_BACKEND`` (read on every call, so tests can switch it):
- ``auto`` (default): Triton for CUDA tensors, PyTorch for everything else;
- ``triton``: Triton always; CPU tensors then need ``TRITON_INTERPRET=1`` set before fastdpo is imported;
- ``torch``: PyTorch always.
float64 inputs always take the PyTorch path: the kernels accumulate in fp32, float64 exists for gradcheck.
"""

import os

import torch

_BACKENDS = ("auto", "triton", "torch")


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def use_triton(x: torch.Tensor) -> bool:
    backend = os.environ.get("FASTDPO_BACKEND", "auto").lower()
    if backend not in _BACKENDS:
        raise ValueError(f"FASTDPO_BACKEND must be one of {_BACKENDS}, got {backend!r}")
    if x.dtype == torch.float64 or backend == "torch":
        return False
    if backend == "auto":
        return x.is_cuda
    if not x.is_cuda and not interpreting():
        raise RuntimeError(
            "FASTDPO_BACKEND=triton with CPU tensors needs TRITON_INTERPRET=1 set before fastdpo is imported")
    return True
