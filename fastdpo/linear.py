"""Fused linear: per-sequence log-probs and the DPO loss from hidden states and the LM head, never building
the logits of more than one chunk of tokens.

Only completion tokens go through the LM head: prompt and padding rows cost no GEMM (one host sync per call
reads each sequence's count of them; the pair grouping uses the same counts). Each chunk of rows:
logits = transform(h @ W.T + b) -> the log-prob kernel (log-sum-exp, target, per-token stats) -> later, the
fused backward kernel turns the same buffer into dlogits in place. ``lean``: the backward in vocabulary tiles
instead (``_vocab_tiled_backward``).

GEMM count, in M x H x V GEMM-equivalents (M completion tokens):
- ``linear_sequence_logps``: 1 forward; 3 backward (recompute the chunk's logits, grad hidden, grad weight):
  4. The upstream gradient of each sequence is only known in backward, and keeping the logits is what this
  op avoids.
- ``linear_dpo_loss``: the loss is known in forward, so forward does the backward work too and backward only
  scales by grad_output. Grouped mode (chunks hold whole pairs; every loss type but aot / aot_unpaired, and
  WPO with sft): each chunk's pairs get their coefficients as soon as their log-probs are in, and the
  gradient GEMMs use the logits still in the buffer: 3, the minimum (naive autograd needs 3 as well).
  Two-pass mode (those losses, or a pair longer than the chunk budget, e.g. T = 32k): all log-probs first,
  then recompute and gradients: 4. The mode is chosen per call.

Memory beyond the inputs and their gradients: one logits chunk (``chunk_bytes``, default 128 MiB; twice that
with softcapping, whose backward needs the forward values), O(M) per-token numbers, and an fp32 accumulator for
the weight (and bias) gradient when the weight is not fp32: the weight gradient is accumulated in fp32.
"""

from dataclasses import dataclass
from typing import Optional

import torch

from fastdpo import _head, _ops, _vocab
from fastdpo._checks import LABEL_DTYPES, reject_dtensor
from fastdpo._library import check_label_range
from fastdpo.dpo import DPOLossOutput, _reference, dpo_output
from fastdpo.logps import SequenceLogps, _mean_scale, sequence_coef
from fastdpo.losses import DPOLossConfig, ld_token_weights, pair_local

DEFAULT_CHUNK_BYTES = 128 * 2 ** 20  # CPU, and the floor on GPUs
# On GPUs the default chunk holds this many tokens (the GEMMs' M): at M = 4096 the three M x H x V GEMMs of a
# chunk run near the tensor cores' peak, and the fp32 weight-gradient accumulator is read and written once per
# chunk (2 x 4 V H bytes against 2 M H V FLOPs: ~8% of a 4096-row chunk's weight-gradient GEMM on an H100).
DEFAULT_CHUNK_TOKENS = 4096
# ... but never more than this fraction of the device memory free at the call.
_CHUNK_FREE_FRACTION = 8
# torch.addmm(..., out_dtype=torch.float32) accumulates a bf16/fp16 product into an fp32 tensor in the GEMM's
# epilogue (CUDA, torch >= 2.8): no partial product is rounded to the input dtype, and no extra pass.
_ADDMM_OUT_DTYPE = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 8)


