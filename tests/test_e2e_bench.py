"""``python -m benchmarks.e2e --device cpu --size tiny --trainer`` runs: one DPO step of a tiny Llama six ways and
TRL's DPOTrainer shipped and patched, each in a fresh process; the five ways with reference log-probs agree on the
loss, and so do the two trainers (the script checks it and exits non-zero otherwise)."""

import json
import os
import pathlib
import subprocess
import sys

from benchmarks.e2e import TRAINER_WAYS, WAYS

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_e2e_step_benchmark_runs_on_cpu(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTDPO_BACKEND")}
    out = tmp_path / "e2e.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.e2e", "--device", "cpu", "--size", "tiny", "--repeats",
                           "1", "--trainer", "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["way"] for r in rows] == list(WAYS + TRAINER_WAYS)
    for r in rows:
        assert "skipped" not in r, r  # every peer is installed with the test extras
        assert r["median_ms"] > 0 and r["peak_mem_bytes"] >= 0
    losses = {r["way"]: r["loss"] for r in rows}
    assert abs(losses["fastdpo_linear"] - losses["naive"]) < 1e-4 * abs(losses["naive"])
    assert abs(losses["trl_trainer"] - losses["trl_trainer_fastdpo"]) < 1e-6  # step 1: policy = reference, log 2
    assert "| fastdpo_linear |" in proc.stdout and "| trl_trainer_fastdpo |" in proc.stdout
