"""fastdpo's Triton kernels, installed as ``fastdpo.kernels``."""

import os
import types

# Compile options every launch passes, and the AOT check compiles with: FMA contraction on, as the kernels were
# measured and checked, whatever TRITON_DEFAULT_FP_FUSION says (Triton 3.9 warns at the first compile when it is
# unset, and plans to turn the default off in 3.10). TRITON_FORCE_DISABLE_FP_FUSION (Triton's spellings of true)
# still turns it off, read here since Triton 3.6 and 3.7 know no such variable and would obey the option.
_FORCE_OFF = os.environ.get("TRITON_FORCE_DISABLE_FP_FUSION", "").strip().lower() in ("1", "true", "on", "yes", "y")
COMPILE_OPTIONS = types.MappingProxyType({"enable_fp_fusion": not _FORCE_OFF})
