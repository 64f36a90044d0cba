#!/bin/bash
# One SLURM array task per participant, each running the qsmprep Apptainer image.
# Submit with one task per line of participants.tsv (header excluded), e.g.
#   sbatch --array=1-$(( $(wc -l < /data/bids/participants.tsv) - 1 ))%20 slurm_array.sh
# (%20: at most 20 tasks at once). Edit the four paths below.
#SBATCH --job-name=qsmprep
#SBATCH --cpus-per-task=4
#SBATCH --mem=16G
#SBATCH --time=02:00:00
#SBATCH --output=qsmprep_%A_%a.log
set -euo pipefail

BIDS=${BIDS:-/data/bids}                        # input dataset (mounted read-only)
OUT=${OUT:-/data/derivatives/qsmprep}           # one output folder for all tasks
SIF=${SIF:-/containers/qsmprep.sif}             # apptainer build qsmprep.sif ...
SCRATCH=${SCRATCH:-${TMPDIR:-/scratch/$USER}}   # fast local or scratch disk

# line N+1 of participants.tsv (line 1 is the header), first column: sub-<label>
subject=$(awk -F'\t' -v n="$((SLURM_ARRAY_TASK_ID + 1))" 'NR == n {print $1}' \
          "$BIDS/participants.tsv")
if [ -z "$subject" ]; then
    echo "no participant on line $((SLURM_ARRAY_TASK_ID + 1)) of $BIDS/participants.tsv" >&2
    exit 1
fi
work="$SCRATCH/qsmprep_work/$subject"   # one work folder per task: resumable, no clashes
mkdir -p "$OUT" "$work"
cpus=${SLURM_CPUS_PER_TASK:-1}
mem_gb=$(( ${SLURM_MEM_PER_NODE:-8192} / 1024 ))   # SLURM gives MB

# --cleanenv: nothing from the login environment leaks in; add --nv for a GPU partition
apptainer run --cleanenv \
    -B "$BIDS:/data:ro" -B "$OUT:/out" -B "$work:/work" \
    "$SIF" /data /out participant --participant-label "$subject" \
    -w /work --nprocs "$cpus" --omp-nthreads "$cpus" --mem "$mem_gb"
