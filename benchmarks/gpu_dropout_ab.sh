#!/usr/bin/env bash
# A/B of where the hidden-dropout masks come from (jax.random bits vs a keyed position hash,
# jaxpeft.models.hash_dropout) on one GPU, one process per line, and a profile of the hashed
# BitFit step. A BERT-base configuration takes about 50 s here (compile, warm-up, 3 x 10 steps).
#   bash benchmarks/gpu_dropout_ab.sh OUT_DIR [SECONDS]
# Finished stages are packed into OUT_DIR/dropout_ab.tgz (benchmarks/stages.sh).
set -u
out=${1:?usage: gpu_dropout_ab.sh OUT_DIR [SECONDS]}
# shellcheck source=benchmarks/stages.sh
source "$(dirname "$0")/stages.sh" "$out" "${2:-420}"
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
work=$(mktemp -d)
s() { stage "$work" dropout_ab.tgz "$@"; }
bench=(python3 scripts/bench.py --steps=10 --repeats=3 --peak_tflops=790 "--out=$work/ab")
s 130 ab.log "${bench[@]}" --methods=bitfit --batches=256 --dropout_impl=random,hash
s 70 prof.log python3 benchmarks/profile_step.py --out="$work" --method=bitfit --batch=256 \
    --dropout_impl=hash --name=bitfit_b256_hash
s 130 ab.log "${bench[@]}" --methods=bitfit --batches=64 --dropout_impl=random,hash
s 130 ab.log "${bench[@]}" --methods=full --batches=256 --dropout_impl=random,hash
