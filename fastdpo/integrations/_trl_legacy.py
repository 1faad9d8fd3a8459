"""TRL 0.24-0.28's ``DPOTrainer`` (full logits) through ``fastdpo.dpo_loss``.

TRL 0.x runs the policy on the concatenated batch, turns the logits into per-sequence log-probs in
``concatenated_forward`` (``selective_log_softmax``: a row loop of logsumexp, or log_softmax in bf16) and
computes the loss in ``get_batch_loss_metrics`` / ``dpo_loss``. fastdpo replaces both methods:

- ``get_batch_loss_metrics``: the reference forward first (its logits are gone before the policy's exist),
  then the same model call on the same tokens (prompt + completion, flushed left, truncated as TRL does), then
  one ``fastdpo.dpo_loss`` on the logits: the fused forward, the loss head and a backward that writes dlogits
  straight from the saved log-sum-exp, into the logits' own storage by default (``INPLACE_BACKWARD``): the
  step holds one logits-sized buffer. A model whose autograd graph saves its logits (one ending in ``tanh``
  or ``exp``) makes that backward raise (autograd's version check), never silently wrong:
  ``patch(inplace_backward=False)`` there. Logs TRL 0.x's metrics with TRL 0.x's semantics (``ipo`` on
  length-averaged log-probs, cDPO ``label_smoothing`` for ``sigmoid``, ``bco_pair``'s running mean, rewards
  summed over the loss types' weights).
- ``concatenated_forward`` (the reference forward, ``precompute_ref_log_probs``, and anything else that calls
  it): ``fastdpo.sequence_logps`` with its per-token statistics, returning the keys TRL reads.

Options whose TRL 0.x semantics fastdpo does not reproduce raise a ``ValueError`` naming them (before the model
runs), never a silent difference: see ``legacy_config``.
"""

import dataclasses
from types import SimpleNamespace
from typing import List, Tuple

import torch

from fastdpo.dpo import dpo_loss
from fastdpo.logps import sequence_logps
from fastdpo.losses import DPOLossConfig, dpo_loss_from_logps, pair_losses, token_nll

IGNORE = -100
# dlogits into the logits' own storage (the model's output, which nothing else reads once the loss is formed):
# set by ``fastdpo.integrations.trl.patch(inplace_backward=...)``; a trainer's ``fastdpo_inplace_backward``
# attribute overrides it.
INPLACE_BACKWARD = True
# TRL 0.x's `reference_free` zeroes the reference only in the log-ratios these loss types read; the others
# (nca_pair, sppo_hard, aot, discopop, ...) still read the reference log-probs directly.
_REFERENCE_FREE_TYPES = {"sigmoid", "robust", "exo_pair", "hinge", "ipo", "apo_zero", "apo_down", "sft"}
# TRL 0.x applies the JS divergence to the shared `logits` only: these loss types read it.
_JS_TYPES = {"sigmoid", "robust", "exo_pair", "hinge", "sft"}


