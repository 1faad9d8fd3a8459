"""The fused linear, dispatched: per-sequence log-probs and the DPO loss from hidden states and an LM head, chunk
of tokens by chunk, never holding more than one chunk's logits. The custom ops (``fastdpo._library``) and the
autograd Functions (``fastdpo.linear``) call these; the log-prob kernels and the loss head come from ``_ops`` and
``_head``.

A call is four steps:

1. **rows**: the completion rows, those that score a token (``completion_rows``). Prompt and padding rows never
   reach the LM head. Their per-sequence counts are read to the host here: the one host synchronisation of a
   call (the chunk loop's bounds and the pair groups need them); the backward of ``linear_sequence_logps`` gets
   them from its forward, without a second read.
2. **chunk loop**: each chunk's logits ``transform(h @ W.T + b)`` (``Head``), then the log-prob kernel on them.
3. **loss head** (DPO): every pair's loss and each sequence's coefficient dL/dlogp, from per-sequence numbers.
4. **gradients**, only of the inputs that need one (``Grads``): dlogits by the backward kernel, in the chunk's own
   buffer, then ``dlogits @ W`` into the hidden states' gradient and ``dlogits.T @ h`` into the weight's.

GEMMs per call, in M x H x V GEMM-equivalents (M completion tokens):

| | forward | hidden grad | weight grad | recompute | total (hidden and head trainable / head frozen) |
|---|---|---|---|---|---|
| ``linear_dpo_loss``, grouped (every pair's chunk holds the pair) | 1 | 1 | 1 | 0 | 3 / 2 |
| ``linear_dpo_loss``, two-pass (aot losses, WPO with sft, a pair past a chunk, a vocabulary shard) | 1 | 1 | 1 | 1 | 4 / 3 |
| ``linear_sequence_logps`` (the upstream gradient arrives in backward) | 1 | 1 | 1 | 1 | 4 / 3 |
| no input needs a gradient (``no_grad``, frozen everything) | 1 | 0 | 0 | 0 | 1 |

``lean`` runs the gradients in vocabulary tiles over all rows instead (recompute, then the weight's rows of the
tile in one GEMM, written once in the weight's dtype: no fp32 copy of the weight gradient).
"""

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

from fastdpo import _head, _ops, _vocab
from fastdpo.losses import ld_token_weights, ld_token_weights_packed

# The logits buffer of one chunk: CPU, and the floor on GPUs.
DEFAULT_CHUNK_BYTES = 128 * 2 ** 20
# On GPUs the default chunk holds this many tokens (the GEMMs' M): at M = 4096 the three M x H x V GEMMs of a
# chunk run near the tensor cores' peak, and the fp32 weight-gradient accumulator is read and written once per
# chunk (2 x 4 V H bytes against 2 M H V FLOPs: ~8% of a 4096-row chunk's weight-gradient GEMM on an H100).
DEFAULT_CHUNK_TOKENS = 4096
# ... and never more than this fraction of the device's memory (a property of the device, not of the moment).
_CHUNK_MEMORY_FRACTION = 16
# Lean vocabulary tiles are whole multiples of this many columns (the GEMMs' N; tensor-core tiles are 64-256).
LEAN_TILE_COLS = 128
# torch.addmm(..., out_dtype=torch.float32) accumulates a bf16/fp16 product into an fp32 tensor in the GEMM's
# epilogue (CUDA, torch >= 2.8): no partial product is rounded to the input dtype, and no extra pass.
_ADDMM_OUT_DTYPE = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 8)
NO_LABEL = -1  # rows handed to the kernels all hold a real target: nothing matches this


@dataclass(frozen=True)
class LogitOptions:
    """``logits = softcap * tanh(h @ W.T * logit_scale / softcap) / temperature`` (TRL's order; no softcap when
    ``softcap`` is None). Gemma uses ``softcap`` (final_logit_softcapping), Cohere ``logit_scale``."""

    logit_scale: float = 1.0
    softcap: Optional[float] = None
    temperature: float = 1.0

    def __post_init__(self):
        if not (isinstance(self.temperature, (int, float)) and self.temperature > 0):
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.softcap is not None and not self.softcap > 0:
            raise ValueError(f"softcap must be > 0 or None, got {self.softcap}")
        if not (isinstance(self.logit_scale, (int, float)) and math.isfinite(self.logit_scale)):
            raise ValueError(f"logit_scale must be a finite number, got {self.logit_scale}")

    @property
    def identity(self) -> bool:
        return self.logit_scale == 1.0 and self.softcap is None and self.temperature == 1.0

    def as_list(self) -> List[float]:
        """For a custom op's ``float[]`` argument (softcap 0: none)."""
        return [float(self.logit_scale), float(self.softcap or 0.0), float(self.temperature)]

    @classmethod
    def from_list(cls, values: Sequence[float]) -> "LogitOptions":
        scale, cap, temp = values
        return cls(scale, cap if cap > 0 else None, temp)


