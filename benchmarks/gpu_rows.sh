#!/usr/bin/env bash
# One-GPU rows on a 2-GPU host: our prompt/prefix methods, BERT-large and the dropout-mask A/B on
# GPU 0; the real-data SST-2 epoch and the peer's remaining torch.compile rows on GPU 1.
#   bash benchmarks/gpu_rows.sh OUT_DIR BERT_BASE_SHAPE_DIR GLUE_DIR [SECONDS]
set -u
out=${1:?usage: gpu_rows.sh OUT_DIR MODEL_DIR GLUE_DIR [SECONDS]}
model=${2:?}; data=${3:?}; budget=${4:-330}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
end=$(( $(date +%s) + budget ))
left() { echo $(( end - $(date +%s) )); }
bench=(python3 scripts/bench.py --steps=10 --repeats=3 --peak_tflops=790 "--out=$out/ours")
(
  export CUDA_VISIBLE_DEVICES=0
  timeout 75 "${bench[@]}" --methods=bitfit --batches=256 --dropout_bits=32,8
  timeout $(( $(left) * 3 / 5 )) "${bench[@]}" --methods=frozen,prompt,ptuning,prefix,ptuning_v2 --batches=64,256 --dropout_bits=8
  timeout $(( $(left) - 5 )) "${bench[@]}" --sizes=large --methods=full,bitfit --batches=64
) > "$out/ours.log" 2>&1 &
(
  export CUDA_VISIBLE_DEVICES=1
  s=$(date +%s)
  timeout 150 python3 scripts/train.py --method=bitfit --task=sst2 --model="$model" --random_init \
      --data_dir="$data" --dtype=bfloat16 --attention_impl=cudnn --batch_size=256 --num_epochs=1 \
      --max_seq_length=128 --eval_every=0 --keep=0 --no-progress --output_dir=/tmp/epoch
  echo "EPOCH_WALL_S $(( $(date +%s) - s )) (process start to exit, tokenization and compilation included)"
  cp /tmp/epoch/results.json "$out/epoch_results.json" 2>/dev/null
  timeout $(( $(left) - 5 )) python3 scripts/bench.py --no_ours --methods=ptuning_v2 --batches=256 --peer=compile \
      --steps=10 --repeats=3 --peak_tflops=790 --timeout=120 --out="$out/peer"
) > "$out/gpu1.log" 2>&1 &
wait
grep -v -i warn "$out/ours.log" | grep "seq/s\|ERROR"; grep -v -i warn "$out/gpu1.log" | grep -v "^|" | tail -12
