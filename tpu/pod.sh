#!/usr/bin/env bash
# Train on a Cloud TPU VM slice (one host or a multi-host pod slice) with gcloud:
#
#   tpu/pod.sh [OPTIONS] COMMAND [-- TRAIN_FLAGS...]
#
# COMMAND
#   create   create the slice (gcloud compute tpus tpu-vm create)
#   setup    copy the project (git archive of HEAD) and GLUE to every worker, install it there
#   run      run scripts/train.py on every worker at once (--worker=all); TRAIN_FLAGS go to it
#   fetch    copy the run's output folder back from worker 0 (only process 0 writes it)
#   delete   delete the slice
#   all      create, setup, run, fetch, then delete (also on failure, unless --keep)
#
# OPTIONS
#   --name=NAME           slice name (default: jaxpeft-$USER)
#   --zone=ZONE           zone, e.g. us-central2-b (required)
#   --project=PROJECT     Google Cloud project (default: gcloud's configured project)
#   --accelerator=TYPE    accelerator type, e.g. v4-8, v5litepod-16, v5p-8, v6e-8 (default: v4-8)
#   --version=RUNTIME     TPU software version (default by family: tpu-ubuntu2204-base for v2-v4,
#                         v2-alpha-tpuv5-lite for v5e, v2-alpha-tpuv5 for v5p, v2-alpha-tpuv6e for v6e)
#   --spot | --preemptible  create a Spot / preemptible slice
#   --glue=SOURCE         GLUE on the workers: a local folder (copied to every worker), a gs:// URL
#                         (each worker copies it with gcloud storage), or "hub" (the workers download
#                         nyu-mll/glue themselves). Default: $GLUE_DIR if set, else hub.
#   --run=NAME            run name: output folder ~/runs/NAME on the workers (default: tpu-run)
#   --results=DIR         where fetch puts the output locally (default: runs/tpu/NAME)
#   --keep                with "all": keep the slice at the end
#   --dry-run             print every command instead of running it
#
# Example (BitFit on SST-2 over a v5e-16 pod slice, 4 processes joined by jax.distributed):
#   tpu/pod.sh --zone=us-west4-a --accelerator=v5litepod-16 --spot --glue=gs://my-bucket/glue \
#       all -- --method=bitfit --task=sst2 --batch_size=256 --dtype=bfloat16
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
name="jaxpeft-${USER:-tpu}"
zone=""
project=""
accelerator="v4-8"
version=""
capacity=""
glue="${GLUE_DIR:-hub}"
run_name="tpu-run"
results=""
keep=0
dry_run=0
command=""
train_args=()

die() { echo "error: $*" >&2; exit 2; }

while [ $# -gt 0 ]; do
  case "$1" in
    --name=*) name="${1#*=}" ;;
    --zone=*) zone="${1#*=}" ;;
    --project=*) project="${1#*=}" ;;
    --accelerator=*) accelerator="${1#*=}" ;;
    --version=*) version="${1#*=}" ;;
    --spot) capacity="--spot" ;;
    --preemptible) capacity="--preemptible" ;;
    --glue=*) glue="${1#*=}" ;;
    --run=*) run_name="${1#*=}" ;;
    --results=*) results="${1#*=}" ;;
    --keep) keep=1 ;;
    --dry-run) dry_run=1 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    --) shift; train_args=("$@"); break ;;
    create|setup|run|fetch|delete|all)
      [ -z "$command" ] || die "one COMMAND only (got $command and $1)"
      command="$1" ;;
    *) die "unknown argument '$1' (see tpu/pod.sh --help)" ;;
  esac
  shift
done

