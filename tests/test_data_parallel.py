"""Data-parallel training steps on CPU (gloo, 2 ranks): a tiny Llama under DDP and under FSDP2 (``fully_shard``),
its DPO loss computed three ways (``dpo_loss`` on the wrapped model's logits, ``policy_dpo_loss``, ``policy_logps``
then ``dpo_loss_from_logps``), each rank holding half of the global batch. Two SGD steps; after each backward the
gradients (FSDP2's gathered from their shards) equal those of one process on the whole batch, and the loss
averaged over the ranks equals its loss. Tolerances: fp32, the same sums associated differently (per rank, then
averaged by the wrapper)."""

import contextlib

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("transformers")

import fastdpo  # noqa: E402
from dist_utils import run_ranks  # noqa: E402
from trl_utils import tiny_llama  # noqa: E402

V, B, T = 64, 4, 10  # 4 pairs: 2 per rank
REF_C = torch.tensor([-30.0, -28.0, -31.0, -29.5])
REF_R = torch.tensor([-29.0, -30.5, -30.0, -31.0])


def _batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, V, (2 * B, T), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    mask[B + 2, 7:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :4] = -100
    return ids, mask, labels


def _local(x, rank, world):
    """This rank's pairs of a (2B, ...) batch (chosen rows, then the same pairs' rejected rows)."""
    per = B // world
    return torch.cat([x[rank * per:(rank + 1) * per], x[B + rank * per:B + (rank + 1) * per]])


def _loss(way, model, ids, mask, labels, ref_c, ref_r):
    if way == "logits":
        return fastdpo.dpo_loss(model(input_ids=ids, attention_mask=mask).logits, labels, ref_c, ref_r).loss
    if way == "linear":
        return fastdpo.policy_dpo_loss(model, ids, mask, labels, ref_c, ref_r, chunk_bytes=3 * V * 4).loss
    lp = fastdpo.policy_logps(model, ids, mask, labels).logps
    n = lp.shape[0] // 2
    return fastdpo.dpo_loss_from_logps(lp[:n], lp[n:], ref_c, ref_r)


def _grads(model):
    out = {}
    for name, p in model.named_parameters():
        g = p.grad
        if g is not None and hasattr(g, "full_tensor"):  # FSDP2: a DTensor sharded over the ranks
            g = g.full_tensor()
        out[name.replace("_fsdp_wrapped_module.", "").replace("module.", "")] = None if g is None else g.detach()
    return out


