"""Plain Hugging Face loops: per-sequence log-probs of a causal LM without building its logits."""

from typing import Optional

import torch

from fastdpo.linear import linear_sequence_logps
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


def policy_logps(model, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor], labels: torch.Tensor, *,
                 ignore_index: int = -100, average: bool = False, temperature: float = 1.0,
                 **kwargs) -> SequenceLogps:
    """``sequence_logps(model(input_ids).logits, labels)`` through the backbone and the fused-linear LM head.

    Args:
        model: a transformers causal LM (``...ForCausalLM``), PEFT-wrapped or not; tied embeddings work.
        labels: (N, T) ``input_ids`` with prompt and padding set to ``ignore_index`` (shifted inside).
        kwargs: passed to ``linear_sequence_logps`` (``return_token_logps``, ``chunk_bytes``, ...).
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT: LoRA lives inside
    head = base.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear) or type(head) is not torch.nn.Linear:
        raise TypeError(f"policy_logps needs a plain nn.Linear LM head, got {type(head).__name__} (an adapter on "
                        "the LM head changes its effective weight)")
    backbone = getattr(base, base.base_model_prefix)
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    return linear_sequence_logps(hidden.to(head.weight.device), head.weight, labels, head.bias,
                                 ignore_index=ignore_index, average=average, temperature=temperature,
                                 **_logit_options(base.config), **kwargs)
