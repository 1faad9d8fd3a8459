"""Stored reference log-probs: run the reference model once, reuse its per-example log-probs for every epoch.

    refs = fastdpo.precompute_reference_logps(ref_model, examples, "ref.safetensors", tokenizer=tok)
    refs = fastdpo.ReferenceLogps.open("ref.safetensors", ref_model=ref_model, tokenizer=tok, data=examples)
    ref_chosen, ref_rejected = refs[batch_indices]            # (B,) each, for a plain loop
    dataset = dataset.add_column("ref_chosen_logps", refs.chosen.tolist())   # TRL's precomputed columns
    dataset = dataset.add_column("ref_rejected_logps", refs.rejected.tolist())

The file is safetensors (no pickle): ``chosen`` and ``rejected`` float32 (n,), ``done`` uint8 (n,), and metadata
holding a fingerprint of the reference weights, the tokenizer and the data, and a SHA-256 checksum of the
tensors. Every batch is written atomically (temporary file, fsync, rename), so a run killed at any point leaves
the last complete file; running again resumes after the examples it holds. Batches have fixed boundaries
(``batch_size``), so a resumed cache holds the same tensors and metadata, bit for bit, as an uninterrupted one
(only the on-disk order of safetensors' metadata keys may differ). A corrupted or truncated file,
or one made from other weights, tokenizer or data, raises ``ValueError`` instead of serving numbers.

An example is a dict with ``prompt_input_ids``, ``chosen_input_ids`` and ``rejected_input_ids`` (lists of token
ids; the completions without the prompt), as TRL tokenizes preference data; ``collate`` can read other layouts.
"""

import hashlib
import json
import os
import tempfile
from typing import Callable, Dict, List, Optional, Sequence

import torch

FORMAT = "fastdpo-reference-logps/1"


def fingerprint(ref_model, tokenizer, data: Sequence) -> str:
    """SHA-256 over the reference's weights (names, shapes, dtypes, bytes), the tokenizer's vocabulary and
    special tokens, and the token ids of every example."""
    h = hashlib.sha256(FORMAT.encode())
    for name, t in sorted(ref_model.state_dict().items()):
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    if tokenizer is not None:
        h.update(json.dumps(tokenizer.get_vocab(), sort_keys=True).encode())
        h.update(json.dumps(getattr(tokenizer, "special_tokens_map", {}), sort_keys=True, default=str).encode())
    for ex in data:
        for key in ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids"):
            h.update(json.dumps([int(i) for i in ex[key]]).encode() if key in ex else b"-")
    return h.hexdigest()


def collate_pairs(examples: List[Dict], pad_token_id: int = 0) -> Dict[str, torch.Tensor]:
    """Examples -> (2B, T) right-padded ``input_ids``, ``attention_mask`` and ``labels`` (prompt and padding
    -100), chosen rows first: the layout every fastdpo loss takes."""
    rows, prompts = [], []
    for side in ("chosen_input_ids", "rejected_input_ids"):
        for ex in examples:
            p = [int(i) for i in ex["prompt_input_ids"]]
            rows.append(p + [int(i) for i in ex[side]])
            prompts.append(len(p))
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    labels = torch.full((len(rows), T), -100, dtype=torch.long)
    for i, (r, p) in enumerate(zip(rows, prompts)):
        ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
        labels[i, p:len(r)] = torch.tensor(r[p:])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _checksum(tensors: Dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        h.update(k.encode())
        h.update(tensors[k].contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _write_atomic(path: str, tensors: Dict[str, torch.Tensor], meta: Dict[str, str]) -> None:
    from safetensors.torch import save_file

    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".safetensors")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={**meta, "checksum": _checksum(tensors)})
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class ReferenceLogps:
    """Per-example reference log-probs from a cache file: ``chosen`` and ``rejected`` (n,) float32."""

    def __init__(self, chosen: torch.Tensor, rejected: torch.Tensor, done: torch.Tensor, meta: Dict[str, str]):
        self.chosen, self.rejected, self.done, self.meta = chosen, rejected, done, meta

    @classmethod
    def open(cls, path: str, *, ref_model=None, tokenizer=None, data: Optional[Sequence] = None,
             expected_fingerprint: Optional[str] = None, allow_partial: bool = False) -> "ReferenceLogps":
        """Read and verify a cache: its checksum always; its fingerprint against ``expected_fingerprint`` or the
        one of ``ref_model``, ``tokenizer`` and ``data`` when given; completeness unless ``allow_partial``."""
        from safetensors import safe_open

        try:
            with safe_open(path, framework="pt") as f:
                meta = dict(f.metadata() or {})
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except FileNotFoundError:
            raise
        except Exception as e:  # safetensors raises its own errors on truncated or garbled headers
            raise ValueError(f"{path} is not a readable reference-log-prob cache ({type(e).__name__}: {e})") from e
        if meta.get("format") != FORMAT or set(tensors) != {"chosen", "rejected", "done"}:
            raise ValueError(f"{path} is not a {FORMAT} file")
        if _checksum(tensors) != meta.get("checksum"):
            raise ValueError(f"{path} is corrupted: its checksum does not match its contents")
        if expected_fingerprint is None and ref_model is not None:
            if data is None:
                raise ValueError("pass data (and the tokenizer) with ref_model to verify the cache's fingerprint")
            expected_fingerprint = fingerprint(ref_model, tokenizer, data)
        if expected_fingerprint is not None and meta.get("fingerprint") != expected_fingerprint:
            raise ValueError(f"{path} was computed from other reference weights, tokenizer or data "
                             "(fingerprint mismatch)")
        refs = cls(tensors["chosen"], tensors["rejected"], tensors["done"].bool(), meta)
        if not allow_partial and not bool(refs.done.all()):
            raise ValueError(f"{path} is incomplete ({int(refs.done.sum())} of {refs.done.numel()} examples): "
                             "run precompute_reference_logps again to finish it")
        return refs

    def __len__(self) -> int:
        return self.chosen.numel()

    def __getitem__(self, index):
        """(ref_chosen_logps, ref_rejected_logps) of the examples at ``index`` (an int, slice, list or tensor)."""
        return self.chosen[index], self.rejected[index]


