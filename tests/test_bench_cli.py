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
    cases = C.default_cases("cuda", "default")
    assert {c["impl"] for c in cases if c["op"] == "dpo_loss"} == {"naive", "naive_compiled", "trl", "liger", "fastdpo"}
    assert any(c["op"] == "linear_dpo_loss" and c["variant"] == "lean" for c in cases)
