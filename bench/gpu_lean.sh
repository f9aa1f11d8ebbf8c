#!/usr/bin/env bash
# Issue 18's GPU rows in one short call (~2-3 minutes on one H100/H200), for an offline GPU image
# whose python3 has CUDA torch: the fused-kernel GPU test, then bench/gpu_step.py at the Qwen2.5-0.5B
# and -7B shapes, each measuring emtune's step as it was before issue 18 and as it is now on the
# same model in one process (KL / feature-l2 / undefended: time, peak memory, MFU on LoRA FLOPs and
# on 6·N·T; Liger-Kernel's RMSNorm/SwiGLU/RoPE when its wheel is installed; selective activation
# checkpointing). Output: $OUT/gpu.md (also reports/bench/gpu.md), $OUT/gpu_lean.log.
# Wheels: carry .whl/ with the pinned packages the image lacks (see bench/gpu_check.sh) plus
#   python3 -m pip download --no-deps -d .whl liger-kernel==0.8.5
# (pure Python; its Triton comes with the image's CUDA torch). Without it the "now" rows run the
# plain kernels and say so.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp}
mkdir -p "$OUT"
log="$OUT/gpu_lean.log"
say() { echo "== gpu_lean +${SECONDS}s: $*" | tee -a "$log"; }
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site:$PWD || { say "wheel install FAILED"; exit 3; }
else
    export PYTHONPATH=$PWD
fi
python3 -c "import torch, importlib.util as u; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), \
'liger', u.find_spec('liger_kernel') is not None)" 2>&1 | tee -a "$log"
nvidia-smi -L 2>&1 | tee -a "$log"

say "fused-kernel and GPU step tests"
timeout 90 python3 -m pytest -q -p no:cacheprovider -m gpu tests/train/test_memory.py tests/train/test_gpu.py -k "fused or defended_loss" 2>&1 | tail -5 | tee -a "$log"
status=0
say "0.5B shape"
timeout 70 python3 bench/gpu_step.py --shape qwen2.5-0.5b --rounds 1 --steps 3 --warmup 1 --gen-new 0 \
    >>"$log" 2>&1 || { say "0.5B failed (status $?, 124 = timed out)"; status=1; }
append=(); [ "$status" -eq 0 ] && append=(--append)
say "7B shape"
timeout 150 python3 bench/gpu_step.py --shape qwen2.5-7b --rounds 1 --steps 3 --warmup 1 --gen-new 0 \
    --before-checkpointing on "${append[@]}" >>"$log" 2>&1 || { say "7B failed (status $?, 124 = timed out)"; status=1; }
cp reports/bench/gpu.md "$OUT/gpu.md" 2>/dev/null && say "copied reports/bench/gpu.md to $OUT/gpu.md"
grep -E "Issue 18 rows|selective checkpointing|fused kernels" "$log" | tee -a "$OUT/summary.txt"
say "done (status $status)"
exit "$status"
