"""One DPO training step of a Llama-3.2-1B-shaped model, the loss computed eight ways: time per step and peak memory.

    python -m benchmarks.e2e [--device cpu|cuda] [--size 1b|tiny] [--repeats N] [--trainer] [--in-process]
                             [--lengths ultrafeedback|full] [--attn sdpa|eager|flash_attention_2] [--out FILE.json]

The step is what a trainer runs per micro-batch once the reference log-probs are stored: the policy forward,
the loss, the backward (no optimizer step). The model has random weights (hidden 2048, 16 layers, 32 heads,
8 KV heads, V = 128256, tied head: Llama-3.2-1B's shape; bf16 on GPU, fp32 on CPU), the batch 4 pairs x 2048
tokens with a 1/8 prompt (``--size tiny``: a 2-layer, hidden-64, V = 1000 model, 2 pairs x 64 tokens, for CPU
and the tests) with ``--lengths full``; by default (``--lengths ultrafeedback``) the lengths are drawn like
UltraFeedback's (lognormal; LENGTHS below), 8 pairs at ``max_length`` 1024 (tiny too), right-padded to
the batch's longest as TRL's collator pads: the padded ways run the padding, the packed ways only the real tokens.
The ways:

- ``naive``: the model's logits, ``log_softmax``, gather, mask, sum (TRL 0.x's path), the sigmoid loss;
- ``trl_logits``: the logits through TRL's ``selective_log_softmax``, the sigmoid loss;
- ``fastdpo_logits``: the logits through ``fastdpo.dpo_loss`` (every metric computed);
- ``trl_fused_head``: the backbone's hidden states through TRL 1.16's fused LM head (``_ChunkedLogProbFunction``,
  with the entropy / mean-logit / top-1 outputs its DPOTrainer requests), the sigmoid loss;
- ``liger_fused_linear``: hidden states through Liger's ``LigerFusedLinearDPOLoss`` (reference-free: Liger takes
  reference log-probs only through a reference model);
- ``fastdpo_linear``: hidden states through ``fastdpo.linear_dpo_loss`` (every metric computed);
- ``fastdpo_logits_packed``: the batch packed (``pack_batch``: one row, no padding), the model's logits of it
  through ``fastdpo.dpo_loss(..., cu_seqlens=)``;
- ``fastdpo_linear_packed``: the packed batch through ``fastdpo.policy_dpo_loss`` (backbone + fused linear).

With ``--trainer``, two more rows: TRL's ``DPOTrainer`` itself on the same model and batch shape (a dataset of
random word sequences, an in-memory tokenizer, reference log-probs precomputed by TRL before training), a dozen
optimizer steps as shipped (``trl_trainer``), with ``fastdpo.integrations.trl.patch()`` (``trl_trainer_fastdpo``)
and patched with ``padding_free=True`` (``trl_trainer_fastdpo_packed``): the median step time (optimizer included)
and peak memory.

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
import textwrap
import time

import torch

from benchmarks.runner import peak_extra_bytes

WAYS = ("naive", "trl_logits", "fastdpo_logits", "trl_fused_head", "liger_fused_linear", "fastdpo_linear",
        "fastdpo_logits_packed", "fastdpo_linear_packed")
PACKED_WAYS = ("fastdpo_logits_packed", "fastdpo_linear_packed")
TRAINER_WAYS = ("trl_trainer", "trl_trainer_fastdpo", "trl_trainer_fastdpo_packed")
TRAINER_STEPS = 12
SIZES = {
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, pairs=4, tokens=2048),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1000, pairs=2, tokens=64),
}
# ``--lengths ultrafeedback``: prompt, chosen and rejected lengths drawn lognormal with these medians (tokens) and
# sigma, like UltraFeedback's; each sequence is prompt + completion truncated to ``max_length`` (TRL's
# keep_start), the batch padded to its longest. Per size: pairs per batch and max_length.
LENGTHS = {"medians": {"prompt": 100, "chosen": 250, "rejected": 200}, "sigma": 0.9}
LENGTH_BATCH = {"1b": dict(pairs=8, max_length=1024), "tiny": dict(pairs=8, max_length=1024)}


def draw_lengths(pairs: int, max_length: int, seed: int = 0):
    """(prompt lengths (B,), sequence lengths (2B,): chosen then rejected) from LENGTHS."""
    g = torch.Generator().manual_seed(seed)

    def draw(median):
        z = torch.randn(pairs, generator=g, dtype=torch.float64)
        return (median * torch.exp(LENGTHS["sigma"] * z)).round().clamp(min=1).long()
    prompt = draw(LENGTHS["medians"]["prompt"]).clamp(max=max_length - 1)
    chosen, rejected = draw(LENGTHS["medians"]["chosen"]), draw(LENGTHS["medians"]["rejected"])
    return prompt, (prompt.repeat(2) + torch.cat([chosen, rejected])).clamp(max=max_length)
BETA = 0.1


def unavailable(way: str) -> str:
    module = {"trl_logits": "trl.trainer.utils", "trl_fused_head": "trl.trainer.utils",
              "liger_fused_linear": "liger_kernel.chunked_loss", "trl_trainer": "trl",
              "trl_trainer_fastdpo": "trl", "trl_trainer_fastdpo_packed": "trl"}.get(way)
    if module:
        try:
            __import__(module)
        except Exception as e:  # noqa: BLE001
            return f"{module} not importable: {type(e).__name__}"
    return ""


def build(size: str, device: str, seed: int = 0, lengths: str = "full", attn: str = "sdpa"):
    """(model, input_ids (2B, T), attention_mask, labels with the prompt and padding at -100, ref_chosen (B,),
    ref_rejected). ``lengths="full"``: every sequence ``tokens`` long with a 1/8 prompt; ``"ultrafeedback"``:
    drawn from LENGTHS, right-padded to the batch's longest."""
    from transformers import LlamaConfig, LlamaForCausalLM

    s = dict(SIZES[size])
    pairs, tokens = s.pop("pairs"), s.pop("tokens")
    if lengths == "ultrafeedback":
        pairs, tokens = LENGTH_BATCH[size]["pairs"], LENGTH_BATCH[size]["max_length"]
    torch.manual_seed(seed)
    cfg = LlamaConfig(**s, max_position_embeddings=max(tokens, 128), tie_word_embeddings=True, pad_token_id=0,
                      bos_token_id=1, eos_token_id=2, attn_implementation=attn)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = LlamaForCausalLM(cfg).to(device=device, dtype=dtype)
    g = torch.Generator().manual_seed(seed)
    if lengths == "ultrafeedback":
        prompt, seq = draw_lengths(pairs, tokens, seed)
        tokens = int(seq.max())
        pos = torch.arange(tokens)[None]
        mask = (pos < seq[:, None]).long()
        input_ids = torch.randint(3, cfg.vocab_size, (2 * pairs, tokens), generator=g).masked_fill(mask == 0, 0)
        labels = input_ids.masked_fill((pos < prompt.repeat(2)[:, None]) | (mask == 0), -100)
    else:
        input_ids = torch.randint(3, cfg.vocab_size, (2 * pairs, tokens), generator=g)
        labels = input_ids.clone()
        labels[:, : tokens // 8] = -100  # the prompt
        mask = torch.ones_like(input_ids)
    ref = -2.0 * tokens * torch.rand(2 * pairs, generator=g) - tokens  # stored reference log-probs
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
    elif way in PACKED_WAYS:  # the padding taken out once per batch (as a collator would), then one packed row
        import fastdpo
        from fastdpo.integrations.hf import pack_batch, packed_forward_kwargs

        packed = pack_batch(input_ids, attention_mask, labels)
        if way == "fastdpo_logits_packed":
            forward_kwargs = packed_forward_kwargs(model, packed.cu_seqlens, packed.max_seqlen, packed.num_tokens)

            def loss():
                logits_packed = model(input_ids=packed.input_ids, **forward_kwargs).logits
                return fastdpo.dpo_loss(logits_packed, packed.labels, ref_c, ref_r, beta=BETA,
                                        cu_seqlens=packed.cu_seqlens).loss
        else:
            def loss():
                return fastdpo.policy_dpo_loss(model, **packed.model_inputs(), ref_chosen_logps=ref_c,
                                               ref_rejected_logps=ref_r, beta=BETA).loss
    else:
        raise ValueError(f"unknown way {way!r}; expected one of {WAYS}")

    def step():
        model.zero_grad(set_to_none=True)
        out = loss()
        out.backward()
        return out.detach()
    return step


def measure_trainer(way: str, size: str, device: str, lengths: str = "full", attn: str = "sdpa") -> dict:
    """TRL's DPOTrainer, shipped or patched: median step time after two warm-up steps, peak memory of training."""
    import copy

    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ[var] = "1"
    if way in ("trl_trainer_fastdpo", "trl_trainer_fastdpo_packed"):
        import fastdpo.integrations.trl as fdt

        fdt.patch()
    model, input_ids, *_ = build(size, device, lengths=lengths, attn=attn)
    pairs, tokens = input_ids.shape[0] // 2, input_ids.shape[1]
    if lengths == "ultrafeedback":
        tokens = LENGTH_BATCH[size]["max_length"]
    words = {f"w{i}": i + 4 for i in range(min(model.config.vocab_size - 4, 5000))}
    tok = PreTrainedTokenizerFast(
        tokenizer_object=_word_tokenizer(Tokenizer, models, pre_tokenizers, words), bos_token="<s>", eos_token="</s>",
        pad_token="<pad>", unk_token="<unk>")
    g = torch.Generator().manual_seed(0)
    names = list(words)

    def sentence(k):
        return " ".join(names[int(i)] for i in torch.randint(0, len(names), (k,), generator=g))
    n_rows = pairs * (TRAINER_STEPS + 2)
    if lengths == "ultrafeedback":  # per-example lengths from LENGTHS; TRL truncates to max_length
        gl = torch.Generator().manual_seed(1)
        med, sigma = LENGTHS["medians"], LENGTHS["sigma"]

        def draw(name):
            z = torch.randn(n_rows, generator=gl, dtype=torch.float64)
            return (med[name] * torch.exp(sigma * z)).round().clamp(min=1).long().tolist()
        lens = {name: draw(name) for name in ("prompt", "chosen", "rejected")}
    else:
        lens = {"prompt": [tokens // 8] * n_rows, "chosen": [tokens - tokens // 8 - 2] * n_rows}  # bos / eos
        lens["rejected"] = lens["chosen"]
    data = Dataset.from_dict({"prompt": [sentence(k) for k in lens["prompt"]],
                              "chosen": [" " + sentence(k) for k in lens["chosen"]],
                              "rejected": [" " + sentence(k) for k in lens["rejected"]]})
    cuda = device == "cuda"
    args = DPOConfig(output_dir="/tmp/fastdpo-e2e-trainer", per_device_train_batch_size=pairs,
                     max_steps=TRAINER_STEPS + 2, learning_rate=1e-6, report_to="none", save_strategy="no",
                     logging_steps=1, seed=0, use_cpu=not cuda, bf16=cuda, precompute_ref_log_probs=True,
                     max_length=tokens if lengths == "ultrafeedback" else None,
                     padding_free=way == "trl_trainer_fastdpo_packed")
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


def measure(way: str, size: str, device: str, repeats: int, lengths: str = "full", attn: str = "sdpa") -> dict:
    why = unavailable(way)
    if why:
        return {"way": way, "skipped": why}
    if way in TRAINER_WAYS:
        return measure_trainer(way, size, device, lengths, attn)
    model, *batch = build(size, device, lengths=lengths, attn=attn)
    mask = batch[1]
    tokens = int(mask.sum()) if way in PACKED_WAYS else mask.numel()  # what the model runs on per step
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
            "peak_mem_bytes": int(peak), "loss": float(loss), "tokens": tokens}


def run_way(way: str, size: str, device: str, repeats: int, in_process: bool, lengths: str = "full",
            attn: str = "sdpa") -> dict:
    if in_process:
        return measure(way, size, device, repeats, lengths, attn)
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([here, os.environ.get("PYTHONPATH", "")])}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-m", "benchmarks.e2e", "--way", way, "--size", size, "--device", device,
                           "--repeats", str(repeats), "--lengths", lengths, "--attn", attn],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"way": way, "skipped": "failed: " + (proc.stderr.strip().splitlines() or ["?"])[-1][:200]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def batch_summary(size: str, lengths: str) -> dict:
    """The step's batch: pairs, padded length, real tokens and the padding fraction."""
    if lengths == "full":
        pairs, tokens = SIZES[size]["pairs"], SIZES[size]["tokens"]
        return {"pairs": pairs, "padded_tokens": 2 * pairs * tokens, "real_tokens": 2 * pairs * tokens,
                "padding": 0.0, "text": f"batch: {pairs} pairs x {tokens} tokens, no padding"}
    pairs, max_length = LENGTH_BATCH[size]["pairs"], LENGTH_BATCH[size]["max_length"]
    _, seq = draw_lengths(pairs, max_length)
    padded, real = 2 * pairs * int(seq.max()), int(seq.sum())
    med = LENGTHS["medians"]
    return {"pairs": pairs, "max_length": max_length, "padded_tokens": padded, "real_tokens": real,
            "padding": 1 - real / padded,
            "text": (f"batch: {pairs} pairs, lengths lognormal (medians prompt {med['prompt']}, chosen "
                     f"{med['chosen']}, rejected {med['rejected']} tokens; sigma {LENGTHS['sigma']}), max_length "
                     f"{max_length}: padded {2 * pairs} x {int(seq.max())} = {padded} tokens, {real} real "
                     f"({1 - real / padded:.0%} padding)")}


