"""Multi-process tests on CPU: ``run_ranks(fn, world)`` spawns ``world`` processes joined in a gloo group and runs
``fn(rank, world)`` in each; an exception in any rank fails the caller with that rank's traceback."""

import os
import socket
import tempfile
import time

import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank, world, init_file, env, fn, args):
    os.environ.update(env)
    if init_file is None:  # the callee initialises (accelerate does, from RANK, WORLD_SIZE, MASTER_*)
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
        fn(rank, world, *args)
        return
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    fn(rank, world, *args)
    import gc
    gc.collect()  # DDP's reducer and FSDP2's state go before their process group
    dist.barrier()  # no rank tears gloo down while another still talks to it
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(fn, world: int, *args, env=None, init: bool = True, timeout: float = 600.0):
    """``fn`` must be a module-level function (spawned processes import it by name). ``init=False``: no process
    group is made; the ranks get RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT to make their own.
    A run past ``timeout`` seconds (a rank waiting in a collective the others never join) kills every rank and
    raises ``TimeoutError``: a hang fails the test instead of the whole run."""
    env = dict(env or {})
    if not init:
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    with tempfile.TemporaryDirectory() as d:
        ctx = mp.start_processes(_entry, args=(world, os.path.join(d, "init") if init else None, env, fn, args),
                                 nprocs=world, join=False, start_method="spawn")
        deadline = time.monotonic() + timeout
        while not ctx.join(timeout=max(0.0, min(5.0, deadline - time.monotonic()))):
            if time.monotonic() >= deadline:
                for p in ctx.processes:
                    if p.is_alive():
                        p.kill()
                raise TimeoutError(f"ranks still running after {timeout:.0f} s (a collective some rank never joined?)")
