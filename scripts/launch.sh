#!/bin/bash
# Train on one machine: all its GPUs (DDP, or DeepSpeed through ACCELERATE_CONFIG), or 2 CPU processes.
#
#   scripts/launch.sh configs/demo.yaml trainer.max_steps=100        # every visible GPU
#   NUM_GPUS=4 scripts/launch.sh CONFIG [key=value ...]
#   ACCELERATE_CONFIG=configs/accelerate/single_node_zero3.yaml scripts/launch.sh CONFIG trainer.deepspeed=configs/deepspeed/zero3.json
#   MTF_CPU=1 scripts/launch.sh configs/demo.yaml                    # 2 gloo processes on CPU
#
# Environment (all optional):
#   NUM_GPUS           processes to start (default: `nvidia-smi -L` count; 2 with MTF_CPU=1)
#   MTF_CPU=1          CPU with gloo (sets ACCELERATE_USE_CPU=1: a MULTI_CPU config or `--cpu` would
#                      silently run ONE process, FIELD_NOTES)
#   ACCELERATE_CONFIG  accelerate config (default single_node_ddp.yaml, or cpu_2proc.yaml with MTF_CPU=1)
#   DRY_RUN=1          print the command instead of running it
#
# Exit codes are the trainer's: 0 done, 1 bug, 2 user error, 3 preempted (run the same command again to
# resume). torchrun reports every failing worker as 1, so each rank records its own code (see mtf_rank).
set -euo pipefail

die() {
  echo "launch.sh: error: $*" >&2
  exit 2
}

# Runs as each trainer process: records the trainer's real exit code (torchrun would report 1).
# shellcheck disable=SC2317  # called through `accelerate launch --no_python bash -c`
mtf_rank() {
  local rc=0 child
  "$@" &
  child=$!
  trap 'kill -TERM "$child" 2>/dev/null || true' TERM
  wait "$child" || rc=$?
  while kill -0 "$child" 2>/dev/null; do  # wait was interrupted by a trap: wait for the real code
    rc=0
    wait "$child" || rc=$?
  done
  echo "$rc" >"$MTF_EXIT_DIR/rank-${RANK:-0}"
  return "$rc"
}

[[ $# -ge 1 ]] || die "usage: scripts/launch.sh CONFIG [key=value ...]  (NUM_GPUS=N or MTF_CPU=1 in the environment)"
[[ -f $1 ]] || die "run config '$1' not found (relative paths resolve against $PWD)"

if [[ ${MTF_CPU:-0} == 1 ]]; then
  export ACCELERATE_USE_CPU=1
  NUM_GPUS=${NUM_GPUS:-2}
  ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-configs/accelerate/cpu_2proc.yaml}
elif [[ -z ${NUM_GPUS:-} ]]; then
  command -v nvidia-smi >/dev/null || die "no nvidia-smi: set NUM_GPUS, or MTF_CPU=1 to train with 2 CPU processes"
  NUM_GPUS=$(nvidia-smi -L | grep -c '^GPU') || die "nvidia-smi lists no GPU: set NUM_GPUS or MTF_CPU=1"
fi
[[ $NUM_GPUS =~ ^[1-9][0-9]*$ ]] || die "NUM_GPUS must be a positive integer, got '$NUM_GPUS'"
ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-configs/accelerate/single_node_ddp.yaml}
[[ -f $ACCELERATE_CONFIG ]] || die "ACCELERATE_CONFIG '$ACCELERATE_CONFIG' not found (see configs/accelerate/)"

if [[ $NUM_GPUS == 1 && ${MTF_CPU:-0} != 1 ]]; then
  cmd=(python -m train.cli train "$@")  # one process: no launcher, the trainer's exit code as is
else
  command -v accelerate >/dev/null || die "accelerate not found on PATH: activate the project's virtualenv"
  cmd=(accelerate launch --config_file "$ACCELERATE_CONFIG" --num_processes "$NUM_GPUS" --num_machines 1
    --no_python bash -c 'mtf_rank "$@"' mtf-rank python -m train.cli train "$@")
fi
echo "[mtf] $(printf '%q ' "${cmd[@]}")"
if [[ ${DRY_RUN:-0} == 1 ]]; then
  exit 0
fi
if [[ ${cmd[0]} == python ]]; then
  exec "${cmd[@]}"
fi

MTF_EXIT_DIR=$(mktemp -d "${TMPDIR:-/tmp}/mtf-exit.XXXXXX")
export MTF_EXIT_DIR
trap 'rm -rf "$MTF_EXIT_DIR"' EXIT
export -f mtf_rank
rc=0
"${cmd[@]}" || rc=$?
codes=()
for f in "$MTF_EXIT_DIR"/rank-*; do
  [[ -f $f ]] && codes+=("$(<"$f")")
done
for code in "${codes[@]}"; do
  [[ $code == 3 ]] && exit 3  # preempted: a checkpoint was written, the same command resumes
done
if [[ $rc != 0 ]]; then
  for code in "${codes[@]}"; do
    [[ $code != 0 ]] && exit "$code"
  done
fi
exit "$rc"