PACKING_PAIRS = (("fastdpo_logits", "fastdpo_logits_packed"), ("fastdpo_linear", "fastdpo_linear_packed"),
                 ("trl_trainer_fastdpo", "trl_trainer_fastdpo_packed"))


PACKING_LABELS = {"fastdpo_logits": "dpo_loss on the logits", "fastdpo_linear": "fused linear (policy_dpo_loss)",
                  "trl_trainer_fastdpo": "TRL DPOTrainer, patched"}


def plot_packing(rows, title: str, path: str) -> None:
    """Padded against packed, side by side: time per step and peak extra memory per pair of ways."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_way = {r["way"]: r for r in rows if "median_ms" in r}
    pairs = [(a, b) for a, b in PACKING_PAIRS if a in by_way and b in by_way]
    if not pairs:
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    x = range(len(pairs))
    for ax, key, label, scale in ((axes[0], "median_ms", "ms / step", 1.0),
                                  (axes[1], "peak_mem_bytes", "peak extra MiB", 2 ** -20)):
        padded = [by_way[a][key] * scale for a, _ in pairs]
        packed = [by_way[b][key] * scale for _, b in pairs]
        ax.bar([i - 0.2 for i in x], padded, 0.4, label="padded")
        ax.bar([i + 0.2 for i in x], packed, 0.4, label="packed")
        ax.set_xticks(list(x), [PACKING_LABELS[a] for a, _ in pairs])
        ax.set_ylabel(label)
        ax.legend()
    fig.suptitle("\n".join(textwrap.wrap(title, 120)), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
    p.add_argument("--out", default=None, help="write the rows as JSON here (and, with --lengths ultrafeedback, "
                                               "the padded-vs-packed plot beside it, FILE-packing.png)")
    p.add_argument("--trainer", action="store_true", help="also TRL's DPOTrainer, shipped and patched")
    p.add_argument("--lengths", choices=("ultrafeedback", "full"), default="ultrafeedback",
                   help="sequence lengths: drawn like UltraFeedback's (default; padded ways pad to the longest), or "
                        "every sequence full length (no padding)")
    p.add_argument("--attn", default="sdpa", help="the model's attn_implementation (sdpa, eager, flash_attention_2)")
    p.add_argument("--way", choices=WAYS + TRAINER_WAYS, default=None, help=argparse.SUPPRESS)  # for subprocesses
    a = p.parse_args(argv)
    size = a.size or ("1b" if a.device == "cuda" else "tiny")
    repeats = a.repeats or (10 if a.device == "cuda" else 3)
    if a.way:
        print(json.dumps(measure(a.way, size, a.device, repeats, a.lengths, a.attn)))
        return 0
    device_name = torch.cuda.get_device_name() if a.device == "cuda" else f"CPU, {os.cpu_count()} cores"
    print(f"one DPO step, Llama-3.2-1B-shaped model ({size}, attn {a.attn}), {device_name}")
    batch = batch_summary(size, a.lengths)
    print(batch["text"])
    rows = []
    for way in WAYS + (TRAINER_WAYS if a.trainer else ()):
        r = run_way(way, size, a.device, repeats, a.in_process, a.lengths, a.attn)
        rows.append(r)
        print(json.dumps(r), flush=True)
    base = next((r for r in rows if r["way"] == "naive" and "median_ms" in r), None)
    print("\n| way | tokens through the model | ms / step | peak extra MiB | speed-up vs naive | loss |\n"
          "|---|---:|---:|---:|---:|---:|")
    for r in rows:
        if "skipped" in r:
            print(f"| {r['way']} | skipped: {r['skipped']} | | | | |")
            continue
        sp = f"{base['median_ms'] / r['median_ms']:.2f}x" if base and r["way"] in WAYS else "-"
        print(f"| {r['way']} | {r.get('tokens', '-')} | {r['median_ms']:.1f} | {r['peak_mem_bytes'] / 2 ** 20:.0f} "
              f"| {sp} | {r['loss']:.6g} |")
    if a.out and a.lengths == "ultrafeedback":
        plot_packing(rows, f"padded vs packed, {device_name}, {size}, attn {a.attn}: {batch['text'][7:]}",
                     os.path.splitext(a.out)[0] + "-packing.png")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"device": device_name, "size": size, "attn": a.attn, "lengths": a.lengths,
                       "batch": {k: v for k, v in batch.items() if k != "text"},
                       "date": datetime.date.today().isoformat(), "torch": torch.__version__, "rows": rows}, f,
                      indent=1)
    check_losses(rows, a.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
