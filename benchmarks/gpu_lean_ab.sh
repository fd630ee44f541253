#!/usr/bin/env bash
# A/B of the LayerNorm/GELU backward (lean residuals vs autodiff's) on one GPU, a profile of the
# lean BitFit step, and the attention kernel (cuDNN vs XLA) at batch 256.
#   bash benchmarks/gpu_lean_ab.sh OUT_DIR [SECONDS]
# Finished stages are packed into OUT_DIR/lean_ab.tgz (benchmarks/stages.sh).
set -u
out=${1:?usage: gpu_lean_ab.sh OUT_DIR [SECONDS]}
# shellcheck source=benchmarks/stages.sh
source "$(dirname "$0")/stages.sh" "$out" "${2:-420}"
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
work=$(mktemp -d)
s() { stage "$work" lean_ab.tgz "$@"; }
bench=(python3 scripts/bench.py --steps=10 --repeats=3 --peak_tflops=790 "--out=$work/ab")
s 150 ab.log "${bench[@]}" --methods=bitfit,full --batches=256 --lean=1,0
s 80 prof.log python3 benchmarks/profile_step.py --out="$work" --method=bitfit --batch=256 --name=bitfit_b256_lean
s 120 ab.log "${bench[@]}" --methods=bitfit,full --batches=64 --lean=1,0
s 60 ab.log "${bench[@]}" --methods=bitfit --batches=256 --remat=elementwise
s 60 ab.log "${bench[@]}" --methods=bitfit --batches=256 --attention_impl=xla
s 60 ab.log "${bench[@]}" --methods=bitfit --batches=256 --dropout=0
