"""``python -m benchmarks.e2e --device cpu --size tiny`` runs: one DPO step of a tiny Llama six ways, each way in
a fresh process, and the five ways with reference log-probs agree on the loss (the script checks it and exits
non-zero otherwise)."""

import json
import os
import pathlib
import subprocess
import sys

from benchmarks.e2e import WAYS

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_e2e_step_benchmark_runs_on_cpu(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTDPO_BACKEND")}
    out = tmp_path / "e2e.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.e2e", "--device", "cpu", "--size", "tiny", "--repeats",
                           "1", "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["way"] for r in rows] == list(WAYS)
    for r in rows:
        assert "skipped" not in r, r  # every peer is installed with the test extras
        assert r["median_ms"] > 0 and r["peak_mem_bytes"] >= 0
    losses = {r["way"]: r["loss"] for r in rows}
    assert abs(losses["fastdpo_linear"] - losses["naive"]) < 1e-4 * abs(losses["naive"])
    assert "| fastdpo_linear |" in proc.stdout
