#!/usr/bin/env bash
# The current build's rows on one GPU (our attention kernel with the q/k/v bias inside, the fused
# sublayer outputs): the BitFit A/B of the sublayer outputs, prompt tuning and P-tuning (cuDNN
# attention at 148 tokens), the large batches, batch 64, and the peer's torch.compile BitFit row
# in the same command.
#   bash benchmarks/gpu_final.sh OUT_DIR [SECONDS]
# Finished stages are packed into OUT_DIR/final.tgz (benchmarks/stages.sh). About 9 minutes.
set -u
out=${1:?usage: gpu_final.sh OUT_DIR [SECONDS]}
# shellcheck source=benchmarks/stages.sh
source "$(dirname "$0")/stages.sh" "$out" "${2:-560}"
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.95
work=$(mktemp -d)
s() { stage "$work" final.tgz "$@"; }
bench=(python3 scripts/bench.py --peak_tflops=790)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$work/gpu.txt" 2>&1
s 110 ab.log "${bench[@]}" --steps=10 --repeats=3 --out="$work/ab" --methods=bitfit --batches=256 \
    --norm_impl=xla,pallas
s 110 rows.log "${bench[@]}" --steps=10 --repeats=3 --out="$work/prompt" --methods=prompt,ptuning --batches=256
s 130 large.log "${bench[@]}" --steps=2 --repeats=1 --out="$work/large" --methods=bitfit --batches=1024,2048
s 110 b64.log "${bench[@]}" --steps=10 --repeats=3 --out="$work/b64" --methods=bitfit,full,prompt --batches=64
s 150 peer.log "${bench[@]}" --steps=10 --repeats=3 --out="$work/peer" --no_ours --peer=compile --timeout=140 \
    --methods=bitfit --batches=256