[ -n "$command" ] || die "no COMMAND given: create, setup, run, fetch, delete or all"
[ -n "$zone" ] || die "--zone is required (e.g. --zone=us-central2-b for v4)"
[[ "$name" =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] || die "--name='$name': lowercase letters, digits and dashes"
[[ "$run_name" =~ ^[A-Za-z0-9._-]+$ ]] || die "--run='$run_name': letters, digits, dot, dash, underscore"
if [ -z "$version" ]; then
  case "$accelerator" in
    v2-*|v3-*|v4-*) version="tpu-ubuntu2204-base" ;;
    v5litepod-*|v5e-*) version="v2-alpha-tpuv5-lite" ;;
    v5p-*) version="v2-alpha-tpuv5" ;;
    v6e-*) version="v2-alpha-tpuv6e" ;;
    *) die "--accelerator='$accelerator': unknown family; give --version=RUNTIME too" ;;
  esac
fi
results="${results:-runs/tpu/$run_name}"
case "$glue" in
  hub|gs://*) ;;
  *) [ -d "$glue" ] || die "--glue='$glue' is not a folder (nor gs://... nor hub)" ;;
esac

# Shell-quotes one word for display (single quotes where needed; bash 3.2 has no ${x@Q}).
quote() {
  case "$1" in
    '' | *[!A-Za-z0-9_@%+=:,./-]*) printf "'%s'" "$(printf '%s' "$1" | sed "s/'/'\\\\''/g")" ;;
    *) printf '%s' "$1" ;;
  esac
}

# Every command of this script goes through here: printed with --dry-run, run otherwise.
run() {
  if [ "$dry_run" = 1 ]; then
    printf '+'
    for word in "$@"; do printf ' %s' "$(quote "$word")"; done
    printf '\n'
  else
    "$@"
  fi
}

where=(--zone="$zone")
[ -z "$project" ] || where+=(--project="$project")
tpu_ssh() {  # tpu_ssh WORKER COMMAND
  run gcloud compute tpus tpu-vm ssh "$name" "${where[@]}" --worker="$1" --command="$2"
}

create() {
  local flags=(--accelerator-type="$accelerator" --version="$version")
  [ -z "$capacity" ] || flags+=("$capacity")
  run gcloud compute tpus tpu-vm create "$name" "${where[@]}" "${flags[@]}"
}

setup() {
  local archive="/tmp/jaxpeft-$name.tar.gz"
  run git -C "$repo" archive --format=tar.gz -o "$archive" HEAD
  run gcloud compute tpus tpu-vm scp "$archive" "$name:jaxpeft.tar.gz" "${where[@]}" --worker=all
  case "$glue" in
    hub) ;;
    gs://*) tpu_ssh all "rm -rf ~/glue && mkdir -p ~/glue && gcloud storage cp -r $(printf '%q' "${glue%/}/*") ~/glue/" ;;
    *)
      tpu_ssh all "rm -rf ~/glue"
      run gcloud compute tpus tpu-vm scp --recurse "$glue" "$name:glue" "${where[@]}" --worker=all ;;
  esac
  tpu_ssh all "rm -rf ~/jaxpeft && mkdir -p ~/jaxpeft && tar -xzf ~/jaxpeft.tar.gz -C ~/jaxpeft && bash ~/jaxpeft/tpu/worker_setup.sh"
}

train() {
  local data=() cmd
  [ "$glue" = hub ] || data=(--data_dir=glue)
  # Run from the home folder so that relative paths (glue, runs/NAME) are the same on every worker.
  cmd="cd ~ && HF_HUB_DISABLE_PROGRESS_BARS=1 jaxpeft/.venv/bin/python jaxpeft/scripts/train.py"
  cmd+="$(printf ' %q' ${data[@]+"${data[@]}"} --output_dir="runs/$run_name" --no-progress \
          ${train_args[@]+"${train_args[@]}"})"
  tpu_ssh all "$cmd"
}

fetch() {
  run mkdir -p "$(dirname "$results")"
  run gcloud compute tpus tpu-vm scp --recurse "$name:runs/$run_name" "$results" "${where[@]}" --worker=0
}

delete() {
  run gcloud compute tpus tpu-vm delete "$name" "${where[@]}" --quiet
}

case "$command" in
  create) create ;;
  setup) setup ;;
  run) train ;;
  fetch) fetch ;;
  delete) delete ;;
  all)
    create
    if [ "$keep" = 0 ]; then trap delete EXIT; fi
    setup
    train
    fetch ;;
esac
