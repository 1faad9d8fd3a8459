"""fastdpo's benchmark suite: every op, every implementation, time and peak extra memory.

    python -m benchmarks [--quick | --full] [--device cpu|cuda] [--out FILE.json] [--only KEY=V1,V2 ...]

One process per implementation runs its cases one after another (``benchmarks.runner``: imports and compiler
caches paid once, each case measured in isolation). Prints a table as cases finish, writes the JSON (default
``benchmarks/results/<device>-<date>.json``) and PNG plots beside it.
"""

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import threading

from benchmarks import cases as C

HERE = os.path.dirname(os.path.abspath(__file__))


def versions() -> dict:
    out = {"python": platform.python_version()}
    from importlib import metadata

    for name, dist in (("torch", "torch"), ("triton", "triton"), ("transformers", "transformers"), ("trl", "trl"),
                       ("liger_kernel", "liger-kernel"), ("fastdpo", "fastdpo")):
        try:
            out[name] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def describe_device(device: str) -> str:
    if device == "cuda":
        import torch

        return torch.cuda.get_device_name()
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model}, {os.cpu_count()} cores"


def case_repeats(case, repeats: int) -> int:
    """Timed calls of a case: the fused-linear op on CPU (10-30 s a call on 2 cores) times its first call, the one
    that also measures memory."""
    return 0 if case["op"] == "linear_dpo_loss" and case["device"] == "cpu" else repeats


def groups(cases) -> list:
    """Cases by implementation, in the order they first appear: one process each."""
    out = {}
    for case in cases:
        out.setdefault(case["impl"], []).append(case)
    return list(out.values())