def legacy_config(trainer) -> Tuple[DPOLossConfig, float]:
    """``(DPOLossConfig, reward scale)`` reproducing a TRL 0.x trainer's loss, or a ``ValueError`` naming every
    option whose TRL 0.x semantics fastdpo does not reproduce."""
    args = trainer.args
    types = ["aot_unpaired" if t == "aot_pair" else t for t in trainer.loss_type]  # the name before 0.28
    weights = [float(w) for w in trainer.loss_weights] if trainer.loss_weights else [1.0] * len(types)
    eps = float(trainer.label_smoothing)
    f_div = getattr(trainer.f_divergence_type, "value", trainer.f_divergence_type)
    # TRL 0.28 stores the option as a string but compares it with its Enum: it computes reverse KL whatever
    # the option says. 0.24-0.27 keep the Enum and compute what it names.
    f_div_ignored = isinstance(trainer.f_divergence_type, str) and f_div != "reverse_kl"
    bad: List[str] = []
    if trainer.is_encoder_decoder:
        bad.append("encoder-decoder models")
    if trainer.padding_free:
        bad.append("padding_free=True")
    if getattr(args, "use_liger_kernel", False) or getattr(args, "use_liger_loss", False):  # 0.24's name
        bad.append("use_liger_kernel=True (TRL's own Liger loss; fastdpo replaces it)")
    if args.ld_alpha is not None:
        bad.append("ld_alpha (TRL 0.x's LD-DPO masks count positions from the start of the prompt, not of the "
                   "completion; fastdpo implements LD-DPO as TRL >= 1.15)")
    if trainer.use_weighting:
        bad.append("use_weighting (TRL 0.x offsets its WPO token log-probs by one position from their log sum "
                   "p^2 terms, clamps the weights at 1 and also weights the RPO term)")
    if "ipo" in types and set(types) - {"ipo", "sft"}:
        bad.append(f"'ipo' with {sorted(set(types) - {'ipo', 'sft'})} (TRL 0.x then length-averages the "
                   "log-probs every loss type reads)")
    if f_div_ignored:
        bad.append(f"f_divergence_type={f_div!r} (this TRL compares it with an Enum and computes reverse KL "
                   "whatever it says: set 'reverse_kl' for what it computed, or use TRL >= 1.15)")
    elif f_div == "alpha_divergence":
        bad.append("f_divergence_type='alpha_divergence' (TRL 0.x's formula is not TRL 1.x's, which fastdpo "
                   "implements)")
    elif f_div not in ("reverse_kl", "js_divergence"):
        bad.append(f"f_divergence_type={f_div!r} (TRL 0.x computes reverse KL for it)")
    elif f_div == "js_divergence" and not set(types) <= _JS_TYPES:
        bad.append(f"f_divergence_type='js_divergence' with {sorted(set(types) - _JS_TYPES)} (TRL 0.x applies "
                   f"it to {sorted(_JS_TYPES)} only)")
    if trainer.reference_free and not set(types) <= _REFERENCE_FREE_TYPES:
        bad.append(f"reference_free=True with {sorted(set(types) - _REFERENCE_FREE_TYPES)} (TRL 0.x still "
                   "reads the reference log-probs there)")
    if "sigmoid" in types and eps >= 0.5:
        bad.append(f"label_smoothing={eps} with 'sigmoid' (cDPO needs it below 0.5)")
    if bad:
        import trl
        raise ValueError(f"fastdpo's integration of TRL {trl.__version__} does not support: " + "; ".join(bad)
                         + ". Call fastdpo.integrations.trl.unpatch() (or use trl.DPOTrainer) to train with "
                         "TRL's own code.")

    if "exo_pair" in types and eps == 0.0:
        eps = 1e-3  # TRL 0.x's exo_pair sets label_smoothing to 1e-3 when it is 0
    if "sigmoid" in types and eps > 0.0:
        # TRL 0.x's sigmoid is cDPO: -(1-e) logsig(z) - e logsig(-z) = 2(1-e) sigmoid - (1-2e) robust, with
        # robust = (-(1-e) logsig(z) + e logsig(-z)) / (1-2e): two of fastdpo's loss types, one fused head.
        w = weights[types.index("sigmoid")]
        weights[types.index("sigmoid")] = 2.0 * (1.0 - eps) * w
        if "robust" not in types:
            types.append("robust")
            weights.append(0.0)
        weights[types.index("robust")] -= (1.0 - 2.0 * eps) * w
    config = DPOLossConfig(beta=float(trainer.beta), loss_type=tuple(types), loss_weights=tuple(weights),
                           label_smoothing=eps, f_divergence_type=f_div, discopop_tau=float(args.discopop_tau),
                           nll_alpha=float(args.rpo_alpha or 0.0))
    # TRL 0.x adds up each loss type's rewards times its weight
    reward_scale = sum(trainer.loss_weights) if trainer.loss_weights else float(len(trainer.loss_type))
    return config, reward_scale