def default_chunk_bytes(device: torch.device, vocab_size: int, element_size: int, lean: bool = False) -> int:
    """The logits buffer of one chunk when ``chunk_bytes`` is None: 128 MiB on CPU; on a GPU the bytes of
    ``DEFAULT_CHUNK_TOKENS`` rows of logits (half as many with ``lean``), at most 1/8 of the memory free now, at
    least 128 MiB."""
    if device.type != "cuda":
        return DEFAULT_CHUNK_BYTES
    free, _ = torch.cuda.mem_get_info(device)  # a driver query, not a stream synchronisation
    want = (DEFAULT_CHUNK_TOKENS // (2 if lean else 1)) * vocab_size * element_size
    return max(DEFAULT_CHUNK_BYTES, min(want, free // _CHUNK_FREE_FRACTION))
_NO_LABEL = -1  # rows handed to the kernels all hold a real target: nothing matches this


@dataclass(frozen=True)
class LogitOptions:
    """``logits = softcap * tanh(h @ W.T * logit_scale / softcap) / temperature`` (TRL's order; no softcap when
    ``softcap`` is None). Gemma uses ``softcap`` (final_logit_softcapping), Cohere ``logit_scale``."""

    logit_scale: float = 1.0
    softcap: Optional[float] = None
    temperature: float = 1.0

    def __post_init__(self):
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.softcap is not None and not self.softcap > 0:
            raise ValueError(f"softcap must be > 0 or None, got {self.softcap}")

    @property
    def identity(self) -> bool:
        return self.logit_scale == 1.0 and self.softcap is None and self.temperature == 1.0


def _check_linear(hidden, weight, labels, bias, ignore_index):
    """Everything but the labels' range (``_shard``, once the vocabulary size is known)."""
    for name, t in (("hidden", hidden), ("weight", weight), ("labels", labels)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    for name, t in (("hidden", hidden), ("weight", weight), ("bias", bias)):
        reject_dtensor(name, t, "a sharded LM head (FSDP2's fully_shard) is gathered for the call by "
                       "fastdpo.policy_logps / fastdpo.policy_dpo_loss, which run inside the model's forward; or pass "
                       "weight.full_tensor(grad_placements=...) with the gradient placement your parallelism needs "
                       "(FSDP2: [Partial('avg')]); a vocabulary-parallel head takes its local rows and process_group=")
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be 3-D (N, T, H), got shape {tuple(hidden.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (V, H), got shape {tuple(weight.shape)}")
    if not hidden.dtype.is_floating_point or not weight.dtype.is_floating_point:
        raise TypeError(f"hidden and weight must be floating point, got {hidden.dtype} and {weight.dtype}")
    if weight.shape[1] != hidden.shape[2]:
        raise ValueError(f"weight has hidden size {weight.shape[1]} but hidden has {hidden.shape[2]}")
    if labels.dtype not in LABEL_DTYPES:
        raise TypeError(f"labels must be int64 or int32, got {labels.dtype}")
    if tuple(labels.shape) != tuple(hidden.shape[:2]):
        raise ValueError(f"labels must have shape (N, T) = {tuple(hidden.shape[:2])}, got {tuple(labels.shape)}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must be a tensor of shape ({weight.shape[0]},)")
    for name, t in (("weight", weight), ("labels", labels), ("bias", bias)):
        if t is not None and t.device != hidden.device:
            raise ValueError(f"{name} is on {t.device} but hidden on {hidden.device}")
    if not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")


class _Shard:
    """Vocabulary-parallel fused linear (see ``fastdpo._vocab``): ``weight`` holds rows [start, start + Vp) of the
    LM head. The kernels run on local targets; the per-row partials of every chunk are gathered once, after the
    last chunk; the hidden-state gradient is summed over the group."""

    def __init__(self, process_group, hidden, weight, labels):
        self.group = process_group
        self.Vp = weight.shape[0]
        rank, self.size = _vocab.check_split(process_group, self.Vp, tuple(labels.shape), hidden, "weight")
        self.start = rank * self.Vp
        self.vocab_size = self.size * self.Vp

    def local(self, targets):
        return _vocab.local_labels(targets, _NO_LABEL, self.start, self.Vp)

    def combine(self, parts, targets, with_stats):
        """This rank's partials (K, M) of the M completion rows -> (logp, lse, stats (4, M) or None) over the whole
        vocabulary."""
        return _vocab.combine(_vocab.gather(parts, self.group, self.size), targets, self.Vp, with_stats)


def _shard(process_group, hidden, weight, labels, ignore_index):
    """After every other check (a rank that raised there would leave the others waiting in the collective): the
    vocabulary shard (None without a group), then the labels' range over the whole vocabulary."""
    shard = None if process_group is None else _Shard(process_group, hidden, weight, labels)
    check_label_range(labels, weight.shape[0] if shard is None else shard.vocab_size, ignore_index)
    return shard


class _Rows:
    """The forward's per-row outputs of the completion rows ``idx`` (flat indices into N * T), filled chunk by
    chunk: log-probs (N * T,), lse (M,), statistics (4, N * T) or None. With a vocabulary shard the kernels run on
    local targets and each chunk's partials are kept; ``finish`` gathers and combines them, once."""

    def __init__(self, head, idx, targets, N, T, cdt, with_stats, shard):
        dev = idx.device
        self.head, self.idx, self.targets, self.with_stats, self.shard = head, idx, targets, with_stats, shard
        self.kernel_targets = targets if shard is None else shard.local(targets)
        self.row_logps = torch.zeros(N * T, dtype=cdt, device=dev)
        self.lse = torch.zeros(idx.numel(), dtype=cdt, device=dev)
        self.stats = torch.zeros(4, N * T, dtype=cdt, device=dev) if with_stats else None
        self.parts = None
        if shard is not None:
            K = _vocab.K_STATS if with_stats else _vocab.K_PLAIN
            self.parts = torch.zeros(K, idx.numel(), dtype=cdt, device=dev)

    def forward_chunk(self, sl):
        """Completion rows ``sl`` through the head and the log-prob kernel; returns the chunk's (h, logits)."""
        idx = self.idx[sl]
        h, z = self.head.logits(idx)
        rl, self.lse[sl], st = self.head.forward_rows(z, self.kernel_targets[sl], self.with_stats,
                                                      with_max=self.shard is not None)
        if self.shard is not None:
            self.parts[:, sl] = _vocab.partials(rl, self.lse[sl], st, self.kernel_targets[sl])
        else:
            self.row_logps[idx] = rl
            if st is not None:
                self.stats[:, idx] = st
        return h, z

    def finish(self):
        """With a shard: every shard's partials of every row, gathered (one all-gather) and combined."""
        if self.shard is not None:
            self.row_logps[self.idx], self.lse, st = self.shard.combine(self.parts, self.targets, self.with_stats)
            if st is not None:
                self.stats[:, self.idx] = st


class _Head:
    """The LM head applied chunk by chunk to selected rows of the hidden states."""

    def __init__(self, hidden, weight, bias, opts: LogitOptions, chunk_bytes: Optional[int], lean: bool = False):
        self.H = hidden.shape[2]
        self.V = weight.shape[0]
        self.cdt = torch.promote_types(hidden.dtype, weight.dtype)  # an fp32 LM head computes in fp32
        self.h = hidden.reshape(-1, self.H)
        self.w = weight.to(self.cdt)
        self.b = None if bias is None else bias.to(self.cdt)
        self.opts = opts
        size = torch.empty((), dtype=self.cdt).element_size()
        if chunk_bytes is None:
            chunk_bytes = default_chunk_bytes(hidden.device, self.V, size, lean)
        self.chunk_bytes = chunk_bytes
        self.chunk_rows = max(1, chunk_bytes // (self.V * size * (1 if opts.softcap is None else 2)))

    def logits(self, idx):
        """(m, V) logits of the rows ``idx`` (flat indices into N * T), transformed in place."""
        h = self.h.index_select(0, idx).to(self.cdt)
        return h, self.transform(h @ self.w.t() if self.b is None else torch.addmm(self.b, h, self.w.t()))

    def tile_logits(self, h, v0, v1):
        """(M, v1 - v0) logits of vocabulary entries [v0, v1) for the rows ``h`` (M, H), transformed."""
        w = self.w[v0:v1]
        return self.transform(h @ w.t() if self.b is None else torch.addmm(self.b[v0:v1], h, w.t()))

    def transform(self, z):
        """``softcap * tanh(z * logit_scale / softcap) / temperature``, in place."""
        o = self.opts
        if not o.identity:
            if o.logit_scale != 1.0:
                z.mul_(o.logit_scale)
            if o.softcap is not None:
                z.div_(o.softcap).tanh_().mul_(o.softcap)
            if o.temperature != 1.0:
                z.div_(o.temperature)
        return z

    def forward_rows(self, z, targets, with_stats, with_max=False):
        rows, lse, stats = _ops.logps_forward(z[None], targets[None], _NO_LABEL, False, with_stats, with_max)
        return rows[0], lse[0], None if stats is None else stats[:, 0]

    def backward_rows(self, z, targets, lse, coef, ignore_index=_NO_LABEL):
        """dlogits of the rows before the transform (in z's buffer unless softcapping keeps z). A target outside
        [0, z.shape[1]) adds no one-hot term (a vocabulary tile that does not hold it)."""
        o = self.opts
        keep = o.softcap is not None  # the chain rule through tanh needs the forward values
        dz = _ops.logps_backward(z[None], targets[None], lse[None], coef[None], ignore_index, False,
                                 inplace=not keep)[0]
        if not o.identity:
            scale = o.logit_scale / o.temperature
            if keep:  # z = c tanh(u) / T: dz/du-chain = (1 - tanh^2) = 1 - (z T / c)^2
                t = z.mul_(o.temperature / o.softcap)
                dz.mul_(t.mul_(t).neg_().add_(1.0))
            if scale != 1.0:
                dz.mul_(scale)
        return dz

    def accumulate(self, idx, h, dz, grads):
        """grads = [grad_h_flat, grad_w (fp32 unless fp64), grad_b or None]: rows idx get dz @ W; W and b
        accumulate in fp32, each chunk's product formed in fp32 too (never rounded to a bf16 partial)."""
        grad_h, grad_w, grad_b = grads
        grad_h.index_copy_(0, idx, (dz @ self.w).to(grad_h.dtype))
        if grad_w.dtype == dz.dtype:
            grad_w.addmm_(dz.t(), h)
        elif grad_w.is_cuda and _ADDMM_OUT_DTYPE:  # fp32 accumulation in the GEMM's epilogue
            torch.addmm(grad_w, dz.t(), h, out_dtype=grad_w.dtype, out=grad_w)
        else:  # the chunk's inputs in fp32: exact products, fp32 sums (CPU has no out_dtype GEMM)
            grad_w.addmm_(dz.t().to(grad_w.dtype), h.to(grad_w.dtype))
        if grad_b is not None:
            grad_b.add_(dz.sum(0, dtype=grad_b.dtype))


def _vocab_tiled_backward(head: _Head, idx, targets, lse, coef, grads, tile_bytes: int):
    """The lean backward of the M completion rows ``idx``: vocabulary tile by tile, recompute the tile's logits
    for every row (GEMM 1), write the tile's rows of the weight gradient in one GEMM over all rows (GEMM 2: summed
    in fp32 inside the GEMM and rounded once, in the weight's dtype: no fp32 copy of the weight gradient), and
    add the tile's share of the hidden-state gradient to an fp32 (M, H) accumulator (GEMM 3). ``grads``:
    [grad_h_flat, grad_w and grad_b in their own dtypes]."""
    grad_h, grad_w, grad_b = grads
    M = idx.numel()
    if M == 0:
        return
    acc_dtype = torch.float64 if head.cdt == torch.float64 else torch.float32
    h = head.h.index_select(0, idx).to(head.cdt)  # (M, H)
    acc_h = torch.zeros(M, head.H, dtype=acc_dtype, device=h.device)
    per_col = M * h.element_size() * (1 if head.opts.softcap is None else 2)
    tile = max(64, tile_bytes // per_col)
    for v0 in range(0, head.V, tile):
        v1 = min(head.V, v0 + tile)
        z = head.tile_logits(h, v0, v1)
        # V is never a shifted target (targets - v0 < V - v0): every row is scored
        dz = head.backward_rows(z, targets - v0, lse, coef, ignore_index=head.V)
        torch.mm(dz.t(), h, out=grad_w[v0:v1]) if grad_w.dtype == dz.dtype else grad_w[v0:v1].copy_(dz.t() @ h)
        if grad_b is not None:
            grad_b[v0:v1] = dz.sum(0, dtype=acc_dtype)
        w = head.w[v0:v1]
        if dz.dtype == acc_dtype:
            acc_h.addmm_(dz, w)
        elif acc_h.is_cuda and _ADDMM_OUT_DTYPE:
            torch.addmm(acc_h, dz, w, out_dtype=acc_dtype, out=acc_h)
        else:
            acc_h.addmm_(dz.to(acc_dtype), w.to(acc_dtype))
    grad_h.index_copy_(0, idx, acc_h.to(grad_h.dtype))


def _completion_rows(labels, ignore_index, shift, pair_major: bool):
    """Flat row indices (M,) of the rows that score a completion token, their targets (M,), the (N, T) validity
    of rows, and each sequence's row count as Python ints (N,): reading those counts is the one host
    synchronisation of a call (the rows then come out of ``nonzero_static`` with a known size).
    ``pair_major``: ordered pair by pair (chosen i, then rejected i)."""
    rlab, valid = _ops.row_labels(labels, ignore_index, shift)
    N, T = labels.shape
    per_seq = valid.sum(1).tolist()  # the host sync
    order = torch.arange(N * T, device=labels.device)
    if pair_major:
        order = order.view(2, N // 2, T).transpose(0, 1).reshape(-1)
    mask = valid.reshape(-1)[order]
    try:
        picked = torch.nonzero_static(mask, size=sum(per_seq)).squeeze(1)
    except RuntimeError:  # a torch without nonzero_static on this device: boolean indexing syncs once more
        picked = mask.nonzero().squeeze(1)
    idx = order[picked]
    return idx, rlab.reshape(-1)[idx], valid, per_seq


class LinearSequenceLogpsFunction(torch.autograd.Function):
    """``(hidden, weight, bias, labels, ignore_index, shift, average, opts, chunk_bytes, with_stats)
    -> (logps (N,), token_logps (N, T), num_tokens (N,), stats (4, N, T))``; logps and token_logps are
    differentiable with respect to hidden, weight and bias."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ignore_index, shift, average, opts, chunk_bytes, with_stats,
                lean=False, process_group=None):
        _check_linear(hidden, weight, labels, bias, ignore_index)
        shard = _shard(process_group, hidden, weight, labels, ignore_index)
        N, T, _ = hidden.shape
        head = _Head(hidden, weight, bias, opts, chunk_bytes)
        idx, targets, valid, _ = _completion_rows(labels, ignore_index, shift, pair_major=False)
        cdt = torch.float64 if head.cdt == torch.float64 else torch.float32
        rows = _Rows(head, idx, targets, N, T, cdt, with_stats, shard)
        for r0 in range(0, idx.numel(), head.chunk_rows):
            rows.forward_chunk(slice(r0, r0 + head.chunk_rows))
        rows.finish()
        stats = rows.stats
        token_logps = _ops.rows_to_positions(rows.row_logps.view(N, T), shift)
        num_tokens = valid.sum(1)
        logps = token_logps.sum(1)
        if average:
            logps = logps * _mean_scale(num_tokens, logps.dtype)
        stats = (_ops.rows_to_positions(stats.view(4 * N, T), shift).view(4, N, T) if with_stats
                 else torch.zeros(0, device=hidden.device))
        ctx.mark_non_differentiable(num_tokens, stats)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(hidden, weight, bias, labels, idx, rows.kernel_targets, rows.lse, num_tokens)
        ctx.options = (ignore_index, shift, average, opts, chunk_bytes, lean, shard)
        return logps, token_logps, num_tokens, stats

    @staticmethod
    def backward(ctx, grad_logps, grad_token_logps, *_):
        hidden, weight, bias, labels, idx, targets, lse, num_tokens = ctx.saved_tensors
        ignore_index, shift, average, opts, chunk_bytes, lean, shard = ctx.options
        coef = sequence_coef(labels, num_tokens, grad_logps, grad_token_logps, average)
        coef = _ops.positions_to_rows(coef, shift).reshape(-1)[idx]
        grads = _grad_buffers(hidden, weight, bias, lean)
        head = _Head(hidden, weight, bias, opts, chunk_bytes, lean)
        if lean:
            _vocab_tiled_backward(head, idx, targets, lse, coef, grads, head.chunk_bytes)
        else:
            for r0 in range(0, idx.numel(), head.chunk_rows):
                sl = slice(r0, r0 + head.chunk_rows)
                h, z = head.logits(idx[sl])
                head.accumulate(idx[sl], h, head.backward_rows(z, targets[sl], lse[sl], coef[sl]), grads)
        if shard is not None:  # every shard's share of d loss / d hidden
            _vocab.all_reduce_sum_(grads[0], shard.group)
        return (*_finish_grads(grads, hidden, weight, bias), None, None, None, None, None, None, None, None, None)


def _grad_buffers(hidden, weight, bias, lean=False):
    """Zeroed gradients: the weight's and bias's in fp32 accumulators (chunks of tokens add to them), or, with
    ``lean``, in their own dtypes (vocabulary tiles write each row once)."""
    N, T, H = hidden.shape
    grad_h = torch.zeros(N * T, H, dtype=hidden.dtype, device=hidden.device)
    acc = torch.float32 if weight.dtype != torch.float64 else torch.float64
    grad_w = torch.zeros(weight.shape, dtype=weight.dtype if lean else acc, device=weight.device)
    grad_b = None if bias is None else torch.zeros(bias.shape, dtype=bias.dtype if lean else acc, device=bias.device)
    return [grad_h, grad_w, grad_b]


def _finish_grads(grads, hidden, weight, bias):
    grad_h, grad_w, grad_b = grads
    return (grad_h.view(hidden.shape), grad_w.to(weight.dtype), None if bias is None else grad_b.to(bias.dtype))


def linear_sequence_logps(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                          bias: Optional[torch.Tensor] = None, *, ignore_index: int = -100, shift: bool = True,
                          average: bool = False, logit_scale: float = 1.0, softcap: Optional[float] = None,
                          temperature: float = 1.0, return_token_logps: bool = False,
                          return_token_stats: bool = False, chunk_bytes: Optional[int] = None,
                          lean: bool = False, process_group=None) -> SequenceLogps:
    """``sequence_logps(transform(hidden @ weight.T + bias), labels)`` without building the logits.

    Args:
        hidden: (N, T, H); weight: (V, H) (the LM head, tied embeddings included); bias: (V,) or None.
        logit_scale, softcap, temperature: see ``LogitOptions``.
        return_token_stats: also return ``token_stats``, per-token (N, T) ``entropy``, ``mean_logits``,
            ``log_sum_sq_probs`` and ``is_top1`` (TRL's fused LM head outputs; not differentiable).
        chunk_bytes: the logits buffer of one chunk of tokens; None: ``default_chunk_bytes`` (128 MiB on CPU,
            4096 tokens' logits on a GPU, within 1/8 of its free memory).
        lean: backward in vocabulary tiles, each writing its rows of the weight gradient once, in the weight's
            dtype: no fp32 copy of the weight gradient, the same 4 GEMMs (see ``_vocab_tiled_backward``).
        process_group: vocabulary-parallel (Megatron's column-parallel LM head): ``weight`` (and ``bias``) hold rows
            [r * Vp, (r + 1) * Vp) of the head on rank r, ``hidden`` and ``labels`` (global ids) are the same on every
            rank. Every rank gets the unsharded outputs; the weight gradient is the local rows', the hidden-state
            gradient the full one (summed over the group). Communication: one all-gather of 2 fp32 per completion
            token (7 with the statistics) in forward, one all-reduce of the hidden-state gradient in backward.
    """
    opts = LogitOptions(logit_scale, softcap, temperature)
    logps, token_logps, num_tokens, stats = LinearSequenceLogpsFunction.apply(
        hidden, weight, bias, labels, ignore_index, shift, average, opts, chunk_bytes, return_token_stats, lean,
        process_group)
    return SequenceLogps(logps, num_tokens, token_logps if return_token_logps else None,
                         _ops.named_token_stats(stats) if return_token_stats else None)


class LinearDPOLossFunction(torch.autograd.Function):
    """``(hidden, weight, bias, labels, ref_chosen, ref_rejected, config, ignore_index, shift, opts,
    chunk_bytes, lean) -> (loss, logps (2B,), num_tokens (2B,), seq_stats (4, 2B), rewards (2B,), metrics (10,))``,
    as ``FusedDPOLossFunction``. Forward computes the gradients too (see the module docstring); backward scales
    them by grad_output."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ref_chosen_logps, ref_rejected_logps, config, ignore_index,
                shift, opts, chunk_bytes, lean=False, process_group=None):
        _check_linear(hidden, weight, labels, bias, ignore_index)
        if not isinstance(config, DPOLossConfig):
            raise TypeError(f"config must be a DPOLossConfig, got {type(config).__name__}")
        N, T, _ = hidden.shape
        if N % 2 or N == 0:
            raise ValueError(f"hidden must hold 2B rows (chosen [0, B), rejected [B, 2B)) with B >= 1, got {N} rows")
        B = N // 2
        if (ref_chosen_logps is None) != (ref_rejected_logps is None):
            raise ValueError("give both ref_chosen_logps and ref_rejected_logps, or neither (reference-free)")
        head = _Head(hidden, weight, bias, opts, chunk_bytes, lean)
        dev = hidden.device
        cdt = torch.float64 if head.cdt == torch.float64 else torch.float32
        like = torch.empty(0, dtype=cdt, device=dev)
        ref_c = ref_r = None
        if ref_chosen_logps is not None:
            ref_c = _reference(ref_chosen_logps, "ref_chosen_logps", B, like, cdt)
            ref_r = _reference(ref_rejected_logps, "ref_rejected_logps", B, like, cdt)
        p = _head.params(config)
        shard = _shard(process_group, hidden, weight, labels, ignore_index)

        idx, targets, valid_rows, per_seq = _completion_rows(labels, ignore_index, shift, pair_major=True)
        valid_pos = _ops.rows_to_positions(valid_rows, shift)
        num_tokens = valid_pos.sum(1)
        token_w = None
        if config.ld_alpha is not None:
            token_w = _ops.positions_to_rows(ld_token_weights(valid_pos, config.ld_alpha), shift).reshape(-1)
        seq_of_row = idx // T  # the sequence of each completion row
        rows = _Rows(head, idx, targets, N, T, cdt, True, shard)
        # per-sequence numbers the head reads, filled in as the sequences' chunks are done
        logps = torch.zeros(N, dtype=cdt, device=dev)
        sums = torch.zeros(N, dtype=cdt, device=dev) if token_w is not None else logps
        seq_stats = torch.zeros(4, N, dtype=cdt, device=dev)
        want_grad = any(ctx.needs_input_grad[:3])
        grads = _grad_buffers(hidden, weight, bias, lean) if want_grad else None

        def fill_sequences(seqs):
            """Per-sequence log-probs, unweighted sums and statistics of the sequences ``seqs``."""
            lp = rows.row_logps.view(N, T)[seqs]
            logps[seqs] = (lp * token_w.view(N, T)[seqs]).sum(1) if token_w is not None else lp.sum(1)
            if token_w is not None:
                sums[seqs] = lp.sum(1)
            seq_stats[:, seqs] = rows.stats.view(4, N, T)[:, seqs].sum(2)

        def head_on_pairs(p0, p1):
            """Loss share of pairs [p0, p1) and the coefficient of each completion row of theirs."""
            seqs = torch.cat([torch.arange(p0, p1, device=dev), torch.arange(B + p0, B + p1, device=dev)])
            fill_sequences(seqs)
            out, coef, rewards, metrics = _head.loss_head(logps, sums, num_tokens, seq_stats, ref_c, ref_r, p,
                                                           pairs=(p0, p1), with_metrics=p1 == B)
            if token_w is not None:  # LD-DPO weighs the pair terms per token; the token term (sft, nll) is flat
                token = torch.zeros_like(coef)
                token[:B] = out[1]
                return out[0], coef - token, token, rewards, metrics
            return out[0], coef, None, rewards, metrics

        def row_coef(sl, coef, token):
            s = seq_of_row[sl]
            if token is None:
                return coef[s]
            return coef[s] * token_w[idx[sl]] + token[s]

        def backward_chunk(sl, h, z, coef):
            head.accumulate(idx[sl], h, head.backward_rows(z, rows.kernel_targets[sl], rows.lse[sl], coef), grads)

        rows_per_pair = [per_seq[b] + per_seq[B + b] for b in range(B)]
        grouped = (want_grad and not lean and shard is None and pair_local(config)
                   and max(rows_per_pair, default=0) <= head.chunk_rows)
        losses = []
        if grouped:  # 3 GEMMs: each group's gradients while its logits are in the buffer
            p0 = r0 = 0
            while p0 < B:
                p1, r1 = p0, r0
                while p1 < B and (p1 == p0 or r1 + rows_per_pair[p1] - r0 <= head.chunk_rows):
                    r1 += rows_per_pair[p1]
                    p1 += 1
                sl = slice(r0, r1)
                h, z = rows.forward_chunk(sl)
                loss, coef, token, rewards, metrics = head_on_pairs(p0, p1)
                losses.append(loss)
                if r1 > r0:
                    backward_chunk(sl, h, z, row_coef(sl, coef, token))
                p0, r0 = p1, r1
        else:  # log-probs of every chunk, the loss, then (with grad) recompute and gradients: 4 GEMMs (lean: the
            # backward in vocabulary tiles, see _vocab_tiled_backward)
            for r0 in range(0, idx.numel(), head.chunk_rows):
                rows.forward_chunk(slice(r0, r0 + head.chunk_rows))
            rows.finish()  # with a shard: one all-gather of every completion row's partials
            loss, coef, token, rewards, metrics = head_on_pairs(0, B)
            losses.append(loss)
            if want_grad and lean:
                _vocab_tiled_backward(head, idx, rows.kernel_targets, rows.lse,
                                      row_coef(slice(0, idx.numel()), coef, token), grads, head.chunk_bytes)
            elif want_grad:
                for r0 in range(0, idx.numel(), head.chunk_rows):
                    sl = slice(r0, r0 + head.chunk_rows)
                    h, z = head.logits(idx[sl])
                    backward_chunk(sl, h, z, row_coef(sl, coef, token))
        loss = torch.stack(losses).sum()
        if want_grad and shard is not None:  # every shard's share of d loss / d hidden
            _vocab.all_reduce_sum_(grads[0], shard.group)
        if want_grad:
            ctx.grads = _finish_grads(grads, hidden, weight, bias)
        ctx.mark_non_differentiable(logps, num_tokens, seq_stats, rewards, metrics)
        ctx.set_materialize_grads(False)
        return loss, logps, num_tokens, seq_stats, rewards, metrics

    @staticmethod
    def backward(ctx, grad_loss, *_):
        grads = [None if g is None else g.mul_(grad_loss.to(g.dtype)) for g in ctx.grads]  # in place: no copy
        ctx.grads = None
        return (*grads, None, None, None, None, None, None, None, None, None, None)


def linear_dpo_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                    ref_chosen_logps: Optional[torch.Tensor] = None, ref_rejected_logps: Optional[torch.Tensor] = None,
                    bias: Optional[torch.Tensor] = None, *, config: Optional[DPOLossConfig] = None,
                    ignore_index: int = -100, shift: bool = True, logit_scale: float = 1.0,
                    softcap: Optional[float] = None, temperature: float = 1.0,
                    chunk_bytes: Optional[int] = None, lean: bool = False, process_group=None,
                    **options) -> DPOLossOutput:
    """``dpo_loss`` of ``transform(hidden @ weight.T + bias)`` without building the logits; same options and
    output (every ``DPOLossConfig`` field as a keyword, or ``config=``).

    Args:
        hidden: (2B, T, H), rows [0, B) chosen, [B, 2B) rejected; weight: (V, H); bias: (V,) or None.
        logit_scale, softcap, temperature: see ``LogitOptions``.
        chunk_bytes: the logits buffer of one chunk (a group of whole pairs where they fit); None:
            ``default_chunk_bytes`` (128 MiB on CPU, 4096 tokens' logits on a GPU, within 1/8 of its free memory).
        lean: the memory-lean setting: log-probs of every chunk first, then the backward in vocabulary tiles
            over all tokens (``_vocab_tiled_backward``): 4 GEMMs instead of 3, and no fp32 copy of the weight
            gradient (beyond the inputs and gradients: one chunk of logits, the completion rows' hidden states
            and an fp32 (tokens, H) accumulator).
        process_group: vocabulary-parallel, as in ``linear_sequence_logps`` (``weight`` holds this rank's rows of
            the head); every rank gets the unsharded loss and metrics. Always the two-pass mode (4 GEMMs): the
            loss needs every shard's partials, gathered once after the last chunk.
    """
    if config is None:
        config = DPOLossConfig(**options)
    elif options:
        raise TypeError(f"pass either config or loss options, not both: {sorted(options)}")
    opts = LogitOptions(logit_scale, softcap, temperature)
    loss, logps, _, _, rewards, metrics = LinearDPOLossFunction.apply(
        hidden, weight, bias, labels, ref_chosen_logps, ref_rejected_logps, config, ignore_index, shift, opts,
        chunk_bytes, lean, process_group)
    return dpo_output(loss, logps, rewards, metrics)


class LinearDPOLoss(torch.nn.Module):
    """``LinearDPOLoss(beta=..., loss_type=...)(hidden, weight, labels, ref_chosen, ref_rejected, bias)``."""

    def __init__(self, *, ignore_index: int = -100, shift: bool = True, logit_scale: float = 1.0,
                 softcap: Optional[float] = None, temperature: float = 1.0, chunk_bytes: Optional[int] = None,
                 lean: bool = False, process_group=None, **options):
        super().__init__()
        self.config = DPOLossConfig(**options)
        self.kwargs = dict(ignore_index=ignore_index, shift=shift, logit_scale=logit_scale, softcap=softcap,
                           temperature=temperature, chunk_bytes=chunk_bytes, lean=lean, process_group=process_group)

    def forward(self, hidden, weight, labels, ref_chosen_logps=None, ref_rejected_logps=None,
                bias=None) -> DPOLossOutput:
        return linear_dpo_loss(hidden, weight, labels, ref_chosen_logps, ref_rejected_logps, bias,
                               config=self.config, **self.kwargs)

    def extra_repr(self) -> str:
        return repr(self.config)