def run_group(cases, repeats: int, timeout: int):
    """Runs ``cases`` (one implementation) in one runner process; yields each row as it finishes. ``timeout`` is
    per case: the process is killed when the group's total runs out. Cases that cannot run here, and those a
    crashed or killed process did not reach, come back as skipped with the reason."""
    runnable = []
    for case in cases:
        why = C.unavailable(case)
        if why:
            yield {**case, "skipped": why}
        else:
            runnable.append({**case, "repeats": case_repeats(case, repeats)})
    if not runnable:
        return
    cmd = [sys.executable, "-m", "benchmarks.runner", json.dumps(runnable), "--repeats", str(repeats)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")])}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    stderr = []
    drain = threading.Thread(target=lambda: stderr.extend(proc.stderr), daemon=True)
    drain.start()
    killed = threading.Event()

    def kill():
        killed.set()
        proc.kill()
    timer = threading.Timer(timeout * len(runnable), kill)
    timer.start()
    done = 0
    try:
        for line in proc.stdout:
            if line.startswith("{"):
                row = json.loads(line)
                done += 1
                yield row
        proc.wait()
    finally:
        timer.cancel()
    drain.join(timeout=5)
    if done < len(runnable):
        last = (("".join(stderr).strip().splitlines() or ["?"])[-1])[:200]
        why = f"timed out after {timeout} s a case" if killed.is_set() else f"failed: {last}"
        for case in runnable[done:]:
            case = dict(case)
            case.pop("repeats")
            yield {**case, "skipped": why}


def add_ratios(results):
    """Speed-up and memory ratio of every row against naive on the same op, shape and dtype."""
    key = lambda r: (r["op"], r["N"], r["T"], r["V"], r["dtype"])  # noqa: E731
    naive = {key(r): r for r in results if r["impl"] == "naive" and "median_ms" in r}
    for r in results:
        base = naive.get(key(r))
        if base and "median_ms" in r:
            r["speedup_vs_naive"] = base["median_ms"] / r["median_ms"]
            r["mem_ratio_vs_naive"] = r["peak_mem_bytes"] / max(base["peak_mem_bytes"], 1)


def measure_ceilings(device: str) -> dict:
    """The device's copy bandwidth and GEMM rate (``benchmarks.ceilings``), in a process of its own so that
    its buffers stay out of the cases' memory. {} if it fails."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.ceilings", "--device", device], capture_output=True,
                          text=True, env=env)
    return json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else {}


def add_ceiling_shares(r, ceilings: dict) -> None:
    """Percent of the measured ceiling: bandwidth for the logits ops (their byte model), GEMM rate for the
    fused-linear op (its 3-GEMM FLOP count)."""
    if "median_ms" not in r or not ceilings:
        return
    if r.get("bytes_moved"):
        r["percent_of_measured_bw"] = 100 * r["achieved_gbps"] / ceilings["copy_gbps"]
    if r.get("flops"):
        r["percent_of_measured_gemm"] = 100 * r["achieved_tflops"] / ceilings["gemm_tflops"]


def _ceiling_share(r) -> str:
    if "percent_of_measured_bw" in r:
        return f"{r['percent_of_measured_bw']:.0f}% bw"
    if "percent_of_measured_gemm" in r:
        return f"{r['percent_of_measured_gemm']:.0f}% GEMM"
    return ""


def fmt_row(r) -> str:
    name = r["impl"] + (f"[{r['variant']}]" if r.get("variant") else "")
    shape = f"{r['N']}x{r['T']}x{r['V']}"
    head = f"{r['op']:<19} {shape:<16} {r['dtype']:<9} {name:<26}"
    if "skipped" in r:
        return f"{head} skipped: {r['skipped']}"
    extra = ""
    if "speedup_vs_naive" in r:
        extra = f" {r['speedup_vs_naive']:>6.2f}x {r['mem_ratio_vs_naive']:>6.2f}x"
    return (f"{head} {r['median_ms']:>10.1f} {r['peak_mem_bytes'] / 2**20:>10.0f} "
            f"{r['achieved_gbps']:>7.1f}{extra} {_ceiling_share(r):>9}")


HEADER = (f"{'op':<19} {'shape NxTxV':<16} {'dtype':<9} {'impl':<26} {'median ms':>10} {'peak MiB':>10} "
          f"{'GB/s':>7} {'speedup':>7} {'mem':>7} {'ceiling':>9}")


def _write_markdown(path: str, doc) -> None:
    v = doc["versions"]
    with open(path, "w") as f:
        f.write(f"Measured {doc['date']} on {doc['device']} ({doc['mode']} mode); torch {v['torch']}, triton "
                f"{v['triton']}, trl {v['trl']}, liger-kernel {v['liger_kernel']}.")
        c = doc.get("ceilings")
        if c:
            f.write(f" Measured ceilings: copy {c['copy_gbps']:.0f} GB/s (read + write), GEMM "
                    f"{c['gemm_tflops']:.2f} TFLOP/s ({c['gemm']}).")
        f.write("\n\n")
        f.write(markdown_table(doc["results"]) + "\n")


def markdown_table(results) -> str:
    """The results as a markdown table (README carries the latest CPU one)."""
    shares = any(_ceiling_share(r) for r in results)
    lines = ["| op | shape (N x T x V) | dtype | impl | median ms | peak extra MiB | speed-up vs naive | memory vs naive |"
             + (" of measured ceiling |" if shares else ""),
             "|---|---|---|---|---:|---:|---:|---:|" + ("---:|" if shares else "")]
    for r in results:
        name = r["impl"] + (f" ({r['variant']})" if r.get("variant") else "")
        head = f"| {r['op']} | {r['shape']} | {r['dtype']} | {name} |"
        if "skipped" in r:
            lines.append(f"{head} skipped: {r['skipped']} | | | |")
            continue
        ratios = (f" {r['speedup_vs_naive']:.2f}x | {r['mem_ratio_vs_naive']:.2f}x |"
                  if "speedup_vs_naive" in r else " | |")
        lines.append(f"{head} {r['median_ms']:.0f} | {r['peak_mem_bytes'] / 2**20:.0f} |{ratios}"
                     + (f" {_ceiling_share(r)} |" if shares else ""))
    return "\n".join(lines)


def plot(results, path_prefix: str) -> list:
    """Time and peak memory per 1k tokens (N x T) against the vocabulary, one colour per implementation."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    impls = sorted({(r["impl"], r.get("variant", "")) for r in results})
    colours = {impl: plt.get_cmap("tab10")(i % 10) for i, impl in enumerate(impls)}
    paths = []
    ops = sorted({r["op"] for r in results})
    for metric, label in (("median_ms", "median time per 1k tokens (ms)"),
                          ("peak_mem_bytes", "peak extra memory per 1k tokens (MiB)")):
        fig, axes = plt.subplots(1, len(ops), figsize=(5.5 * len(ops), 4), squeeze=False)
        for ax, op in zip(axes[0], ops):
            rows = [r for r in results if r["op"] == op and metric in r]
            for impl in impls:
                pts = sorted((r["V"], r[metric] / (2**20 if metric == "peak_mem_bytes" else 1) / (r["N"] * r["T"] / 1e3))
                             for r in rows if (r["impl"], r.get("variant", "")) == impl)
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=colours[impl],
                            label=impl[0] + (f" [{impl[1]}]" if impl[1] else ""))
            ax.set_title(op + (" (H=%d)" % C.LINEAR_H if op == "linear_dpo_loss" else ""))
            ax.set_xlabel("vocabulary size V")
            ax.set_ylabel(label)
            ax.set_xscale("log")
            ax.legend(fontsize=7)
        fig.tight_layout()
        out = f"{path_prefix}-{'time' if metric == 'median_ms' else 'memory'}.png"
        fig.savefig(out, dpi=110)
        plt.close(fig)
        paths.append(out)
    return paths


