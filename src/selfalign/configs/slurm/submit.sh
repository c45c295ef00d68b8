#!/usr/bin/env bash
# Submits selfalign stages 1-2 as Slurm array jobs, the merge/finalize steps after them
# and the training after those (--dependency=afterok: a failed job stops what follows).
# Run it from the directory the paths in the scripts are relative to:
#   bash configs/slurm/submit.sh
set -euo pipefail
if [ ! -f configs/paper.yaml ]; then
  echo 'submit.sh: no configs/paper.yaml here; run it from the directory that has it' >&2
  exit 2
fi
submit() {  # sbatch --parsable prints ID or ID;CLUSTER
  local id
  id=$(sbatch --parsable "$@")
  echo "${id%%;*}"
}
self_instruct=$(submit configs/slurm/1a_self_instruct.sbatch)
topics=$(submit configs/slurm/1b_topics.sbatch)
questions=$(submit --dependency=afterok:$topics configs/slurm/1c_questions.sbatch)
merge=$(submit --dependency=afterok:$self_instruct:$questions configs/slurm/1d_merge.sbatch)
self_align=$(submit --dependency=afterok:$merge configs/slurm/2a_self_align.sbatch)
finalize=$(submit --dependency=afterok:$self_align configs/slurm/2b_finalize.sbatch)
train=$(submit --dependency=afterok:$finalize configs/slurm/3_train.sbatch)
echo "submitted: self_instruct=$self_instruct topics=$topics questions=$questions merge=$merge self_align=$self_align finalize=$finalize train=$train"