def _forward(trainer, model, batch):
    """TRL 0.x's ``concatenated_forward`` up to the logits: ``(logits (2B, T, V), labels (2B, T) aligned with
    the logits and -100 off the completions, model outputs, B)``."""
    from trl.trainer.utils import flush_left, flush_right, pad_to_length

    num_examples = batch["prompt_input_ids"].shape[0]
    cb = trainer.concatenated_inputs(batch, padding_value=trainer.pad_token_id)
    model_kwargs = {"use_cache": False}
    if trainer.aux_loss_enabled:
        model_kwargs["output_router_logits"] = True
    for key in ("pixel_values", "pixel_attention_mask", "image_sizes"):
        if key in cb:
            model_kwargs[key] = cb[key]
    input_ids = torch.cat((cb["prompt_input_ids"], cb["completion_input_ids"]), dim=1)
    attention_mask = torch.cat((cb["prompt_attention_mask"], cb["completion_attention_mask"]), dim=1)
    loss_mask = torch.cat((torch.zeros_like(cb["prompt_attention_mask"]), cb["completion_attention_mask"]), dim=1)
    has_tt = "token_type_ids" in cb
    token_type_ids = pad_to_length(cb["token_type_ids"], input_ids.shape[1], 0) if has_tt else None
    extra = (token_type_ids,) if has_tt else ()

    # Flush and truncate, exactly as TRL 0.24-0.28
    max_length = trainer.max_length
    if max_length is not None and max_length < attention_mask.size(1):
        if trainer.truncation_mode == "keep_start":
            attention_mask, input_ids, loss_mask, *extra = flush_left(attention_mask, input_ids, loss_mask, *extra)
            attention_mask, input_ids, loss_mask = (t[:, :max_length] for t in (attention_mask, input_ids,
                                                                                loss_mask))
        elif trainer.truncation_mode == "keep_end":
            if has_tt:
                attention_mask, input_ids, loss_mask, *extra = flush_left(attention_mask, input_ids, loss_mask,
                                                                          *extra)
                extra = [extra[0][:, -max_length:]]
            else:
                attention_mask, input_ids, loss_mask = flush_right(attention_mask, input_ids, loss_mask)
            attention_mask, input_ids, loss_mask = (t[:, -max_length:] for t in (attention_mask, input_ids,
                                                                                 loss_mask))
            attention_mask, input_ids, loss_mask, *extra = flush_left(attention_mask, input_ids, loss_mask, *extra)
        else:
            raise ValueError(f"Unknown truncation mode: '{trainer.truncation_mode}'. Should be one of "
                             "['keep_end', 'keep_start'].")
    else:
        attention_mask, input_ids, loss_mask, *extra = flush_left(attention_mask, input_ids, loss_mask, *extra)
    if has_tt:
        model_kwargs["token_type_ids"] = extra[0]

    logits_to_keep = None
    if trainer.use_logits_to_keep:
        first_compute_index = loss_mask.nonzero(as_tuple=True)[1].min()
        logits_to_keep = (loss_mask.shape[1] - first_compute_index).item() + 1  # +1 for the first label
        model_kwargs["logits_to_keep"] = logits_to_keep
    outputs = model(input_ids, attention_mask=attention_mask, **model_kwargs)
    logits = outputs.logits

    labels = torch.roll(input_ids, shifts=-1, dims=1)  # logits[:, t] scores labels[:, t]
    loss_mask = torch.roll(loss_mask, shifts=-1, dims=1).bool()
    if logits_to_keep is not None:
        labels, loss_mask = labels[:, -logits_to_keep:], loss_mask[:, -logits_to_keep:]
    if logits.shape[:2] != labels.shape[:2]:  # LLaVA: image tokens before the text
        logits = logits[:, -labels.shape[1]:]
    labels = labels.masked_fill(~loss_mask, IGNORE)
    labels[:, -1] = IGNORE  # the roll's wrap-around, which TRL drops from the sums too
    return logits, labels, outputs, num_examples


def _mean_logits(seq, B):
    """TRL 0.x's logits/chosen and logits/rejected: the mean logit over the scored positions of each half, from
    ``sequence_logps(return_token_stats=True)`` (NaN for a half without tokens, as TRL's ``.mean()``)."""
    per_seq = seq.token_stats["mean_logits"].sum(1)
    counts = seq.num_tokens
    return per_seq[:B].sum() / counts[:B].sum(), per_seq[B:].sum() / counts[B:].sum()


def concatenated_forward(self, model, batch, is_ref_model=False):
    """TRL 0.x's ``concatenated_forward`` (the keys TRL reads) with fastdpo's fused log-probs."""
    legacy_config(self)
    logits, labels, outputs, B = _forward(self, model, batch)
    out = sequence_logps(logits, labels, shift=False, return_token_stats=True)
    counts = out.num_tokens
    logps = out.logps / counts if "ipo" in self.loss_type else out.logps  # TRL 0.x: ipo averages
    mean_chosen, mean_rejected = _mean_logits(out, B)
    output = {"chosen_logps": logps[:B], "rejected_logps": logps[B:], "mean_chosen_logits": mean_chosen,
              "mean_rejected_logits": mean_rejected}
    if self.args.rpo_alpha is not None or "sft" in self.loss_type:
        output["nll_loss"] = -out.logps[:B].sum() / counts[:B].sum()
    if self.aux_loss_enabled:
        output["aux_loss"] = outputs.aux_loss
    return output


