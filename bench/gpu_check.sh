#!/usr/bin/env bash
# One-call GPU check for an offline NVIDIA machine whose python3 already has CUDA torch (the lent
# H100/H200 image): installs the pinned wheels carried in .whl/ (pydantic, transformers, peft, ...),
# prints versions, runs the GPU tests (tests/train/test_gpu.py), then bench/gpu.sh (0.5B and 7B
# shapes). Run from anywhere as `bash bench/gpu_check.sh`; everything is done within ~9 minutes
# (GPU_CHECK_DEADLINE seconds, default 525: the benchmark's limits shrink if the tests ran long).
# Output files go to $OUT (or /tmp): env.txt, gpu_tests.log, gpu_bench.log, gpu.md, gpu_eval.md.
# GPU_BENCH_PARTS picks the benchmark parts (default: train; "eval" = the generation benchmark only,
# about 2 minutes; "train eval" = both, which needs a larger GPU_CHECK_DEADLINE). GPU_CHECK_TESTS=0
# skips the GPU tests.
# Filling .whl/ (on a machine with pip access; `echo /.whl/ >> .git/info/exclude` first), for each
# NAME==VERSION of constraints.txt that the image lacks or has at another version (pydantic and its
# needs, transformers, huggingface_hub and its new httpx2/httpcore2/truststore, peft, tokenizers, ...):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl NAME==VERSION
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp}
mkdir -p "$OUT"
DEADLINE=${GPU_CHECK_DEADLINE:-525}
say() { echo "== gpu_check +${SECONDS}s: $*"; }
marker=$(mktemp)   # reports/bench/gpu.md newer than this = written by this run

# 1. the carried wheels, ahead of the image's own packages
if compgen -G ".whl/*.whl" >/dev/null; then
    say "installing $(ls .whl/*.whl | wc -l) wheels into /tmp/site"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site:$PWD \
        || { say "wheel install FAILED"; exit 3; }
else
    say "no .whl/*.whl here (name .whl in carry): using the image's packages only"
    export PYTHONPATH=$PWD
fi

# 2. what runs
say "versions"
timeout 120 python3 - <<'EOF' 2>&1 | tee "$OUT/env.txt"
import importlib, platform
print("python", platform.python_version())
for name in ("torch", "transformers", "peft", "pydantic", "pydantic_core", "huggingface_hub", "tokenizers",
             "accelerate", "safetensors", "httpx2", "yaml", "numpy"):
    try:
        module = importlib.import_module(name)
        print(f"{name} {getattr(module, '__version__', '?')}  ({module.__file__})")
    except Exception as exc:  # noqa: BLE001 - report and go on
        print(f"{name}: IMPORT FAILED {type(exc).__name__}: {exc}")
import torch
ok = torch.cuda.is_available()
print("torch CUDA", torch.version.cuda, "available:", ok, torch.cuda.get_device_name() if ok else "")
import emtune.study.trial, emtune.train.trainer  # what the tests import, without Ray or MLflow
print("emtune imports ok")
EOF
nvidia-smi -L 2>&1 | tee -a "$OUT/env.txt"

# 3. GPU tests (they skip without CUDA: a skip here is a failure of the check)
if [ "${GPU_CHECK_TESTS:-1}" = 0 ]; then
    say "GPU tests skipped (GPU_CHECK_TESTS=0)"
    tests_rc=0
else
    say "GPU tests"
    timeout 150 python3 -m pytest -q -p no:cacheprovider -m gpu tests/train/test_gpu.py \
        tests/evaluation/test_generation_gpu.py 2>&1 | tee "$OUT/gpu_tests.log"
    tests_rc=${PIPESTATUS[0]}
    if grep -qE "[0-9]+ skipped" "$OUT/gpu_tests.log"; then
        say "WARNING: some GPU tests were SKIPPED (no usable CUDA?)"
        [ "$tests_rc" -eq 0 ] && tests_rc=5
    fi
    say "GPU tests: status $tests_rc (124 = timed out)"
fi

# 4. benchmark: 0.5B then 7B, each under its own limit, all within the deadline
# (gpu.sh runs each shape under its own `timeout`; the outer one is only a backstop)
left=$(( DEADLINE - SECONDS - 20 ))
small=150
large=$(( left - small - 10 ))
[ "$large" -gt 250 ] && large=250
if [ "$large" -lt 90 ]; then small=$(( left / 2 )); large=$(( left - small - 10 )); fi
if [ "$large" -lt 30 ]; then
    say "benchmark SKIPPED: only ${left}s left before the ${DEADLINE}s deadline"
    bench_rc=6
else
    total=$(( small + large + 15 ))
    say "benchmark: limits ${small}s (0.5B) + ${large}s (7B), ${total}s in all"
    # the training part only: its limits are sized above (the eval part: GPU_BENCH_PARTS=eval bench/gpu.sh)
    GPU_BENCH_PARTS=${GPU_BENCH_PARTS:-train} GPU_BENCH_LIMIT_SMALL=$small GPU_BENCH_LIMIT_LARGE=$large PYTHON=python3 \
        timeout --kill-after=5 "$total" bash bench/gpu.sh 2>&1 | tee "$OUT/gpu_bench.log"
    bench_rc=${PIPESTATUS[0]}
    say "benchmark: status $bench_rc (1 = a shape failed or timed out, 2 = no CUDA, 124 = timed out)"
fi
for report in gpu.md gpu_eval.md; do
    if [ -f "reports/bench/$report" ] && [ "reports/bench/$report" -nt "$marker" ]; then
        cp "reports/bench/$report" "$OUT/$report"
        say "copied reports/bench/$report to $OUT/$report"
    else
        say "reports/bench/$report was not written by this run"
    fi
done
rm -f "$marker"

say "done: tests $tests_rc, benchmark $bench_rc"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
