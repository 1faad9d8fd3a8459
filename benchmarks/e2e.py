"""One DPO training step of a Llama-3.2-1B-shaped model, the loss computed six ways: time per step and peak memory.

    python -m benchmarks.e2e [--device cpu|cuda] [--size 1b|tiny] [--repeats N] [--trainer] [--in-process] [--out FILE.json]

The step is what a trainer runs per micro-batch once the reference log-probs are stored: the policy forward,
the loss, the backward (no optimizer step). The model has random weights (hidden 2048, 16 layers, 32 heads,
8 KV heads, V = 128256, tied head: Llama-3.2-1B's shape; bf16 on GPU, fp32 on CPU), the batch 4 pairs x 2048
tokens with a 1/8 prompt (``--size tiny``: a 2-layer, hidden-64, V = 1000 model, 2 pairs x 64 tokens, for CPU
and the tests). The six ways:

- ``naive``: the model's logits, ``log_softmax``, gather, mask, sum (TRL 0.x's path), the sigmoid loss;
- ``trl_logits``: the logits through TRL's ``selective_log_softmax``, the sigmoid loss;
- ``fastdpo_logits``: the logits through ``fastdpo.dpo_loss`` (every metric computed);
- ``trl_fused_head``: the backbone's hidden states through TRL 1.16's fused LM head (``_ChunkedLogProbFunction``,
  with the entropy / mean-logit / top-1 outputs its DPOTrainer requests), the sigmoid loss;
- ``liger_fused_linear``: hidden states through Liger's ``LigerFusedLinearDPOLoss`` (reference-free: Liger takes
  reference log-probs only through a reference model);
- ``fastdpo_linear``: hidden states through ``fastdpo.linear_dpo_loss`` (every metric computed).

With ``--trainer``, two more rows: TRL's ``DPOTrainer`` itself on the same model and batch shape (a dataset of
random word sequences, an in-memory tokenizer, reference log-probs precomputed by TRL before training), a dozen
optimizer steps as shipped (``trl_trainer``) and with ``fastdpo.integrations.trl.patch()`` (``trl_trainer_fastdpo``):
the median step time (optimizer included) and peak memory.

On the logits ways the model builds (2B, T, V) logits; on the hidden ways it never does. Each way runs in a
fresh process (peak memory in isolation) unless ``--in-process``; the five ways with reference log-probs must
give the same loss (checked, within the dtype's rounding), Liger's its own. Peak memory is what the step
allocates beyond the model and its inputs (CUDA ``max_memory_allocated``; CPU resident high-water mark).
"""

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from benchmarks.runner import peak_extra_bytes

WAYS = ("naive", "trl_logits", "fastdpo_logits", "trl_fused_head", "liger_fused_linear", "fastdpo_linear")
TRAINER_WAYS = ("trl_trainer", "trl_trainer_fastdpo")
TRAINER_STEPS = 12
SIZES = {
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, pairs=4, tokens=2048),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1000, pairs=2, tokens=64),
}
BETA = 0.1


def unavailable(way: str) -> str:
    module = {"trl_logits": "trl.trainer.utils", "trl_fused_head": "trl.trainer.utils",
              "liger_fused_linear": "liger_kernel.chunked_loss", "trl_trainer": "trl",
              "trl_trainer_fastdpo": "trl"}.get(way)
    if module:
        try:
            __import__(module)
        except Exception as e:  # noqa: BLE001
            return f"{module} not importable: {type(e).__name__}"
    return ""


