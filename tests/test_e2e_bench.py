"""``python -m benchmarks.e2e --device cpu --size tiny --trainer`` runs: one DPO step of a tiny Llama eight ways
(padded and packed) and TRL's DPOTrainer shipped, patched and patched with padding_free=True (in one process
here; each in a fresh one is the default, for peak memory in isolation); the ways with reference log-probs agree
on the loss, and so do the trainers (the script checks it and exits non-zero otherwise). Run at ``--lengths full``
(the quick shape); the default UltraFeedback-like batch is checked for what it is."""

import json
import os
import pathlib
import subprocess
import sys

import torch

from benchmarks.e2e import LENGTH_BATCH, TRAINER_WAYS, WAYS, batch_summary, build, draw_lengths

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_e2e_step_benchmark_runs_on_cpu(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTDPO_BACKEND")}
    out = tmp_path / "e2e.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.e2e", "--device", "cpu", "--size", "tiny", "--repeats",
                           "1", "--trainer", "--lengths", "full", "--in-process", "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["way"] for r in rows] == list(WAYS + TRAINER_WAYS)
    for r in rows:
        assert "skipped" not in r, r  # every peer is installed with the test extras
        assert r["median_ms"] > 0 and r["peak_mem_bytes"] >= 0
    losses = {r["way"]: r["loss"] for r in rows}
    assert abs(losses["fastdpo_linear"] - losses["naive"]) < 1e-4 * abs(losses["naive"])
    assert abs(losses["fastdpo_linear_packed"] - losses["naive"]) < 1e-4 * abs(losses["naive"])
    assert abs(losses["trl_trainer"] - losses["trl_trainer_fastdpo"]) < 1e-6  # step 1: policy = reference, log 2
    assert abs(losses["trl_trainer_fastdpo_packed"] - losses["trl_trainer_fastdpo"]) < 1e-6
    assert "| fastdpo_linear |" in proc.stdout and "| trl_trainer_fastdpo |" in proc.stdout


def test_ultrafeedback_batch():
    """The default batch: lengths drawn lognormal (the same draw every run), right-padded to the longest, about
    half padding, prompt and padding masked in the labels."""
    pairs, max_length = LENGTH_BATCH["tiny"]["pairs"], LENGTH_BATCH["tiny"]["max_length"]
    prompt, seq = draw_lengths(pairs, max_length)
    assert torch.equal(seq, draw_lengths(pairs, max_length)[1]) and int(seq.max()) <= max_length
    summary = batch_summary("tiny", "ultrafeedback")
    assert 0.2 < summary["padding"] < 0.8 and summary["real_tokens"] == int(seq.sum())
    _, ids, mask, labels, ref_c, ref_r = build("tiny", "cpu", lengths="ultrafeedback")
    assert ids.shape == (2 * pairs, int(seq.max())) and torch.equal(mask.sum(1), seq)
    assert ((labels != -100).sum(1) == seq - prompt.repeat(2)).all()
    assert ref_c.shape == ref_r.shape == (pairs,)


def test_packing_plot(tmp_path):
    from benchmarks.e2e import plot_packing

    rows = [{"way": w, "median_ms": 10.0 + i, "peak_mem_bytes": 2 ** 20 * (5 + i)}
            for i, w in enumerate(["fastdpo_logits", "fastdpo_logits_packed", "fastdpo_linear", "fastdpo_linear_packed"])]
    path = tmp_path / "p.png"
    plot_packing(rows, "title", str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
