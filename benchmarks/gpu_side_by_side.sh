#!/usr/bin/env bash
# shellcheck disable=SC2030,SC2031  # each GPU stream sets its own CUDA_VISIBLE_DEVICES in its subshell
# Ours (GPU 0) and the PyTorch + peft peer with torch.compile (GPU 1) at the same time, every method,
# BERT-base shapes, seq 128, batches 256 and 64; on GPU 0 also the lean-residuals A/B and two XLA
# flag A/Bs (Triton normalization fusions off, Triton GEMMs off) for BitFit at batch 256.
#   bash benchmarks/gpu_side_by_side.sh OUT_DIR [SECONDS]
# Finished stages are packed into OUT_DIR/ours.tgz and OUT_DIR/peer.tgz (benchmarks/stages.sh).
set -u
out=${1:?usage: gpu_side_by_side.sh OUT_DIR [SECONDS]}; budget=${2:-450}
# shellcheck source=benchmarks/stages.sh
source "$(dirname "$0")/stages.sh" "$out" "$budget"
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
bench=(python3 scripts/bench.py --steps=10 --repeats=3 --peak_tflops=790)
(
  export CUDA_VISIBLE_DEVICES=0
  w=$(mktemp -d); o=(--out="$w/ours")
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$w/machine.txt"
  stage "$w" ours.tgz 100 ours.log "${bench[@]}" "${o[@]}" --methods=bitfit,full --batches=256
  stage "$w" ours.tgz 50 ours.log "${bench[@]}" "${o[@]}" --methods=bitfit --batches=256 --lean=0
  stage "$w" ours.tgz 50 flags.log env XLA_FLAGS=--xla_gpu_enable_triton_softmax_priority_fusion=false "${bench[@]}" --out="$w/flag_softmax" --methods=bitfit --batches=256
  stage "$w" ours.tgz 50 flags.log env XLA_FLAGS=--xla_gpu_enable_triton_gemm=false "${bench[@]}" --out="$w/flag_gemm" --methods=bitfit --batches=256
  stage "$w" ours.tgz 150 ours.log "${bench[@]}" "${o[@]}" --methods=frozen,prompt,ptuning,prefix,ptuning_v2 --batches=256
  stage "$w" ours.tgz 150 ours.log "${bench[@]}" "${o[@]}" --methods=bitfit,full,prompt,prefix,ptuning_v2 --batches=64
) &
(
  export CUDA_VISIBLE_DEVICES=1
  w=$(mktemp -d)
  python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)" > "$w/versions.txt" 2>&1
  stage "$w" peer.tgz 440 peer.log "${bench[@]}" --no_ours --out="$w/peer" --peer=compile --timeout=100 \
      --methods=bitfit,full,prompt,ptuning_v2,prefix,ptuning --batches=256
  stage "$w" peer.tgz 200 peer.log "${bench[@]}" --no_ours --out="$w/peer" --peer=compile --timeout=100 \
      --methods=bitfit,full,prefix --batches=64
) &
wait
