#!/usr/bin/env bash
# Launch parameters of our kernels in the whole BitFit step, and a profile of full fine-tuning:
#   1. a device profile of full fine-tuning at batch 256 (benchmarks/profile_step.py);
#   2. BitFit at batch 256 with attention launches: the default 128:8:128:8, more warps both ways;
#   3. BitFit at batch 256 with sublayer-output launches: the default 2:4:2:32:4 and neighbours.
#   bash benchmarks/gpu_tuning.sh OUT_DIR [SECONDS]
# Finished stages are packed into OUT_DIR/tuning.tgz (benchmarks/stages.sh). About 9 minutes.
set -u
out=${1:?usage: gpu_tuning.sh OUT_DIR [SECONDS]}
# shellcheck source=benchmarks/stages.sh
source "$(dirname "$0")/stages.sh" "$out" "${2:-560}"
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
work=$(mktemp -d)
s() { stage "$work" tuning.tgz "$@"; }
bench=(python3 scripts/bench.py --steps=10 --repeats=3 --peak_tflops=790 --methods=bitfit --batches=256)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$work/gpu.txt" 2>&1
s 100 prof.log python3 benchmarks/profile_step.py --out="$work" --method=full --batch=256 --name=full_b256
s 220 attn.log "${bench[@]}" --out="$work/attn" --attention_tuning=128:8:128:8,128:8:128:16,128:16:128:16,128:8:128:8
s 220 norm.log "${bench[@]}" --out="$work/norm" --norm_tuning=2:4:2:32:4,2:4:2:16:4,2:4:2:64:4,2:8:2:32:8
