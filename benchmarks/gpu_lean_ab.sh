#!/usr/bin/env bash
# A/B of the LayerNorm/GELU backward (lean residuals vs autodiff's) on one GPU, a profile of the
# lean BitFit step, and the attention kernel (cuDNN vs XLA) at batch 256.
#   bash benchmarks/gpu_lean_ab.sh OUT_DIR [SECONDS]
# Each finished stage is packed into OUT_DIR/lean_ab.tgz; a stage starts only with 30 s left.
set -u
out=${1:?usage: gpu_lean_ab.sh OUT_DIR [SECONDS]}; budget=${2:-420}
work=$(mktemp -d); mkdir -p "$out"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
end=$(( $(date +%s) + budget ))
left() { echo $(( end - $(date +%s) )); }
pack() { tar -czf "$out/lean_ab.tgz" -C "$work" . ; }
stage() {
  local cap=$1 log=$2; shift 2
  local t=$(( $(left) < cap ? $(left) : cap ))
  if (( t < 30 )); then echo "skipped (no time): $*" >> "$work/$log"; return; fi
  timeout "$t" "$@" >> "$work/$log" 2>&1
  pack
}
bench=(python3 scripts/bench.py --steps=10 --repeats=3 --peak_tflops=790 "--out=$work/ab")
stage 150 ab.log "${bench[@]}" --methods=bitfit,full --batches=256 --lean=1,0
stage 80 prof.log python3 benchmarks/profile_step.py --out="$work" --method=bitfit --batch=256 --name=bitfit_b256_lean
stage 120 ab.log "${bench[@]}" --methods=bitfit,full --batches=64 --lean=1,0
stage 60 ab.log "${bench[@]}" --methods=bitfit --batches=256 --remat=elementwise
stage 60 ab.log "${bench[@]}" --methods=bitfit --batches=256 --attention_impl=xla
stage 60 ab.log "${bench[@]}" --methods=bitfit --batches=256 --dropout=0
