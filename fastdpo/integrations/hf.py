"""Plain Hugging Face loops: per-sequence log-probs of a causal LM without building its logits."""

from typing import Optional

import torch

try:
    from torch.distributed.tensor import DTensor, Partial
except ImportError:  # a torch built without distributed: no DTensor can reach us
    DTensor = Partial = None

from fastdpo.dpo import DPOLossOutput
from fastdpo.linear import linear_dpo_loss, linear_sequence_logps
from fastdpo.logps import SequenceLogps


def _logit_options(config) -> dict:
    """Softcapping and logit scaling as the model's config states them (TRL's add_fused_lm_head reads the same)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    scale = getattr(text, "logit_scale", None)
    if scale is None:
        scale = getattr(text, "output_multiplier", None)
    if scale is None:
        scale = getattr(text, "lm_head_multiplier", None)
    if scale is None and getattr(text, "logits_scaling", None) is not None:
        scale = text.logits_scaling if getattr(text, "model_type", "") == "hyperclovax" else 1 / text.logits_scaling
    return {"logit_scale": 1.0 if scale is None else float(scale),
            "softcap": getattr(text, "final_logit_softcapping", None)}


def _causal_lm(model):
    """The transformers causal LM inside DDP and PEFT wrappers (FSDP2's ``fully_shard`` wraps in place)."""
    inner = model
    while isinstance(inner, torch.nn.parallel.DistributedDataParallel):
        inner = inner.module
    return inner.get_base_model() if hasattr(inner, "get_base_model") else inner  # PEFT: LoRA lives inside


def _full(p: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A parameter still sharded inside the forward (a DTensor: an LM head that FSDP2 shards as a unit of its
    own, so its forward never runs) gathered for the call; its gradient is averaged over the mesh as FSDP2's
    reduce-scatter does (each rank holds a different batch)."""
    if p is None or DTensor is None or not isinstance(p, DTensor):
        return p
    return p.full_tensor(grad_placements=[Partial("avg")] * p.device_mesh.ndim)


def _through_forward(model, input_ids, attention_mask, loss_fn):
    """``loss_fn(hidden, weight, bias, logit options)`` run *inside* ``model``'s forward, in place of its LM head:
    the outermost wrapper's hooks all run (DDP's gradient synchronisation, FSDP2's unsharding and reduce-scatter),
    and the logits are never built. What ``loss_fn`` returns is what ``model(...)`` returns."""
    lm = _causal_lm(model)
    head = lm.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear) or type(head).forward is not torch.nn.Linear.forward:
        raise TypeError(f"policy_logps needs a plain nn.Linear LM head, got {type(head).__name__} (an adapter on "
                        "the LM head changes its effective weight)")
    options = _logit_options(lm.config)

    def fused_forward(*args, **kwargs):
        # the backbone is looked up here: FSDP2 and PEFT may have replaced it since
        backbone = getattr(lm, lm.base_model_prefix)
        hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        return loss_fn(hidden.to(head.weight.device), _full(head.weight), _full(head.bias), options)

    saved = lm.__dict__.get("forward")  # an instance forward already there (TRL's fused head patches one in)
    lm.forward = fused_forward  # an instance attribute: module hooks still wrap it
    try:
        return model(input_ids=input_ids, attention_mask=attention_mask)
    finally:
        if saved is None:
            del lm.forward
        else:
            lm.forward = saved


def policy_logps(model, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor], labels: torch.Tensor, *,
                 ignore_index: int = -100, average: bool = False, temperature: float = 1.0,
                 **kwargs) -> SequenceLogps:
    """``sequence_logps(model(input_ids).logits, labels)`` through the backbone and the fused-linear LM head.

    Runs inside ``model``'s own forward (its LM head replaced for the call), so a model wrapped in DDP, in FSDP2
    (``fully_shard``) or in PEFT computes what the same batch computes unwrapped, gradients synchronised by the
    wrapper as usual.

    Args:
        model: a transformers causal LM (``...ForCausalLM``), PEFT-wrapped, DDP-wrapped or ``fully_shard``-ed;
            tied embeddings work.
        labels: (N, T) ``input_ids`` with prompt and padding set to ``ignore_index`` (shifted inside).
        kwargs: passed to ``linear_sequence_logps`` (``return_token_logps``, ``chunk_bytes``, ...).
    """
    def loss_fn(hidden, weight, bias, options):
        return linear_sequence_logps(hidden, weight, labels, bias, ignore_index=ignore_index, average=average,
                                     temperature=temperature, **options, **kwargs)

    return _through_forward(model, input_ids, attention_mask, loss_fn)


def policy_dpo_loss(model, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor], labels: torch.Tensor,
                    ref_chosen_logps: Optional[torch.Tensor] = None, ref_rejected_logps: Optional[torch.Tensor] = None,
                    *, ignore_index: int = -100, temperature: float = 1.0, **kwargs) -> DPOLossOutput:
    """``dpo_loss(model(input_ids).logits, labels, ...)`` through the backbone and ``linear_dpo_loss``: the
    policy's DPO loss without its logits, inside its own forward like ``policy_logps`` (DDP, FSDP2, PEFT).

    Args:
        input_ids, attention_mask, labels: (2B, T), rows [0, B) chosen, [B, 2B) rejected.
        kwargs: passed to ``linear_dpo_loss``: the loss options (``beta``, ``loss_type``, ... or ``config``),
            ``chunk_bytes``, ``lean``.
    """
    def loss_fn(hidden, weight, bias, options):
        return linear_dpo_loss(hidden, weight, labels, ref_chosen_logps, ref_rejected_logps, bias,
                               ignore_index=ignore_index, temperature=temperature, **options, **kwargs)

    return _through_forward(model, input_ids, attention_mask, loss_fn)
