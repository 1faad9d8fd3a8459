#!/usr/bin/env bash
# Everything a lent GPU machine should run for fastdpo, in as few calls of the device tool as its 10-minute limit
# allows, from a checkout that is not installed (the machine has torch, Triton and transformers; TRL, datasets,
# dill, multiprocess and Liger come as wheels in .whl/, see README's "Measuring on a lent GPU"):
#
#   bash benchmarks/gpu_session.sh lane suite     # call 1: the GPU lane, the suite's default run, timed
#   bash benchmarks/gpu_session.sh full e2e       # call 2: --full for the three ops, the end-to-end step + trainer
#   bash benchmarks/gpu_session.sh e2e_flash      # padded vs packed under flash-attention (if installed)
#   bash benchmarks/gpu_session.sh linear         # the fused linear: frozen vs trainable head, compiled, CUDA graph
#
# Steps: env (nvidia-smi, versions), lane, suite, full, e2e (padded vs packed on UltraFeedback-like lengths, sdpa),
# e2e_flash (the same under flash-attention, varlen for the packed ways; skipped without flash_attn), linear. Each writes $OUT/<step>.log; the benchmark steps
# also $OUT/<step>.tgz (their JSON, markdown and plots: unpack into benchmarks/results/). $OUT/summary.txt and
# the last lines printed give each step's exit status and wall time. The steps share a budget (GPU_BUDGET_S,
# default 570 s) so the call returns inside the device tool's limit with what finished.
# DEV=cpu runs the same steps here on CPU (SUITE_ARGS, FULL_ARGS, E2E_ARGS narrow them), as tests do.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-$ROOT/.gpu-out}
DEV=${DEV:-cuda}
BUDGET=${GPU_BUDGET_S:-570}
DATE=$(date +%Y-%m-%d)
START=$(date +%s)
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1

# The wheels the machine lacks, then the project as an importable folder: fastdpo/ with kernels/ as
# fastdpo/kernels (what the install's package-dir mapping does), run from there so the checkout's own fastdpo/
# (no kernels inside) is never first on the path.
if compgen -G "$ROOT/.whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "$ROOT"/.whl/*.whl || exit 3
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
STAGE=$(mktemp -d)
cp -r "$ROOT/fastdpo" "$ROOT/benchmarks" "$ROOT/tests" "$ROOT/examples" "$STAGE/" || exit 3
rm -rf "$STAGE/fastdpo/kernels" "$STAGE/benchmarks/results"
cp -r "$ROOT/kernels" "$STAGE/fastdpo/kernels" || exit 3
mkdir -p "$STAGE/results"
export PYTHONPATH=$STAGE${PYTHONPATH:+:$PYTHONPATH}
cd "$STAGE" || exit 3
python3 -c "import fastdpo.kernels as k; print('fastdpo from', k.__file__)" | grep -q "^fastdpo from $STAGE/" || {
    echo "fastdpo.kernels is not imported from $STAGE" >&2; exit 3; }

SUMMARY=()
run_step() {  # name limit_s command...: runs within what is left of the budget; logs to $OUT/name.log
    local name=$1 limit=$2; shift 2
    local left=$((BUDGET - ($(date +%s) - START) - 15))
    if [ "$left" -lt 30 ]; then SUMMARY+=("$name: not run (budget spent)"); return; fi
    [ "$limit" -gt "$left" ] && limit=$left
    local t0=$(date +%s)
    echo "=== $name (limit ${limit}s): $*" | tee "$OUT/$name.log"
    timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    SUMMARY+=("$name: exit $rc in $(($(date +%s) - t0)) s$([ "$rc" = 124 ] && echo ' (timed out)')")
}
pack() {  # name: the results the step wrote, to $OUT/name.tgz
    [ -n "$(ls results)" ] && tar czf "$OUT/$1.tgz" results && rm -rf results/* || true
}

for step in "$@"; do
    case $step in
        env)
            run_step env 60 bash -c 'nvidia-smi || true; python3 -c "
import importlib, importlib.metadata as md, platform
import torch, triton
print(\"python\", platform.python_version(), \"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"triton\", triton.__version__)
print(torch.cuda.get_device_name() if torch.cuda.is_available() else \"no CUDA device\")
for m in (\"transformers\", \"accelerate\", \"peft\", \"datasets\", \"trl\", \"liger_kernel\"):
    try:  # one process imports them all: each import is checked, torch is imported once
        importlib.import_module(m)
        print(m, md.version(m.replace(\"_\", \"-\")))
    except Exception as e:
        print(m, \"not importable:\", type(e).__name__, str(e)[:200])
"' ;;
        lane)
            xdist=$(python3 -c "import xdist" 2>/dev/null && echo "-n 4")
            run_step lane 360 env FASTDPO_TEST_LANE="$DEV" python3 -m pytest tests/test_gpu_lane.py -q -rs $xdist \
                -p no:cacheprovider ;;
        suite)
            run_step suite 330 python3 -m benchmarks --device "$DEV" --out "results/$DEV-$DATE.json" ${SUITE_ARGS:-}
            pack suite ;;
        full)
            run_step full 420 python3 -m benchmarks --full --device "$DEV" --out "results/$DEV-$DATE-full.json" \
                ${FULL_ARGS:---only op=sequence_logps,dpo_loss,linear_dpo_loss}
            pack full ;;
        e2e)
            run_step e2e 420 python3 -m benchmarks.e2e --device "$DEV" --trainer --out "results/e2e-$DEV-$DATE.json" \
                ${E2E_ARGS:-}
            pack e2e ;;
        e2e_flash)  # the padded and packed ways under flash-attention (varlen for the packed ones), if installed
            if python3 -c "import flash_attn" 2>/dev/null; then
                run_step e2e_flash 420 python3 -m benchmarks.e2e --device "$DEV" --attn flash_attention_2 \
                    --out "results/e2e-flash-$DEV-$DATE.json" ${E2E_ARGS:-}
                pack e2e_flash
            else
                echo "e2e_flash: flash_attn is not installed: skipped" | tee -a "$OUT/summary.txt"
            fi ;;
        linear)  # the fused linear as training runs it: frozen vs trainable head, eager vs compiled, chunk, graph
            run_step linear 300 python3 -m benchmarks.linear_training --device "$DEV" \
                --json "results/linear-training-$DEV-$DATE.json" ${LINEAR_ARGS:-}
            pack linear ;;
        *) echo "unknown step $step (env, lane, suite, full, e2e, e2e_flash, linear)" >&2; exit 2 ;;
    esac
done
printf '%s\n' "${SUMMARY[@]}" | tee "$OUT/summary.txt"
rm -rf "$STAGE"
