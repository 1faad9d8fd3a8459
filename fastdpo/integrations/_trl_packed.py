"""``DPOConfig(padding_free=True)`` on TRL >= 1.15, which TRL itself switches off at run time ("temporarily
unavailable after a refactor"): with ``fastdpo.integrations.trl.patch()`` the policy and reference forwards run
packed.

TRL's collator still pads (its batch is int tensors: a few KiB). Each forward TRL makes through its fused LM head
(``model(**inputs, labels=labels, fused_lm_head=True)``) is run on the batch with its padding taken out: one row
(``pack_batch``), ``position_ids`` restarting per sequence, no attention mask, no cache, flash-attention's varlen
offsets under a flash implementation, and TRL's pre-shifted ``shift_labels`` (the next token within the same
sequence), so the backbone and the LM head see only real tokens. The per-token outputs (log-probs, entropy,
mean logits, top-1, log sum p^2) are scattered back to TRL's padded ``(2B, T - 1)`` layout, zero at the padding as
TRL's own, so TRL's loss code, every loss type, ``ld_alpha``, WPO weighting and every metric run unchanged on
them. The host reads the sequence lengths once per forward (the packed row's length is a shape).
"""

import contextlib
import functools
import logging

from fastdpo.integrations.hf import causal_lm, is_compiled, packed_forward_kwargs, pack_batch

_ORIGINAL = None  # DPOTrainer's own _compute_loss and compute_ref_log_probs while patched
_PER_TOKEN = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1", "label_mask")
_TRL_DISABLED = "`padding_free=True` is temporarily unavailable"
calls = 0  # packed forwards run (tests read it)


class _DropTRLFallbackWarning(logging.Filter):
    """TRL warns at construction that it falls back to padding; with the patch it does not."""

    def filter(self, record):
        return _TRL_DISABLED not in record.getMessage()


_FILTER = _DropTRLFallbackWarning()


def _packed_call(lm, forward, compiled: bool):
    """``lm``'s forward (TRL's fused LM head), its ``fused_lm_head=True`` calls on a padded batch run packed."""

    if getattr(forward, "_fastdpo_packed", False):  # a nested context (a subclass calling one method inside another)
        return forward

    @functools.wraps(forward)
    def run(*args, fused_lm_head=False, **kwargs):
        if not fused_lm_head:  # generation, compute_metrics' logits: the model's own padded forward
            return forward(*args, **kwargs)
        global calls
        extra = sorted(set(kwargs) - {"input_ids", "attention_mask", "labels", "use_cache", "output_router_logits"})
        if args or extra or kwargs.get("attention_mask") is None or kwargs.get("labels") is None:
            raise ValueError("padding_free=True (fastdpo): a packed forward takes input_ids, attention_mask and "
                             f"labels only; this batch also has {extra or 'positional arguments'}")
        packed = pack_batch(kwargs.pop("input_ids"), kwargs.pop("attention_mask"), kwargs.pop("labels"))
        kwargs.update(packed_forward_kwargs(lm, packed.cu_seqlens, packed.max_seqlen, packed.num_tokens,
                                            compiled=compiled))
        out = forward(input_ids=packed.input_ids, shift_labels=packed.shift_labels(), fused_lm_head=True, **kwargs)
        calls += 1
        for name in _PER_TOKEN:  # packed position p predicts the token after it: padded (r, t) predicts t + 1
            value = getattr(out, name, None)
            if value is not None:
                setattr(out, name, packed.unpack(value)[:, :-1])
        return out

    run._fastdpo_packed = True
    return run


@contextlib.contextmanager
def _packed_forwards(trainer):
    """The policy's and the reference's causal LMs run packed for the block (their TRL forwards restored after)."""
    if getattr(trainer, "_is_vision_dataset", False):
        raise ValueError("padding_free=True (fastdpo): vision-language batches are not packed; set "
                         "padding_free=False")
    lms, compiled = [], bool(getattr(trainer.args, "torch_compile", False))
    for model in (trainer.model, trainer.ref_model):
        if model is None:
            continue
        if getattr(getattr(model, "active_peft_config", None), "is_prompt_learning", False):
            raise ValueError("padding_free=True (fastdpo): a prompt-learning PEFT adapter prepends virtual tokens "
                             "to every sequence, which a packed row cannot hold; set padding_free=False")
        lm = causal_lm(trainer.accelerator.unwrap_model(model))
        compiled = compiled or is_compiled(model, lm)
        if all(lm is not seen for seen in lms):
            lms.append(lm)
    saved = [(lm, lm.__dict__.get("forward")) for lm in lms]
    for lm in lms:
        lm.forward = _packed_call(lm, lm.forward, compiled)
    try:
        yield
    finally:
        for lm, forward in saved:
            if forward is None:
                del lm.forward
            else:
                lm.forward = forward


def _compute_loss(self, model, inputs, return_outputs):
    context = _packed_forwards(self) if self.args.padding_free else contextlib.nullcontext()
    with context:
        return _ORIGINAL["_compute_loss"](self, model, inputs, return_outputs)


def compute_ref_log_probs(self, model, inputs):
    context = _packed_forwards(self) if self.args.padding_free else contextlib.nullcontext()
    with context:
        return _ORIGINAL["compute_ref_log_probs"](self, model, inputs)


def patch(trainer_cls) -> None:
    global _ORIGINAL
    if _ORIGINAL is None:
        _ORIGINAL = {name: trainer_cls.__dict__[name] for name in ("_compute_loss", "compute_ref_log_probs")}
        trainer_cls._compute_loss = _compute_loss
        trainer_cls.compute_ref_log_probs = compute_ref_log_probs
        logging.getLogger("trl.trainer.dpo_trainer").addFilter(_FILTER)


def unpatch(trainer_cls) -> None:
    global _ORIGINAL
    if _ORIGINAL is not None:
        for name, fn in _ORIGINAL.items():
            setattr(trainer_cls, name, fn)
        _ORIGINAL = None
        logging.getLogger("trl.trainer.dpo_trainer").removeFilter(_FILTER)
