"""Float64 oracles and per-dtype tolerances shared by the tests."""

import math
import os

import torch

from fastdpo.naive import naive_sequence_logps, naive_token_logps

EPS32 = torch.finfo(torch.float32).eps  # 2^-23

# Relative rounding of one stored gradient element (round to nearest: half an ulp of the storage format).
STORE_RTOL = {torch.float32: 2 * EPS32, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11,
              torch.float64: 1e-12}


def logp_tol(logits: torch.Tensor) -> float:
    """Absolute error bound of one token's log-prob computed in fp32 from these (exactly representable)
    logits: x[label] - lse, both of magnitude <= max|x| + log V, each within a few fp32 ulps after the
    exp/sum/log chain (sum of V terms: a relative error of at most ~log2(V) ulps with tree reductions)."""
    if logits.dtype == torch.float64:
        return 1e-10
    V = logits.shape[-1]
    x = logits.detach().abs()
    xmax = torch.where(torch.isfinite(x), x, 0).max().item() if logits.numel() else 0.0
    return 8 * EPS32 * (xmax + math.log(V) + 1) * max(1.0, math.log2(V) / 4)


def reference(logits, labels, *, ignore_index=-100, shift=True, average=False, grad_seq=None, grad_tok=None):
    """Float64 (logps, token_logps, num_tokens, dlogits) of the textbook formula on the same logits."""
    x = logits.detach().double().requires_grad_(True)
    logps, num = naive_sequence_logps(x, labels, ignore_index=ignore_index, shift=shift, average=average,
                                      dtype=torch.float64)
    tok, _ = naive_token_logps(x, labels, ignore_index=ignore_index, shift=shift, dtype=torch.float64)
    loss = logps.new_zeros(())
    if grad_seq is not None:
        loss = loss + (logps * grad_seq.double()).sum()
    if grad_tok is not None:
        loss = loss + (tok * grad_tok.double()).sum()
    grad = torch.autograd.grad(loss, x)[0] if loss.requires_grad else torch.zeros_like(x)
    return logps.detach(), tok.detach(), num, grad


def assert_grad_close(actual: torch.Tensor, expected: torch.Tensor, logits: torch.Tensor, coef_max: float):
    """Gradient elements: fp32 compute error of coef * (onehot - p), then one rounding to the logits' dtype."""
    atol = coef_max * 2 * logp_tol(logits) + store_atol(logits.dtype) + 1e-30
    torch.testing.assert_close(actual.double(), expected, rtol=store_rtol(logits.dtype), atol=atol)


def store_atol(dtype: torch.dtype) -> float:
    """fp16 subnormal spacing (below 6.1e-5 a stored gradient keeps no relative precision)."""
    return 2.0 ** -24 if dtype == torch.float16 else 0.0


def store_rtol(dtype: torch.dtype) -> float:
    """Relative rounding of one gradient element stored in ``dtype``."""
    if dtype == torch.bfloat16 and os.environ.get("FASTDPO_BACKEND") == "triton":
        # Triton 3.9's interpreter casts fp32 -> bf16 by truncation (even with rounding="rtne"): up to a
        # whole ulp. A GPU's cvt.rn.bf16.f32 rounds to nearest, within half an ulp.
        return 2.0 ** -7
    return STORE_RTOL[dtype]


class HostReads:
    """Records every read of a tensor's values on the host while active: ``.tolist()``, ``.item()``, and the
    ops that need one (boolean indexing, ``nonzero`` of unknown size, ``is_nonzero``, a scalar read). On a GPU
    each is a synchronisation. ``HostReads(monkeypatch)`` patches the two methods; use it as a context."""

    _OPS = ("aten.nonzero.default", "aten._local_scalar_dense.default", "aten.is_nonzero.default",
            "aten.masked_select.default")

    def __init__(self, monkeypatch):
        from torch.utils._python_dispatch import TorchDispatchMode

        self.reads = []
        self.tensors = []  # the data pointer of each .tolist() / .item() (None for the dispatched ones)
        for name in ("tolist", "item"):
            orig = getattr(torch.Tensor, name)

            def read(t, _o=orig, _n=name):
                self.reads.append(_n)
                self.tensors.append(t.data_ptr())
                return _o(t)
            monkeypatch.setattr(torch.Tensor, name, read)
        reads, tensors = self.reads, self.tensors

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = str(func)
                bool_index = name == "aten.index.Tensor" and any(
                    t is not None and t.dtype == torch.bool for t in args[1])
                if bool_index or name in HostReads._OPS:
                    reads.append(name)
                    tensors.append(None)
                return func(*args, **(kwargs or {}))
        self.mode = Mode()

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self.mode.__exit__(*exc)


def inline_custom_ops(monkeypatch):
    """Run fastdpo's custom ops as the plain Python functions they wrap, so that a dispatch mode (a FLOP counter,
    an allocation spy) sees the aten ops inside them: through the op boundary a mode sees one opaque call."""
    from torch._library.custom_ops import CustomOpDef

    from fastdpo import _library
    for name, op in vars(_library).copy().items():
        if isinstance(op, CustomOpDef):
            monkeypatch.setattr(_library, name, op._init_fn)


class Allocations:
    """A dispatch mode recording (numel, dtype, op) of every tensor an op returns in new memory (views and in-place
    results, which share an input's storage, are not allocations): what a call allocates."""

    def __init__(self):
        from torch.utils._pytree import tree_leaves
        from torch.utils._python_dispatch import TorchDispatchMode

        seen = self.seen = []

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs))
                          if isinstance(t, torch.Tensor)}
                for t in out if isinstance(out, (tuple, list)) else (out,):
                    if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                        seen.append((t.numel(), t.dtype, str(func)))
                return out
        self.mode = Mode()

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self.mode.__exit__(*exc)

    def sizes(self, dtype=None):
        return {n for n, d, _ in self.seen if dtype is None or d == dtype}
