"""Benchmark cases: what each implementation runs, the shapes, and the byte model of each op.

A case is a dict ``{"op", "impl", "N", "T", "V", "dtype", "device", "variant"}``; ``build(case)`` returns a
zero-argument callable that runs the op once (forward, or forward + backward) on inputs it allocated.
"""

import torch

OPS = ("sequence_logps_fwd", "sequence_logps", "dpo_loss", "linear_dpo_loss")
IMPLS = ("naive", "naive_compiled", "trl", "liger", "fastdpo")
# dpo_loss peers: TRL's selective_log_softmax and Liger's cross-entropy for the log-probs, then the sigmoid loss
# (neither computes TRL's metrics in that path; fastdpo and naive do).
IMPLS_BY_OP = {"sequence_logps_fwd": IMPLS, "sequence_logps": IMPLS, "dpo_loss": IMPLS,
               "linear_dpo_loss": ("naive", "naive_compiled", "trl", "liger", "fastdpo")}
# Left to --full: torch.compile costs 10-25 s a case on 2 cores (a minute for the fused-linear op), and it compiles
# again for every op, dtype and shape: 16 compiles in the GPU default mode, more than the 5 minutes it is meant to
# take there (not yet timed on a GPU; on CPU the default and quick modes take under 3 minutes).
FULL_ONLY = {(op, "naive_compiled") for op in OPS}
LINEAR_H = 1024  # hidden size of the fused-linear cases (a 1B-class model)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def unavailable(case) -> str:
    """Why a case cannot run here ('' when it can): reported as skipped, never dropped."""
    for impl, module in (("trl", "trl.trainer.utils"), ("liger", "liger_kernel.chunked_loss")):
        if case["impl"] == impl:
            try:
                __import__(module)
            except Exception as e:  # noqa: BLE001
                return f"{module} not importable: {type(e).__name__}"
    if case["device"] == "cuda" and not torch.cuda.is_available():
        return "no CUDA device"
    if case["impl"] == "liger" and case["op"] != "linear_dpo_loss" and case["device"] != "cuda":
        return "Liger's cross-entropy kernel (its per-token log-prob path) is Triton-only: needs a CUDA device"
    return ""


