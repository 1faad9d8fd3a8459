"""Stored reference log-probs: correct numbers, bit-identical after a SIGKILL and resume, loud on mismatch."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("transformers")

import fastdpo  # noqa: E402
from fastdpo.reference import collate_pairs  # noqa: E402
from trl_utils import tiny_llama, tiny_tokenizer, WORDS  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def examples(n=10, seed=0):
    tok = tiny_tokenizer()
    g = torch.Generator().manual_seed(seed)

    def words(k):
        return " ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (k,), generator=g))
    out = []
    for _ in range(n):
        ex = {key: tok(words(int(torch.randint(2, 7, (1,), generator=g))), add_special_tokens=False)["input_ids"]
              for key in ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")}
        out.append(ex)
    return tok, out


def test_values_equal_the_reference_model(tmp_path):
    tok, data = examples()
    model = tiny_llama(len(tok))
    refs = fastdpo.precompute_reference_logps(model, data, str(tmp_path / "ref.safetensors"), tokenizer=tok,
                                              batch_size=3, progress=False)
    batch = collate_pairs(data, tok.pad_token_id)
    with torch.no_grad():
        lp = fastdpo.sequence_logps(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                                    batch["labels"]).logps
    torch.testing.assert_close(refs.chosen, lp[:10], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(refs.rejected, lp[10:], rtol=1e-5, atol=1e-4)
    c, r = refs[[1, 4]]
    assert torch.equal(c, refs.chosen[[1, 4]]) and torch.equal(r, refs.rejected[[1, 4]])


def test_sigkill_then_resume_is_identical(tmp_path):
    tok, data = examples()
    full = tmp_path / "full.safetensors"
    fastdpo.precompute_reference_logps(tiny_llama(len(tok)), data, str(full), tokenizer=tok, batch_size=3,
                                       progress=False)
    part = tmp_path / "part.safetensors"
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {HERE!r})
        import fastdpo.reference as R
        from test_reference_cache import examples
        from trl_utils import tiny_llama
        writes = 0
        original = R._write_atomic
        def write_then_die(*args):
            global writes
            original(*args)
            writes += 1
            if writes == 2:
                os.kill(os.getpid(), signal.SIGKILL)
        R._write_atomic = write_then_die
        tok, data = examples()
        R.precompute_reference_logps(tiny_llama(len(tok)), data, {str(part)!r}, tokenizer=tok, batch_size=3,
                                     progress=False)
    """)
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    partial = fastdpo.ReferenceLogps.open(str(part), allow_partial=True)
    assert int(partial.done.sum()) == 6
    with pytest.raises(ValueError, match="incomplete"):
        fastdpo.ReferenceLogps.open(str(part))
    fastdpo.precompute_reference_logps(tiny_llama(len(tok)), data, str(part), tokenizer=tok, batch_size=3,
                                       progress=False)
    a, b = fastdpo.ReferenceLogps.open(str(full)), fastdpo.ReferenceLogps.open(str(part))
    assert torch.equal(a.chosen, b.chosen) and torch.equal(a.rejected, b.rejected)
    # identical caches: the same tensors and metadata (safetensors orders metadata keys arbitrarily on disk)
    assert a.meta == b.meta and torch.equal(a.done, b.done)


def test_mismatch_and_corruption_fail_loudly(tmp_path):
    tok, data = examples()
    model = tiny_llama(len(tok))
    path = tmp_path / "ref.safetensors"
    fastdpo.precompute_reference_logps(model, data, str(path), tokenizer=tok, batch_size=4, progress=False)
    fastdpo.ReferenceLogps.open(str(path), ref_model=model, tokenizer=tok, data=data)  # the right ones: fine
    other = tiny_llama(len(tok), seed=1)
    with pytest.raises(ValueError, match="fingerprint"):
        fastdpo.ReferenceLogps.open(str(path), ref_model=other, tokenizer=tok, data=data)
    with pytest.raises(ValueError, match="fingerprint"):
        fastdpo.ReferenceLogps.open(str(path), ref_model=model, tokenizer=tok, data=data[:-1])
    with pytest.raises(ValueError, match="fingerprint"):  # resuming against other data refuses too
        fastdpo.precompute_reference_logps(model, data[:-1], str(path), tokenizer=tok, batch_size=4, progress=False)
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0xFF  # a flipped bit in the tensor data
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="checksum"):
        fastdpo.ReferenceLogps.open(str(bad))
    bad.write_bytes(path.read_bytes()[: len(raw) // 2])  # truncated
    with pytest.raises(ValueError, match="not a readable"):
        fastdpo.ReferenceLogps.open(str(bad))
