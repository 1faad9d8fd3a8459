"""The benchmark suite (``python -m benchmarks``)."""

import fastdpo  # noqa: F401  (first: keeps this checkout's kernels/ from shadowing Hugging Face's, fastdpo/_checkout.py)
