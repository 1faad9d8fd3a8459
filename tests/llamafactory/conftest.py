"""LLaMA-Factory's tests run in a venv of their own (tests/llamafactory/run.sh): LLaMA-Factory 0.9.5 pins TRL 0.24
and transformers <= 5.6, the main suite TRL 1.16 and transformers 5.2x.

A stand-in module for ``torchaudio``: LLaMA-Factory 0.9.5 imports it at the top of ``llamafactory/data/mm_plugin.py``
(for audio inputs, which these tests have none of). The index's torchaudio wheels are CUDA-linked and fail to load
beside the CPU torch, so run.sh removes them; an empty module stands in, and any use of it would raise
AttributeError rather than pass silently."""

import importlib.machinery
import sys
import types

import torch

# One thread: the tiny model's ops are too small to share, and on a busy 2-core machine two threads wait on each
# other (a LLaMA-Factory run took 5.5 s with two, 1.4 s with one).
torch.set_num_threads(1)

try:
    import torchaudio  # noqa: F401
except (ImportError, OSError):
    _stand_in = types.ModuleType("torchaudio")
    _stand_in.__spec__ = importlib.machinery.ModuleSpec("torchaudio", None)  # find_spec() reads it; no
    sys.modules["torchaudio"] = _stand_in                                    # distribution: "not available"
