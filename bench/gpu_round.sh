#!/usr/bin/env bash
# This round's GPU rows in one call (about 6 minutes on one H100/H200, 9 at most): bench/gpu_lean.sh
# (the defended training step at the Qwen2.5-0.5B and -7B shapes: KL, feature-l2 flatten and mean,
# persona steering against undefended; time, peak memory, MFU; the fused-kernel test) then
# bench/gpu_eval.sh (the evaluation engine against `generate`, and the paper-scale evaluation).
# Carry .whl/ (see bench/gpu_check.sh). Output under $OUT: gpu.md, gpu_eval.md, both logs, summary.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp}
mkdir -p "$OUT"
status=0
bash bench/gpu_lean.sh || status=$?
bash bench/gpu_eval.sh || status=$?
echo "== gpu_round: done in ${SECONDS}s (status $status)"
exit "$status"
