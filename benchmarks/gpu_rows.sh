#!/usr/bin/env bash
# The one-GPU rows: the real-data SST-2 epoch (BitFit, BERT-base shapes), then our prompt/prefix
# methods at batch 256 and 64; on the GPU CUDA_VISIBLE_DEVICES names.
#   bash benchmarks/gpu_rows.sh OUT_DIR BERT_BASE_SHAPE_DIR GLUE_DIR [SECONDS]
# Each finished stage is packed into OUT_DIR/rows.tgz; a stage starts only with 30 s left.
set -u
out=${1:?usage: gpu_rows.sh OUT_DIR MODEL_DIR GLUE_DIR [SECONDS]}
model=${2:?}; data=${3:?}; budget=${4:-420}
work=$(mktemp -d); mkdir -p "$out"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
end=$(( $(date +%s) + budget ))
left() { echo $(( end - $(date +%s) )); }
stage() {  # stage MAX_SECONDS LOG cmd...: run with min(MAX, time left), then pack
  local cap=$1 log=$2; shift 2
  local t=$(( $(left) < cap ? $(left) : cap ))
  if (( t < 30 )); then echo "skipped (no time): $*" >> "$work/$log"; return; fi
  timeout "$t" "$@" >> "$work/$log" 2>&1
  pack
}
pack() { tar -czf "$out/rows.tgz" -C "$work" . ; }
bench=(python3 scripts/bench.py --steps=10 --repeats=3 --peak_tflops=790 "--out=$work/ours")
s=$(date +%s)
stage 260 epoch.log python3 scripts/train.py --method=bitfit --task=sst2 --model="$model" --random_init \
    --data_dir="$data" --dtype=bfloat16 --attention_impl=cudnn --batch_size=256 --num_epochs=1 \
    --max_seq_length=128 --eval_every=0 --keep=0 --no-progress --output_dir="$work/epoch"
echo "EPOCH_WALL_S $(( $(date +%s) - s )) (process start to exit, tokenization and compilation included)" >> "$work/epoch.log"
pack
stage 200 ours.log "${bench[@]}" --methods=prompt,ptuning,prefix,ptuning_v2 --batches=256
stage 200 ours.log "${bench[@]}" --methods=ptuning,prefix,ptuning_v2,prompt --batches=64
