#!/usr/bin/env bash
# Ours and the PyTorch + peft peer (torch.compile) on the same GPU in one run, one after the other:
# the given methods at batch 256 (BERT-base shapes, seq 128, bf16), ours with the build's defaults.
#   bash benchmarks/gpu_same_run.sh OUT_DIR SECONDS METHODS [BATCHES]
#   e.g. bash benchmarks/gpu_same_run.sh OUT 540 bitfit,full,prefix
# Finished stages are packed into OUT_DIR/same.tgz (benchmarks/stages.sh). About a minute per
# method for each side, plus a minute; the peer's compile takes up to two. 570 s held three
# methods with the peer (bitfit,full,ptuning) but not the peer's fourth (prefix).
# OURS_ARGS: more arguments for our side, e.g. OURS_ARGS=--cls_only=1,0 (two rows per method;
# then give OURS_SECONDS, our stage's limit, room for them: about 45 s a row).
set -u
out=${1:?usage: gpu_same_run.sh OUT_DIR SECONDS METHODS [BATCHES]}
methods=${3:?}; batches=${4:-256}
# shellcheck source=benchmarks/stages.sh
source "$(dirname "$0")/stages.sh" "$out" "${2:?}"
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
work=$(mktemp -d)
s() { stage "$work" same.tgz "$@"; }
bench=(python3 scripts/bench.py --steps=10 --repeats=3 --peak_tflops=790 --methods="$methods" --batches="$batches")
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$work/gpu.txt" 2>&1
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)" > "$work/versions.txt" 2>&1
n=$(tr ',' '\n' <<< "$methods" | wc -l)
# ours first (about 45 s per method, the first about a minute more), then the peer in its own
# processes (our process has exited, so the GPU's memory is free for it). The peer's prefix
# tuning took more than 120 s to its first step on a fresh machine.
# shellcheck disable=SC2086  # OURS_ARGS is a list of arguments
s "${OURS_SECONDS:-$(( 60 + 60 * n ))}" ours.log "${bench[@]}" ${OURS_ARGS:-} --out="$work/ours"
s $(( 150 * n )) peer.log "${bench[@]}" --no_ours --peer=compile --timeout=240 --out="$work/peer"
# both sides in one table with the ratios (OUT_DIR/same.tgz: combined/bench.md)
s 60 report.log python3 scripts/bench.py --report "$work/ours/bench.jsonl" "$work/peer/bench.jsonl" --out="$work/combined"
