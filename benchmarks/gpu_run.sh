#!/usr/bin/env bash
# One GPU host, from a source checkout: the step benchmark, the job benchmark and the GPU tests,
# each stage logged to OUT_DIR/<stage>.log as it finishes (and its own files under OUT_DIR/<stage>/).
#   bash benchmarks/gpu_run.sh OUT_DIR STAGE [STAGE ...]
# Stages:
#   env                        versions and the GPU
#   tests                      the tests that run only on a GPU (auto against exact, ...)
#   job:METHOD[:FLAGS]         benchmarks/job.py for METHOD on SST-2 (FLAGS: our training flags,
#                              '+'-separated, e.g. job:bitfit:--packing); PEER=eager,compile
#                              (default: eager) sets the peer's modes, PEER= none; JOBARGS: more
#                              job.py arguments (e.g. '--runs=cold --peer_epochs=1')
#   bench:METHODS:BATCHES[:SEQ[:SIZE[:FLAGS]]]   the step benchmark (ours only; PEERBENCH=compile adds
#                              the peer; FLAGS: compute flags, '+'-separated, e.g. --compute=exact)
#   train:METHOD[:FLAGS]       one training run of METHOD on SST-2 with our defaults plus FLAGS
#   seeds:METHOD[:FLAGS]       three training runs (seeds 0, 1, 2; two at a time) of METHOD on SST-2
#                              with our defaults plus FLAGS; their final dev metrics
#   multi[:ARGS]               benchmarks/multi_adapter.py (ARGS '+'-separated)
#   multitask:METHOD:TASKS[:FLAGS]   one multi-task run of METHOD on TASKS (comma list), then one
#                              single-task run per task with its defaults, one after the other
#   mps                        starts CUDA MPS (several processes' kernels then share the GPU at once)
#   study[:ARGS]               experiments/bitfit_study/run.py run (ARGS '+'-separated, e.g.
#                              study:--jobs=10+--config=experiments/bitfit_study/config_defaults.py);
#                              STUDY_OUT: its results folder (default OUT_DIR/<stage>), resumable
#   peers[:ARGS]               experiments/bitfit_study/run.py peer: the PyTorch peer of every run the
#                              study chose, side by side (ARGS as for study); same STUDY_OUT
#   profile:METHOD[:FLAGS]     the same run twice (empty caches, then filled) under cProfile:
#                              where the host's time goes, the 40 largest cumulative entries
# Env: MODEL (a BERT folder), GLUE (the GLUE folder), TARGET (dev metric to time, default 0.85).
set -u
out=${1:?usage: gpu_run.sh OUT_DIR STAGE [STAGE ...]}; shift
model=${MODEL:?set MODEL to a BERT folder}; glue=${GLUE:?set GLUE to the GLUE folder}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=true
py=${PYTHON:-python3}
for stage in "$@"; do
  IFS=: read -r kind a b c d e <<< "$stage"
  name=$(tr -c 'A-Za-z0-9_.-' '_' <<< "$stage" | sed 's/_$//')
  t0=$(date +%s)
  case $kind in
    env)
      { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
        $py -c "import jax, flax, optax, torch, transformers, peft; print('jax', jax.__version__, jax.devices(), 'flax', flax.__version__, 'optax', optax.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
        nproc; } > "$out/$name.log" 2>&1 ;;
    tests)
      JAXPEFT_TEST_MODEL="$model" $py -m pytest -q -p no:cacheprovider tests/test_compute_options.py -k gpu \
        > "$out/$name.log" 2>&1 ;;
    job)
      # shellcheck disable=SC2086  # the flags are a list
      $py -m benchmarks.job --method="$a" --task=sst2 --data_dir="$glue" --model="$model" \
        --peer="${PEER-eager}" --target="${TARGET:-0.85}" --out="$out/$name" ${JOBARGS:-} -- ${b//+/ } \
        > "$out/$name.log" 2>&1 ;;
    bench)
      # shellcheck disable=SC2086
      $py scripts/bench.py --sizes="${d:-base}" --methods="$a" --batches="$b" --seq="${c:-128}" --steps=10 \
        --repeats=3 --peak_tflops=790 ${PEERBENCH:+--peer=$PEERBENCH} --out="$out/$name" ${e//+/ } \
        > "$out/$name.log" 2>&1 ;;
    seeds)
      for seed in 0 1 2; do
        # shellcheck disable=SC2086
        $py scripts/train.py --method="$a" --task=sst2 --data_dir="$glue" --model="$model" --no-progress \
          --seed="$seed" --output_dir="$out/$name-$seed" ${b//+/ } > "$out/$name-$seed.log" 2>&1 &
        if [ "$seed" = 1 ]; then wait; fi
      done
      wait
      for seed in 0 1 2; do tail -1 "$out/$name-$seed.log"; done > "$out/$name.log" ;;
    multi)
      # shellcheck disable=SC2086
      $py benchmarks/multi_adapter.py --out="$out/$name" ${a//+/ } > "$out/$name.log" 2>&1 ;;
    multitask)
      # shellcheck disable=SC2086
      $py scripts/train.py --method="$a" --tasks="$b" --data_dir="$glue" --model="$model" --no-progress \
        --output_dir="$out/$name-mixed" ${c//+/ } > "$out/$name-mixed.log" 2>&1
      for task in ${b//,/ }; do
        # shellcheck disable=SC2086
        $py scripts/train.py --method="$a" --task="$task" --data_dir="$glue" --model="$model" --no-progress \
          --output_dir="$out/$name-$task" ${c//+/ } > "$out/$name-$task.log" 2>&1
      done
      for f in "$out/$name"-*.log; do echo "$f: $(tail -1 "$f")"; done > "$out/$name.log" ;;
    mps)
      { nvidia-cuda-mps-control -d && echo "MPS daemon started"; } > "$out/$name.log" 2>&1 ;;
    study|peers)
      cmd=$([ "$kind" = study ] && echo run || echo peer)
      # shellcheck disable=SC2086
      $py -m experiments.bitfit_study.run "$cmd" --data_dir="$glue" --model="$model" \
        --out="${STUDY_OUT:-$out/$name}" ${a//+/ } > "$out/$name.log" 2>&1 ;;
    train)
      # shellcheck disable=SC2086
      $py scripts/train.py --method="$a" --task=sst2 --data_dir="$glue" --model="$model" --no-progress \
        --output_dir="$out/$name" ${b//+/ } > "$out/$name.log" 2>&1 ;;
    profile)
      for run in cold warm; do
        # shellcheck disable=SC2086
        JAXPEFT_COMPILATION_CACHE="$out/$name-xla" JAXPEFT_DATA_CACHE="$out/$name-data" \
          $py -m cProfile -o "$out/$name-$run.prof" scripts/train.py --method="$a" --task=sst2 \
          --data_dir="$glue" --model="$model" --no-progress --output_dir="$out/$name-$run" ${b//+/ } \
          > "$out/$name-$run.log" 2>&1
        $py -c "import pstats, sys; pstats.Stats(sys.argv[1]).sort_stats('cumulative').print_stats(40)" \
          "$out/$name-$run.prof" >> "$out/$name-$run.log" 2>&1
      done ;;
    *) echo "unknown stage $stage" >&2; exit 2 ;;
  esac
  echo "$stage: exit $? in $(( $(date +%s) - t0 ))s" | tee -a "$out/stages.log"
done
