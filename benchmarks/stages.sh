# Time-boxed stages for the GPU benchmark scripts (sourced, not run):
#   source benchmarks/stages.sh OUT_DIR SECONDS
#   stage WORK_DIR TGZ MAX_SECONDS LOG cmd...
# runs cmd with min(MAX_SECONDS, time left) and its output appended to WORK_DIR/LOG, then packs
# WORK_DIR into OUT_DIR/TGZ, so a run cut short still returns every finished stage. A stage starts
# only with 30 s left.
# shellcheck shell=bash
stages_out=${1:?usage: source stages.sh OUT_DIR SECONDS}
stages_end=$(( $(date +%s) + ${2:?} ))
mkdir -p "$stages_out"
export PYTHONUNBUFFERED=1

left() { echo $(( stages_end - $(date +%s) )); }

stage() {
  local work=$1 tgz=$2 cap=$3 log=$4; shift 4
  local t; t=$(left)
  if (( t < 30 )); then echo "skipped (no time): $*" >> "$work/$log"; return; fi
  (( t > cap )) && t=$cap
  timeout "$t" "$@" >> "$work/$log" 2>&1
  tar -czf "$stages_out/$tgz" -C "$work" .
}
