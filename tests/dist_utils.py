"""Multi-process tests on CPU: ``run_ranks(fn, world)`` runs ``fn(rank, world)`` in each of ``world`` processes
joined in a gloo group; an exception in any rank fails the caller with that rank's traceback.

The processes of a gloo world are spawned once per world size and pytest process and then serve one test after
another: spawning a rank and importing torch, transformers and fastdpo in it costs seconds, which the ranks' work
in most of these tests does not. A world whose task failed or ran past its timeout is killed, so no test runs on
ranks a failure may have left out of step (a collective some rank never joined); the next test gets a fresh one.
A task that returns on every rank but leaves them out of step (one rank ran a collective the others did not)
fails its own test. Each task runs in the caller's environment at the call (plus ``env``); between tasks every
rank collects garbage. A world holds about 0.4 GB a rank once transformers is imported, until pytest exits.
``init=False`` tests (accelerate makes its own group) spawn ranks of their own, as before."""

import atexit
import gc
import os
import socket
import tempfile
import time
import traceback

import torch.distributed as dist
import torch.multiprocessing as mp
from multiprocessing import connection


def _entry(rank, world, env, fn, args):
    os.environ.update(env)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    fn(rank, world, *args)


def _in_step(world, ctl, world_group):
    """Whether every rank issued as many operations on the default group as this one (after a task that returned
    on every rank): a rank that ran one more (a barrier the others skipped, an async collective nobody waited on)
    would otherwise pass its test and leave the next test's collectives mismatched. Point-to-point sends and
    receives count too, so a task whose ranks exchange them unevenly fails here: none does. Compared over the
    harness's own group, which no task uses. A task that destroyed or replaced the default group fails too."""
    if not dist.is_initialized() or dist.group.WORLD is not world_group:
        return False, "the task destroyed or replaced the default process group"
    seqs = [None] * world
    dist.all_gather_object(seqs, world_group._get_sequence_number_for_group(), group=ctl)
    if len(set(seqs)) > 1:
        return False, f"ranks out of step after the task: operations on the default group per rank {seqs}"
    return True, ""


def _serve(rank, world, init_file, conn):
    """A rank of a pooled world: runs ``(fn, args, env, parent_env)`` tasks until it receives ``None``, each with
    the caller's environment at the call plus ``env``; answers each with ``None`` or what went wrong."""
    if os.environ.get("TRITON_INTERPRET") == "1":  # as conftest does in the pytest process
        import interpreter_patch_once
        interpreter_patch_once.install()
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    ctl = dist.new_group(backend="gloo")  # the harness's own collectives, never matched with a task's
    world_group = dist.group.WORLD
    base = dict(os.environ)
    while True:
        task = conn.recv()
        if task is None:
            break
        fn, args, env, parent_env = task
        os.environ.clear()
        os.environ.update(parent_env)
        os.environ.update(env)
        try:
            fn(rank, world, *args)
            answer = None
        except BaseException:  # noqa: BLE001 - reported to the test, which fails with it
            answer = traceback.format_exc()
        finally:
            os.environ.clear()
            os.environ.update(base)
        gc.collect()  # DDP's reducer and FSDP2's state go before the group's next use
        if answer is None:  # a rank that failed skips this: the others wait here until the world is killed
            ok, why = _in_step(world, ctl, world_group)
            answer = None if ok else why
        conn.send(answer)
    dist.destroy_process_group()


class _World:
    def __init__(self, world):
        ctx = mp.get_context("spawn")
        self._dir = tempfile.TemporaryDirectory()
        init_file = os.path.join(self._dir.name, "init")
        self.conns, self.procs = [], []
        for rank in range(world):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_serve, args=(rank, world, init_file, child), daemon=True)
            proc.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(proc)

    def run(self, fn, args, env, timeout):
        for conn in self.conns:
            conn.send((fn, args, env, dict(os.environ)))
        deadline = time.monotonic() + timeout
        pending = dict(enumerate(self.conns))
        failures = []
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                failures.append(f"ranks {sorted(pending)} still running after {timeout:.0f} s "
                                "(a collective some rank never joined?)")
                break
            ready = connection.wait(list(pending.values()), timeout=min(1.0, left))
            for rank, conn in list(pending.items()):
                if conn in ready:
                    try:
                        answer = conn.recv()
                    except EOFError:
                        answer = f"rank died (exit code {self.procs[rank].exitcode})"
                elif not self.procs[rank].is_alive():
                    answer = f"rank died (exit code {self.procs[rank].exitcode})"
                else:
                    continue
                del pending[rank]
                if answer is not None:
                    failures.append(f"rank {rank} failed:\n{answer}")
                    # the others may wait in a collective this rank left: no need to wait out the whole timeout
                    deadline = min(deadline, time.monotonic() + 2.0)
        if failures:
            raise (TimeoutError if len(failures) == 1 and pending else RuntimeError)("\n".join(failures))

    def close(self, *, kill=False):
        if not kill:
            for conn in self.conns:
                try:
                    conn.send(None)
                except (BrokenPipeError, OSError):
                    kill = True
            for proc in self.procs:
                proc.join(timeout=10)
        for proc in self.procs:
            if proc.is_alive():
                proc.kill()
                proc.join()
        self._dir.cleanup()


_WORLDS = {}


@atexit.register
def _close_worlds():
    for w in _WORLDS.values():
        w.close()
    _WORLDS.clear()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(fn, world: int, *args, env=None, init: bool = True, timeout: float = 600.0):
    """``fn`` must be a module-level function (the ranks import it by name). The ranks run it in the caller's
    environment as it is at the call, plus ``env``. ``init=False``: fresh processes and no process group; the
    ranks get RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT to make their own. A run past ``timeout``
    seconds (a rank waiting in a collective the others never join) kills every rank and raises ``TimeoutError``:
    a hang fails the test instead of the whole run."""
    env = dict(env or {})
    if init:
        w = _WORLDS.get(world)
        if w is not None and not all(p.is_alive() for p in w.procs):  # a rank died between tests
            del _WORLDS[world]
            w.close(kill=True)
            w = None
        w = w or _WORLDS.setdefault(world, _World(world))
        try:
            w.run(fn, args, env, timeout)
        except BaseException:
            del _WORLDS[world]
            w.close(kill=True)
            raise
        return
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    ctx = mp.start_processes(_entry, args=(world, env, fn, args), nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=max(0.0, min(5.0, deadline - time.monotonic()))):
        if time.monotonic() >= deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            raise TimeoutError(f"ranks still running after {timeout:.0f} s (a collective some rank never joined?)")
