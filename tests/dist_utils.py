"""Multi-process tests on CPU: ``run_ranks(fn, world)`` spawns ``world`` processes joined in a gloo group and runs
``fn(rank, world)`` in each; an exception in any rank fails the caller with that rank's traceback."""

import os
import socket
import tempfile

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


def run_ranks(fn, world: int, *args, env=None, init: bool = True):
    """``fn`` must be a module-level function (spawned processes import it by name). ``init=False``: no process
    group is made; the ranks get RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT to make their own."""
    env = dict(env or {})
    if not init:
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_entry, args=(world, os.path.join(d, "init") if init else None, env, fn, args), nprocs=world,
                 join=True)
