"""Property-based fuzzing: random shapes (V from 1 to 300k), ragged masks, shifts, strides, dtypes and loss
types, both backends, held to the float64 oracles of test_sequence_logps.py and test_dpo_loss.py.

262 examples in README's run (100 log-prob cases per backend, 50 loss cases on the PyTorch path and 12 on the
interpreted kernels; derandomized: the same examples every run). A longer fuzz run:

    FASTDPO_FUZZ_EXAMPLES=5000 FASTDPO_FUZZ_SEED=random python -m pytest tests/test_fuzz.py

Every failure found becomes a regression test in the file of the op it broke.
"""

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastdpo.losses import LOSS_TYPES
from test_dpo_loss import SMOOTHED
from test_dpo_loss import check as check_dpo
from test_sequence_logps import check as check_logps

SCALE = int(os.environ.get("FASTDPO_FUZZ_EXAMPLES", "300")) / 300
SETTINGS = dict(deadline=None, derandomize=os.environ.get("FASTDPO_FUZZ_SEED") != "random",
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

VOCABS = st.one_of(st.integers(1, 70), st.integers(71, 9000),
                   st.sampled_from([32000, 50257, 128256, 151936, 262144, 300000]))
# The DPO ops' vocabulary handling is the log-prob kernels' (fuzzed above up to 300k); their own part is the
# per-sequence sums and the loss head, so their fuzz stays at vocabularies the interpreter runs quickly.
DPO_VOCABS = st.one_of(st.integers(1, 70), st.integers(71, 9000), st.just(32000))
DTYPES = st.sampled_from([torch.float32, torch.bfloat16, torch.float16])


@st.composite
def logits_and_labels(draw, even_rows=False, vocabs=VOCABS):
    V = draw(vocabs)
    big = V > 9000  # the interpreter pays per row and vocabulary block: few rows for large vocabularies
    N = draw(st.integers(1, 2 if big else 4)) * (2 if even_rows else 1)
    T = draw(st.integers(1 if not even_rows else 2, 4 if big else 12))
    dtype = draw(DTYPES)
    seed = draw(st.integers(0, 2 ** 31 - 1))
    g = torch.Generator().manual_seed(seed)
    scale = draw(st.sampled_from([0.1, 3.0, 30.0]))
    layout = draw(st.sampled_from(["contiguous", "sliced_t", "strided_v"]))
    if layout == "sliced_t":  # logits[:, :-1]-like: a gap between sequences
        logits = (torch.randn(N, T + 2, V, generator=g) * scale).to(dtype)[:, 1:-1]
    elif layout == "strided_v":
        logits = (torch.randn(N, T, 2 * V, generator=g) * scale).to(dtype)[..., ::2]
    else:
        logits = (torch.randn(N, T, V, generator=g) * scale).to(dtype)
    labels = torch.randint(0, V, (N, T), generator=g)
    p_mask = draw(st.sampled_from([0.0, 0.3, 0.9]))
    labels[torch.rand(N, T, generator=g) < p_mask] = -100
    for n in range(N):  # a ragged prompt
        labels[n, : int(torch.randint(0, T, (1,), generator=g))] = -100
    return logits, labels, draw(st.booleans())


@settings(max_examples=max(1, int(100 * SCALE)), **SETTINGS)
@given(case=logits_and_labels(), average=st.booleans())
def test_fuzz_sequence_logps(backend, case, average):
    logits, labels, shift = case
    check_logps(logits, labels, shift=shift, average=average)


def _fuzz_dpo(case, loss_type, beta, reference):
    logits, labels, shift = case
    B = logits.shape[0] // 2
    g = torch.Generator().manual_seed(B)
    ref_c, ref_r = (-20 + 5 * torch.randn(B, generator=g), -20 + 5 * torch.randn(B, generator=g)) if reference \
        else (None, None)
    if not shift:  # check() runs dpo_loss with shift=True: align the labels to shifted positions instead
        labels = torch.nn.functional.pad(labels[:, :-1], (1, 0), value=-100)
    check_dpo(logits, labels, ref_c, ref_r, loss_type=loss_type, beta=beta,
              label_smoothing=SMOOTHED.get(loss_type, 0.0))


DPO_CASES = dict(case=logits_and_labels(even_rows=True, vocabs=DPO_VOCABS), loss_type=st.sampled_from(LOSS_TYPES),
                 beta=st.sampled_from([0.01, 0.1, 1.0]), reference=st.booleans())


@pytest.mark.parametrize("backend", ["torch"], indirect=True)
@settings(max_examples=max(1, int(50 * SCALE)), **SETTINGS)
@given(**DPO_CASES)
def test_fuzz_dpo_loss(backend, case, loss_type, beta, reference):
    _fuzz_dpo(case, loss_type, beta, reference)


# The interpreter runs each (row, block) program in Python: ~7 s per DPO case, so fewer cases than the torch path
# (the kernels' log-prob part is fuzzed above at every vocabulary size).
@pytest.mark.parametrize("backend", ["triton"], indirect=True)
@settings(max_examples=max(1, int(12 * SCALE)), **SETTINGS)
@given(**DPO_CASES)
def test_fuzz_dpo_loss_interpreted(backend, case, loss_type, beta, reference):
    _fuzz_dpo(case, loss_type, beta, reference)