def precompute_reference_logps(ref_model, data: Sequence, path: str, *, tokenizer=None, batch_size: int = 8,
                               collate: Optional[Callable[[List[Dict]], Dict[str, torch.Tensor]]] = None,
                               progress: bool = True, device=None) -> ReferenceLogps:
    """Run the reference once over ``data`` (fused path, no grad) and write the cache at ``path``; resumes a
    partial cache made from the same weights, tokenizer and data. Returns the finished ``ReferenceLogps``."""
    from fastdpo.integrations.hf import policy_logps

    if collate is None:
        pad = getattr(tokenizer, "pad_token_id", None) or 0
        collate = lambda exs: collate_pairs(exs, pad)  # noqa: E731
    n = len(data)
    fp = fingerprint(ref_model, tokenizer, data)
    meta = {"format": FORMAT, "fingerprint": fp, "batch_size": str(batch_size)}
    if os.path.exists(path):
        refs = ReferenceLogps.open(path, expected_fingerprint=fp, allow_partial=True)
        if refs.meta.get("batch_size") != str(batch_size):
            raise ValueError(f"{path} was made with batch_size={refs.meta.get('batch_size')}: resume with it")
        chosen, rejected, done = refs.chosen.clone(), refs.rejected.clone(), refs.done.to(torch.uint8).clone()
    else:
        chosen, rejected = torch.zeros(n), torch.zeros(n)
        done = torch.zeros(n, dtype=torch.uint8)
    starts = [s for s in range(0, n, batch_size) if not bool(done[s:s + batch_size].all())]
    bar = None
    if progress and starts:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(starts), desc="reference log-probs", unit="batch")
        except ImportError:
            pass
    was_training = ref_model.training
    ref_model.eval()
    device = device or next(ref_model.parameters()).device
    try:
        for s in starts:
            batch = {k: v.to(device) for k, v in collate([data[i] for i in range(s, min(n, s + batch_size))]).items()}
            with torch.no_grad():
                lp = policy_logps(ref_model, batch["input_ids"], batch["attention_mask"], batch["labels"]).logps
            B = lp.shape[0] // 2
            chosen[s:s + B], rejected[s:s + B] = lp[:B].float().cpu(), lp[B:].float().cpu()
            done[s:s + B] = 1
            _write_atomic(path, {"chosen": chosen, "rejected": rejected, "done": done}, meta)
            if bar is not None:
                bar.update(1)
    finally:
        ref_model.train(was_training)
        if bar is not None:
            bar.close()
    if not starts and not os.path.exists(path):
        _write_atomic(path, {"chosen": chosen, "rejected": rejected, "done": done}, meta)
    return ReferenceLogps.open(path, expected_fingerprint=fp)
