#!/usr/bin/env bash
# The q/k/v projection bias inside our attention kernels: the kernel alone against cuDNN (which
# pays for the bias add, the split, the concatenation and the bias-gradient reduction around it),
# the BitFit step with each in one process, a device profile, and the other batch-256 rows.
#   bash benchmarks/gpu_qkv_bias.sh OUT_DIR [SECONDS]
# Finished stages are packed into OUT_DIR/qkv_bias.tgz (benchmarks/stages.sh). About 8 minutes.
set -u
out=${1:?usage: gpu_qkv_bias.sh OUT_DIR [SECONDS]}
# shellcheck source=benchmarks/stages.sh
source "$(dirname "$0")/stages.sh" "$out" "${2:-540}"
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
work=$(mktemp -d)
s() { stage "$work" qkv_bias.tgz "$@"; }
bench=(python3 scripts/bench.py --steps=10 --repeats=3 --peak_tflops=790 "--out=$work/ab")
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$work/gpu.txt" 2>&1
s 60 kernels.log python3 benchmarks/attention_kernels.py --out="$work" --seq=128 --prefix=0,20 \
    --block_q=128 --warps=8 --block_q_bwd=128 --warps_bwd=8
s 120 ab.log "${bench[@]}" --methods=bitfit --batches=256 --attention_impl=cudnn,pallas
s 90 prof.log python3 benchmarks/profile_step.py --out="$work" --method=bitfit --batch=256 --name=bitfit_b256
s 200 ab.log "${bench[@]}" --methods=full,prefix,ptuning_v2 --batches=256 --attention_impl=pallas
