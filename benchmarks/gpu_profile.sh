#!/usr/bin/env bash
# Device profiles of the batch-256 train step and the dropout-mask A/B, on one GPU.
#   bash benchmarks/gpu_profile.sh OUT_DIR [SECONDS]
# Finished stages are packed into OUT_DIR/profile.tgz (benchmarks/stages.sh).
set -u
out=${1:?usage: gpu_profile.sh OUT_DIR [SECONDS]}
# shellcheck source=benchmarks/stages.sh
source "$(dirname "$0")/stages.sh" "$out" "${2:-420}"
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
work=$(mktemp -d)
s() { stage "$work" profile.tgz "$@"; }
prof=(python3 benchmarks/profile_step.py --out="$work")
s 90 prof.log "${prof[@]}" --method=bitfit --batch=256 --name=bitfit_b256
s 90 prof.log "${prof[@]}" --method=full --batch=256 --name=full_b256
s 100 ab.log python3 scripts/bench.py --steps=10 --repeats=3 --peak_tflops=790 \
    --methods=bitfit --batches=256 --dropout_impl=random --dropout_bits=32,8 --out="$work/ab"
s 90 prof.log "${prof[@]}" --method=bitfit --batch=256 --dropout_impl=random --dropout_bits=8 --name=bitfit_b256_bits8
s 90 prof.log "${prof[@]}" --method=bitfit --batch=256 --dropout=0 --name=bitfit_b256_nodrop
