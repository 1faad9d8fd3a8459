"""Benchmark cases: what each implementation runs, the shapes, and the byte model of each op.

A case is a dict ``{"op", "impl", "N", "T", "V", "dtype", "device", "variant"}``; ``build(case)`` returns a
zero-argument callable that runs the op once (forward, or forward + backward) on inputs it allocated.
"""

import torch

OPS = ("sequence_logps_fwd", "sequence_logps", "dpo_loss")
IMPLS = ("naive", "trl", "fastdpo")
IMPLS_BY_OP = {"sequence_logps_fwd": IMPLS, "sequence_logps": IMPLS, "dpo_loss": ("naive", "fastdpo")}

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def unavailable(case) -> str:
    """Why a case cannot run here ('' when it can): reported as skipped, never dropped."""
    if case["impl"] == "trl":
        try:
            import trl.trainer.utils  # noqa: F401
        except Exception as e:  # noqa: BLE001
            return f"trl not importable: {type(e).__name__}"
    if case["device"] == "cuda" and not torch.cuda.is_available():
        return "no CUDA device"
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


def build(case):
    logits, labels = make_inputs(case)
    impl, backward = case["impl"], case["op"] != "sequence_logps_fwd"
    if case["op"] == "dpo_loss":
        B = logits.shape[0] // 2
        ref_c = torch.full((B,), -200.0, device=logits.device)
        ref_r = torch.full((B,), -210.0, device=logits.device)
        if impl == "naive":
            def fn(x):
                return _naive_dpo(x, labels, ref_c, ref_r)[0]
        elif impl == "fastdpo":
            import fastdpo

            inplace = case.get("variant") == "inplace_backward"

            def fn(x):
                return fastdpo.dpo_loss(x, labels, ref_c, ref_r, beta=0.1, inplace_backward=inplace).loss
        else:
            raise ValueError(f"no {impl!r} implementation of dpo_loss")
    elif impl == "naive":
        from fastdpo.naive import naive_sequence_logps

        def fn(x):
            return naive_sequence_logps(x, labels)[0]
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
    writes the gradient once (3x the logits' bytes in all). Labels and per-row outputs are negligible."""
    elem = torch.tensor([], dtype=_DTYPES[case["dtype"]]).element_size()
    logits_bytes = case["N"] * case["T"] * case["V"] * elem
    return logits_bytes if case["op"] == "sequence_logps_fwd" else 3 * logits_bytes


def default_cases(device: str, mode: str):
    """The shapes each mode sweeps; CPU defaults end in minutes on 2 cores."""
    if device == "cpu":
        shapes = {"quick": [(16, 512, 32000)],
                  "default": [(16, 512, 32000), (4, 512, 50257), (2, 512, 128256)],
                  "full": [(16, 512, 32000), (4, 512, 50257), (2, 512, 128256), (2, 512, 151936)]}[mode]
        dtypes = ["float32"] if mode != "full" else ["float32", "bfloat16"]
    else:
        shapes = {"quick": [(16, 1024, 32000)],
                  "default": [(16, 1024, 32000), (8, 1024, 128256)],
                  "full": [(16, 2048, 32000), (8, 2048, 50257), (8, 2048, 128256), (8, 2048, 151936),
                           (4, 2048, 256000)]}[mode]
        dtypes = ["bfloat16", "float32"]
    cases = []
    for N, T, V in shapes:
        for dtype in dtypes:
            for op in OPS:
                for impl in IMPLS_BY_OP[op]:
                    cases.append({"op": op, "impl": impl, "N": N, "T": T, "V": V, "dtype": dtype,
                                  "device": device, "variant": ""})
                if op != "sequence_logps_fwd":
                    cases.append({"op": op, "impl": "fastdpo", "N": N, "T": T, "V": V, "dtype": dtype,
                                  "device": device, "variant": "inplace_backward"})
    return cases
