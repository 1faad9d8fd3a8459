"""Multi-process tests on CPU: ``run_ranks(fn, world)`` spawns ``world`` processes joined in a gloo group and runs
``fn(rank, world)`` in each; an exception in any rank fails the caller with that rank's traceback."""

import os
import tempfile

import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank, world, init_file, env, fn, args):
    os.environ.update(env)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    fn(rank, world, *args)
    import gc
    gc.collect()  # DDP's reducer and FSDP2's state go before their process group
    dist.barrier()  # no rank tears gloo down while another still talks to it
    dist.destroy_process_group()


def run_ranks(fn, world: int, *args, env=None):
    """``fn`` must be a module-level function (spawned processes import it by name)."""
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_entry, args=(world, os.path.join(d, "init"), dict(env or {}), fn, args), nprocs=world, join=True)
