"""Input checks shared by every public op: each raises before any kernel runs and names the argument."""

import torch

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # torch built without distributed
    DTensor = ()

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
LABEL_DTYPES = (torch.int64, torch.int32)


def reject_dtensor(name: str, t, hint: str) -> None:
    """A DTensor (a sharded tensor: FSDP2's parameters, tensor-parallel logits) is refused: the op cannot know
    which gradient placement the caller's parallelism needs."""
    if isinstance(t, DTensor):
        raise TypeError(f"{name} is a DTensor (placements {tuple(t.placements)}): {hint}")


def check_logits_labels(logits, labels, ignore_index: int) -> None:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    reject_dtensor("logits", logits, "for logits sharded over the vocabulary (loss_parallel) pass "
                   "logits.to_local() and process_group= (the group over which the vocabulary is split)")
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if logits.dim() != 3:
        raise ValueError(f"logits must be 3-D (N, T, V), got shape {tuple(logits.shape)}")
    if logits.dtype not in FLOAT_DTYPES:
        raise TypeError(f"logits must be float32, bfloat16, float16 or float64, got {logits.dtype}")
    if logits.shape[2] < 1:
        raise ValueError("logits must have a vocabulary dimension of at least 1")
    if labels.dtype not in LABEL_DTYPES:
        raise TypeError(f"labels must be int64 or int32, got {labels.dtype}")
    if tuple(labels.shape) != tuple(logits.shape[:2]):
        raise ValueError(f"labels must have shape (N, T) = {tuple(logits.shape[:2])} matching logits, "
                         f"got {tuple(labels.shape)}")
    if labels.device != logits.device:
        raise ValueError(f"labels are on {labels.device} but logits on {logits.device}")
    if not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    # The label range is checked inside the forward op (fastdpo._library.check_label_range): it reads the
    # labels' values, which a traced graph must not branch on.


def check_cu_seqlens(cu_seqlens, total: int, device: torch.device, *, pairs: bool) -> None:
    """``cu_seqlens`` of a packed batch: a 1-D int32/int64 tensor of S + 1 offsets on the data's device, 0 first,
    non-decreasing, ``total`` (the token count) last; with ``pairs`` (the DPO ops) S even and >= 2. The values are
    checked for CPU tensors; reading them on a GPU would cost a host sync, so there a bad offset gives NaN for the
    sequences it touches instead (the kernels never read through it)."""
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be a torch.Tensor or None, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dim() != 1:
        raise ValueError(f"cu_seqlens must be 1-D (S + 1 offsets), got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.dtype not in LABEL_DTYPES:
        raise TypeError(f"cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
    if cu_seqlens.device != device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but the data on {device}")
    S = cu_seqlens.numel() - 1
    if S < 1:
        raise ValueError("cu_seqlens must hold at least 2 offsets (one sequence)")
    if pairs and S % 2:
        raise ValueError(f"cu_seqlens must hold an even number of sequences (2B: chosen [0, B), rejected [B, 2B)), "
                         f"got {S}")
    if cu_seqlens.device.type == "cpu":
        _check_cu_values(cu_seqlens, total)


def _check_cu_values(cu_seqlens, total: int) -> None:
    cu = cu_seqlens.tolist()
    if cu[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {cu[0]}")
    if any(b < a for a, b in zip(cu, cu[1:])):
        raise ValueError("cu_seqlens must be non-decreasing")
    if cu[-1] != total:
        raise ValueError(f"cu_seqlens must end at the token count {total}, got {cu[-1]}")


def packed_shapes(name: str, t, feature_dims: int):
    """A packed tensor's accepted shapes: (total, *features) or (1, total, *features); returns it as
    (1, total, *features)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() == 1 + feature_dims:
        return t.unsqueeze(0)
    if t.dim() == 2 + feature_dims and t.shape[0] == 1:
        return t
    raise ValueError(f"{name} of a packed batch (cu_seqlens given) must be (total{', ...' * feature_dims}) or "
                     f"(1, total{', ...' * feature_dims}), got shape {tuple(t.shape)}")


def check_inplace(logits: torch.Tensor, inplace_backward: bool) -> None:
    """``inplace_backward`` writes each logit's own gradient into its storage: logits whose elements share memory
    (an expanded tensor) cannot hold them."""
    if inplace_backward and torch._debug_has_internal_overlap(logits) == 1:
        raise ValueError("inplace_backward needs logits whose elements do not share memory (an expanded tensor's "
                         "do): pass a contiguous copy, or inplace_backward=False")
