#!/usr/bin/env bash
# Device profiles of the batch-256 train step and the dropout-mask A/B, on one GPU.
#   bash benchmarks/gpu_profile.sh OUT_DIR [SECONDS]
# Each finished stage is packed into OUT_DIR/profile.tgz (so a cut run still returns what it did).
set -u
out=${1:?usage: gpu_profile.sh OUT_DIR [SECONDS]}; budget=${2:-420}
work=$(mktemp -d); mkdir -p "$out"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
end=$(( $(date +%s) + budget ))
left() { echo $(( end - $(date +%s) )); }
pack() { tar -czf "$out/profile.tgz" -C "$work" . ; }
prof() { timeout $(( $(left) < 90 ? $(left) : 90 )) python3 benchmarks/profile_step.py --out="$work" "$@"; pack; }
prof --method=bitfit --batch=256 --name=bitfit_b256
prof --method=full --batch=256 --name=full_b256
timeout $(( $(left) < 100 ? $(left) : 100 )) python3 scripts/bench.py --steps=10 --repeats=3 --peak_tflops=790 \
    --methods=bitfit --batches=256 --dropout_bits=32,8 --out="$work/ab" > "$work/ab.log" 2>&1; pack
prof --method=bitfit --batch=256 --dropout_bits=8 --name=bitfit_b256_bits8
prof --method=bitfit --batch=256 --dropout=0 --name=bitfit_b256_nodrop
