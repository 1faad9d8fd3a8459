"""One TRL 0.x DPOTrainer training step (policy forward, reference forward, loss, backward), unpatched and
patched with fastdpo, each in a fresh process: median time and peak extra memory.

    bash tests/trl0/run.sh -q                      # builds .venv-trl0 (TRL 0.28), then:
    .venv-trl0/bin/python -m benchmarks.trl0_step [--pairs 8 --prompt 64 --completion 192 --vocab 32000]

The backbone is a tiny random Llama (hidden 64, 2 layers), so the logits path dominates, as it does for a
large vocabulary. Peak extra memory is the resident high-water mark (reset through /proc/self/clear_refs)
minus the resident size before the step; on CUDA, ``max_memory_allocated`` minus what was held before.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

for _v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ[_v] = "1"


def _rss(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def _run(args):
    import torch
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
    from datasets import Dataset
    from trl_utils import WORDS, dpo_trainer, tiny_llama

    import fastdpo.integrations.trl as fdt

    torch.set_num_threads(min(2, torch.get_num_threads()))
    g = torch.Generator().manual_seed(0)

    def sentence(k):
        return " ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (k,), generator=g))
    data = Dataset.from_dict({"prompt": [sentence(args.prompt) for _ in range(args.pairs)],
                              "chosen": [" " + sentence(args.completion) for _ in range(args.pairs)],
                              "rejected": [" " + sentence(args.completion) for _ in range(args.pairs)]})
    if args.mode == "fastdpo":
        fdt.patch()
    model = tiny_llama(args.vocab)
    cuda = args.device == "cuda"
    trainer = dpo_trainer("/tmp/fastdpo-trl0-bench", model=model, train_dataset=data,
                          per_device_train_batch_size=args.pairs, use_cpu=not cuda, max_length=None,
                          max_prompt_length=None)
    batch = next(iter(trainer.get_train_dataloader()))
    batch = {k: v.to(trainer.model.device) if hasattr(v, "to") else v for k, v in batch.items()}
    trainer.model.train()
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def step():
        trainer.model.zero_grad(set_to_none=True)
        loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()
        sync()
        return loss.detach()

    step()  # warm-up (allocator, first-touch)
    trainer.model.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        loss = step()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        before = _rss("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        loss = step()
        peak = _rss("VmHWM") - before
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1e3)
    import trl
    N, T = 2 * args.pairs, batch["prompt_input_ids"].shape[1] + batch["chosen_input_ids"].shape[1]
    print(json.dumps({"mode": args.mode, "trl": trl.__version__, "device": args.device,
                      "logits_shape": [N, T, args.vocab], "loss": loss.item(),
                      "median_ms": statistics.median(times), "min_ms": min(times), "repeats": args.repeats,
                      "peak_mem_bytes": int(peak)}))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=8)
    p.add_argument("--prompt", type=int, default=64, help="prompt words (= tokens)")
    p.add_argument("--completion", type=int, default=192, help="completion words (= tokens, before EOS)")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda" if _has_cuda() else "cpu")
    p.add_argument("--mode", choices=["trl", "fastdpo"], help="run one mode in this process (internal)")
    args = p.parse_args()
    if args.mode:
        return _run(args)
    rows = []
    for mode in ("trl", "fastdpo"):
        cmd = [sys.executable, "-m", "benchmarks.trl0_step", "--mode", mode] + [
            f"--{k}={getattr(args, k)}" for k in ("pairs", "prompt", "completion", "vocab", "repeats", "device")]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    t, f = rows
    print(f"TRL {t['trl']} DPOTrainer step, logits {t['logits_shape']} fp32 on {args.device}: "
          f"TRL {t['median_ms']:.0f} ms / {t['peak_mem_bytes'] / 2**30:.2f} GiB, "
          f"fastdpo {f['median_ms']:.0f} ms / {f['peak_mem_bytes'] / 2**30:.2f} GiB "
          f"(speed-up {t['median_ms'] / f['median_ms']:.2f}x, {f['peak_mem_bytes'] / max(1, t['peak_mem_bytes']):.2f}x the "
          "memory)")


def _has_cuda():
    try:
        import torch
        return torch.cuda.is_available()
    except ImportError:
        return False


if __name__ == "__main__":
    main()
