"""The benchmark suite's case selection (``--only``) and its dpo_loss peers: pure bookkeeping, no timing."""

import pytest

from benchmarks import cases as C
from benchmarks.__main__ import select


def test_only_filters_cases():
    cases = C.default_cases("cuda", "default")
    got = select(cases, ["op=dpo_loss", "impl=fastdpo,trl", "shape=16x1024x32000", "dtype=bfloat16"])
    assert {(c["impl"], c["variant"]) for c in got} == {("fastdpo", ""), ("fastdpo", "inplace_backward"), ("trl", "")}
    assert all(c["op"] == "dpo_loss" and (c["N"], c["T"], c["V"]) == (16, 1024, 32000) for c in got)
    with pytest.raises(SystemExit, match="KEY=V1,V2"):
        select(cases, ["device=cpu"])
    with pytest.raises(SystemExit, match="no case"):
        select(cases, ["impl=nothing"])


def test_dpo_loss_has_its_peers_and_linear_its_lean_variant():
    full = C.default_cases("cuda", "full")
    assert {c["impl"] for c in full if c["op"] == "dpo_loss"} == {"naive", "naive_compiled", "trl", "liger", "fastdpo"}
    for mode in ("quick", "default"):  # torch.compile's compiles (one per op, dtype and shape) are --full's
        cases = C.default_cases("cuda", mode)
        assert {c["impl"] for c in cases if c["op"] == "dpo_loss"} == {"naive", "trl", "liger", "fastdpo"}
    assert any(c["op"] == "linear_dpo_loss" and c["variant"] == "lean" for c in cases)


def test_rows_report_their_share_of_the_measured_ceilings():
    from benchmarks.__main__ import add_ceiling_shares, markdown_table

    ceilings = {"copy_gbps": 3000.0, "gemm_tflops": 700.0, "gemm": "8192^3 bfloat16", "copy_bytes": 1 << 30}
    logits_row = {"op": "dpo_loss", "impl": "fastdpo", "shape": "8x2048x128256", "dtype": "bfloat16",
                  "median_ms": 4.6, "peak_mem_bytes": 0, "bytes_moved": 12.6e9, "achieved_gbps": 2739.0,
                  "flops": 0, "achieved_tflops": 0.0}
    linear_row = {"op": "linear_dpo_loss", "impl": "fastdpo", "shape": "8x2048x128256 (H=4096)",
                  "dtype": "bfloat16", "median_ms": 74.0, "peak_mem_bytes": 0, "bytes_moved": 0,
                  "achieved_gbps": 0.0, "flops": 4.2e13, "achieved_tflops": 567.0}
    for r in (logits_row, linear_row):
        add_ceiling_shares(r, ceilings)
    assert round(logits_row["percent_of_measured_bw"]) == 91 and "percent_of_measured_gemm" not in logits_row
    assert round(linear_row["percent_of_measured_gemm"]) == 81
    table = markdown_table([logits_row, linear_row])
    assert "of measured ceiling" in table and "91% bw" in table and "81% GEMM" in table


def test_vocab_parallel_benchmark_runs_tiny():
    """``python -m benchmarks.vocab_parallel`` at a tiny size: both ops, 2 gloo ranks, bytes as README states."""
    from benchmarks import vocab_parallel

    rows = vocab_parallel.main(["--shape", "2,16,100", "--repeat", "1"])
    assert [r["op"] for r in rows] == ["dpo_loss", "sequence_logps"]
    assert [r["bytes_sent_per_rank"] for r in rows] == [8 * 24 + 7 * 4 * 32, 8 * 24 + 2 * 4 * 32]
    assert all(r["sharded_ms"] > 0 and r["single_ms"] > 0 for r in rows)


def test_one_process_per_implementation():
    from benchmarks.__main__ import groups

    cases = C.default_cases("cuda", "default")
    got = groups(cases)
    assert len(got) == len({c["impl"] for c in cases})
    assert all(len({c["impl"] for c in g}) == 1 for g in got)
    assert sorted(map(str, (c for g in got for c in g))) == sorted(map(str, cases))


def test_a_group_streams_its_rows_and_a_failing_case_loses_no_other():
    """One runner process for three tiny cases; the middle one fails inside (an unknown dtype): its row says so,
    the others are measured, in order."""
    from benchmarks.__main__ import run_group

    base = {"impl": "fastdpo", "variant": "", "N": 2, "T": 8, "V": 64, "dtype": "float32", "device": "cpu"}
    cases = [{**base, "op": "dpo_loss"}, {**base, "op": "sequence_logps", "dtype": "int7"},
             {**base, "op": "sequence_logps"}]
    rows = list(run_group(cases, repeats=1, timeout=120))
    assert [r["op"] for r in rows] == ["dpo_loss", "sequence_logps", "sequence_logps"]
    assert rows[0]["median_ms"] > 0 and rows[2]["median_ms"] > 0 and rows[0]["repeats"] == 1
    assert rows[1]["skipped"].startswith("failed: KeyError")


def test_gpu_session_script_runs_its_steps_on_cpu(tmp_path):
    """``benchmarks/gpu_session.sh`` (what a lent GPU runs) with DEV=cpu: the project imported from its staged
    copy (fastdpo/ with kernels/ inside, no install), the suite's rows packed for benchmarks/results/, a summary;
    steps the budget cannot hold are reported as not run."""
    import json
    import os
    import subprocess
    import tarfile

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = os.path.join(root, "benchmarks", "gpu_session.sh")
    env = {**os.environ, "DEV": "cpu", "OUT": str(tmp_path / "out"),
           "SUITE_ARGS": "--quick --repeats 1 --only op=sequence_logps_fwd impl=fastdpo"}
    done = subprocess.run(["bash", script, "env", "suite"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = (tmp_path / "out" / "summary.txt").read_text().splitlines()
    assert [line.split(" in ")[0] for line in summary] == ["env: exit 0", "suite: exit 0"], summary
    with tarfile.open(tmp_path / "out" / "suite.tgz") as tar:
        names = tar.getnames()
        doc = json.load(tar.extractfile(next(n for n in names if n.endswith(".json"))))
    assert any(n.endswith(".md") for n in names) and doc["device_type"] == "cpu"
    assert [(r["op"], r["impl"]) for r in doc["results"]] == [("sequence_logps_fwd", "fastdpo")]
    assert doc["results"][0]["median_ms"] > 0

    env.update(GPU_BUDGET_S="20", OUT=str(tmp_path / "out2"))
    done = subprocess.run(["bash", script, "lane", "e2e"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "out2" / "summary.txt").read_text().splitlines() == [
        "lane: not run (budget spent)", "e2e: not run (budget spent)"]
