"""DPO on CPU in under a minute: a tiny random Llama learns to prefer one kind of completion.

    python examples/dpo_tiny.py [--steps 30]

The reference log-probs are computed once and stored (``precompute_reference_logps``); each training step
runs ``fastdpo.policy_dpo_loss``: the policy's backbone and the fused-linear loss on its LM head, inside the
model's forward (so the same step works under DDP or FSDP2), and no logits are ever built.
Chosen completions use the first half of the vocabulary, rejected ones the second: the reward margin grows
as the policy learns that.
"""

import argparse
import os
import sys
import tempfile

import torch

import fastdpo

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from trl_utils import WORDS, tiny_llama, tiny_tokenizer  # noqa: E402


def make_data(tok, n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    half = len(WORDS) // 2

    def words(lo, hi, k):
        return " ".join(WORDS[int(i)] for i in torch.randint(lo, hi, (k,), generator=g))
    ids = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    return [{"prompt_input_ids": ids(words(0, len(WORDS), 4)), "chosen_input_ids": ids(words(0, half, 5)),
             "rejected_input_ids": ids(words(half, len(WORDS), 5))} for _ in range(n)]


def dpo_step(policy, batch, ref_chosen, ref_rejected, optimizer, beta=0.1):
    out = fastdpo.policy_dpo_loss(policy, batch["input_ids"], batch["attention_mask"], batch["labels"], ref_chosen,
                                  ref_rejected, beta=beta)
    optimizer.zero_grad()
    out.loss.backward()
    optimizer.step()
    return out


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=8)
    a = p.parse_args(argv)
    torch.manual_seed(0)
    tok = tiny_tokenizer()
    data = make_data(tok)
    policy = tiny_llama(len(tok), seed=0)
    reference = tiny_llama(len(tok), seed=0)
    with tempfile.TemporaryDirectory() as d:
        refs = fastdpo.precompute_reference_logps(reference, data, os.path.join(d, "ref.safetensors"),
                                                  tokenizer=tok, batch_size=a.batch_size, progress=False)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=3e-3)
    history = []
    for step in range(a.steps):
        idx = [(step * a.batch_size + i) % len(data) for i in range(a.batch_size)]
        batch = fastdpo.reference.collate_pairs([data[i] for i in idx], tok.pad_token_id)
        ref_c, ref_r = refs[idx]
        out = dpo_step(policy, batch, ref_c, ref_r, optimizer)
        m = out.metrics
        history.append((out.loss.item(), m["rewards/margins"].item(), m["rewards/accuracies"].item()))
        if step % 5 == 0 or step == a.steps - 1:
            print(f"step {step:3d}  loss {history[-1][0]:.4f}  reward margin {history[-1][1]:+.4f}  "
                  f"accuracy {history[-1][2]:.2f}", flush=True)
    return history


if __name__ == "__main__":
    main()