def make_inputs(case):
    g = torch.Generator(device="cpu").manual_seed(0)
    N, T, V = case["N"], case["T"], case["V"]
    logits = (torch.randn(N, T, V, generator=g) * 2).to(_DTYPES[case["dtype"]]).to(case["device"])
    labels = torch.randint(0, V, (N, T), generator=g)
    labels[:, : T // 8] = -100  # a short prompt, as in preference data
    return logits, labels.to(case["device"])


def _masked_sum(tok, labels):
    mask = labels[:, 1:] != -100
    return (tok * mask).sum(-1)


def _trl_logps(logits, labels):
    from trl.trainer.utils import selective_log_softmax

    lab = labels[:, 1:]
    tok = selective_log_softmax(logits[:, :-1], torch.where(lab == -100, 0, lab))
    return _masked_sum(tok, labels)


def _liger_logps(logits, labels):
    """Per-token log-probs = -cross-entropy with reduction="none" (Liger's Triton kernel), summed."""
    from liger_kernel.transformers.functional import liger_cross_entropy

    N, T, V = logits.shape
    lab = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
    nll = liger_cross_entropy(logits.reshape(-1, V), lab.reshape(-1), reduction="none", ignore_index=-100)
    return -nll.view(N, T).float().sum(-1)


def _naive_dpo(logits, labels, ref_c, ref_r, beta=0.1):
    """TRL 0.x-style: log_softmax of the full logits, gather, mask, sum; the sigmoid loss; the metrics TRL logs
    (rewards and the mean logit of the completion tokens)."""
    from fastdpo.naive import naive_token_logps

    tok, mask = naive_token_logps(logits, labels)
    logps = tok.sum(-1)
    B = logps.shape[0] // 2
    chosen_rewards = beta * (logps[:B] - ref_c)
    rejected_rewards = beta * (logps[B:] - ref_r)
    loss = -torch.nn.functional.logsigmoid(chosen_rewards - rejected_rewards).mean()
    with torch.no_grad():
        rows = torch.nn.functional.pad(mask[:, 1:], (0, 1))
        metrics = (chosen_rewards.mean(), rejected_rewards.mean(), logits.detach()[rows].float().mean())
    return loss, metrics


def _linear_inputs(case):
    g = torch.Generator(device="cpu").manual_seed(0)
    N, T, V, H = case["N"], case["T"], case["V"], case.get("H", LINEAR_H)
    dtype = _DTYPES[case["dtype"]]
    hidden = torch.randn(N, T, H, generator=g).to(dtype).to(case["device"])
    weight = (torch.randn(V, H, generator=g) / H ** 0.5).to(dtype).to(case["device"])
    labels = torch.randint(0, V, (N, T), generator=g)
    labels[:, : T // 8] = -100
    B = N // 2
    ref = torch.full((N,), -200.0)
    return hidden, weight, labels.to(case["device"]), ref[:B].to(case["device"]), ref[B:].to(case["device"])


def _sigmoid_dpo(logps, ref_c, ref_r, beta=0.1):
    B = logps.shape[0] // 2
    return -torch.nn.functional.logsigmoid(beta * ((logps[:B] - ref_c) - (logps[B:] - ref_r))).mean()


def build_linear(case):
    """The sigmoid DPO loss from hidden states (N, T, H) and an LM head (V, H), forward + backward."""
    hidden, weight, labels, ref_c, ref_r = _linear_inputs(case)
    impl = case["impl"]
    if impl in ("naive", "naive_compiled"):
        def fn(h, w):
            return _naive_dpo(h @ w.t(), labels, ref_c, ref_r)[0]
        if impl == "naive_compiled":
            fn = torch.compile(fn, dynamic=False)
    elif impl == "trl":  # the chunked fused LM head of TRL >= 1.15, called as its DPOTrainer does on CPU
        from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE, _ChunkedLogProbFunction

        N, T, H = hidden.shape
        mask = torch.nn.functional.pad(labels[:, 1:] != -100, (0, 1), value=False)
        targets = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=0).clamp(min=0).reshape(-1)

        def fn(h, w):
            lp = _ChunkedLogProbFunction.apply(h.reshape(-1, H), w, None, targets, 1.0, _CHUNKED_LOGPROB_CHUNK_SIZE,
                                               None, 1.0, ("entropy", "mean_logits", "is_top1"))[0]
            return _sigmoid_dpo(lp.view(N, T).masked_fill(~mask, 0).sum(1), ref_c, ref_r)
    elif impl == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

        loss_fn = LigerFusedLinearDPOLoss(beta=0.1, compiled=False, use_ref_model=False)
        shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
        N, T, H = hidden.shape

        def fn(h, w):  # reference log-probs as numbers, like the others: Liger takes them via its ref model only
            return loss_fn(w, h, shifted)[0]
    elif impl == "fastdpo":
        from fastdpo.linear import linear_dpo_loss

        lean = case.get("variant") == "lean"

        def fn(h, w):
            return linear_dpo_loss(h, w, labels, ref_c, ref_r, beta=0.1, lean=lean).loss
    else:
        raise ValueError(f"no {impl!r} implementation of linear_dpo_loss")
    h_leaf = hidden.requires_grad_(True)
    w_leaf = weight.requires_grad_(True)

    def run():
        return torch.autograd.grad(fn(h_leaf, w_leaf), (h_leaf, w_leaf))
    return run


def build(case):
    if case["op"] == "linear_dpo_loss":
        return build_linear(case)
    logits, labels = make_inputs(case)
    impl, backward = case["impl"], case["op"] != "sequence_logps_fwd"
    if case["op"] == "dpo_loss":
        B = logits.shape[0] // 2
        ref_c = torch.full((B,), -200.0, device=logits.device)
        ref_r = torch.full((B,), -210.0, device=logits.device)
        if impl in ("naive", "naive_compiled"):
            def fn(x):
                return _naive_dpo(x, labels, ref_c, ref_r)[0]
        elif impl == "trl":
            def fn(x):
                return _sigmoid_dpo(_trl_logps(x, labels), ref_c, ref_r)
        elif impl == "liger":
            def fn(x):
                return _sigmoid_dpo(_liger_logps(x, labels), ref_c, ref_r)
        elif impl == "fastdpo":
            import fastdpo

            inplace = case.get("variant") == "inplace_backward"

            def fn(x):
                return fastdpo.dpo_loss(x, labels, ref_c, ref_r, beta=0.1, inplace_backward=inplace).loss
        else:
            raise ValueError(f"no {impl!r} implementation of dpo_loss")
    elif impl in ("naive", "naive_compiled"):
        from fastdpo.naive import naive_sequence_logps

        def fn(x):
            return naive_sequence_logps(x, labels)[0]
    elif impl == "liger":
        def fn(x):
            return _liger_logps(x, labels)
    elif impl == "trl":
        def fn(x):
            return _trl_logps(x, labels)
    elif impl == "fastdpo":
        import fastdpo

        inplace = case.get("variant") == "inplace_backward"

        def fn(x):
            return fastdpo.sequence_logps(x, labels, inplace_backward=inplace).logps
    else:
        raise ValueError(f"unknown impl {impl!r}")

    if impl == "naive_compiled":
        fn = torch.compile(fn, dynamic=False)
    if not backward:
        def run():
            with torch.no_grad():
                return fn(logits)
        return run

    leaf = logits.requires_grad_(True)

    def run():
        # logits as a model hands them over: a non-leaf whose gradient flows on upstream (and is dropped)
        x = leaf.view_as(leaf)
        out = fn(x)
        (grad,) = torch.autograd.grad(out.sum(), x)
        return grad
    return run


def bytes_moved(case) -> int:
    """The hardware floor for this op: forward reads the logits once; backward reads them once more and
    writes the gradient once (3x the logits' bytes in all). Labels and per-row outputs are negligible.
    For linear_dpo_loss (compute-bound, a GEMM op) this is 0: see flops()."""
    if case["op"] == "linear_dpo_loss":
        return 0
    elem = torch.tensor([], dtype=_DTYPES[case["dtype"]]).element_size()
    logits_bytes = case["N"] * case["T"] * case["V"] * elem
    return logits_bytes if case["op"] == "sequence_logps_fwd" else 3 * logits_bytes


# Peak DRAM bandwidth (GB/s) of common training GPUs, from their vendors' data sheets: the floor every
# logits-op figure is held to (``percent_of_peak_bw``).
PEAK_GBPS = {"H200": 4800, "H100 SXM": 3350, "H100 80GB HBM3": 3350, "H100 PCIe": 2000, "H100 NVL": 3900,
             "A100-SXM4-80GB": 2039, "A100 80GB PCIe": 1935, "A100-SXM4-40GB": 1555, "A100-PCIE-40GB": 1555,
             "L40S": 864, "RTX 4090": 1008, "A10G": 600}


def peak_gbps(device_name: str):
    """The data-sheet bandwidth of a CUDA device by name, or None when unknown (then no percentage)."""
    for key, gbps in PEAK_GBPS.items():
        if key.lower() in device_name.lower():
            return gbps
    return None


def flops(case) -> int:
    """linear_dpo_loss: the floor is 3 GEMMs over the completion rows (logits, grad hidden, grad weight),
    2 * M * H * V FLOPs each; M counts the rows that score a completion token (7/8 of them here)."""
    if case["op"] != "linear_dpo_loss":
        return 0
    M = case["N"] * (case["T"] - case["T"] // 8 - 1)
    return 3 * 2 * M * case.get("H", LINEAR_H) * case["V"]


def default_cases(device: str, mode: str):
    """The shapes each mode sweeps. CPU: --quick (the logits ops at 8x512x32000, about a minute on 2 cores),
    default (also a Llama-3 vocabulary and the fused-linear op, within 3 minutes), --full (more vocabularies, bf16,
    the compiled naive baseline)."""
    logits_ops = ("sequence_logps_fwd", "sequence_logps", "dpo_loss")
    if device == "cpu":
        shapes = {"quick": [(8, 512, 32000)],
                  "default": [(8, 512, 32000), (2, 512, 128256)],
                  "full": [(16, 512, 32000), (4, 512, 50257), (2, 512, 128256), (2, 512, 151936)]}[mode]
        linear_shapes = {"quick": [], "default": [(8, 512, 32000)], "full": [(16, 512, 32000)]}[mode]
        if mode == "full":  # a sweep over tokens
            shapes += [(4, t, 32000) for t in (128, 1024, 2048)]
        dtypes = ["float32"] if mode != "full" else ["float32", "bfloat16"]
    else:
        shapes = {"quick": [(16, 1024, 32000)],
                  "default": [(16, 1024, 32000), (8, 1024, 128256)],
                  "full": [(16, 2048, 32000), (8, 2048, 50257), (8, 2048, 128256), (8, 2048, 151936),
                           (4, 2048, 256000)]}[mode]
        linear_shapes = {"quick": [(16, 1024, 32000)], "default": [(16, 1024, 32000), (8, 1024, 128256)],
                         "full": [(16, 2048, 128256), (8, 4096, 128256), (8, 2048, 256000)]}[mode]
        if mode == "full":  # a sweep over tokens at Llama-3's vocabulary
            shapes += [(8, t, 128256) for t in (256, 512, 4096, 8192)]
        dtypes = ["bfloat16", "float32"]
    cases = []

    def add(op, impl, N, T, V, dtype, variant=""):
        cases.append({"op": op, "impl": impl, "N": N, "T": T, "V": V, "dtype": dtype, "device": device,
                      "variant": variant})
    for dtype in dtypes:
        for N, T, V in shapes:
            for op in logits_ops:
                for impl in IMPLS_BY_OP[op]:
                    if mode == "full" or (op, impl) not in FULL_ONLY:
                        add(op, impl, N, T, V, dtype)
                if op != "sequence_logps_fwd":
                    add(op, "fastdpo", N, T, V, dtype, "inplace_backward")
        for N, T, V in linear_shapes:
            for impl in IMPLS_BY_OP["linear_dpo_loss"]:
                if mode == "full" or ("linear_dpo_loss", impl) not in FULL_ONLY:
                    add("linear_dpo_loss", impl, N, T, V, dtype)
            if device != "cpu" or mode == "full":  # the memory-lean setting (a minute more on CPU: --full)
                add("linear_dpo_loss", "fastdpo", N, T, V, dtype, "lean")
    return cases
