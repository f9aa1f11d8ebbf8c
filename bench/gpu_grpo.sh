#!/usr/bin/env bash
# GRPO step time per defense on one NVIDIA GPU (the RL setting): bench/grpo_step.py at the
# random-init Qwen2.5-0.5B shape (8 prompts x 4 generations x 256 forced completion tokens, bf16).
# About 2 minutes on one H100; the run is cut at GPU_GRPO_LIMIT seconds (default 170).
# Writes reports/bench/grpo_step.md (section qwen2.5-0.5b) and copies it with the log to $OUT.
# On an offline GPU image whose python3 has CUDA torch: the wheels carried in .whl/ are installed
# first (as bench/gpu_check.sh does); this benchmark also needs trl and datasets (constraints.txt
# versions) among them if the image lacks those. PYTHON=... picks another interpreter.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false TRL_EXPERIMENTAL_SILENCE=1
OUT=${OUT:-/tmp}
mkdir -p "$OUT"
PYTHON=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site:$PWD || { echo "bench/gpu_grpo.sh: wheel install failed" >&2; exit 3; }
else
    export PYTHONPATH=$PWD
fi
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "bench/gpu_grpo.sh: no NVIDIA GPU here; on CPU run: .venv/bin/python bench/grpo_step.py --size tiny" >&2
    exit 2
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
timeout --kill-after=5 "${GPU_GRPO_LIMIT:-170}" "$PYTHON" bench/grpo_step.py --size qwen2.5-0.5b "$@" 2>&1 \
    | tee "$OUT/gpu_grpo.log"
rc=${PIPESTATUS[0]}
cp reports/bench/grpo_step.md "$OUT/" 2>/dev/null || true
echo "bench/gpu_grpo.sh: status $rc (124 = timed out, 2 = no usable CUDA)"
exit "$rc"
