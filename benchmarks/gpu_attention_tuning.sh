#!/usr/bin/env bash
# The whole train step with cuDNN attention and with the pallas kernel at several launch
# parameters (block_q:warps:block_q_bwd:warps_bwd), one process per line, on one GPU.
#   bash benchmarks/gpu_attention_tuning.sh OUT_DIR [SECONDS]
# Finished stages are packed into OUT_DIR/attention_tuning.tgz (benchmarks/stages.sh). About 9 minutes.
set -u
out=${1:?usage: gpu_attention_tuning.sh OUT_DIR [SECONDS]}
# shellcheck source=benchmarks/stages.sh
source "$(dirname "$0")/stages.sh" "$out" "${2:-540}"
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
work=$(mktemp -d)
s() { stage "$work" attention_tuning.tgz "$@"; }
bench=(python3 scripts/bench.py --steps=10 --repeats=3 --peak_tflops=790 "--out=$work/ab")
s 260 ab.log "${bench[@]}" --methods=bitfit --batches=256 --attention_impl=cudnn,pallas \
    --attention_tuning=128:8:128:8,128:8:64:8,128:4:32:4
s 70 ab.log "${bench[@]}" --methods=full --batches=256 --attention_impl=pallas --attention_tuning=128:8:128:8
s 70 ab.log "${bench[@]}" --methods=prefix --batches=256 --attention_impl=pallas --attention_tuning=128:8:128:8
s 70 ab.log "${bench[@]}" --methods=bitfit --batches=64 --attention_impl=pallas --attention_tuning=128:8:128:8