def _steps(rank, world, wrap, way, tie):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    ids, mask, labels = _batch()
    single = tiny_llama(V, seed=0, tie=tie)
    model = tiny_llama(V, seed=0, tie=tie)
    if wrap == "ddp":
        model = DistributedDataParallel(model)
    else:
        mesh = init_device_mesh("cpu", (world,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        if wrap == "fsdp2_head":  # the LM head a unit of its own: still sharded (a DTensor) inside the forward
            fully_shard(model.lm_head, mesh=mesh)
        fully_shard(model, mesh=mesh)
    opts = [torch.optim.SGD(m.parameters(), lr=0.5) for m in (single, model)]
    for step in range(2):
        expected = _loss(way, single, ids, mask, labels, REF_C, REF_R)
        expected.backward()
        loss = _loss(way, model, *(_local(x, rank, world) for x in (ids, mask, labels, REF_C, REF_R)))
        loss.backward()
        total = loss.detach().clone()
        dist.all_reduce(total)
        torch.testing.assert_close(total / world, expected.detach(), rtol=1e-5, atol=1e-6)
        want, got = _grads(single), _grads(model)
        assert set(want) == set(got), (sorted(want), sorted(got))
        for name, g in want.items():
            scale = max(1.0, g.abs().max().item())
            torch.testing.assert_close(got[name], g, rtol=1e-4, atol=1e-5 * scale,
                                       msg=lambda m, name=name: f"step {step} {name}: {m}")
        for opt in opts:
            opt.step()
            opt.zero_grad()


@pytest.mark.parametrize("wrap,tie", [("ddp", False), ("fsdp2", True), ("fsdp2_head", False)])
@pytest.mark.parametrize("way", ["logits", "linear", "logps"])
def test_data_parallel_step(wrap, way, tie):
    run_ranks(_steps, 2, wrap, way, tie, env={"FASTDPO_BACKEND": "torch"})


def _dtensor_refused(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    labels = torch.zeros(2, 5, dtype=torch.long)
    weight = distribute_tensor(torch.randn(V, 8), mesh, [Shard(0)])
    with pytest.raises(TypeError, match="weight is a DTensor.*policy_dpo_loss"):
        fastdpo.linear_dpo_loss(torch.randn(2, 5, 8), weight, labels)
    logits = distribute_tensor(torch.randn(2, 5, V), mesh, [Shard(2)])
    with pytest.raises(TypeError, match="logits is a DTensor.*to_local"):
        fastdpo.sequence_logps(logits, labels)


def test_dtensor_inputs_refused_with_what_to_do():
    run_ranks(_dtensor_refused, 2)


def _trl_run(out, patched, batch, **extra):
    """Two steps of TRL's DPOTrainer on the tiny Llama, shipped or patched: its logged rows and final weights
    (DTensor shards gathered) and whether TRL's own chunked log-prob function ran."""
    import copy

    from trl.kernels import chunked_logprob

    import fastdpo.integrations.trl as fdt
    from trl_utils import dpo_trainer, perturb, tiny_llama, tiny_tokenizer

    calls = {"n": 0}
    original = chunked_logprob.ChunkedLogProbFunction.forward

    def spy(*args, **kwargs):
        calls["n"] += 1
        return original(*args, **kwargs)
    chunked_logprob.ChunkedLogProbFunction.forward = staticmethod(spy)
    try:
        model = tiny_llama(len(tiny_tokenizer()))
        ref = copy.deepcopy(model)
        perturb(model)
        with fdt.patched() if patched else contextlib.nullcontext():
            trainer = dpo_trainer(f"{out}/{patched}", model=model, ref_model=ref, per_device_train_batch_size=batch,
                                  max_steps=2, learning_rate=1e-2, **extra)
            trainer.train()
    finally:
        chunked_logprob.ChunkedLogProbFunction.forward = staticmethod(original)
    weights = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
               for k, v in trainer.model.state_dict().items()}
    return trainer, [h for h in trainer.state.log_history if "loss" in h], weights, calls["n"] > 0


def _same_run(got, want, rtol):
    (logs_a, w_a), (logs_b, w_b) = want, got
    assert len(logs_a) == len(logs_b) == 2
    for a, b in zip(logs_a, logs_b):
        for k, v in a.items():
            assert b[k] == pytest.approx(v, rel=rtol, abs=1e-6), (k, v, b[k])
    assert set(w_a) == set(w_b)
    for k in w_a:
        torch.testing.assert_close(w_b[k], w_a[k], rtol=rtol, atol=1e-5, msg=k)


def _trl_ranks(rank, world, out, fsdp=False):
    """TRL's DPOTrainer over accelerate's multi-process setup (2 pairs per rank), as shipped and patched: the same
    logged rows and weights after 2 steps, and fastdpo (not TRL's chunked function) computed the patched run.
    Rank 0 saves the patched run to ``out/ranks.pt`` for the caller to hold to one process on the global batch.
    CPU: DDP on gloo. ``fsdp``: accelerate's FSDP2 (on CPU only with ``_accelerate_fsdp_on_cpu``)."""
    from torch.distributed.tensor import DTensor, Shard

    extra = dict(fsdp="full_shard", use_cpu=not torch.cuda.is_available(),
                 fsdp_config={"fsdp_version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]}
                 ) if fsdp else {}
    runs = {}
    for patched in (False, True):
        trainer, logs, weights, trl_ran = _trl_run(out, patched, 2, **extra)
        assert trainer.accelerator.num_processes == world
        assert trl_ran != patched, (patched, trl_ran)
        if fsdp:
            assert trainer.is_fsdp_enabled and type(trainer.model).__name__.startswith("FSDP")
            for name, p in trainer.model.named_parameters():  # every weight sharded over the ranks
                assert isinstance(p, DTensor) and p.placements == (Shard(0),), name
                assert p.device_mesh.size() == world, name
        else:
            assert type(trainer.model_wrapped).__name__ == "DistributedDataParallel"
        runs[patched] = (logs, weights)
    _same_run(runs[True], runs[False], rtol=1e-5)
    if rank == 0:
        torch.save(runs[True], f"{out}/ranks.pt")


def _same_as_one_process(out, world):
    """The ranks' patched run against one process patched on the same global batch (accelerate hands rank r the
    r-th of every ``world`` consecutive batches: together the one process's batch). fp32 rounding: the gradient is
    averaged over ranks instead of summed in one batch (weights differed by <= 2e-6 after 2 steps)."""
    _, logs, weights, _ = _trl_run(f"{out}/one", True, 2 * world)
    _same_run(torch.load(f"{out}/ranks.pt"), (logs, weights), rtol=1e-5)


def test_trl_patch_multi_process(tmp_path):
    """TRL's DPOTrainer over accelerate's CPU DDP (2 gloo ranks), shipped and patched, and one process."""
    pytest.importorskip("trl")
    run_ranks(_trl_ranks, 2, str(tmp_path), init=False)
    _same_as_one_process(str(tmp_path), 2)


def _accelerate_fsdp_on_cpu():
    """accelerate enables FSDP only for GPU-like process groups: on a CPU (gloo) group its AcceleratorState drops
    the FSDP plugin, and transformers then trains without FSDP. This lets its FSDP branch be taken on CPU: the
    process group is reported as multi-GPU to AcceleratorState's constructor, which then sets FSDP (its last line
    overwrites the shared distributed type). The device, the backend and everything accelerate does to prepare
    the model (``fully_shard`` of each decoder layer, then of the root) are unchanged."""
    import accelerate.state as state
    from accelerate.utils import DistributedType

    init = state.AcceleratorState.__init__

    def patched(self, *args, **kwargs):
        shared = state.PartialState._shared_state
        if shared.get("distributed_type") == DistributedType.MULTI_CPU:
            shared["distributed_type"] = DistributedType.MULTI_GPU
        init(self, *args, **kwargs)
    state.AcceleratorState.__init__ = patched


def _trl_fsdp_ranks(rank, world, out):
    _accelerate_fsdp_on_cpu()
    _trl_ranks(rank, world, out, True)


def test_trl_patch_under_accelerate_fsdp2_on_cpu(tmp_path):
    """TRL's DPOTrainer with accelerate's FSDP2 (2 gloo ranks, every weight a DTensor shard), shipped and patched,
    and one process on the global batch: the same logged rows and weights after 2 steps (the GPU lane runs the
    multi-process part over NCCL)."""
    pytest.importorskip("trl")
    run_ranks(_trl_fsdp_ranks, 2, str(tmp_path), init=False, env={"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"})
    _same_as_one_process(str(tmp_path), 2)
