#!/usr/bin/env bash
# The fused sublayer output (BertConfig.norm_impl=pallas: bias, dropout, residual and LayerNorm as
# one kernel each way) against XLA's fusions on one GPU: the BitFit step with each in one process
# (three launch parameters of ours), a device profile, and the other methods' batch-256 rows.
#   bash benchmarks/gpu_norm.sh OUT_DIR [SECONDS]
# Finished stages are packed into OUT_DIR/norm.tgz (benchmarks/stages.sh). About 9 minutes.
set -u
out=${1:?usage: gpu_norm.sh OUT_DIR [SECONDS]}
# shellcheck source=benchmarks/stages.sh
source "$(dirname "$0")/stages.sh" "$out" "${2:-560}"
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
work=$(mktemp -d)
s() { stage "$work" norm.tgz "$@"; }
bench=(python3 scripts/bench.py --steps=10 --repeats=3 --peak_tflops=790 "--out=$work/ab")
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$work/gpu.txt" 2>&1
s 220 ab.log "${bench[@]}" --methods=bitfit --batches=256 --norm_impl=xla,pallas \
    --norm_tuning=4:4:4:64:4,8:8:8:64:8,2:4:2:32:4
s 90 prof.log python3 benchmarks/profile_step.py --out="$work" --method=bitfit --batch=256 \
    --norm_impl=pallas --name=bitfit_b256_norm
s 230 ab.log "${bench[@]}" --methods=full,prefix,ptuning_v2,prompt --batches=256 --norm_impl=pallas