def get_batch_loss_metrics(self, model, batch, train_eval="train"):
    """TRL 0.x's ``get_batch_loss_metrics``: the loss through ``fastdpo.dpo_loss``, TRL 0.x's metrics."""
    config, reward_scale = legacy_config(self)
    # The reference first (TRL runs it second): its logits are freed before the policy's exist
    if "ref_chosen_logps" in batch and "ref_rejected_logps" in batch:
        ref_chosen, ref_rejected = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
    else:
        ref_chosen, ref_rejected = self.compute_ref_log_probs(batch)
    logits, labels, outputs, B = _forward(self, model, batch)
    ref_chosen = ref_chosen.to(logits.device, torch.float32)
    ref_rejected = ref_rejected.to(logits.device, torch.float32)
    counts = (labels != IGNORE).sum(1)
    ipo = "ipo" in config.loss_types
    if ipo:  # TRL 0.x's reference log-probs are length-averaged for ipo; fastdpo's ipo averages sums itself
        loss_refs = (ref_chosen * counts[:B], ref_rejected * counts[B:])
    else:
        loss_refs = (ref_chosen, ref_rejected)
    if self.reference_free:
        loss_refs = (None, None)
    inplace = bool(getattr(self, "fastdpo_inplace_backward", INPLACE_BACKWARD))
    if "bco_pair" in config.loss_types:
        out = _bco_pair_loss(self, logits, labels, ref_chosen, ref_rejected, config, inplace)
    else:
        out = dpo_loss(logits, labels, *loss_refs, config=config, shift=False, inplace_backward=inplace)
    loss = out.loss
    if self.aux_loss_enabled:
        loss = loss + self.aux_loss_coef * outputs.aux_loss

    chosen, rejected = out.chosen_logps, out.rejected_logps
    if ipo:
        chosen, rejected = chosen / counts[:B], rejected / counts[B:]
    chosen_rewards = reward_scale * self.beta * (chosen - ref_chosen)
    rejected_rewards = reward_scale * self.beta * (rejected - ref_rejected)
    prefix = "eval_" if train_eval == "eval" else ""

    def mean(t):
        return self.accelerator.gather_for_metrics(t.detach()).mean().item()
    metrics = {
        f"{prefix}rewards/chosen": mean(chosen_rewards),
        f"{prefix}rewards/rejected": mean(rejected_rewards),
        f"{prefix}rewards/accuracies": mean((chosen_rewards > rejected_rewards).float()),
        f"{prefix}rewards/margins": mean(chosen_rewards - rejected_rewards),
        f"{prefix}logps/chosen": mean(chosen),
        f"{prefix}logps/rejected": mean(rejected),
        f"{prefix}logits/chosen": mean(out.metrics["logits/chosen"]),
        f"{prefix}logits/rejected": mean(out.metrics["logits/rejected"]),
    }
    if self.args.rpo_alpha is not None or "sft" in self.loss_type:
        metrics[f"{prefix}nll_loss"] = mean(-out.chosen_logps.sum() / counts[:B].sum())
    if self.aux_loss_enabled:
        metrics[f"{prefix}aux_loss"] = mean(outputs.aux_loss)
    return loss, metrics


def _bco_pair_loss(self, logits, labels, ref_chosen, ref_rejected, config, inplace):
    """TRL 0.x's ``bco_pair``: -logsig(beta c - delta) - logsig(-(beta r - delta)), with delta the running mean of
    the batch-mean rewards (``self.running``), updated with this batch's first. delta needs this batch's
    log-probs before the loss, so the loss runs in two stages: the fused log-probs (``sequence_logps``, whose
    backward is the same single dlogits pass), then the loss formulas on the (B,) numbers, with the reference
    shifted by delta / beta for ``bco_pair`` alone."""
    seq = sequence_logps(logits, labels, shift=False, return_token_stats=True, inplace_backward=inplace)
    B = ref_chosen.shape[0]
    chosen, rejected = seq.logps[:B], seq.logps[B:]
    counts = seq.num_tokens.to(chosen.dtype)
    beta = config.beta
    self.running.update(torch.cat((beta * (chosen - ref_chosen), beta * (rejected - ref_rejected))).mean().detach())
    shift = self.running.mean / beta
    per_type = dict(zip(config.loss_types, config.weights))
    bco = pair_losses("bco_pair", config, chosen, rejected, ref_chosen + shift, ref_rejected + shift, counts[:B],
                      counts[B:], chosen)
    loss = per_type.pop("bco_pair") * bco.mean()
    if per_type:  # the other loss types (and RPO's NLL) read the plain reference
        others = dataclasses.replace(config, loss_type=tuple(per_type), loss_weights=tuple(per_type.values()))
        loss = loss + dpo_loss_from_logps(chosen, rejected, ref_chosen, ref_rejected, chosen_tokens=counts[:B],
                                          rejected_tokens=counts[B:], config=others)
    elif config.nll_alpha:
        loss = loss + config.nll_alpha * token_nll(chosen, counts[:B].sum())
    mean_chosen, mean_rejected = _mean_logits(seq, B)
    metrics = {"logits/chosen": mean_chosen, "logits/rejected": mean_rejected}
    return SimpleNamespace(loss=loss, chosen_logps=chosen.detach(), rejected_logps=rejected.detach(),
                           metrics=metrics)