def build(size: str, device: str, seed: int = 0):
    """(model, input_ids (2B, T), attention_mask, labels with the prompt at -100, ref_chosen (B,), ref_rejected)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    s = dict(SIZES[size])
    pairs, tokens = s.pop("pairs"), s.pop("tokens")
    torch.manual_seed(seed)
    cfg = LlamaConfig(**s, max_position_embeddings=max(tokens, 128), tie_word_embeddings=True, pad_token_id=0,
                      bos_token_id=1, eos_token_id=2)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = LlamaForCausalLM(cfg).to(device=device, dtype=dtype)
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, cfg.vocab_size, (2 * pairs, tokens), generator=g)
    labels = input_ids.clone()
    labels[:, : tokens // 8] = -100  # the prompt
    ref = -2.0 * tokens * torch.rand(2 * pairs, generator=g) - tokens  # stored reference log-probs
    mask = torch.ones_like(input_ids)
    to = dict(device=device)
    return (model, input_ids.to(**to), mask.to(**to), labels.to(**to), ref[:pairs].to(**to), ref[pairs:].to(**to))


def _sigmoid(logps, ref_c, ref_r):
    B = logps.shape[0] // 2
    return -torch.nn.functional.logsigmoid(BETA * ((logps[:B] - ref_c) - (logps[B:] - ref_r))).mean()


def step_fn(way: str, model, input_ids, attention_mask, labels, ref_c, ref_r):
    """A zero-argument callable running one step (forward, loss, backward); returns the loss (detached)."""
    shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)  # the label each position scores
    weight = model.lm_head.weight  # tied: the embedding matrix

    def logits():
        return model(input_ids=input_ids, attention_mask=attention_mask).logits

    def hidden():
        return model.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    if way == "naive":
        from fastdpo.naive import naive_token_logps

        def loss():
            tok, _ = naive_token_logps(logits(), labels)
            return _sigmoid(tok.sum(-1), ref_c, ref_r)
    elif way == "trl_logits":
        from trl.trainer.utils import selective_log_softmax

        def loss():
            tok = selective_log_softmax(logits()[:, :-1], shifted[:, :-1].clamp(min=0))
            return _sigmoid((tok * (shifted[:, :-1] != -100)).sum(-1), ref_c, ref_r)
    elif way == "fastdpo_logits":
        import fastdpo

        def loss():
            return fastdpo.dpo_loss(logits(), labels, ref_c, ref_r, beta=BETA).loss
    elif way == "trl_fused_head":
        from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE, _ChunkedLogProbFunction

        def loss():
            h = hidden()
            N, T, H = h.shape
            lp = _ChunkedLogProbFunction.apply(h.reshape(-1, H), weight, None, shifted.clamp(min=0).reshape(-1), 1.0,
                                               _CHUNKED_LOGPROB_CHUNK_SIZE, None, 1.0,
                                               ("entropy", "mean_logits", "is_top1"))[0]
            return _sigmoid(lp.view(N, T).masked_fill(shifted == -100, 0).sum(1), ref_c, ref_r)
    elif way == "liger_fused_linear":
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

        liger = LigerFusedLinearDPOLoss(beta=BETA, compiled=False, use_ref_model=False)

        def loss():
            return liger(weight, hidden(), shifted)[0]
    elif way == "fastdpo_linear":
        import fastdpo

        def loss():
            return fastdpo.linear_dpo_loss(hidden(), weight, labels, ref_c, ref_r, beta=BETA).loss
    else:
        raise ValueError(f"unknown way {way!r}; expected one of {WAYS}")

    def step():
        model.zero_grad(set_to_none=True)
        out = loss()
        out.backward()
        return out.detach()
    return step


def measure_trainer(way: str, size: str, device: str) -> dict:
    """TRL's DPOTrainer, shipped or patched: median step time after two warm-up steps, peak memory of training."""
    import copy

    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ[var] = "1"
    if way == "trl_trainer_fastdpo":
        import fastdpo.integrations.trl as fdt

        fdt.patch()
    model, input_ids, *_ = build(size, device)
    pairs, tokens = input_ids.shape[0] // 2, input_ids.shape[1]
    words = {f"w{i}": i + 4 for i in range(min(model.config.vocab_size - 4, 5000))}
    tok = PreTrainedTokenizerFast(
        tokenizer_object=_word_tokenizer(Tokenizer, models, pre_tokenizers, words), bos_token="<s>", eos_token="</s>",
        pad_token="<pad>", unk_token="<unk>")
    g = torch.Generator().manual_seed(0)
    names = list(words)

    def sentence(k):
        return " ".join(names[int(i)] for i in torch.randint(0, len(names), (k,), generator=g))
    n_rows = pairs * (TRAINER_STEPS + 2)
    prompt, completion = tokens // 8, tokens - tokens // 8 - 2  # bos / eos
    data = Dataset.from_dict({"prompt": [sentence(prompt) for _ in range(n_rows)],
                              "chosen": [" " + sentence(completion) for _ in range(n_rows)],
                              "rejected": [" " + sentence(completion) for _ in range(n_rows)]})
    cuda = device == "cuda"
    args = DPOConfig(output_dir="/tmp/fastdpo-e2e-trainer", per_device_train_batch_size=pairs,
                     max_steps=TRAINER_STEPS + 2, learning_rate=1e-6, report_to="none", save_strategy="no",
                     logging_steps=1, seed=0, use_cpu=not cuda, bf16=cuda, precompute_ref_log_probs=True,
                     max_length=None)
    times, sync = [], (torch.cuda.synchronize if cuda else (lambda: None))

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            sync()
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            sync()
            times.append((time.perf_counter() - self.t0) * 1e3)

    trainer = DPOTrainer(model=model, ref_model=copy.deepcopy(model), args=args, train_dataset=data,
                         processing_class=tok, callbacks=[Clock()])
    _, peak = peak_extra_bytes(trainer.train, cuda)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"way": way, "median_ms": statistics.median(times[2:]), "min_ms": min(times[2:]),
            "repeats": len(times) - 2, "peak_mem_bytes": int(peak), "loss": float(losses[0])}


