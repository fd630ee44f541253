#!/usr/bin/env bash
# shellcheck disable=SC2030,SC2031  # each GPU stream sets its own CUDA_VISIBLE_DEVICES in its subshell
# Speed/memory A/B of how the train step is built (remat policy, fused QKV, dropout) on GPU 0,
# with the PyTorch + peft peer (torch.compile) on GPU 1 at the same time.
#   bash benchmarks/gpu_speed_ab.sh OUT_DIR
set -u
out=${1:?usage: gpu_speed_ab.sh OUT_DIR}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.95
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$out/machine.txt"
python3 -c "import jax, flax, optax, torch, transformers, peft; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)" >> "$out/machine.txt" 2>/dev/null
(
  export CUDA_VISIBLE_DEVICES=0
  timeout 330 python3 scripts/bench.py --sizes=base --methods=bitfit,full --batches=256 \
      --remat=none,elementwise --fuse_qkv=1,0 --steps=10 --repeats=3 --out="$out/ab"
  timeout 60 python3 scripts/bench.py --sizes=base --methods=bitfit --batches=256 --dropout=0 \
      --steps=10 --repeats=3 --peak_tflops=790 --out="$out/ab"
  timeout 150 python3 scripts/bench.py --sizes=base --methods=bitfit,full --batches=64 \
      --remat=none,elementwise --steps=10 --repeats=3 --peak_tflops=790 --out="$out/ab"
) > "$out/ours.log" 2>&1 &
(
  export CUDA_VISIBLE_DEVICES=1
  timeout 540 python3 scripts/bench.py --no_ours --sizes=base --methods=bitfit,full,prompt,ptuning_v2 \
      --batches=64,256 --peer=compile --steps=10 --repeats=3 --peak_tflops=790 --timeout=150 --out="$out/peer"
) > "$out/peer.log" 2>&1 &
wait
grep -v -i warn "$out/ours.log" | tail -30
grep -v -i warn "$out/peer.log" | grep torch | tail -20
