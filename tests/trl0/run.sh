#!/usr/bin/env bash
# The TRL 0.x integration tests, in a venv of their own (.venv-trl0): TRL 0.x needs transformers 4.x, the rest
# of the suite TRL 1.16 and transformers 5. Runs them with TRL 0.28, then with 0.24 (the oldest release whose
# DPOTrainer code fastdpo reproduces). CI runs this after README's test command. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/../.."
python3 -m venv .venv-trl0
. .venv-trl0/bin/activate
pip install torch==2.13.0
pip install -e . pytest peft "trl==0.28.0" "transformers==4.57.6"
python -m pytest tests/trl0 "$@"
# TRL 0.24 beside it (same dependencies), first on the path
rm -rf .venv-trl0/trl-0.24
pip install --no-deps --target .venv-trl0/trl-0.24 "trl==0.24.0"
PYTHONPATH=.venv-trl0/trl-0.24 python -m pytest tests/trl0 "$@"
