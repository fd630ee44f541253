#!/usr/bin/env bash
# Two candidate changes in the whole train step, each against the default in the same process:
#   erf_impl       xla (jax.lax.erf) | rsqrt (the same rational erf without its IEEE division)
#   attention      128:8:128:8 (default) | 128:8:128:8:o (the backward kernel's delta_from_output)
# BitFit, then full fine-tuning, at batch 256 (BERT-base, seq 128, bf16), all four combinations.
#   bash benchmarks/gpu_variants.sh OUT_DIR [SECONDS]
# Finished stages are packed into OUT_DIR/variants.tgz (benchmarks/stages.sh). About 8 minutes.
set -u
out=${1:?usage: gpu_variants.sh OUT_DIR [SECONDS]}
# shellcheck source=benchmarks/stages.sh
source "$(dirname "$0")/stages.sh" "$out" "${2:-480}"
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
work=$(mktemp -d)
s() { stage "$work" variants.tgz "$@"; }
variants=(--erf_impl="xla,rsqrt" --attention_tuning="128:8:128:8,128:8:128:8:o")
bench=(python3 scripts/bench.py --steps=10 --repeats=3 --peak_tflops=790 --batches=256 "${variants[@]}")
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$work/gpu.txt" 2>&1
s 230 bitfit.log "${bench[@]}" --out="$work/bitfit" --methods=bitfit
s 250 full.log "${bench[@]}" --out="$work/full" --methods=full
