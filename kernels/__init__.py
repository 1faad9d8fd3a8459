"""fastdpo's Triton kernels, installed as ``fastdpo.kernels``."""

# Compile options every launch passes, and the AOT check compiles with: FMA contraction on, as the kernels were
# measured and checked, whatever TRITON_DEFAULT_FP_FUSION says (Triton 3.9 warns at the first compile when it is
# unset, and plans to turn the default off in 3.10). TRITON_FORCE_DISABLE_FP_FUSION still wins.
COMPILE_OPTIONS = {"enable_fp_fusion": True}
