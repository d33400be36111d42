#!/usr/bin/env bash
# One node's torchrun agent under srun (scripts/slurm.sh); arguments are torchrun's. On preemption the agent passes
# SIGTERM to its ranks and exits 1 however they ended; this exits 0 when they stopped on a committed checkpoint.
set -uo pipefail

STOP_DIR=$(mktemp -d)
trap 'rm -rf "$STOP_DIR"' EXIT
export RECIPE_STOPPED_FILE="$STOP_DIR/stopped"  # every rank writes it after its stop checkpoint commits
# Slurm signals every process of the step, the agent included: this script only keeps waiting for it.
trap ':' TERM

torchrun "$@" &
AGENT=$!
while kill -0 "$AGENT" 2>/dev/null; do wait "$AGENT"; done
wait "$AGENT"
status=$?
if [[ $status -ne 0 && -f "$RECIPE_STOPPED_FILE" ]]; then
    echo "torchrun_node: stopped on the committed checkpoint of step $(cat "$RECIPE_STOPPED_FILE"); the torchrun" \
         "agent's exit $status after the preemption signal is expected; relaunch to continue" >&2
    exit 0
fi
exit $status
