"""fastdpo: fused Triton kernels for DPO losses."""

from fastdpo.logps import SequenceLogps, SequenceLogpsFunction, sequence_logps

__version__ = "0.1.0"

__all__ = ["SequenceLogps", "SequenceLogpsFunction", "sequence_logps"]
