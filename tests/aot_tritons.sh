#!/usr/bin/env bash
# The whole AOT check (tests/test_aot.py's compile test with FASTDPO_AOT_FULL=1: every kernel variant, every logits
# dtype, compiled for sm_80 and sm_90 through python -m fastdpo.aot, no error, no spill, lean loop bodies) against
# every Triton GPU users run: the venv's own (README's run compiles its bf16 variants only), 3.6.0, pinned by
# torch 2.11's CUDA wheels, and 3.7.1, pinned by torch 2.13's. The other two are installed side by side with
# --target (no torch, no other package touched) and put first on PYTHONPATH for the check alone.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
log=$(mktemp)
trap 'rm -f "$log"' EXIT
for v in own 3.6.0 3.7.1; do
  dir=
  if [ "$v" != own ]; then
    dir=$PWD/.triton-$v
    [ -f "$dir/triton/__init__.py" ] || "$py" -m pip install -q --no-deps --target "$dir" "triton==$v"
  fi
  want=$(PYTHONPATH="$dir" "$py" -c 'import triton; print(triton.__version__)')
  [ "$v" = own ] || [ "$want" = "$v" ] || { echo "triton $v is not first on the path ($want is)" >&2; exit 1; }
  echo "+ AOT check with triton $want"
  PYTHONPATH="$dir" FASTDPO_AOT_FULL=1 "$py" -m pytest -q -s -p no:cacheprovider \
    tests/test_aot.py::test_aot_compiles_without_spills | tee "$log"
  # the test ran the whole check (every dtype) with this Triton
  grep -q "(logits fp32 bf16 fp16; Triton $want)" "$log" || { echo "not the whole check" >&2; exit 1; }
done
