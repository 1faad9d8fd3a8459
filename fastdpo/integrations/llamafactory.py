"""LLaMA-Factory's DPO trainer (``CustomDPOTrainer``) through fastdpo's kernels.

One call before LLaMA-Factory builds its trainer::

    import fastdpo.integrations.llamafactory as fdl
    fdl.patch()
    from llamafactory.train.tuner import run_exp
    run_exp({"stage": "dpo", ...})          # the same dict (or YAML) as without fastdpo

or, for a YAML run, ``python -m fastdpo.integrations.llamafactory train config.yaml`` in place of
``llamafactory-cli train config.yaml`` (``torchrun ... -m fastdpo.integrations.llamafactory train config.yaml``
on several GPUs). LLaMA-Factory has no plugin or callback hook that runs before its trainer is built, so a YAML
key cannot switch it on.

What it replaces: ``CustomDPOTrainer.concatenated_forward``, the model forward and the logits -> per-sequence
log-probs step (LLaMA-Factory's ``get_batch_logps``: fp32 logits, a log-softmax copy, a gather), for the policy
and the reference alike. In its place:

- the fused-linear path, when the LM head can be reached: ``fastdpo.policy_logps`` runs the backbone and
  ``linear_sequence_logps`` on its hidden states; the logits are never built;
- else the logits path: the model's own forward, then ``fastdpo.sequence_logps`` (one pass, a backward that
  writes dlogits from the saved log-sum-exp, into the logits' storage with ``inplace_backward``). Which path and
  why is logged once per reason.

Everything after the (2B,) per-sequence log-probs stays LLaMA-Factory's own code: ``compute_preference_loss``
(sigmoid, hinge, ipo, kto_pair through TRL's ``dpo_loss``, which TRL >= 0.20 computes as sigmoid whatever the
name; orpo, simpo; the BCO term with its running mean; cDPO ``dpo_label_smoothing``), ``pref_ftx`` and the metrics.
What the replacement reproduces of ``concatenated_forward`` itself: length-averaged log-probs for ipo, orpo and
simpo; ``ld_alpha`` on the policy's log-probs only, with LLaMA-Factory's mask (positions from the first completion
token); ``chosen_logps_avg``; and the ``logits/chosen``, ``logits/rejected`` metrics, means over every position
and the whole vocabulary (the returned ``chosen_logits`` / ``rejected_logits`` are those 0-dim means, all
LLaMA-Factory reads of them; the fused-linear path gets them from the mean hidden state and the mean head row).
The reference is LLaMA-Factory's: a reference model, or with LoRA the policy with its adapter disabled.

Falls back, logged: an encoder-decoder model runs LLaMA-Factory's own ``concatenated_forward``. The fused-linear
path gives way to the logits path for inputs beyond ``input_ids`` / ``attention_mask`` (multimodal, packed), a
model class from outside transformers (remote code, whose forward may transform the hidden states), an LM head
that is not a plain ``nn.Linear`` (LoRA or ``additional_target`` on it), a model wrapped in anything but DDP or
PEFT (DeepSpeed's engine, whatever its stage), a head DeepSpeed ZeRO-3 partitions, FSDP1, and configs with logit scaling or softcapping (the
``logits/*`` metrics would need the logits). Not reached: LLaMA-Factory's other trainers (KTO, ``use_mca``'s
Megatron trainer, ``USE_V1``).
"""

import contextlib
import logging
import os
import sys
import threading
from collections import Counter
from importlib import metadata

import torch

from fastdpo import policy_logps, sequence_logps

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch built without distributed
    DTensor = ()

IGNORE_INDEX = -100  # LLaMA-Factory's IGNORE_INDEX
# LLaMA-Factory releases whose concatenated_forward / get_batch_logps this module reproduces: 0.9.5 is tested
# (tests/llamafactory), 0.9.4's two functions are the same code.
SUPPORTED = ("0.9.4", "0.9.5")
_SCALING = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")

logger = logging.getLogger(__name__)
calls = Counter()  # how often each path ran: "linear", "logits", "original" (tests read it)
_LOCK = threading.Lock()
_ORIGINAL = None  # LLaMA-Factory's concatenated_forward while patched
_OPTIONS = {"inplace_backward": True, "fused_linear": True}
_logged = set()


def _trainer_class():
    try:
        version = metadata.version("llamafactory")
    except metadata.PackageNotFoundError as e:
        raise ImportError("fastdpo.integrations.llamafactory needs LLaMA-Factory: pip install llamafactory") from e
    if version not in SUPPORTED:
        raise RuntimeError(f"fastdpo.integrations.llamafactory supports LLaMA-Factory {', '.join(SUPPORTED)}; "
                           f"LLaMA-Factory {version} may compute its DPO log-probs differently: use its own trainer "
                           "(do not call patch()) or a supported release")
    from llamafactory.train.dpo.trainer import CustomDPOTrainer
    return CustomDPOTrainer


