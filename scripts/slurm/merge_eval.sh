#!/bin/bash
# Merge the shard results of scripts/slurm/eval.sbatch into OUT_DIR/results.json (the same JSON as one
# `mtf eval --json` over the whole mixture) and print the results table. `mtf eval-merge` fails, naming the
# missing (dataset, template) pairs and the array indices to rerun, unless every pair of the mixture is
# there exactly once.
#
#   scripts/slurm/merge_eval.sh EVAL_MIXTURE OUT_DIR
#   sbatch --dependency=afterok:JOBID --wrap "scripts/slurm/merge_eval.sh EVAL_MIXTURE OUT_DIR"
set -euo pipefail

die() {
  echo "merge_eval.sh: error: $*" >&2
  exit 2
}

[[ $# -eq 2 ]] || die "usage: scripts/slurm/merge_eval.sh EVAL_MIXTURE OUT_DIR"
MIXTURE=$1
OUT_DIR=$2
[[ -f $MIXTURE ]] || die "eval mixture '$MIXTURE' not found"
shopt -s nullglob
results=("$OUT_DIR"/shards/shard-*.json)
[[ ${#results[@]} -gt 0 ]] || die "no shard results in $OUT_DIR/shards/ (did the eval.sbatch array run?)"
command -v python >/dev/null || die "python not found on PATH: activate the project's virtualenv"
python -m train.cli eval-merge --mixture "$MIXTURE" --output "$OUT_DIR/results.json" "${results[@]}"
