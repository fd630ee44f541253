#!/usr/bin/env bash
# The feed-forward bias + GELU kernels (BertConfig.activation_impl=pallas) against XLA's fusions in
# the BitFit step (one process, with the fused sublayer outputs on both sides), the peer's
# torch.compile BitFit row in the same command, and full fine-tuning with every kernel.
#   bash benchmarks/gpu_gelu.sh OUT_DIR [SECONDS]
# Finished stages are packed into OUT_DIR/gelu.tgz (benchmarks/stages.sh). About 5 minutes.
set -u
out=${1:?usage: gpu_gelu.sh OUT_DIR [SECONDS]}
# shellcheck source=benchmarks/stages.sh
source "$(dirname "$0")/stages.sh" "$out" "${2:-320}"
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
work=$(mktemp -d)
s() { stage "$work" gelu.tgz "$@"; }
bench=(python3 scripts/bench.py --steps=10 --repeats=3 --peak_tflops=790)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$work/gpu.txt" 2>&1
s 150 ab.log "${bench[@]}" --out="$work/ab" --methods=bitfit --batches=256 --activation_impl=xla,pallas
s 90 peer.log "${bench[@]}" --out="$work/peer" --no_ours --peer=compile --timeout=80 --methods=bitfit --batches=256
s 80 full.log "${bench[@]}" --out="$work/full" --methods=full --batches=256 --activation_impl=pallas
