#!/usr/bin/env bash
# BERT-large rows and measured largest batches: ours on GPU 0, the PyTorch + peft peer
# (torch.compile) on GPU 1 at the same time. BERT-large, seq 128, bf16, batch 64 (and 128 for ours);
# then BERT-base batches near the predicted capacity (OOM is recorded as an error row, not fatal).
#   bash benchmarks/gpu_large.sh OUT_DIR [SECONDS]
# Finished stages are packed into OUT_DIR/ours.tgz and OUT_DIR/peer.tgz (benchmarks/stages.sh).
# shellcheck disable=SC2030,SC2031  # each GPU stream sets its own CUDA_VISIBLE_DEVICES in its subshell
set -u
out=${1:?usage: gpu_large.sh OUT_DIR [SECONDS]}; budget=${2:-450}
# shellcheck source=benchmarks/stages.sh
source "$(dirname "$0")/stages.sh" "$out" "$budget"
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.95
bench=(python3 scripts/bench.py --steps=10 --repeats=3 --peak_tflops=790)
(
  export CUDA_VISIBLE_DEVICES=0
  w=$(mktemp -d); o=(--out="$w/ours")
  stage "$w" ours.tgz 200 ours.log "${bench[@]}" "${o[@]}" --sizes=large --methods=bitfit,full,ptuning_v2 --batches=64,128
  stage "$w" ours.tgz 60 ours.log "${bench[@]}" "${o[@]}" --sizes=base --methods=full --batches=256 --lean=0
  stage "$w" ours.tgz 150 ours.log python3 scripts/bench.py --steps=2 --repeats=1 --peak_tflops=790 "${o[@]}" \
      --sizes=base --methods=bitfit,full --batches=2048,3072
) &
(
  export CUDA_VISIBLE_DEVICES=1
  w=$(mktemp -d)
  stage "$w" peer.tgz 300 peer.log "${bench[@]}" --no_ours --out="$w/peer" --peer=compile --timeout=140 \
      --sizes=large --methods=bitfit,full --batches=64
  stage "$w" peer.tgz 200 peer.log "${bench[@]}" --no_ours --out="$w/peer" --peer=compile --timeout=180 \
      --sizes=base --methods=prompt --batches=256
) &
wait
