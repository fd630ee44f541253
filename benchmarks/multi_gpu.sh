#!/usr/bin/env bash
# Two GPUs of one host: scaling of the train step (data- and FSDP-parallel), the loss curve of a
# real training run on 1 vs 2 GPUs at the same global batch, and the 2-GPU run's mid-run checkpoint
# resumed on 1 GPU and on the CPU. Needs the bundled MiniLM weights (MODEL) and GLUE SST-2 (DATA).
#   bash benchmarks/multi_gpu.sh OUT_DIR [MODEL] [DATA]
# Env: SIZES (base), METHODS (bitfit,ptuning_v2), MAX_STEPS (60). Everything lands in OUT_DIR as
# it finishes: scale.jsonl, train.log (all runs' output), compare.md, runs.tgz (the runs' logs).
set -u
out=${1:?usage: multi_gpu.sh OUT_DIR [MODEL] [DATA]}
model=${2:-minilm}
data=${3:-../shared/data/glue}
work=${WORK:-/tmp/jaxpeft-multi-gpu}
sizes=${SIZES:-base}; meths=${METHODS:-bitfit,ptuning_v2}; steps=${MAX_STEPS:-60}; half=$((steps / 2))
rm -rf "$work"; mkdir -p "$out" "$work"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
bench=(python3 scripts/bench.py --steps=10 --repeats=3 --peak_tflops=790 "--sizes=$sizes" "--out=$work/scale")
train=(python3 scripts/train.py --method=bitfit --task=sst2 "--model=$model" "--data_dir=$data" --batch_size=64
       "--max_steps=$steps" "--max_train_examples=$((steps * 64))" --max_eval_examples=256 --log_every=5
       "--eval_every=$half" "--save_every=$half" --keep=3 --prng_impl=threefry2x32 --no-progress)
log=$out/train.log
t0=$(date +%s); stamp() { echo "## $1 at +$(( $(date +%s) - t0 ))s" | tee -a "$log"; }
save() { cp "$work/scale/bench.jsonl" "$out/scale.jsonl" 2>/dev/null; }

stamp "1: one-GPU references (bench on GPU 0, training on GPU 1)"
CUDA_VISIBLE_DEVICES=0 timeout 90 "${bench[@]}" "--methods=$meths" --batches=64 > "$out/bench.log" 2>&1 &
CUDA_VISIBLE_DEVICES=1 timeout 90 "${train[@]}" --output_dir="$work/bitfit_1gpu" >> "$log" 2>&1 &
wait; save
stamp "2: two-GPU bench"
timeout 70 "${bench[@]}" "--methods=$meths" --batches=128 --mesh=data:2 >> "$out/bench.log" 2>&1; save
timeout 40 "${bench[@]}" --methods=bitfit --batches=128 --mesh=data:1,fsdp:2 >> "$out/bench.log" 2>&1; save
stamp "3: two-GPU training"
timeout 80 "${train[@]}" --mesh=data:2 --output_dir="$work/bitfit_data2" >> "$log" 2>&1
stamp "4: resume the 2-GPU run's mid-run checkpoint on 1 GPU and on the CPU"
ls "$work/bitfit_data2/checkpoints" >> "$log" 2>&1
for where in gpu1 cpu; do
  cp -r "$work/bitfit_data2" "$work/resume_$where"
  rm -rf "$work/resume_$where/checkpoints/$steps" "$work/resume_$where/results.json" "$work/resume_$where/adapter"
done
CUDA_VISIBLE_DEVICES=0 timeout 60 "${train[@]}" --resume --output_dir="$work/resume_gpu1" > "$work/resume_gpu1.out" 2>&1 &
JAX_PLATFORMS=cpu timeout 60 "${train[@]}" --resume --output_dir="$work/resume_cpu" > "$work/resume_cpu.out" 2>&1 &
wait; cat "$work"/resume_*.out >> "$log"
stamp "5: compare"
{
  echo "# BitFit on SST-2: 1 GPU (reference) vs 2 GPUs, same global batch"
  python3 benchmarks/compare_runs.py "$work/bitfit_1gpu" "$work/bitfit_data2"
  echo; echo "# The 2-GPU run (reference) vs the same run resumed from its step-$half checkpoint elsewhere"
  python3 benchmarks/compare_runs.py "$work/bitfit_data2" "$work/resume_gpu1" "$work/resume_cpu" --from_step=$half
} > "$out/compare.md" 2>&1
python3 scripts/bench.py --report "$work/scale/bench.jsonl" --out="$out" > /dev/null 2>&1
tar czf "$out/runs.tgz" -C "$work" --exclude=checkpoints --exclude=adapter . 2>/dev/null
cat "$out/compare.md"; grep -h "seq/s\|ERROR" "$out/bench.log"; grep -h "^done\|^error\|resuming\|^## " "$log"