def chunk_rows(device: torch.device, vocab_size: int, element_size: int, *, softcap: bool, lean: bool,
               chunk_bytes: Optional[int]) -> int:
    """Rows of logits in one chunk: ``chunk_bytes`` of them (softcapping keeps two buffers), or by default 128 MiB
    on CPU and on a GPU ``DEFAULT_CHUNK_TOKENS`` rows (half as many with ``lean``), at least 128 MiB and at most
    1/16 of the device's memory. A function of the shapes and the device alone, never of the memory free at the
    call, so the chunking, and with it every bit of the result, is the same in a fresh process and deep inside a
    training loop. One exception, to run rather than fail: when the chunk does not fit in what torch's allocator
    can still hand out (the driver's free memory plus what the caching allocator holds unused), it is halved until
    it does, with a warning (the results then round differently)."""
    row = vocab_size * element_size * (2 if softcap else 1)
    if chunk_bytes is None:
        chunk_bytes = DEFAULT_CHUNK_BYTES
        if device.type == "cuda":
            total = torch.cuda.get_device_properties(device).total_memory
            want = (DEFAULT_CHUNK_TOKENS // (2 if lean else 1)) * row
            chunk_bytes = max(DEFAULT_CHUNK_BYTES, min(want, total // _CHUNK_MEMORY_FRACTION))
    rows = max(1, chunk_bytes // row)
    if device.type == "cuda" and rows > 1 and not torch.cuda.is_current_stream_capturing():
        available = allocator_free_bytes(device)
        if rows * row > available:
            fit = rows
            while fit > 1 and fit * row > available:
                fit //= 2
            import warnings
            warnings.warn(f"fastdpo: a chunk of {rows} rows of logits ({rows * row / 2 ** 20:.0f} MiB) does not fit in "
                          f"the {available / 2 ** 20:.0f} MiB torch's allocator can give; using {fit} rows (results "
                          "round differently from the default chunking; pass chunk_bytes= to fix it)", RuntimeWarning,
                          stacklevel=3)
            rows = fit
    return int(rows)


def allocator_free_bytes(device: torch.device) -> int:
    """What torch's allocator can still hand out on ``device``: the driver's free memory plus the blocks the
    caching allocator holds unused (reserved, not allocated), within the process's memory fraction if one is set
    (``torch.cuda.set_per_process_memory_fraction``)."""
    free, total = torch.cuda.mem_get_info(device)  # a driver query, not a stream synchronisation
    allocated = torch.cuda.memory_allocated(device)
    available = free + torch.cuda.memory_reserved(device) - allocated
    fraction = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    if fraction is not None:
        available = min(available, int(fraction(device) * total) - allocated)
    return available


# ------------------------------------------------------------------------------------------------- rows


@dataclass
class Rows:
    """The completion rows of a batch: flat indices (M,) into N * T of the rows that score a token, their targets
    (M,), the sequence of each (M,), and each sequence's row count as Python ints (S,) (None while a CUDA graph of
    a packed batch is captured: unknown without a host read)."""

    idx: torch.Tensor
    targets: torch.Tensor
    seq: torch.Tensor
    counts: Optional[List[int]]

    @property
    def M(self) -> int:
        return self.idx.numel()


def completion_rows(labels: torch.Tensor, ignore_index: int, shift: bool, *, pair_major: bool,
                    counts: Optional[torch.Tensor] = None, cu: Optional[torch.Tensor] = None) -> Rows:
    """The rows that score a completion token; ``pair_major``: ordered pair by pair (chosen i, then rejected i).
    Sequences are the N rows of ``labels``, or with ``cu`` the segments of one packed row (its segment starts
    masked). Reading the per-sequence counts to the host is the one host synchronisation of a fused-linear call;
    ``counts`` (a CPU tensor, from an earlier call on the same labels) skips it. The rows then come out of
    ``nonzero_static`` with a known size.

    While a CUDA graph is being captured no host read is possible: every row is taken then (prompt and padding
    rows with a target that scores nothing: zero log-prob, zero gradient), at the cost of their GEMM work."""
    rlab, valid = _ops.row_labels(labels, ignore_index, shift)
    N, T = labels.shape
    S = N if cu is None else cu.numel() - 1
    seq_all = None if cu is None else _ops.segment_ids(cu, N * T)  # the sequence of each row
    if not pair_major:
        order = torch.arange(N * T, device=labels.device)
    elif cu is None:
        order = torch.arange(N * T, device=labels.device).view(2, N // 2, T).transpose(0, 1).reshape(-1)
    else:  # pair by pair, chosen first, each sequence's rows in order
        order = torch.sort((seq_all % (S // 2)) * 2 + seq_all // (S // 2), stable=True).indices
    seq_of = (lambda i: i // T) if cu is None else (lambda i: seq_all[i])
    if capturing(labels):
        known = [T] * N if cu is None else None  # a packed row's counts would need a read: unknown
        return Rows(order, torch.where(valid, rlab, NO_LABEL).reshape(-1)[order], seq_of(order), known)
    if counts is not None and (counts < 0).any():  # counts a capture left unknown
        counts = None
    if counts is None:
        counts = valid.sum(1) if cu is None else _ops.segment_sum(valid.reshape(-1).long(), cu)
    per_seq = counts.tolist()  # the host read (of host memory when ``counts`` came from a forward)
    if any(c < 0 for c in per_seq):  # untrusted offsets (a GPU's cu_seqlens, unchecked until now)
        raise ValueError("cu_seqlens must start at 0, be non-decreasing and end at the token count: some offsets "
                         "are not")
    mask = valid.reshape(-1)[order]
    try:
        picked = torch.nonzero_static(mask, size=sum(per_seq)).squeeze(1)
    except RuntimeError:  # a torch without nonzero_static on this device: boolean indexing syncs once more
        picked = mask.nonzero().squeeze(1)
    idx = order[picked]
    return Rows(idx, rlab.reshape(-1)[idx], seq_of(idx), per_seq)


def capturing(labels: torch.Tensor) -> bool:
    """Whether a CUDA graph is being captured on the labels' device (no host read may happen)."""
    return labels.is_cuda and torch.cuda.is_current_stream_capturing()


def row_chunks(M: int, chunk: int):
    """Slices of ``chunk`` rows covering [0, M)."""
    return [slice(r0, min(M, r0 + chunk)) for r0 in range(0, M, chunk)]


def pair_groups(rows: Rows, num_pairs: int, chunk: int) -> Optional[List[Tuple[int, int, slice]]]:
    """Consecutive pairs [p0, p1) whose rows (pair-major) fit in one chunk, with their rows' slice; None when a
    single pair is longer than a chunk (then the two-pass mode runs)."""
    if rows.counts is None:
        return None
    per_pair = [rows.counts[b] + rows.counts[num_pairs + b] for b in range(num_pairs)]
    if max(per_pair, default=0) > chunk:
        return None
    groups, p0, r0 = [], 0, 0
    while p0 < num_pairs:
        p1, r1 = p0, r0
        while p1 < num_pairs and (p1 == p0 or r1 + per_pair[p1] - r0 <= chunk):
            r1 += per_pair[p1]
            p1 += 1
        groups.append((p0, p1, slice(r0, r1)))
        p0, r0 = p1, r1
    return groups


# ------------------------------------------------------------------------------------------------- head


class Head:
    """The LM head applied chunk by chunk to selected rows of the hidden states, and the per-chunk kernels."""

    def __init__(self, hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                 opts: LogitOptions):
        self.H = hidden.shape[2]
        self.V = weight.shape[0]
        self.cdt = torch.promote_types(hidden.dtype, weight.dtype)  # an fp32 LM head computes in fp32
        self.h = hidden.reshape(-1, self.H)
        self.w = weight.to(self.cdt)
        self.b = None if bias is None else bias.to(self.cdt)
        self.opts = opts

    @property
    def acc_dtype(self) -> torch.dtype:
        return torch.float64 if self.cdt == torch.float64 else torch.float32

    def chunk(self, chunk_bytes: Optional[int], lean: bool) -> int:
        """Rows per chunk (``chunk_rows``), chosen at run time inside the op: on a GPU it may query the allocator,
        which a traced graph cannot."""
        return chunk_rows(self.h.device, self.V, self.w.element_size(), softcap=self.opts.softcap is not None,
                          lean=lean, chunk_bytes=chunk_bytes)

    def buffer_bytes(self, rows: int) -> int:
        """Bytes of logits buffers a chunk of ``rows`` rows holds (two with softcapping: the backward needs the
        forward values)."""
        return rows * self.V * self.w.element_size() * (1 if self.opts.softcap is None else 2)

    def logits(self, idx: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(h (m, H), logits (m, V)) of the rows ``idx`` (flat indices into N * T), transformed in place."""
        h = self.h.index_select(0, idx).to(self.cdt)
        return h, self._transform(h @ self.w.t() if self.b is None else torch.addmm(self.b, h, self.w.t()))

    def tile_logits(self, h: torch.Tensor, v0: int, v1: int) -> torch.Tensor:
        """(M, v1 - v0) logits of vocabulary entries [v0, v1) for the rows ``h`` (M, H), transformed."""
        w = self.w[v0:v1]
        return self._transform(h @ w.t() if self.b is None else torch.addmm(self.b[v0:v1], h, w.t()))

    def _transform(self, z: torch.Tensor) -> torch.Tensor:
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

    @staticmethod
    def logps(z, targets, with_stats: bool, with_max: bool = False):
        """The log-prob kernel on a chunk's logits: (per-row log-probs (m,), lse (m,), stats (4 or 6, m) or None)."""
        rows, lse, stats = _ops.logps_forward(z[None], targets[None], NO_LABEL, False, with_stats, with_max)
        return rows[0], lse[0], None if stats is None else stats[:, 0]

    def dlogits(self, z, targets, lse, coef, ignore_index: int = NO_LABEL) -> torch.Tensor:
        """d loss / d (h @ W.T + b) of the chunk, in z's buffer unless softcapping keeps z. A target outside
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


# ---------------------------------------------------------------------------------------------- gradients


class Grads:
    """Gradient buffers of the inputs that need one, None for the others: the hidden states' (N * T, H) in their
    dtype; the weight's and bias's accumulated over chunks in fp32 (float64 for a float64 head), or, ``lean``,
    written once per vocabulary tile in their own dtypes."""

    def __init__(self, hidden, weight, bias, needs: Sequence[bool], lean: bool):
        need_h, need_w, need_b = needs
        acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
        N, T, H = hidden.shape
        self.lean = lean
        self.hidden = torch.zeros(N * T, H, dtype=hidden.dtype, device=hidden.device) if need_h else None
        self.weight = (torch.zeros(weight.shape, dtype=weight.dtype if lean else acc, device=weight.device)
                       if need_w else None)
        self.bias = (torch.zeros(bias.shape, dtype=bias.dtype if lean else acc, device=bias.device)
                     if need_b and bias is not None else None)

    @property
    def any(self) -> bool:
        return self.hidden is not None or self.weight is not None or self.bias is not None

    def add_chunk(self, head: Head, idx: torch.Tensor, h: torch.Tensor, dz: torch.Tensor) -> None:
        """A chunk's share: rows ``idx`` of the hidden states' gradient get dz @ W (one GEMM); the weight's
        accumulates dz.T @ h (one GEMM), formed in fp32 (never rounded to a bf16 partial); the bias's dz summed."""
        if self.hidden is not None:
            self.hidden.index_copy_(0, idx, (dz @ head.w).to(self.hidden.dtype))
        if self.weight is not None:
            _addmm_acc(self.weight, dz.t(), h)
        if self.bias is not None:
            self.bias.add_(dz.sum(0, dtype=self.bias.dtype))

    def vocab_tiled(self, head: Head, rows: Rows, targets, lse, coef, tile_bytes: int) -> None:
        """The lean gradients of the M completion rows: vocabulary tile by tile, recompute the tile's logits for
        every row (GEMM 1), write the tile's rows of the weight gradient in one GEMM over all rows (GEMM 2, summed in
        fp32 inside the GEMM and rounded once, in the weight's dtype), and add the tile's share of the hidden
        states' gradient to an fp32 (M, H) accumulator (GEMM 3). Tiles are multiples of ``LEAN_TILE_COLS``."""
        M = rows.M
        if M == 0:
            return
        acc = head.acc_dtype
        h = head.h.index_select(0, rows.idx).to(head.cdt)  # (M, H)
        acc_h = torch.zeros(M, head.H, dtype=acc, device=h.device) if self.hidden is not None else None
        per_col = head.buffer_bytes(M) // head.V
        tile = max(LEAN_TILE_COLS, tile_bytes // per_col // LEAN_TILE_COLS * LEAN_TILE_COLS)
        for v0 in range(0, head.V, tile):
            v1 = min(head.V, v0 + tile)
            z = head.tile_logits(h, v0, v1)
            # V is never a shifted target (targets - v0 < V - v0): every completion row is scored; rows without a
            # target (NO_LABEL: every row is taken while a CUDA graph is captured) are mapped to V, scoring nothing
            dz = head.dlogits(z, torch.where(targets == NO_LABEL, head.V, targets - v0), lse, coef,
                              ignore_index=head.V)
            if self.weight is not None:
                if self.weight.dtype == dz.dtype:
                    torch.mm(dz.t(), h, out=self.weight[v0:v1])
                else:
                    self.weight[v0:v1].copy_(dz.t() @ h)
            if self.bias is not None:
                self.bias[v0:v1] = dz.sum(0, dtype=acc)
            if acc_h is not None:
                _addmm_acc(acc_h, dz, head.w[v0:v1])
        if acc_h is not None:
            self.hidden.index_copy_(0, rows.idx, acc_h.to(self.hidden.dtype))

    def finish(self, hidden, weight, bias) -> Tuple[Optional[torch.Tensor], ...]:
        """(hidden's (N, T, H), weight's, bias's), each in its input's dtype, or None where not needed."""
        return (None if self.hidden is None else self.hidden.view(hidden.shape),
                None if self.weight is None else self.weight.to(weight.dtype),
                None if self.bias is None else self.bias.to(bias.dtype))


def _addmm_acc(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b, with acc in fp32 (or fp64) and a, b maybe in half precision: the product formed in acc's
    dtype, each chunk's partial never rounded to the inputs' dtype. Under autocast a chunk's logits (hence a) can
    be bf16 while the rows they came from (b) are fp32: both go to the lower precision first, as autocast's own
    GEMM would (a CUDA GEMM with ``out_dtype`` takes one input dtype)."""
    if a.dtype != b.dtype:
        low = a.dtype if a.element_size() < b.element_size() else b.dtype
        a, b = a.to(low), b.to(low)
    _gemm_into(acc, a, b)


def _gemm_into(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b for a and b of one dtype."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif acc.is_cuda and _ADDMM_OUT_DTYPE:  # fp32 accumulation in the GEMM's epilogue
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
    else:  # the chunk's inputs in fp32: exact products, fp32 sums (CPU has no out_dtype GEMM)
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


# ------------------------------------------------------------------------------------------ vocabulary shard


class Shard:
    """Vocabulary-parallel fused linear (see ``fastdpo._vocab``): ``weight`` holds rows [start, start + Vp) of the
    LM head. The kernels run on local targets; the per-row partials of every chunk are gathered once, after the
    last chunk; the hidden states' gradient is summed over the group."""

    def __init__(self, process_group, hidden, weight, labels, *, ignore_index: int, shift: bool, with_stats: bool,
                 needs: Sequence[bool], cu: Optional[torch.Tensor] = None):
        self.group = process_group
        self.Vp = weight.shape[0]
        agree = (int(with_stats), *map(int, needs), hidden.shape[2], _vocab.dtype_code(weight.dtype))
        rank, self.size = _vocab.check_split(process_group, self.Vp, labels, hidden, "weight",
                                             ignore_index=ignore_index, shift=shift, agree=agree, cu=cu)
        self.start = rank * self.Vp
        self.vocab_size = self.size * self.Vp

    def local(self, targets):
        return _vocab.local_labels(targets, NO_LABEL, self.start, self.Vp)

    def combine(self, parts, targets, with_stats):
        """This rank's partials (K, M) of the M completion rows -> (logp, lse, stats (4, M) or None) over the whole
        vocabulary."""
        return _vocab.combine(_vocab.gather(parts, self.group, self.size), targets, self.Vp, with_stats)

    def sum_hidden_grad(self, grads: Grads) -> None:
        if grads.hidden is not None:  # every shard's share of d loss / d hidden
            _vocab.all_reduce_sum_(grads.hidden, self.group)


# ---------------------------------------------------------------------------------------------- forward


class RowOutputs:
    """The forward's per-row outputs of the completion rows, filled chunk by chunk: log-probs (N * T,), lse (M,),
    statistics (4, N * T) or None. With a vocabulary shard the kernels run on local targets and each chunk's
    partials are kept; ``finish`` gathers and combines them, once."""

    def __init__(self, head: Head, rows: Rows, N: int, T: int, with_stats: bool, shard: Optional[Shard]):
        dev, cdt = rows.idx.device, head.acc_dtype
        self.head, self.rows, self.with_stats, self.shard = head, rows, with_stats, shard
        self.targets = rows.targets if shard is None else shard.local(rows.targets)  # what the kernels see
        self.row_logps = torch.zeros(N * T, dtype=cdt, device=dev)
        self.lse = torch.zeros(rows.M, dtype=cdt, device=dev)
        self.stats = torch.zeros(4, N * T, dtype=cdt, device=dev) if with_stats else None
        self.parts = None
        if shard is not None:
            K = _vocab.K_STATS if with_stats else _vocab.K_PLAIN
            self.parts = torch.zeros(K, rows.M, dtype=cdt, device=dev)

    def chunk(self, sl: slice) -> Tuple[torch.Tensor, torch.Tensor]:
        """Completion rows ``sl`` through the head and the log-prob kernel; returns the chunk's (h, logits)."""
        idx = self.rows.idx[sl]
        if idx.numel() == 0:  # a group of pairs without completion tokens: nothing to compute
            return self.head.h[:0], self.head.h.new_empty((0, self.head.V))
        h, z = self.head.logits(idx)
        rl, self.lse[sl], st = Head.logps(z, self.targets[sl], self.with_stats, with_max=self.shard is not None)
        if self.shard is not None:
            self.parts[:, sl] = _vocab.partials(rl, self.lse[sl], st, self.targets[sl])
        else:
            self.row_logps[idx] = rl
            if st is not None:
                self.stats[:, idx] = st
        return h, z

    def finish(self) -> None:
        """With a shard: every shard's partials of every row, gathered (one all-gather) and combined."""
        if self.shard is not None:
            self.row_logps[self.rows.idx], self.lse, st = self.shard.combine(self.parts, self.rows.targets,
                                                                              self.with_stats)
            if st is not None:
                self.stats[:, self.rows.idx] = st


def recompute_grads(head: Head, rows: Rows, out: RowOutputs, coef: torch.Tensor, grads: Grads, chunk: int,
                    lean: bool, tile_bytes: int) -> None:
    """The gradients after the forward has let its logits go: per chunk, recompute the logits (GEMM), dlogits, and
    the chunk's share (``Grads.add_chunk``); with ``lean``, in vocabulary tiles (``Grads.vocab_tiled``).
    ``coef`` (M,): d loss / d log-prob of each completion row."""
    if lean:
        grads.vocab_tiled(head, rows, out.targets, out.lse, coef, tile_bytes)
        return
    for sl in row_chunks(rows.M, chunk):
        h, z = head.logits(rows.idx[sl])
        grads.add_chunk(head, rows.idx[sl], h, head.dlogits(z, out.targets[sl], out.lse[sl], coef[sl]))


def sequence_logps_forward(hidden, weight, bias, labels, *, ignore_index: int, shift: bool, opts: LogitOptions,
                           chunk_bytes: Optional[int], with_stats: bool, shard: Optional[Shard] = None,
                           cu: Optional[torch.Tensor] = None):
    """Per-sequence log-probs: (token_logps (N, T) at positions, lse (N * T,) per row (0 off the completion),
    stats (4, N, T) or None, logps (S,), num_tokens (S,), row counts (S,) int64 on the CPU). With ``cu``: one
    packed row (N = 1) of S segments, its segment starts masked."""
    N, T, _ = hidden.shape
    head = Head(hidden, weight, bias, opts)
    chunk = head.chunk(chunk_bytes, lean=False)
    rows = completion_rows(labels, ignore_index, shift, pair_major=False, cu=cu)
    out = RowOutputs(head, rows, N, T, with_stats, shard)
    for sl in row_chunks(rows.M, chunk):
        out.chunk(sl)
    out.finish()
    token_logps = _ops.rows_to_positions(out.row_logps.view(N, T), shift)
    stats = None
    if with_stats:
        stats = _ops.rows_to_positions(out.stats.view(4 * N, T), shift).view(4, N, T)
    lse_rows = torch.zeros(N * T, dtype=out.lse.dtype, device=hidden.device)
    lse_rows[rows.idx] = out.lse
    valid_pos = _ops.valid_positions(labels, ignore_index, shift)
    if cu is None:
        logps, num_tokens = token_logps.sum(1), valid_pos.sum(1)
    else:
        logps, num_tokens = _ops.segment_sum(token_logps[0], cu), _ops.segment_sum(valid_pos[0].long(), cu)
    # on the CPU: the backward reads it without a sync (-1: unknown, a capture took every row)
    counts = torch.tensor(rows.counts if rows.counts is not None else [-1] * num_tokens.numel(), dtype=torch.int64)
    return token_logps, lse_rows, stats, logps, num_tokens, counts


def sequence_logps_backward(hidden, weight, bias, labels, lse_rows, coef, counts, *, ignore_index: int,
                            shift: bool, opts: LogitOptions, chunk_bytes: Optional[int], lean: bool,
                            needs: Sequence[bool], shard: Optional[Shard] = None, cu: Optional[torch.Tensor] = None):
    """Gradients of ``linear_sequence_logps`` from ``coef`` (N, T) at positions (d loss / d token log-prob):
    (hidden's, weight's, bias's), None where not needed. ``counts``: the forward's row counts (no host read)."""
    head = Head(hidden, weight, bias, opts)
    chunk = head.chunk(chunk_bytes, lean)
    rows = completion_rows(labels, ignore_index, shift, pair_major=False, counts=counts, cu=cu)
    grads = Grads(hidden, weight, bias, needs, lean)
    if grads.any:
        out = _Saved(rows.targets if shard is None else shard.local(rows.targets), lse_rows[rows.idx])
        row_coef = _ops.positions_to_rows(coef, shift).reshape(-1)[rows.idx].to(head.acc_dtype)
        recompute_grads(head, rows, out, row_coef, grads, chunk, lean, head.buffer_bytes(chunk))
        if shard is not None:
            shard.sum_hidden_grad(grads)
    return grads.finish(hidden, weight, bias)


@dataclass
class _Saved:
    """What ``recompute_grads`` reads of a forward: the kernels' targets and the lse of the completion rows."""

    targets: torch.Tensor
    lse: torch.Tensor


@dataclass
class DPOOutputs:
    loss: torch.Tensor  # ()
    logps: torch.Tensor  # (2B,) LD-DPO weighted when on
    num_tokens: torch.Tensor  # (2B,) int64
    seq_stats: torch.Tensor  # (4, 2B)
    rewards: torch.Tensor  # (2B,)
    metrics: torch.Tensor  # (10,) in _head.METRICS order
    grads: Tuple[Optional[torch.Tensor], ...]  # hidden's, weight's, bias's (None where not needed)


class _PairHead:
    """The loss head over the batch's pairs, as their log-probs come in: per-sequence sums of the rows' outputs
    (LD-DPO weighted when on), the head on pairs [p0, p1), and the resulting coefficient of each completion row."""

    def __init__(self, out: RowOutputs, rows: Rows, labels, ref_c, ref_r, p: _head.HeadParams, ignore_index, shift,
                 cu: Optional[torch.Tensor] = None):
        N, T = labels.shape
        S = N if cu is None else cu.numel() - 1
        self.out, self.rows, self.refs, self.p, self.N, self.T, self.S, self.cu = (
            out, rows, (ref_c, ref_r), p, N, T, S, cu)
        dev, cdt = labels.device, out.row_logps.dtype
        valid_pos = _ops.valid_positions(labels, ignore_index, shift)
        self.num_tokens = self._seq_sums(valid_pos.reshape(-1).long())
        self.token_w = None  # LD-DPO: per-row weights (N * T,)
        if p.ld:
            w = (ld_token_weights(valid_pos, p.ld_alpha) if cu is None
                 else ld_token_weights_packed(valid_pos[0], cu, p.ld_alpha)[None])
            self.token_w = _ops.positions_to_rows(w, shift).reshape(-1).to(cdt)
        self.logps = torch.zeros(S, dtype=cdt, device=dev)
        self.sums = torch.zeros(S, dtype=cdt, device=dev) if p.ld else self.logps
        self.seq_stats = torch.zeros(4, S, dtype=cdt, device=dev)
        self.losses = []
        self.coef = self.token = self.rewards = self.metrics = None

    def _seq_sums(self, flat: torch.Tensor, seqs: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Per-sequence sums of per-row values (..., N * T) (of the sequences ``seqs`` only, or all): over a padded
        row, or a packed row's segments (a row lies in the segment of the position it scores)."""
        if self.cu is None:
            v = flat.view(*flat.shape[:-1], self.N, self.T)
            return (v if seqs is None else v[..., seqs, :]).sum(-1)
        out = _ops.segment_sum(flat, self.cu)
        return out if seqs is None else out[..., seqs]

    def run(self, p0: int, p1: int) -> None:
        """Fill the sequences of pairs [p0, p1) and run the head on them: their loss share, the coefficients of
        their sequences (with LD-DPO the token term, flat over tokens, apart), and on the last pairs the rewards and
        metrics of the batch."""
        B = self.S // 2
        dev = self.logps.device
        seqs = torch.cat([torch.arange(p0, p1, device=dev), torch.arange(B + p0, B + p1, device=dev)])
        lp = self.out.row_logps
        if self.token_w is not None:
            self.logps[seqs] = self._seq_sums(lp * self.token_w, seqs)
            self.sums[seqs] = self._seq_sums(lp, seqs)
        else:
            self.logps[seqs] = self._seq_sums(lp, seqs)
        self.seq_stats[:, seqs] = self._seq_sums(self.out.stats, seqs)
        out, coef, rewards, metrics = _head.loss_head(self.logps, self.sums, self.num_tokens, self.seq_stats,
                                                      *self.refs, self.p, pairs=(p0, p1), with_metrics=p1 == B)
        self.losses.append(out[0])
        if self.token_w is not None:  # LD-DPO weighs the pair terms per token; the token term (sft, nll) is flat
            token = torch.zeros_like(coef)
            token[:B] = out[1]
            coef, self.token = coef - token, token
        self.coef = coef
        if p1 == B:
            self.rewards, self.metrics = rewards, metrics

    def row_coef(self, sl: slice) -> torch.Tensor:
        """d loss / d log-prob of completion rows ``sl`` (of pairs the head has run on)."""
        s = self.rows.seq[sl]
        if self.token_w is None:
            return self.coef[s]
        return self.coef[s] * self.token_w[self.rows.idx[sl]] + self.token[s]


def dpo_forward(hidden, weight, bias, labels, ref_c, ref_r, p: _head.HeadParams, *, ignore_index: int,
                shift: bool, opts: LogitOptions, chunk_bytes: Optional[int], lean: bool, needs: Sequence[bool],
                pair_local: bool, shard: Optional[Shard] = None, cu: Optional[torch.Tensor] = None) -> DPOOutputs:
    """The DPO loss of hidden states (2B, T, H) and its gradients (those of the inputs that need one), in one
    pass where it can: the gradients are known with the loss. Grouped mode when each chunk can hold whole pairs
    and each pair's gradient is its own (``pair_local``): a chunk's gradients use its logits still in the buffer
    (3 GEMMs). Otherwise every chunk's log-probs first, the loss, then the gradients (4 GEMMs)."""
    N, T, _ = hidden.shape
    B = (N if cu is None else cu.numel() - 1) // 2
    head = Head(hidden, weight, bias, opts)
    chunk = head.chunk(chunk_bytes, lean)
    rows = completion_rows(labels, ignore_index, shift, pair_major=True, cu=cu)  # step 1: the one host read
    out = RowOutputs(head, rows, N, T, True, shard)
    pairs = _PairHead(out, rows, labels, ref_c, ref_r, p, ignore_index, shift, cu)
    grads = Grads(hidden, weight, bias, needs, lean)
    groups = None
    if grads.any and not lean and shard is None and pair_local:
        groups = pair_groups(rows, B, chunk)
    if groups is not None:  # steps 2-4 per group of pairs, while its logits are in the buffer
        for p0, p1, sl in groups:
            h, z = out.chunk(sl)
            pairs.run(p0, p1)
            if sl.stop > sl.start:
                grads.add_chunk(head, rows.idx[sl], h,
                                head.dlogits(z, out.targets[sl], out.lse[sl], pairs.row_coef(sl)))
    else:
        for sl in row_chunks(rows.M, chunk):  # step 2
            out.chunk(sl)
        out.finish()  # with a shard: one all-gather of every completion row's partials
        pairs.run(0, B)  # step 3
        if grads.any:  # step 4
            recompute_grads(head, rows, out, pairs.row_coef(slice(0, rows.M)), grads, chunk, lean,
                            head.buffer_bytes(chunk))
    if shard is not None:
        shard.sum_hidden_grad(grads)
    loss = torch.stack(pairs.losses).sum()
    return DPOOutputs(loss, pairs.logps, pairs.num_tokens, pairs.seq_stats, pairs.rewards, pairs.metrics,
                      grads.finish(hidden, weight, bias))
