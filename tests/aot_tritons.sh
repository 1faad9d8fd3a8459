#!/usr/bin/env bash
# The AOT check (python -m fastdpo.aot: every kernel configuration compiled for sm_80 and sm_90, exit 1 on any
# error or spill) against the Tritons GPU users run besides the venv's own (tests/test_aot.py covers that one):
# 3.6.0, pinned by torch 2.11's CUDA wheels, and 3.7.1, pinned by torch 2.13's. Each is installed side by side
# with --target (no torch, no other package touched) and put first on PYTHONPATH for the check alone.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
for v in 3.6.0 3.7.1; do
  dir=.triton-$v
  [ -f "$dir/triton/__init__.py" ] || "$py" -m pip install -q --no-deps --target "$dir" "triton==$v"
  echo "+ AOT check with triton $v"
  PYTHONPATH="$dir" TRITON_DEFAULT_FP_FUSION=1 "$py" -m fastdpo.aot | tail -n 1
done
