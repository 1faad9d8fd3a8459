"""TRL's DPOTrainer through fastdpo's kernels: TRL 1.14, 1.15, 1.16 and 0.24-0.28.

TRL >= 1.15 computes DPO log-probs through its fused LM head (``trl.trainer.utils.add_fused_lm_head``), which
calls ``_ChunkedLogProbFunction`` on the hidden states of the scored positions and reads per-token
log-probs, entropy, mean logits, is_top1 and (WPO) log sum p^2. ``patch()`` replaces that function, for the
policy and the reference forward alike, with ``fastdpo.linear_sequence_logps`` returning the same fields:

    import fastdpo.integrations.trl as fdt
    fdt.patch()              # then build and train an unmodified trl.DPOTrainer
    fdt.unpatch()

or ``FastDPOTrainer``, a DPOTrainer subclass that routes only its own loss computation through fastdpo.

TRL 1.14 (the release axolotl 0.21 pins) builds full logits by default and reads the chunked LM head only with
``use_liger_kernel=True``; ``patch()`` replaces the per-token log-prob functions of both paths in
``trl.trainer.dpo_trainer`` (``_trl_chunked``): ``fastdpo.sequence_logps`` on the logits, ``linear_sequence_logps``
on the hidden states. TRL's loss and metrics code runs unchanged on what they return.

TRL 0.24-0.28 computes DPO on full logits in ``DPOTrainer.concatenated_forward`` and
``get_batch_loss_metrics``; there ``patch()`` replaces those two methods (``_trl_legacy``): the loss runs
through ``fastdpo.dpo_loss`` (fused forward, loss head and dlogits backward), the reference forward through
``fastdpo.sequence_logps``. Other TRL versions (0.29-1.13, < 0.24) raise, naming the version.

On TRL >= 1.15 the patch also brings back ``DPOConfig(padding_free=True)``, which TRL switches off at run time:
the policy and reference forwards run packed (``_trl_packed``), TRL's loss and metrics unchanged. TRL 1.14 keeps
its own fall-back to padding (with its warning); TRL 0.x refuses ``padding_free`` under the patch.

The entropy fastdpo returns carries no gradient (TRL's DPO logs it detached; a loss that differentiates the
entropy must not use the patch).
"""

import contextlib
import threading

from packaging.version import Version

from fastdpo.linear import linear_sequence_logps

_LOCK = threading.Lock()
_ORIGINAL = None  # what patch() replaced: TRL's function (>= 1.15), its functions (1.14) or methods (0.x)
MIN_TRL = Version("1.14")  # 1.14: per-token log-prob functions (_trl_chunked); >= 1.15: the fused LM head
FUSED_HEAD_TRL = Version("1.15")
LEGACY_TRL = (Version("0.24"), Version("0.29"))  # full-logit DPOTrainers sharing 0.28's code: [0.24, 0.29)
_LEGACY_METHODS = ("concatenated_forward", "get_batch_loss_metrics")


class FusedLogProbFunction:
    """Drop-in for ``trl.trainer.utils._ChunkedLogProbFunction``: same ``apply`` signature and outputs."""

    calls = 0  # how often TRL called fastdpo (tests read it)

    @staticmethod
    def apply(hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping=None,
              logit_scale=1.0, outputs=("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")):
        """hidden (M, H), targets (M,) -> (log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1), each (M,)
        or None when not in ``outputs``. ``chunk_size`` (TRL's vocabulary tile) has no counterpart: fastdpo
        chunks tokens within its own memory budget."""
        FusedLogProbFunction.calls += 1
        out = linear_sequence_logps(hidden[None], weight, targets[None], bias, shift=False,
                                    logit_scale=1.0 if logit_scale is None else float(logit_scale),
                                    softcap=final_logit_softcapping, temperature=float(temperature),
                                    return_token_logps=True, return_token_stats=bool(outputs))
        stats = out.token_stats or {}
        fields = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
        return (out.token_logps[0], *(stats[f][0] if f in outputs else None for f in fields))


def _trl_kind():
    """("fused", trl.trainer.utils) for TRL >= 1.15, ("chunked", trl.trainer.dpo_trainer) for 1.14,
    ("legacy", DPOTrainer) for 0.24-0.28; else an error."""
    try:
        import trl
        import trl.trainer.utils as utils
    except ImportError as e:  # pragma: no cover - the extra is not installed
        raise ImportError("fastdpo.integrations.trl needs TRL: pip install 'fastdpo[trl]'") from e
    version = Version(trl.__version__)
    if version >= FUSED_HEAD_TRL and hasattr(utils, "_ChunkedLogProbFunction"):
        return "fused", utils
    if MIN_TRL <= version < FUSED_HEAD_TRL:
        from fastdpo.integrations import _trl_chunked
        from trl.trainer import dpo_trainer
        if all(hasattr(dpo_trainer, n) for n in _trl_chunked.NAMES):
            return "chunked", dpo_trainer
    if LEGACY_TRL[0] <= version < LEGACY_TRL[1]:
        from trl import DPOTrainer
        if all(hasattr(DPOTrainer, m) for m in _LEGACY_METHODS):
            return "legacy", DPOTrainer
    raise RuntimeError(f"fastdpo.integrations.trl supports TRL >= {FUSED_HEAD_TRL} (its fused LM head), TRL "
                       f"{MIN_TRL}.x (its per-token log-prob functions) and {LEGACY_TRL[0]} <= TRL < {LEGACY_TRL[1]} "
                       f"(full logits); TRL {trl.__version__} is none of these (or its DPOTrainer lacks the code "
                       "fastdpo replaces): call fastdpo.dpo_loss or fastdpo.policy_logps from your own loss there")


