"""The textbook PyTorch baseline: log_softmax in fp32 -> gather -> mask -> sum.

It materialises an fp32 copy of the logits and autograd keeps it for backward. It is the benchmark
baseline and, run in float64, the tests' oracle.
"""

import torch


def naive_token_logps(logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100,
                      shift: bool = True, dtype: torch.dtype = torch.float32):
    """(token_logps (N, T) aligned with labels, 0 where masked; mask (N, T) bool)."""
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    mask = labels != ignore_index
    logp = torch.log_softmax(logits.to(dtype), dim=-1)
    tok = torch.gather(logp, 2, torch.where(mask, labels, 0).long().unsqueeze(-1)).squeeze(-1)
    tok = torch.where(mask, tok, 0.0)
    if shift:
        tok = torch.nn.functional.pad(tok, (1, 0))
        mask = torch.nn.functional.pad(mask, (1, 0))
    return tok, mask


def naive_sequence_logps(logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100,
                         shift: bool = True, average: bool = False, dtype: torch.dtype = torch.float32):
    """(logps (N,), num_tokens (N,))."""
    tok, mask = naive_token_logps(logits, labels, ignore_index=ignore_index, shift=shift, dtype=dtype)
    num = mask.sum(-1)
    logps = tok.sum(-1)
    if average:
        logps = torch.where(num > 0, logps / num.clamp(min=1), 0.0)
    return logps, num
