#!/usr/bin/env bash
# BERT-large rows and measured largest batches, ours and the PyTorch + peft peer (torch.compile).
# BERT-large, seq 128, bf16, batch 64; then BERT-base batches near the predicted capacity (an
# out-of-memory run is recorded as an error row, not fatal) and the peer's prompt tuning at 256.
#   bash benchmarks/gpu_large.sh OUT_DIR [SECONDS] [both|ours|peer]
# both: ours on GPU 0 and the peer on GPU 1 at the same time (a two-GPU host); ours or peer: that
# stream alone on GPU 0. Finished stages are packed into OUT_DIR/ours.tgz and OUT_DIR/peer.tgz
# (benchmarks/stages.sh).
set -u
out=${1:?usage: gpu_large.sh OUT_DIR [SECONDS] [both|ours|peer]}; budget=${2:-450}; which=${3:-both}
# shellcheck source=benchmarks/stages.sh
source "$(dirname "$0")/stages.sh" "$out" "$budget"
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.95
bench=(python3 scripts/bench.py --steps=10 --repeats=3 --peak_tflops=790)
ours() {
  local w; w=$(mktemp -d); local o=(--out="$w/ours" --dropout_impl=hash)
  stage "$w" ours.tgz 240 ours.log "${bench[@]}" "${o[@]}" --sizes=large --methods=bitfit,full,ptuning_v2 --batches=64
  stage "$w" ours.tgz 180 ours.log python3 scripts/bench.py --steps=2 --repeats=1 --peak_tflops=790 "${o[@]}" \
      --sizes=base --methods=bitfit,full --batches=2048,3072
}
peer() {
  local w; w=$(mktemp -d)
  stage "$w" peer.tgz 300 peer.log "${bench[@]}" --no_ours --out="$w/peer" --peer=compile --timeout=140 \
      --sizes=large --methods=bitfit,full --batches=64
  stage "$w" peer.tgz 200 peer.log "${bench[@]}" --no_ours --out="$w/peer" --peer=compile --timeout=180 \
      --sizes=base --methods=prompt --batches=256
}
case $which in
  both) CUDA_VISIBLE_DEVICES=0 ours & CUDA_VISIBLE_DEVICES=1 peer & wait ;;
  ours) ours ;;
  peer) peer ;;
  *) echo "gpu_large.sh: the third argument is both, ours or peer, not '$which'" >&2; exit 2 ;;
esac
