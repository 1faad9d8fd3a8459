"""TRL 1.14's ``DPOTrainer`` through fastdpo (axolotl 0.21 pins TRL 1.14.1).

TRL 1.14 has two DPO paths, both in ``trl.trainer.dpo_trainer``, and ``patch()`` replaces the three names they call
there (the trainer's own loss, metrics and reference code stay TRL's):

- the default, on full logits: ``selective_log_softmax_and_entropy`` (the policy's per-token log-probs and
  detached entropies) and ``selective_log_softmax`` (the reference's) become ``fastdpo.sequence_logps`` with its
  per-token statistics: one fused pass, and a backward that writes dlogits from the saved log-sum-exp, into the
  logits' storage by default (``INPLACE_BACKWARD``, as for TRL 0.x). TRL still reads its logits for WPO weights,
  ``logits/*`` and ``mean_token_accuracy``, all in the forward, before the logits are overwritten.
- ``use_liger_kernel=True``: the chunked LM head ``_ChunkedLogProbFunction`` (per-token log-probs and entropy of
  hidden states, no logits) becomes ``FusedLogProbEntropyFunction`` (``fastdpo.linear_sequence_logps``).

A call these replacements do not reproduce exactly (``temperature != 1``, an entropy that needs a gradient, no
row mask, other shapes) runs TRL's own function: never a different result. TRL >= 1.15 reads these through its
fused LM head instead (``FusedLogProbFunction`` in ``fastdpo.integrations.trl``).
"""

from fastdpo.linear import linear_sequence_logps
from fastdpo.logps import sequence_logps

IGNORE = -100
# dlogits into the logits' storage; set by ``fastdpo.integrations.trl.patch(inplace_backward=...)``
INPLACE_BACKWARD = True
NAMES = ("_ChunkedLogProbFunction", "selective_log_softmax_and_entropy", "selective_log_softmax")
_ORIGINAL = {}  # TRL's functions while patched (the fall-back for calls fastdpo does not reproduce)
_logit_calls = 0  # how often TRL's full-logit path called fastdpo


class FusedLogProbEntropyFunction:
    """Drop-in for TRL 1.14's ``_ChunkedLogProbFunction``: (hidden (M, H), weight, bias, targets (M,), temperature,
    chunk_size, softcap, logit_scale) -> (log_probs (M,), entropy (M,)). The entropy carries no gradient (TRL 1.14
    detaches it on this path)."""

    calls = 0  # how often TRL called fastdpo here (tests read it)

    @staticmethod
    def apply(hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping=None,
              logit_scale=1.0):
        FusedLogProbEntropyFunction.calls += 1
        out = linear_sequence_logps(hidden[None], weight, targets[None], bias, shift=False,
                                    logit_scale=1.0 if logit_scale is None else float(logit_scale),
                                    softcap=final_logit_softcapping, temperature=float(temperature),
                                    return_token_logps=True, return_token_stats=True)
        return out.token_logps[0], out.token_stats["entropy"][0]


def _reproducible(logits, index, temperature, row_mask) -> bool:
    return (temperature == 1.0 and row_mask is not None and logits.dim() == 3 and index.shape == logits.shape[:2]
            and row_mask.shape == index.shape)


def _fused(logits, index, row_mask, stats):
    labels = index.masked_fill(row_mask == 0, IGNORE)
    return sequence_logps(logits, labels, shift=False, return_token_logps=True, return_token_stats=stats,
                          inplace_backward=INPLACE_BACKWARD)


def selective_log_softmax_and_entropy(logits, index, entropy_requires_grad=True, temperature=1.0, row_mask=None):
    """TRL 1.14's function of that name (per-token log-probs, zero off ``row_mask``, and entropies) through
    ``fastdpo.sequence_logps``, when the entropy needs no gradient (as in DPO)."""
    if entropy_requires_grad or not _reproducible(logits, index, temperature, row_mask):
        return _ORIGINAL["selective_log_softmax_and_entropy"](logits, index, entropy_requires_grad, temperature,
                                                              row_mask)
    global _logit_calls
    _logit_calls += 1
    out = _fused(logits, index, row_mask, stats=True)
    return out.token_logps, out.token_stats["entropy"].masked_fill(row_mask == 0, 0.0)


def selective_log_softmax(logits, index, temperature=1.0, row_mask=None):
    """TRL 1.14's ``selective_log_softmax`` (the reference's per-token log-probs) through ``fastdpo.sequence_logps``."""
    if not _reproducible(logits, index, temperature, row_mask):
        return _ORIGINAL["selective_log_softmax"](logits, index, temperature, row_mask)
    global _logit_calls
    _logit_calls += 1
    return _fused(logits, index, row_mask, stats=False).token_logps


REPLACEMENTS = {"_ChunkedLogProbFunction": FusedLogProbEntropyFunction,
                "selective_log_softmax_and_entropy": selective_log_softmax_and_entropy,
                "selective_log_softmax": selective_log_softmax}


def calls() -> int:
    """How often TRL 1.14 called fastdpo through either path."""
    return FusedLogProbEntropyFunction.calls + _logit_calls


def patch(module) -> None:
    """Replace the names in ``trl.trainer.dpo_trainer`` (``module``), keeping TRL's as the fall-back."""
    _ORIGINAL.update({n: getattr(module, n) for n in NAMES})
    for n in NAMES:
        setattr(module, n, REPLACEMENTS[n])


def unpatch(module) -> None:
    for n in NAMES:
        setattr(module, n, _ORIGINAL[n])
    _ORIGINAL.clear()


__all__ = ["FusedLogProbEntropyFunction", "calls", "selective_log_softmax", "selective_log_softmax_and_entropy"]
