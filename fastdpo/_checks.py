"""Input checks shared by every public op: each raises before any kernel runs and names the argument."""

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
LABEL_DTYPES = (torch.int64, torch.int32)


def check_logits_labels(logits, labels, ignore_index: int) -> None:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
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