def select(cases, only) -> list:
    """The cases matching every ``KEY=V1,V2`` filter (KEY one of op, impl, variant, shape, dtype)."""
    keys = {"op", "impl", "variant", "shape", "dtype"}
    for f in only:
        key, _, values = f.partition("=")
        if key not in keys or not values:
            raise SystemExit(f"--only takes KEY=V1,V2 with KEY one of {sorted(keys)}, got {f!r}")
        wanted = set(values.split(","))
        cases = [c for c in cases if (f"{c['N']}x{c['T']}x{c['V']}" if key == "shape" else c[key]) in wanted]
    if not cases:
        raise SystemExit(f"no case of this mode matches --only {' '.join(only)}")
    return cases


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="fastdpo benchmark suite")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="one shape: under 3 minutes on 2 CPU cores")
    mode.add_argument("--full", action="store_true", help="every vocabulary and dtype: for GPUs")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None)
    p.add_argument("--out", default=None)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--timeout", type=int, default=600, help="seconds per case")
    p.add_argument("--replot", metavar="JSON", help="redraw the plots and table of a results file; run nothing")
    p.add_argument("--only", nargs="+", default=[], metavar="KEY=V1,V2",
                   help="keep the mode's cases whose op, impl, variant, shape (NxTxV) or dtype is one of the values, "
                        "e.g. --only op=dpo_loss impl=fastdpo,trl shape=16x512x32000")
    a = p.parse_args(argv)
    if a.replot:
        with open(a.replot) as f:
            doc = json.load(f)
        prefix = os.path.splitext(a.replot)[0]
        pngs = plot(doc["results"], prefix)
        _write_markdown(prefix + ".md", doc)
        print("wrote " + ", ".join(pngs + [prefix + ".md"]))
        return 0
    import torch

    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    mode_name = "quick" if a.quick else "full" if a.full else "default"
    repeats = a.repeats or (20 if device == "cuda" else 2)
    cases = select(C.default_cases(device, mode_name), a.only)
    date = datetime.date.today().isoformat()
    out = a.out or os.path.join(HERE, "results", f"{device}-{date}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    dev = describe_device(device)
    print(f"fastdpo benchmarks: {len(cases)} cases, mode {mode_name}, on {dev}", flush=True)
    ceilings = measure_ceilings(device)
    if ceilings:
        print(f"measured ceilings: copy {ceilings['copy_gbps']:.0f} GB/s (read + write), GEMM "
              f"{ceilings['gemm_tflops']:.2f} TFLOP/s ({ceilings['gemm']})", flush=True)
    print(HEADER, flush=True)
    results = []
    for group in groups(cases):
        for r in run_group(group, repeats, a.timeout):
            r["shape"] = f"{r['N']}x{r['T']}x{r['V']}" + (f" (H={C.LINEAR_H})" if r["op"] == "linear_dpo_loss" else "")
            add_ceiling_shares(r, ceilings)
            results.append(r)
            add_ratios(results)
            print(f"{fmt_row(r)}   [{len(results)}/{len(cases)}]", flush=True)
    order = {json.dumps(c, sort_keys=True): i for i, c in enumerate(cases)}
    results.sort(key=lambda r: order.get(json.dumps({k: r[k] for k in cases[0]}, sort_keys=True), len(order)))
    doc = {"device": dev, "device_type": device, "mode": mode_name, "versions": versions(), "date": date,
           "ceilings": ceilings,
           "byte_model": "forward: logits bytes; forward+backward: 3x logits bytes (read, read, write grad)",
           "results": results}
    with open(out, "w") as f:
        json.dump(doc, f, indent=1)
    pngs = plot(results, os.path.splitext(out)[0])
    md = os.path.splitext(out)[0] + ".md"
    _write_markdown(md, doc)
    print(f"wrote {out}, {md}" + "".join(f", {q}" for q in pngs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
