"""The multi-process harness itself (``dist_utils.run_ranks``): pooled ranks serve one test after another in the
caller's environment of the moment, a failing rank fails the caller with its traceback, ranks left out of step
fail the test that did it, a rank left waiting in a collective times out instead of hanging the run, and the
next call after any of these gets a working world."""

import os
import signal

import pytest
import torch
import torch.distributed as dist

import dist_utils
from dist_utils import run_ranks


def _sum_ranks(rank, world):
    t = torch.tensor([float(rank)])
    dist.all_reduce(t)
    assert t.item() == sum(range(world))


def _env_is(rank, world, name, value):
    assert os.environ.get(name) == value, (name, os.environ.get(name))


def _set_env_in_rank(rank, world):
    os.environ["DIST_UTILS_LEFT_BEHIND"] = "yes"


def _rank1_fails(rank, world):
    if rank == 1:
        raise ValueError("rank one's own error")


def _rank0_collective_nobody_joins(rank, world):
    if rank == 0:
        dist.all_reduce(torch.ones(1), async_op=True)  # never waited on: rank 0 is one collective ahead


def _destroys_the_group(rank, world):
    dist.destroy_process_group()


def _rank1_waits_alone(rank, world):
    if rank == 1:
        dist.all_reduce(torch.ones(1))  # rank 0 never joins


def test_a_world_serves_several_calls_in_the_callers_environment(monkeypatch):
    monkeypatch.setenv("DIST_UTILS_PROBE", "set")
    run_ranks(_sum_ranks, 2)
    first = dist_utils._WORLDS[2]
    run_ranks(_env_is, 2, "DIST_UTILS_PROBE", "set")
    run_ranks(_env_is, 2, "DIST_UTILS_PROBE", "other", env={"DIST_UTILS_PROBE": "other"})
    monkeypatch.delenv("DIST_UTILS_PROBE")
    run_ranks(_env_is, 2, "DIST_UTILS_PROBE", None)  # not the environment the world was spawned in
    run_ranks(_set_env_in_rank, 2)
    run_ranks(_env_is, 2, "DIST_UTILS_LEFT_BEHIND", None)  # nor what a task set
    assert dist_utils._WORLDS[2] is first  # the same processes throughout


def test_a_failing_rank_fails_the_caller_and_the_world_is_replaced():
    run_ranks(_sum_ranks, 2)
    before = dist_utils._WORLDS[2]
    with pytest.raises(RuntimeError, match="(?s)rank 1 failed:.*rank one's own error"):
        run_ranks(_rank1_fails, 2)
    assert 2 not in dist_utils._WORLDS and not any(p.is_alive() for p in before.procs)
    run_ranks(_sum_ranks, 2)


def test_ranks_left_out_of_step_fail_the_test_that_did_it():
    with pytest.raises(RuntimeError, match="rank 0 failed:\nranks out of step after the task"):
        run_ranks(_rank0_collective_nobody_joins, 2)
    run_ranks(_sum_ranks, 2)


def test_a_task_that_destroys_the_default_group_fails_itself():
    with pytest.raises(RuntimeError, match="destroyed or replaced the default process group"):
        run_ranks(_destroys_the_group, 2)
    run_ranks(_sum_ranks, 2)


def test_a_rank_waiting_alone_times_out_and_the_world_is_replaced():
    run_ranks(_sum_ranks, 2)  # a warm world: the 3 s below are the task's alone (rank 0 waits in the harness's check)
    with pytest.raises(TimeoutError, match=r"ranks \[0, 1\] still running after 3 s"):
        run_ranks(_rank1_waits_alone, 2, timeout=3)
    run_ranks(_sum_ranks, 2)


def test_a_rank_that_died_between_tests_is_replaced():
    run_ranks(_sum_ranks, 2)
    w = dist_utils._WORLDS[2]
    os.kill(w.procs[1].pid, signal.SIGKILL)
    w.procs[1].join()
    run_ranks(_sum_ranks, 2)
    assert dist_utils._WORLDS[2] is not w
