"""The multi-process harness itself (``dist_utils.run_ranks``): pooled ranks serve one test after another, a
failing rank fails the caller with its traceback, a rank left waiting in a collective times out instead of hanging
the run, and the next call after either gets a working world."""

import os

import pytest
import torch
import torch.distributed as dist

import dist_utils
from dist_utils import run_ranks


def _sum_ranks(rank, world):
    t = torch.tensor([float(rank)])
    dist.all_reduce(t)
    assert t.item() == sum(range(world))
    assert os.environ.get("DIST_UTILS_PROBE") == "set"


def _env_restored(rank, world):
    assert "DIST_UTILS_PROBE" not in os.environ


def _rank1_fails(rank, world):
    if rank == 1:
        raise ValueError("rank one's own error")


def _rank1_waits_alone(rank, world):
    if rank == 1:
        dist.all_reduce(torch.ones(1))  # rank 0 never joins


def test_a_world_serves_several_calls_and_restores_env():
    run_ranks(_sum_ranks, 2, env={"DIST_UTILS_PROBE": "set"})
    first = dist_utils._WORLDS[2]
    run_ranks(_env_restored, 2)
    assert dist_utils._WORLDS[2] is first  # the same processes, no respawn


def test_a_failing_rank_fails_the_caller_and_the_world_is_replaced():
    run_ranks(_env_restored, 2)
    before = dist_utils._WORLDS[2]
    with pytest.raises(RuntimeError, match="(?s)rank 1 failed:.*rank one's own error"):
        run_ranks(_rank1_fails, 2)
    assert 2 not in dist_utils._WORLDS and not any(p.is_alive() for p in before.procs)
    run_ranks(_sum_ranks, 2, env={"DIST_UTILS_PROBE": "set"})


def test_a_rank_waiting_alone_times_out_and_the_world_is_replaced():
    with pytest.raises(TimeoutError, match=r"ranks \[.*1\] still running after 3 s"):
        run_ranks(_rank1_waits_alone, 2, timeout=3)
    run_ranks(_sum_ranks, 2, env={"DIST_UTILS_PROBE": "set"})
