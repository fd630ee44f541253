#!/usr/bin/env bash
# Our short-sequence attention kernel (jaxpeft.models.pallas_attention) against cuDNN on one GPU:
# the kernel alone over a grid of block sizes and warps (benchmarks/attention_kernels.py), then the
# whole train step with each (scripts/bench.py --attention_impl=cudnn,pallas, one process per line).
#   bash benchmarks/gpu_attention.sh OUT_DIR [SECONDS]
# Finished stages are packed into OUT_DIR/attention.tgz (benchmarks/stages.sh). About 8 minutes.
set -u
out=${1:?usage: gpu_attention.sh OUT_DIR [SECONDS]}
# shellcheck source=benchmarks/stages.sh
source "$(dirname "$0")/stages.sh" "$out" "${2:-570}"
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
work=$(mktemp -d)
s() { stage "$work" attention.tgz "$@"; }
bench=(python3 scripts/bench.py --steps=10 --repeats=3 --peak_tflops=790 "--out=$work/ab")
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$work/gpu.txt" 2>&1
s 100 kernels.log python3 benchmarks/attention_kernels.py --out="$work" --seq=128 --prefix=0 \
    --block_q=128 --warps=4,8 --block_q_bwd=32,64,128 --warps_bwd=4,8
s 40 kernels.log python3 benchmarks/attention_kernels.py --out="$work" --seq=128 --prefix=20 \
    --block_q=128 --warps=8 --block_q_bwd=64 --warps_bwd=4
s 120 ab.log "${bench[@]}" --methods=bitfit --batches=256 --attention_impl=cudnn,pallas
s 110 ab.log "${bench[@]}" --methods=bitfit --batches=64 --attention_impl=cudnn,pallas
s 170 ab.log "${bench[@]}" --methods=prefix,ptuning_v2,full --batches=256 --attention_impl=pallas
