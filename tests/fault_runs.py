"""Shared pieces of the fault tests that launch train.py: one run config and its uninterrupted reference losses.

The reference run is launched once per test session and reused by every test that compares against it.
"""

from __future__ import annotations

import os
from pathlib import Path

from tests.launch import run_entry, train_losses

FAULT_SHIM = Path(__file__).resolve().parent / "fault_shim"
STEPS = 8
# 2-rank FSDP2 with dropout on, a checkpoint every 2 steps: every resumed step must match the reference exactly.
COMMON = [
    "training.strategy=fsdp2",
    f"training.num_train_steps={STEPS}",
    "training.warmup_steps=2",
    "checkpoint.every_steps=2",
    "checkpoint.keep_last=10",
    "eval.every_steps=100",
    "model.hidden_dropout_prob=0.1",
]
_reference: dict[str, dict[int, float]] = {}


def fault_env(point: str, rank: int, step: int) -> dict[str, str]:
    """Environment that makes `rank` fail at `point` while saving checkpoint `step` (see fault_shim)."""
    path = os.pathsep.join(p for p in (str(FAULT_SHIM), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path, "RECIPE_FAULT": f"{point}:{rank}:{step}"}


def reference_losses(tmp_path_factory) -> dict[int, float]:
    """Per-step losses of the uninterrupted 2-rank run (launched on first use)."""
    if "losses" not in _reference:
        tmp = tmp_path_factory.mktemp("reference")
        run_entry("train.py", [*COMMON, f"output_dir={tmp / 'run'}"], nproc=2, tmp=tmp)
        _reference["losses"] = train_losses(tmp / "run" / "train.jsonl")
        assert sorted(_reference["losses"]) == list(range(1, STEPS + 1))
    return _reference["losses"]


def committed_steps(checkpoint_dir: Path) -> list[int]:
    from checkpointing.checkpointer import committed_checkpoints

    return sorted(step for step, _ in committed_checkpoints(checkpoint_dir)[0])
