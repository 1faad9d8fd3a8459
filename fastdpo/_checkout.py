"""Running from a source checkout: its ``kernels/`` directory (installed as ``fastdpo.kernels``) must not stand
in for Hugging Face's ``kernels`` package, which transformers (>= 5.25 a dependency) imports."""

import importlib
import importlib.util
import os
import sys
from pathlib import Path


def unshadow_hf_kernels() -> None:
    """With the checkout's root on ``sys.path`` (``python -m pytest`` or ``python -m benchmarks`` run there),
    ``import kernels`` would find this checkout's Triton sources. Import the installed ``kernels`` package once
    with the root left out, so that later imports (transformers') get it from ``sys.modules``. A no-op for an
    installed wheel, or when no ``kernels`` package is installed."""
    ours = Path(__file__).resolve().parent.parent / "kernels" / "__init__.py"
    try:
        spec = importlib.util.find_spec("kernels")
    except (ImportError, ValueError):
        return
    if spec is None or spec.origin is None or Path(spec.origin).resolve() != ours:
        return
    root = ours.parent.parent
    saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if Path(p or os.getcwd()).resolve() != root]
    try:
        importlib.import_module("kernels")
    except ImportError:
        pass  # none installed: transformers finds this directory, reads no version and treats it as absent
    finally:
        sys.path[:] = saved
