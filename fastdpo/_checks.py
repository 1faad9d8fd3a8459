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
