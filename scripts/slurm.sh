#!/usr/bin/env bash
# Multi-node launch on Slurm: one torchrun agent per node, c10d rendezvous on the first node.
#   sbatch --nodes=4 scripts/slurm.sh 106m training.strategy=fsdp2 checkpoint.dir=/shared/ckpt
#   SCRIPT=distill.py sbatch --nodes=2 scripts/slurm.sh 4m distill.teacher=/models/Geneformer-V1-10M
#SBATCH --job-name=geneformer
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --signal=B:USR1@300
#SBATCH --output=slurm-%j.out
set -euo pipefail

CONFIG=${1:?usage: sbatch scripts/slurm.sh CONFIG [hydra overrides...]}
shift
SCRIPT=${SCRIPT:-train.py}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)

# --signal above sends SIGUSR1 to this script five minutes before the time limit. srun forwards SIGTERM to the
# torchrun agents, which pass it to every rank: each checkpoints at the end of its step and exits 0.
trap 'kill -TERM "$SRUN_PID" 2>/dev/null' USR1

srun --kill-on-bad-exit=1 torchrun \
    --nnodes="$SLURM_JOB_NUM_NODES" --nproc_per_node="$GPUS_PER_NODE" \
    --rdzv-backend=c10d --rdzv-endpoint="$HEAD_NODE:29500" --rdzv-id="$SLURM_JOB_ID" \
    "$SCRIPT" --config-name "$CONFIG" "$@" &
SRUN_PID=$!
# `wait` returns early when the trap fires; keep waiting until the ranks have checkpointed and exited.
while kill -0 "$SRUN_PID" 2>/dev/null; do wait "$SRUN_PID" || true; done
