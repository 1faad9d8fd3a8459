"""Vocabulary-parallel ops against the single-process op: ``python -m benchmarks.vocab_parallel``.

Spawns P ranks (gloo on CPU, NCCL with one GPU per rank where there are P GPUs), each holding 1/P of the
vocabulary, and times one forward+backward of ``dpo_loss`` and ``sequence_logps`` with ``process_group=`` against
the same op on the whole vocabulary in one process (on CPU each rank, and the single process, get one thread, so
P ranks use P cores against the single process's one). Also times the op's collectives alone and reports the
bytes each rank sends per call. Prints a table; ``--json PATH`` writes the rows.

    python -m benchmarks.vocab_parallel [--ranks 2] [--shape 4,256,32000] [--repeat 5]
"""

import argparse
import gc
import json
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _timed(fn, repeat, sync):
    fn()  # warm-up (compiles, allocations)
    out = []
    for _ in range(repeat):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def _batch(shape, dtype, device):
    N, T, V = shape
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(N, T, V, generator=g) * 2).to(dtype).to(device)
    labels = torch.randint(0, V, (N, T), generator=g).to(device)
    labels[:, : T // 4] = -100
    return logits, labels


def _rank(rank, world, init_file, shape, dtype, repeat, queue):
    cuda = torch.cuda.device_count() >= world
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(1)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        rows = _measure(rank, world, device, cuda, shape, dtype, repeat)
    finally:
        # Teardown while the interpreter is whole: every tensor, closure and work object of the measurement gone
        # first (a gloo worker thread still holding tensors at interpreter exit aborts the process, "terminate
        # called without an active exception"), every rank past its last collective before any destroys the group.
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()
    if rank == 0:
        queue.put(rows)


def _measure(rank, world, device, cuda, shape, dtype, repeat):
    import fastdpo
    from fastdpo import _vocab

    sync = torch.cuda.synchronize if cuda else (lambda: None)
    group = dist.group.WORLD
    N, T, V = shape
    Vp = V // world
    logits, labels = _batch((N, T, Vp * world), dtype, device)
    part = logits[:, :, rank * Vp:(rank + 1) * Vp].contiguous().requires_grad_()
    full = logits.requires_grad_()
    rows = []

    def dpo(x, pg):
        return lambda: fastdpo.dpo_loss(x, labels, process_group=pg).loss.backward()

    def logps(x, pg):
        return lambda: fastdpo.sequence_logps(x, labels, process_group=pg).logps.sum().backward()

    for op, make, k in (("dpo_loss", dpo, _vocab.K_STATS), ("sequence_logps", logps, _vocab.K_PLAIN)):
        sharded = _timed(make(part, group), repeat, sync)
        partials = torch.zeros(k, N, T, device=device)
        with_stats = int(k == _vocab.K_STATS)
        comm = _timed(lambda: (_vocab.check_split(group, Vp, labels, part, "logits", ignore_index=-100, shift=True,
                                                  agree=(with_stats,)),
                               _vocab.gather(partials, group, world)), repeat, sync)
        dist.barrier()
        single = _timed(make(full, None), repeat, sync) if rank == 0 else None
        dist.barrier()
        if rank == 0:
            rows.append({"op": op, "ranks": world, "shape": [N, T, Vp * world], "dtype": str(dtype).split(".")[-1],
                         "device": torch.cuda.get_device_name(device) if cuda else "cpu (1 thread per rank)",
                         "single_ms": single * 1e3, "sharded_ms": sharded * 1e3, "collectives_ms": comm * 1e3,
                         "speedup": single / sharded, "ideal_speedup": world,
                         "bytes_sent_per_rank": 8 * _vocab.agreement_size(1) + k * 4 * N * T})
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--shape", default="4,256,32000", help="N,T,V (V rounded down to a multiple of --ranks)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    shape = tuple(int(v) for v in args.shape.split(","))
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_rank, args=(args.ranks, os.path.join(d, "init"), shape, getattr(torch, args.dtype), args.repeat,
                              queue), nprocs=args.ranks)
    rows = queue.get()
    print(f"| op | ranks | shape | device | one process | sharded, per rank | its collectives | speed-up (ideal) "
          f"| sent per rank |")
    print("|---|---:|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['op']} | {r['ranks']} | {'x'.join(map(str, r['shape']))} {r['dtype']} | {r['device']} "
              f"| {r['single_ms']:.1f} ms | {r['sharded_ms']:.1f} ms | {r['collectives_ms']:.2f} ms "
              f"| {r['speedup']:.2f}x ({r['ideal_speedup']}x) | {r['bytes_sent_per_rank'] / 1e3:.1f} kB |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