def patch(*, inplace_backward: bool = True) -> None:
    """Route every DPOTrainer built or running from now on through fastdpo: TRL >= 1.15's fused LM head, TRL
    1.14's per-token log-prob functions, or TRL 0.24-0.28's ``concatenated_forward`` and ``get_batch_loss_metrics``.

    ``inplace_backward`` (TRL 0.x and 1.14's default path, which hand fastdpo the model's logits): write dlogits
    into the logits' storage, so a step holds one logits-sized buffer instead of two. A model whose autograd
    graph saves its logits (one ending in ``tanh`` or ``exp``) then fails in backward with autograd's in-place
    error: pass False there. TRL >= 1.15 never builds the logits: the option has nothing to act on."""
    global _ORIGINAL
    if not isinstance(inplace_backward, bool):
        raise TypeError(f"inplace_backward must be a bool, got {type(inplace_backward).__name__}")
    kind, target = _trl_kind()
    from fastdpo.integrations import _trl_chunked, _trl_legacy
    with _LOCK:
        _trl_legacy.INPLACE_BACKWARD = _trl_chunked.INPLACE_BACKWARD = inplace_backward
        if _ORIGINAL is not None:
            return
        if kind == "fused":
            from trl import DPOTrainer

            from fastdpo.integrations import _trl_packed
            _ORIGINAL = target._ChunkedLogProbFunction
            target._ChunkedLogProbFunction = FusedLogProbFunction
            _trl_packed.patch(DPOTrainer)
        elif kind == "chunked":
            _trl_chunked.patch(target)
            _ORIGINAL = dict(_trl_chunked._ORIGINAL)
        else:
            from fastdpo.integrations import _trl_legacy
            _ORIGINAL = {m: target.__dict__[m] for m in _LEGACY_METHODS}
            for m in _LEGACY_METHODS:
                setattr(target, m, getattr(_trl_legacy, m))


def unpatch() -> None:
    """Restore TRL's own code."""
    global _ORIGINAL
    kind, target = _trl_kind()
    with _LOCK:
        if _ORIGINAL is None:
            return
        if kind == "fused":
            from trl import DPOTrainer

            from fastdpo.integrations import _trl_packed
            target._ChunkedLogProbFunction = _ORIGINAL
            _trl_packed.unpatch(DPOTrainer)
        elif kind == "chunked":
            from fastdpo.integrations import _trl_chunked
            _trl_chunked.unpatch(target)
        else:
            for m, fn in _ORIGINAL.items():
                setattr(target, m, fn)
        _ORIGINAL = None


def is_patched() -> bool:
    return _ORIGINAL is not None


@contextlib.contextmanager
def patched(**options):
    """``patch(**options)`` for the duration of a block (restores TRL's code after, unless it was patched
    before)."""
    from fastdpo.integrations import _trl_chunked, _trl_legacy
    was, inplace = is_patched(), (_trl_legacy.INPLACE_BACKWARD, _trl_chunked.INPLACE_BACKWARD)
    patch(**options)
    try:
        yield
    finally:
        _trl_legacy.INPLACE_BACKWARD, _trl_chunked.INPLACE_BACKWARD = inplace
        if not was:
            unpatch()


def _make_trainer_class(kind):
    from trl import DPOTrainer

    if kind == "legacy":
        from fastdpo.integrations import _trl_legacy

        class FastDPOTrainer(DPOTrainer):
            """``trl.DPOTrainer`` (0.24-0.28) whose loss and reference log-probs run through fastdpo; set
            ``fastdpo_inplace_backward = False`` on it (or a subclass) for models whose graph saves the logits."""

            fastdpo_inplace_backward = True

            concatenated_forward = _trl_legacy.concatenated_forward
            get_batch_loss_metrics = _trl_legacy.get_batch_loss_metrics

        return FastDPOTrainer

    class FastDPOTrainer(DPOTrainer):
        """``trl.DPOTrainer`` (>= 1.14) whose loss and reference log-probs run through fastdpo (no global patch
        outside its own calls)."""

        def _compute_loss(self, model, inputs, return_outputs):
            with patched():
                return super()._compute_loss(model, inputs, return_outputs)

        def compute_ref_log_probs(self, model, inputs):
            with patched():
                return super().compute_ref_log_probs(model, inputs)

    return FastDPOTrainer


def __getattr__(name):
    if name == "FastDPOTrainer":  # built on first use: importing this module does not import TRL
        cls = _make_trainer_class(_trl_kind()[0])
        globals()[name] = cls
        return cls
    raise AttributeError(name)


__all__ = ["FastDPOTrainer", "FusedLogProbFunction", "is_patched", "patch", "patched", "unpatch"]
