#!/usr/bin/env bash
# Column tiles in the sublayer-output kernels and key segments in the attention kernel, on one GPU:
#   1. the sublayer-output kernels alone (benchmarks/norm_kernels.py): XLA's fusions, the one padded
#      tile of 1024 columns of the previous build, three tiles of 256, the backward loop pipelined,
#      other row blocks; dropout rate 0 and 0.1 (the hash's share);
#   2. attention alone at 148 and 128 tokens (benchmarks/attention_kernels.py): cuDNN against our
#      kernel (148 = a main segment of 128 and a tail of 32);
#   3. BitFit at batch 256: the previous build's tile against the fastest tuning of step 1;
#   4. prompt tuning at batch 256 (148 tokens): cuDNN's attention against ours.
#   bash benchmarks/gpu_segments.sh OUT_DIR [SECONDS]
# Finished stages are packed into OUT_DIR/segments.tgz (benchmarks/stages.sh). About 8 minutes.
# Ran at commit 1a10062, whose norm tuning had a seventh field, the column tile (1024: one padded
# tile, the build before; 0: automatic, three of 256); the tiles measured slower and were removed.
set -u
out=${1:?usage: gpu_segments.sh OUT_DIR [SECONDS]}
# shellcheck source=benchmarks/stages.sh
source "$(dirname "$0")/stages.sh" "$out" "${2:-560}"
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
work=$(mktemp -d)
s() { stage "$work" segments.tgz "$@"; }
bench=(python3 scripts/bench.py --steps=10 --repeats=3 --peak_tflops=790)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$work/gpu.txt" 2>&1
old=2:4:2:32:4:1:1024
s 110 norm.log python3 benchmarks/norm_kernels.py --out="$work" --rates=0,0.1 \
    --tunings=$old,2:4:2:32:4,2:4:2:32:4:2,2:4:2:32:4:3,4:4:4:32:4,1:4:2:32:4,4:8:4:64:8:2,2:4:2:32:4:1:128
s 90 attn.log python3 benchmarks/attention_kernels.py --out="$work" --seq=148,128 --block_q=128,64 \
    --warps=8 --block_q_bwd=128,64 --warps_bwd=8
best=$(python3 - "$work/norm_kernels.jsonl" "$old" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])] if __import__("os").path.exists(sys.argv[1]) else []
rows = [r for r in rows if r["rate"] > 0 and r["impl"] not in ("xla", sys.argv[2]) and "fwd_bwd_ms" in r]
print(min(rows, key=lambda r: r["fwd_bwd_ms"])["impl"] if rows else "2:4:2:32:4")
PY
)
echo "fastest tuning alone: $best" >> "$work/ab.log"
s 170 ab.log "${bench[@]}" --out="$work/ab" --methods=bitfit --batches=256 --norm_tuning="$old,$best"
s 170 prompt.log "${bench[@]}" --out="$work/prompt" --methods=prompt --batches=256 --attention_impl=cudnn,pallas
