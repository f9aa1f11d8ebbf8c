#!/usr/bin/env bash
# GPU benchmark at real Qwen2.5 shapes, random-init (no weights are downloaded). Needs an NVIDIA GPU
# and a CUDA build of torch in .venv. Two parts, both by default (GPU_BENCH_PARTS="train eval"):
# - train (issue 7, item 5): emtune's defended LoRA step, bench/gpu_step.py -> reports/bench/gpu.md
#   (0.5B section, then 7B). About 3-5 minutes on one H100; each shape has its own time limit,
#   150 s and 250 s (GPU_BENCH_LIMIT_SMALL / GPU_BENCH_LIMIT_LARGE override them). Extra arguments
#   go to both of its runs, e.g. `bench/gpu.sh --batch 2 --seq 1024`.
# - eval (issue 15): evaluation generation, today's path vs the built-in engine and the
#   paper-scale evaluation time, bench/gpu_eval.py -> reports/bench/gpu_eval.md. About 2 minutes
#   on one H100; limits 90 s and 150 s (GPU_EVAL_LIMIT_SMALL / GPU_EVAL_LIMIT_LARGE).
#   Only this part: GPU_BENCH_PARTS=eval bench/gpu.sh
# PYTHON=python3 bench/gpu.sh uses an interpreter that already has CUDA torch, transformers, peft,
# pydantic and pyyaml (emtune itself is imported from this checkout), e.g. on an offline GPU image.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1

if [ -z "${PYTHON:-}" ]; then
    PYTHON=.venv/bin/python
    if [ ! -x .venv/bin/python ]; then
        # the same install as `make install` (torch first and exact, then the pinned set)
        python3 -m venv .venv
        .venv/bin/pip install --quiet torch==2.13.0
        .venv/bin/pip install --quiet -c constraints.txt -e .
    fi
fi

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "bench/gpu.sh: no NVIDIA GPU here (nvidia-smi missing or failing); run it on a GPU machine." >&2
    echo "To check the code on CPU: .venv/bin/python bench/gpu_step.py --dry-run" >&2
    exit 2
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader

# each shape under its own time limit, so the whole script stays within ~7 minutes; a shape that
# fails or times out is reported and the next one still runs (status 2 = no usable CUDA: stop)
status=0
append=()   # the first shape that succeeds starts a fresh report; later ones append to it
run_shape() {
    local limit=$1; shift
    local rc=0
    timeout "$limit" "$PYTHON" bench/gpu_step.py "$@" "${append[@]}" || rc=$?
    if [ "$rc" -eq 2 ]; then exit 2; fi
    if [ "$rc" -ne 0 ]; then
        echo "bench/gpu.sh: 'gpu_step.py $*' failed with status $rc (124 = timed out)" >&2
        status=1
    else
        append=(--append)
    fi
}
parts=" ${GPU_BENCH_PARTS:-train eval} "
if [[ "$parts" == *" train "* ]]; then
    run_shape "${GPU_BENCH_LIMIT_SMALL:-150}" --shape qwen2.5-0.5b "$@"
    # before issue 18 the 7B shape needed every block checkpointed (80 GiB): start there, no OOM tries
    run_shape "${GPU_BENCH_LIMIT_LARGE:-250}" --shape qwen2.5-7b --before-checkpointing on "$@"
    echo "wrote reports/bench/gpu.md"
fi
run_eval() {
    local limit=$1; shift
    local rc=0
    timeout "$limit" "$PYTHON" bench/gpu_eval.py "$@" || rc=$?
    if [ "$rc" -eq 2 ]; then exit 2; fi
    if [ "$rc" -ne 0 ]; then
        echo "bench/gpu.sh: 'gpu_eval.py $*' failed with status $rc (124 = timed out)" >&2
        status=1
    fi
}
if [[ "$parts" == *" eval "* ]]; then
    run_eval "${GPU_EVAL_LIMIT_SMALL:-90}" --shape qwen2.5-0.5b
    run_eval "${GPU_EVAL_LIMIT_LARGE:-150}" --shape qwen2.5-7b
    echo "wrote reports/bench/gpu_eval.md"
fi
exit "$status"
