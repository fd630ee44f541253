#!/usr/bin/env bash
# The one-GPU rows: the real-data SST-2 epoch (BitFit, BERT-base shapes), then our prompt/prefix
# methods at batch 256 and 64; on the GPU CUDA_VISIBLE_DEVICES names.
#   bash benchmarks/gpu_rows.sh OUT_DIR BERT_BASE_SHAPE_DIR GLUE_DIR [SECONDS]
# Finished stages are packed into OUT_DIR/rows.tgz (benchmarks/stages.sh).
set -u
out=${1:?usage: gpu_rows.sh OUT_DIR MODEL_DIR GLUE_DIR [SECONDS]}
model=${2:?}; data=${3:?}
# shellcheck source=benchmarks/stages.sh
source "$(dirname "$0")/stages.sh" "$out" "${4:-420}"
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
work=$(mktemp -d)
s() { stage "$work" rows.tgz "$@"; }
bench=(python3 scripts/bench.py --steps=10 --repeats=3 --peak_tflops=790 "--out=$work/ours")
t0=$(date +%s)
s 260 epoch.log python3 scripts/train.py --method=bitfit --task=sst2 --model="$model" --random_init \
    --data_dir="$data" --dtype=bfloat16 --attention_impl=cudnn --batch_size=256 --num_epochs=1 \
    --max_seq_length=128 --eval_every=0 --keep=0 --no-progress --output_dir="$work/epoch"
echo "EPOCH_WALL_S $(( $(date +%s) - t0 )) (process start to exit, tokenization and compilation included)" >> "$work/epoch.log"
tar -czf "$out/rows.tgz" -C "$work" .
s 200 ours.log "${bench[@]}" --methods=prompt,ptuning,prefix,ptuning_v2 --batches=256
s 200 ours.log "${bench[@]}" --methods=ptuning,prefix,ptuning_v2,prompt --batches=64
