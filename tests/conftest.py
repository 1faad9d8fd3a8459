"""Tests run the Triton kernels on CPU through Triton's interpreter, which is read when ``@triton.jit``
runs: these variables must be set before anything imports fastdpo."""

import os

os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
for _v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ[_v] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(params=["torch", "triton"])
def backend(request, monkeypatch):
    """Runs a test on the PyTorch path and on the Triton kernels (interpreted on CPU)."""
    monkeypatch.setenv("FASTDPO_BACKEND", request.param)
    return request.param
