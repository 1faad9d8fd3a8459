#!/usr/bin/env bash
# TRL 0.28's integration tests, in a venv of their own (.venv-trl0): TRL 0.28 needs transformers 4.x, the rest
# of the suite TRL 1.16 and transformers 5. CI runs this after README's test command. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/../.."
python3 -m venv .venv-trl0
. .venv-trl0/bin/activate
pip install torch==2.13.0
pip install -e . pytest "trl==0.28.0" "transformers==4.57.6"
python -m pytest tests/trl0 "$@"
