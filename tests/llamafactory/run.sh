#!/usr/bin/env bash
# LLaMA-Factory's DPO through fastdpo (tests/llamafactory), in a venv of its own (.venv-lf): LLaMA-Factory 0.9.5 pins
# TRL <= 0.24 and transformers <= 5.6, the main venv has TRL 1.16. torch goes in first, pinned, and stays pinned
# through constraints.txt; the torchvision and torchaudio LLaMA-Factory pulls in are CUDA builds that fail to load
# beside the CPU torch: removed (conftest.py stands a module in for LLaMA-Factory's torchaudio import). fastdpo goes
# in without its dependencies (its extras want TRL >= 1.15), then triton and numpy. CI runs this after
# tests/trl1/run.sh. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/../.."
python3 -m venv .venv-lf
. .venv-lf/bin/activate
c=tests/llamafactory/constraints.txt
pip install -q torch==2.13.0
pip install -q --no-compile -c $c "llamafactory==0.9.5" pytest  # no .pyc for the ~150 packages: the tests import few
pip uninstall -q -y torchvision torchaudio
pip install -q -c $c triton numpy
pip install -q -c $c --no-deps -e .
python -m pytest tests/llamafactory "$@"
