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
    root = Path(__file__).resolve().parent.parent
    if not is_checkout(root):  # an installed wheel: site-packages/kernels is Hugging Face's own
        return
    ours = root / "kernels" / "__init__.py"
    try:
        spec = importlib.util.find_spec("kernels")
    except (ImportError, ValueError):
        return
    if spec is None or spec.origin is None or Path(spec.origin).resolve() != ours:
        return
    saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if Path(p or os.getcwd()).resolve() != root]
    try:
        importlib.import_module("kernels")
    except Exception:  # noqa: BLE001 - none installed (transformers then finds this directory, reads no version
        pass           # and treats it as absent), or it fails to import: transformers will say so, not fastdpo
    finally:
        sys.path[:] = saved


def is_checkout(root: Path) -> bool:
    """``root`` is a fastdpo source checkout (its ``kernels/`` the Triton sources), not a site-packages."""
    return (root / "pyproject.toml").is_file() and (root / "fastdpo" / "_checkout.py").is_file() and \
        (root / "kernels" / "__init__.py").is_file()
