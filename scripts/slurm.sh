#!/usr/bin/env bash
# Multi-node launch on Slurm: one torchrun agent per node, c10d rendezvous on the first node. Submit from the
# repository root; the job's exit status is the run's (0 also when a preemption stopped it on a committed checkpoint).
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
RDZV_PORT=${RDZV_PORT:-29500}
# How long an agent lets its ranks finish the preemption checkpoint before it kills them (torch 2.11 and newer; older
# agents wait 30 s): within --signal's 300 s lead time above. Raise both for a model whose checkpoint takes longer.
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${SHUTDOWN_TIMEOUT:-270}
HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)

# --signal above sends SIGUSR1 to this script five minutes before the time limit. srun passes SIGTERM on to the
# job step's processes; the ranks checkpoint at the end of their step and exit 0 (scripts/torchrun_node.sh).
trap 'kill -TERM "$SRUN_PID" 2>/dev/null' USR1

srun --kill-on-bad-exit=1 bash "$SLURM_SUBMIT_DIR/scripts/torchrun_node.sh" \
    --nnodes="$SLURM_JOB_NUM_NODES" --nproc_per_node="$GPUS_PER_NODE" \
    --rdzv-backend=c10d --rdzv-endpoint="$HEAD_NODE:$RDZV_PORT" --rdzv-id="$SLURM_JOB_ID" \
    "$SCRIPT" --config-name "$CONFIG" "$@" &
SRUN_PID=$!
# `wait` returns early when the trap fires; keep waiting until the ranks have checkpointed and exited, then
# hand on srun's status (a failed run fails the job, so `afterok` dependencies do not start).
while kill -0 "$SRUN_PID" 2>/dev/null; do wait "$SRUN_PID" || true; done
wait "$SRUN_PID"