def patch(*, inplace_backward: bool = True, fused_linear: bool = True) -> None:
    """Route every ``CustomDPOTrainer`` from now on through fastdpo (see the module docstring).

    Args:
        inplace_backward: on the logits path, write dlogits into the logits' storage (one logits-sized buffer per
            step instead of two). A model whose autograd graph saves its final logits then fails in backward with
            autograd's in-place error, never silently: pass False there.
        fused_linear: take the fused-linear path where the LM head can be reached; False: always the logits path.
    """
    global _ORIGINAL
    for name, value in (("inplace_backward", inplace_backward), ("fused_linear", fused_linear)):
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    cls = _trainer_class()
    with _LOCK:
        _OPTIONS.update(inplace_backward=inplace_backward, fused_linear=fused_linear)
        if _ORIGINAL is None:
            _ORIGINAL = cls.__dict__["concatenated_forward"]
            cls.concatenated_forward = concatenated_forward


def unpatch() -> None:
    """Restore LLaMA-Factory's own ``concatenated_forward``."""
    global _ORIGINAL
    cls = _trainer_class()
    with _LOCK:
        if _ORIGINAL is not None:
            cls.concatenated_forward = _ORIGINAL
            _ORIGINAL = None
        _OPTIONS.update(inplace_backward=True, fused_linear=True)


def is_patched() -> bool:
    return _ORIGINAL is not None


@contextlib.contextmanager
def patched(**options):
    """``patch(**options)`` for the duration of a block (LLaMA-Factory's code restored after, unless it was
    patched before, with its options)."""
    was, before = is_patched(), dict(_OPTIONS)
    patch(**options)
    try:
        yield
    finally:
        if was:
            _OPTIONS.update(before)
        else:
            unpatch()


def _log_once(message: str) -> None:
    if message not in _logged:
        _logged.add(message)
        logger.warning("fastdpo: %s", message)


def _causal_lm(model):
    """What ``fastdpo.policy_logps`` will see: the model inside DDP and PEFT wrappers, or None if that is not a
    transformers model (DeepSpeed's engine, say, which forwards attribute look-ups to the model it wraps)."""
    from transformers import PreTrainedModel

    inner = model
    while isinstance(inner, torch.nn.parallel.DistributedDataParallel):
        inner = inner.module
    lm = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    return lm if isinstance(lm, PreTrainedModel) else None


def _linear_blocker(trainer, model, batch):
    """Why the fused-linear path cannot take this call (a phrase), or None."""
    extra = sorted(set(batch) - {"input_ids", "attention_mask"})
    if extra:
        return f"the batch carries {extra} (multimodal or packed inputs)"
    lm = _causal_lm(model)
    if lm is None:
        return f"the model is a {type(model).__name__} (only DDP and PEFT wrappers are looked through)"
    if not type(lm).__module__.startswith("transformers.models."):
        return (f"{type(lm).__name__} is not a transformers model class (remote code may transform the hidden "
                "states before its head)")
    head = lm.get_output_embeddings()
    if type(head) is not torch.nn.Linear:
        return f"the LM head is a {type(head).__name__}, not a plain nn.Linear (an adapter or wrapper on it)"
    if getattr(head.weight, "ds_id", None) is not None:
        return "DeepSpeed ZeRO-3 partitions the LM head"
    if getattr(trainer, "is_fsdp_enabled", False) and not getattr(trainer.accelerator, "is_fsdp2", False):
        return "FSDP1 (FSDP2 and DDP take the fused-linear path)"
    text = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
    for attr in _SCALING:
        if getattr(text, attr, None) is not None:
            return f"the model's config sets {attr} (the logits/* metrics would need the logits)"
    return None


def _mean_logit(hidden_mean, head):
    """The mean logit over positions and vocabulary, from the mean hidden state: the head is affine."""
    weight, bias = head.weight, head.bias
    if isinstance(weight, DTensor):
        weight = weight.full_tensor()
    if isinstance(bias, DTensor):
        bias = bias.full_tensor()
    mean = hidden_mean @ weight.float().mean(0)
    return mean if bias is None else mean + bias.float().mean()


def _linear_logps(trainer, model, batch, labels, B, token_logps):
    """(SequenceLogps, chosen mean logit, rejected mean logit) without the logits."""
    lm = _causal_lm(model)
    backbone = getattr(lm, lm.base_model_prefix)
    means = []

    def hook(module, args, output):  # the hidden states of the backbone call policy_logps makes
        hidden = output[0] if isinstance(output, tuple) else output.last_hidden_state
        with torch.no_grad():
            means.extend(hidden[rows].mean((0, 1), dtype=torch.float32) for rows in (slice(0, B), slice(B, None)))
    handle = backbone.register_forward_hook(hook)
    try:
        # accelerate's mixed-precision autocast wraps the model's forward, which policy_logps replaces for the call
        with trainer.accelerator.autocast():
            seq = policy_logps(model, batch["input_ids"], batch.get("attention_mask"), labels,
                               ignore_index=IGNORE_INDEX, return_token_logps=token_logps)
    finally:
        handle.remove()
    with torch.no_grad():
        head = lm.get_output_embeddings()
        return seq, _mean_logit(means[0], head), _mean_logit(means[1], head)


