"""Tests run the Triton kernels on CPU through Triton's interpreter, which is read when ``@triton.jit``
runs: these variables must be set before anything imports fastdpo.

``FASTDPO_TEST_LANE=cuda`` is the GPU lane (``tests/test_gpu_lane.py``): the kernels compiled for the GPU, so
the interpreter stays off, and only that file is collected."""

import os

GPU_LANE = os.environ.get("FASTDPO_TEST_LANE", "") == "cuda"
if not GPU_LANE:
    os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
for _v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ[_v] = "1"

import pathlib  # noqa: E402
from importlib import metadata  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from packaging.version import Version  # noqa: E402

# Under pytest-xdist (README's command runs two workers) one thread each: the tests' ops are small, and two
# threads per worker on two cores wait on each other.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, torch.get_num_threads()))

import fastdpo  # noqa: E402,F401  (before any test imports transformers: see fastdpo/_checkout.py)


@pytest.fixture(params=["torch", "triton"])
def backend(request, monkeypatch):
    """Runs a test on the PyTorch path and on the Triton kernels (interpreted on CPU)."""
    monkeypatch.setenv("FASTDPO_BACKEND", request.param)
    return request.param


def _legacy_trl() -> bool:
    try:
        return Version(metadata.version("trl")) < Version("1")
    except metadata.PackageNotFoundError:
        return False


# tests/trl0 needs TRL 0.26-0.28 and transformers 4.x, which cannot share a venv with the rest (TRL 1.16,
# transformers 5): it runs in its own venv (tests/trl0/run.sh, a CI step of its own) and only there. So does
# tests/llamafactory (LLaMA-Factory 0.9.5 pins TRL 0.24 and transformers <= 5.6; tests/llamafactory/run.sh).
if _legacy_trl():
    collect_ignore = [str(p) for p in pathlib.Path(__file__).parent.glob("test_*.py")]
elif GPU_LANE:
    collect_ignore = ["trl0", "llamafactory"] + [str(p) for p in pathlib.Path(__file__).parent.glob("test_*.py")
                                                 if p.name != "test_gpu_lane.py"]
else:
    collect_ignore = ["trl0", "llamafactory"]

if not GPU_LANE:
    import interpreter_patch_once  # noqa: E402

    interpreter_patch_once.install()