def _word_tokenizer(Tokenizer, models, pre_tokenizers, words):
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **words}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tok


def measure(way: str, size: str, device: str, repeats: int) -> dict:
    why = unavailable(way)
    if why:
        return {"way": way, "skipped": why}
    if way in TRAINER_WAYS:
        return measure_trainer(way, size, device)
    model, *batch = build(size, device)
    step = step_fn(way, model, *batch)
    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    step()  # warm-up: compiles, allocator and gradient buffers
    sync()
    model.zero_grad(set_to_none=True)
    loss, peak = peak_extra_bytes(step, cuda)
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return {"way": way, "median_ms": statistics.median(times), "min_ms": min(times), "repeats": repeats,
            "peak_mem_bytes": int(peak), "loss": float(loss)}


def run_way(way: str, size: str, device: str, repeats: int, in_process: bool) -> dict:
    if in_process:
        return measure(way, size, device, repeats)
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([here, os.environ.get("PYTHONPATH", "")])}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-m", "benchmarks.e2e", "--way", way, "--size", size, "--device", device,
                           "--repeats", str(repeats)], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"way": way, "skipped": "failed: " + (proc.stderr.strip().splitlines() or ["?"])[-1][:200]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def check_losses(rows, device: str) -> None:
    """The ways with reference log-probs compute the same loss, and so do the two trainer rows: within fp32
    rounding on CPU, bf16's on GPU."""
    tol = 2e-2 if device == "cuda" else 1e-4
    for group in (set(WAYS) - {"liger_fused_linear"}, set(TRAINER_WAYS)):
        losses = {r["way"]: r["loss"] for r in rows if "loss" in r and r["way"] in group}
        if len(losses) < 2:
            continue
        first, ref = next(iter(losses.items()))
        bad = {w: v for w, v in losses.items() if abs(v - ref) > tol * max(1.0, abs(ref))}
        if bad:
            raise SystemExit(f"the ways disagree on the loss: {first} {ref}, {bad}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--size", choices=tuple(SIZES), default=None, help="default: 1b on CUDA, tiny on CPU")
    p.add_argument("--repeats", type=int, default=None, help="timed steps (default: 10 on CUDA, 3 on CPU)")
    p.add_argument("--in-process", action="store_true", help="every way in this process (memory not isolated)")
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    p.add_argument("--trainer", action="store_true", help="also TRL's DPOTrainer, shipped and patched")
    p.add_argument("--way", choices=WAYS + TRAINER_WAYS, default=None, help=argparse.SUPPRESS)  # for subprocesses
    a = p.parse_args(argv)
    size = a.size or ("1b" if a.device == "cuda" else "tiny")
    repeats = a.repeats or (10 if a.device == "cuda" else 3)
    if a.way:
        print(json.dumps(measure(a.way, size, a.device, repeats)))
        return 0
    device_name = torch.cuda.get_device_name() if a.device == "cuda" else f"CPU, {os.cpu_count()} cores"
    print(f"one DPO step, Llama-3.2-1B-shaped model ({size}), {device_name}")
    rows = []
    for way in WAYS + (TRAINER_WAYS if a.trainer else ()):
        r = run_way(way, size, a.device, repeats, a.in_process)
        rows.append(r)
        print(json.dumps(r), flush=True)
    base = next((r for r in rows if r["way"] == "naive" and "median_ms" in r), None)
    print("\n| way | ms / step | peak extra MiB | speed-up vs naive | loss |\n|---|---:|---:|---:|---:|")
    for r in rows:
        if "skipped" in r:
            print(f"| {r['way']} | skipped: {r['skipped']} | | | |")
            continue
        sp = f"{base['median_ms'] / r['median_ms']:.2f}x" if base and r["way"] in WAYS else "-"
        print(f"| {r['way']} | {r['median_ms']:.1f} | {r['peak_mem_bytes'] / 2 ** 20:.0f} | {sp} | {r['loss']:.6g} |")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"device": device_name, "size": size, "date": datetime.date.today().isoformat(),
                       "torch": torch.__version__, "rows": rows}, f, indent=1)
    check_losses(rows, a.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