def _ld_logps(token_logps, labels, valid_length, ld_alpha):
    """LLaMA-Factory's ``get_batch_logps`` with ``ld_alpha``, on fastdpo's per-token log-probs: weight 1 on the
    first min(chosen, rejected) positions from each sequence's first completion token, ``ld_alpha`` after."""
    labels, per_token = labels[:, 1:], token_logps[:, 1:]  # fastdpo's are aligned with the unshifted labels
    loss_mask = labels != IGNORE_INDEX
    n = labels.shape[0] // 2
    min_lengths = torch.min(valid_length[:n], valid_length[n:])
    start_positions = torch.argmax(loss_mask.int(), dim=1)
    public_lengths = start_positions + torch.cat([min_lengths, min_lengths], dim=0)
    position_ids = torch.arange(labels.shape[-1], device=per_token.device).expand_as(per_token)
    ld_mask = position_ids < public_lengths.unsqueeze(1)
    front = (per_token * (ld_mask * loss_mask).float()).sum(-1)
    rear = (per_token * (~ld_mask * loss_mask).float()).sum(-1)
    return front + ld_alpha * rear


def concatenated_forward(self, model, batch, is_ref_model=False):
    """``CustomDPOTrainer.concatenated_forward`` through fastdpo: the same keys and values (``chosen_logits`` and
    ``rejected_logits`` as their 0-dim means)."""
    if self.is_encoder_decoder:
        _log_once("encoder-decoder model: LLaMA-Factory's own concatenated_forward")
        calls["original"] += 1
        return _ORIGINAL(self, model, batch, is_ref_model)
    batch = dict(batch)  # LLaMA-Factory pops the labels from (a clone of) the batch; never mutate the caller's
    labels = batch.pop("labels")
    B = batch["input_ids"].size(0) // 2
    ld_alpha = None if is_ref_model else self.ld_alpha
    blocker = _linear_blocker(self, model, batch) if _OPTIONS["fused_linear"] else "patch(fused_linear=False)"
    if blocker is None:
        calls["linear"] += 1
        seq, chosen_logits, rejected_logits = _linear_logps(self, model, batch, labels, B, ld_alpha is not None)
    else:
        if _OPTIONS["fused_linear"]:
            _log_once(f"logits path (not fused-linear): {blocker}")
        calls["logits"] += 1
        logits = model(**batch, return_dict=True, use_cache=False).logits
        with torch.no_grad():  # LLaMA-Factory logs the mean of its fp32 logits over all positions and the vocabulary
            chosen_logits, rejected_logits = (logits[rows].mean(dtype=torch.float32)
                                              for rows in (slice(0, B), slice(B, None)))
        seq = sequence_logps(logits, labels, ignore_index=IGNORE_INDEX, return_token_logps=ld_alpha is not None,
                             inplace_backward=_OPTIONS["inplace_backward"])
    all_logps, valid_length = seq.logps, seq.num_tokens
    if ld_alpha is not None:
        all_logps = _ld_logps(seq.token_logps, labels, valid_length, ld_alpha)
    averaged = self.loss_type in ["ipo", "orpo", "simpo"]
    if averaged:
        all_logps = all_logps / valid_length
    chosen_logps, rejected_logps = all_logps.split(B, dim=0)
    chosen_length, _ = valid_length.split(B, dim=0)
    return {"chosen_logps": chosen_logps, "rejected_logps": rejected_logps, "chosen_logits": chosen_logits,
            "rejected_logits": rejected_logits,
            "chosen_logps_avg": chosen_logps if averaged else chosen_logps / chosen_length}


USAGE = ("usage: python -m fastdpo.integrations.llamafactory train CONFIG.yaml [key=value ...]\n"
         "       (llamafactory-cli train's arguments; LLaMA-Factory's DPO through fastdpo)")


def main(argv=None) -> int:
    """``llamafactory-cli train`` with ``patch()`` first, in this process."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "train":
        print(USAGE, file=sys.stderr)
        return 2
    if os.environ.get("USE_V1", "0").lower() in ("true", "y", "1"):
        print("fastdpo: USE_V1 runs LLaMA-Factory's v1 trainers, which this integration does not reach",
              file=sys.stderr)
        return 2
    from llamafactory.extras.misc import get_device_count

    launched = "LOCAL_RANK" in os.environ  # already one of torchrun's processes
    force = os.environ.get("FORCE_TORCHRUN", "0").lower() in ("true", "y", "1")
    if not launched and (force or get_device_count() > 1):
        # llamafactory-cli would start torchrun on its own launcher, whose processes would not be patched
        print("fastdpo: several devices (or FORCE_TORCHRUN): start the processes yourself, e.g.\n"
              "  torchrun --nproc_per_node N -m fastdpo.integrations.llamafactory " + " ".join(argv),
              file=sys.stderr)
        return 2
    patch()
    from llamafactory.train.tuner import run_exp

    sys.argv = [sys.argv[0], *argv[1:]]  # LLaMA-Factory reads its arguments (a YAML path, overrides) from here
    run_exp()
    return 0


__all__ = ["calls", "concatenated_forward", "is_patched", "main", "patch", "patched", "unpatch"]

if __name__ == "__main__":
    sys.exit(main())
