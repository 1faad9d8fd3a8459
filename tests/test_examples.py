"""The example users run, and the minimal DPO step of docs/trainers.md, actually train."""

import os
import re
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_example_learns():
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "dpo_tiny.py"), "--steps", "30"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = re.findall(r"loss ([\d.]+)\s+reward margin ([-+\d.]+)", proc.stdout)
    losses, margins = [float(r[0]) for r in rows], [float(r[1]) for r in rows]
    assert len(rows) >= 5
    assert losses[-1] < losses[0] - 0.1 and margins[-1] > margins[0] + 0.5, proc.stdout


def test_docs_dpo_step_runs():
    """The training-loop function docs/trainers.md shows, executed as written on a tiny model."""
    from trl_utils import tiny_llama

    import fastdpo
    from fastdpo.reference import collate_pairs

    readme = open(os.path.join(ROOT, "docs", "trainers.md")).read()
    code = re.search(r"```python\n(import torch, fastdpo\n\ndef dpo_step.*?)```", readme, re.S).group(1)
    scope = {}
    exec(code, scope)
    policy, reference = tiny_llama(40, seed=0), tiny_llama(40, seed=0)
    g = torch.Generator().manual_seed(0)
    exs = [{"prompt_input_ids": torch.randint(3, 40, (3,), generator=g).tolist(),
            "chosen_input_ids": torch.randint(3, 20, (4,), generator=g).tolist(),
            "rejected_input_ids": torch.randint(20, 40, (4,), generator=g).tolist()} for _ in range(4)]
    batch = collate_pairs(exs)
    opt = torch.optim.AdamW(policy.parameters(), lr=3e-3)
    first = scope["dpo_step"](policy, reference, batch, opt)
    for _ in range(10):
        last = scope["dpo_step"](policy, reference, batch, opt)
    assert last[0] < first[0] and last[1] > first[1]
    assert fastdpo.policy_logps(reference, batch["input_ids"], batch["attention_mask"], batch["labels"]) is not None
