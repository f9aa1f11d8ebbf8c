#!/usr/bin/env bash
# Issue 15's GPU rows in one short call (about 2 minutes on one H100/H200, 3 at most), for an offline
# GPU image whose python3 has CUDA torch (no vLLM needed: the built-in engine is torch + transformers):
# the engine's GPU tests (tests/evaluation/test_generation_gpu.py: same greedy answers as
# transformers' generate on CUDA, sampled answers independent of the batch, batch from free memory),
# then bench/gpu_eval.py at the Qwen2.5-0.5B and -7B shapes in one process: today's path
# (`generate`, chunks of 16, adapter unmerged) vs the engine, and the paper-scale evaluation
# (54 questions x 10 samples x 600 new tokens) through the engine, stopped at 60 s per shape if it
# runs longer (GPU_EVAL_DEADLINE). Output: $OUT/gpu_eval.md (also reports/bench/gpu_eval.md), $OUT/gpu_eval.log.
# Wheels: carry .whl/ with the pinned packages the image lacks (pydantic, transformers, peft, ...;
# see bench/gpu_check.sh for how to fill it).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
log="$OUT/gpu_eval.log"
: >"$log"
marker=$(mktemp)   # reports/bench/gpu_eval.md newer than this = written by this run
say() { echo "== gpu_eval +${SECONDS}s: $*" | tee -a "$log"; }
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site:$PWD || { say "wheel install FAILED"; exit 3; }
else
    export PYTHONPATH=$PWD
fi
"$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" 2>&1 | tee -a "$log"
nvidia-smi -L 2>&1 | tee -a "$log"

status=0
say "engine GPU tests"
timeout 45 "$PYTHON" -m pytest -q -p no:cacheprovider -m gpu tests/evaluation/test_generation_gpu.py 2>&1 \
    | tail -5 | tee -a "$log"
tests_rc=${PIPESTATUS[0]}
if grep -qE "[0-9]+ skipped" "$log"; then tests_rc=5; fi  # a skip here means no usable CUDA
[ "$tests_rc" -eq 0 ] || { say "GPU tests failed (status $tests_rc, 124 = timed out, 5 = skipped)"; status=1; }
say "0.5B and 7B shapes"
timeout 150 "$PYTHON" bench/gpu_eval.py --shape qwen2.5-0.5b qwen2.5-7b --paper-deadline-s "${GPU_EVAL_DEADLINE:-60}" \
    >>"$log" 2>&1 || { say "benchmark failed (status $?, 124 = timed out)"; status=1; }
if [ reports/bench/gpu_eval.md -nt "$marker" ]; then
    cp reports/bench/gpu_eval.md "$OUT/gpu_eval.md" && say "copied reports/bench/gpu_eval.md to $OUT/gpu_eval.md"
else
    say "reports/bench/gpu_eval.md was not written by this run"
fi
rm -f "$marker"
grep -E "^Targets:|target\(s\) missed" "$log" | tee -a "$OUT/summary.txt"
say "done (status $status)"
exit "$status"
