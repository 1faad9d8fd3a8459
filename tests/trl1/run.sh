#!/usr/bin/env bash
# The TRL 1.x parity and integration tests (tests/test_trl_parity.py, tests/test_trl_integration.py) against the
# TRL 1.x releases README's run (TRL 1.16) does not cover: 1.14.1 (axolotl 0.21's pin; 1.14.0's dpo_trainer.py,
# dpo_config.py and utils.py are 1.14.1's byte for byte), 1.14.2 (its DPO tokenization changed) and 1.15.0. Each
# is installed with --target beside the main venv's packages (no other package touched) and put first on
# PYTHONPATH. test_trl_parity.py runs on fastdpo's PyTorch path only: its Triton cases check fastdpo's kernels,
# which do not depend on TRL's version (README's run has them). One thread: the tiny models' ops are too small to
# share and two threads wait on each other (the 1.14 integration tests: 112 s with two on a busy machine, 29 s
# with one). TRL_VERSIONS="..." picks others. CI runs this after tests/trl0/run.sh.
set -euo pipefail
cd "$(dirname "$0")/../.."
py=${PYTHON:-.venv/bin/python}
for v in ${TRL_VERSIONS:-1.14.1 1.14.2 1.15.0}; do
  dir=.venv/trl-$v
  [ -f "$dir/trl/__init__.py" ] || "$py" -m pip install -q --no-deps --target "$dir" "trl==$v"
  PYTHONPATH="$dir" "$py" -c "import trl, sys; sys.exit(trl.__version__ != '$v')" || { echo "TRL $v not first on the path" >&2; exit 1; }
  echo "+ TRL $v: tests/test_trl_parity.py tests/test_trl_integration.py tests/test_trl_padding_free.py"
  OMP_NUM_THREADS=1 PYTHONPATH="$dir" "$py" -m pytest tests/test_trl_parity.py tests/test_trl_integration.py \
    tests/test_trl_padding_free.py \
    -k "not triton" "$@"
done
