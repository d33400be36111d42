"""A worker SIGKILLed while writing a checkpoint (2-process torchrun): nothing but the unfinished save is lost.

One run is killed three times, at three points of three different saves; every relaunch resumes from the
previous complete checkpoint, keeps the broken one as evidence, and the losses equal an uninterrupted run's.
"""

from __future__ import annotations

import pytest

from tests.fault_runs import COMMON, STEPS, committed_steps, fault_env, reference_losses
from tests.launch import run_entry, train_losses

pytestmark = pytest.mark.slow

# (point of the save, rank killed, step being saved, newest complete checkpoint when it dies)
KILLS = [
    ("kill_before_shards", 0, 4, 2),  # step dir created, no shard yet
    ("kill_mid_shard", 1, 6, 4),  # rank 1's shard half written
    ("kill_before_commit", 0, 8, 6),  # every shard and .metadata written, COMMITTED.json not yet published
]


def test_sigkill_during_checkpoint_writes_resumes_from_the_previous_complete_one(tmp_path, tmp_path_factory):
    run = [*COMMON, f"output_dir={tmp_path / 'run'}"]
    checkpoints = tmp_path / "run" / "checkpoints"
    previous_kill = None
    for point, rank, step, newest_complete in KILLS:
        killed = run_entry(
            "train.py", run, nproc=2, tmp=tmp_path, env=fault_env(point, rank, step), check=False
        )
        assert killed.returncode != 0, f"{point}: the run was not killed\n{killed.stderr[-3000:]}"
        assert "Signals.SIGKILL" in killed.stderr or "-9" in killed.stderr, killed.stderr[-3000:]
        # The interrupted save never counts as a checkpoint, so resuming can only pick a complete one.
        assert committed_steps(checkpoints) == list(range(2, step, 2)), point
        assert (checkpoints / f"step_{step:08d}").is_dir()
        if previous_kill is not None:
            # This launch resumed from the newest complete checkpoint and said which broken one it skipped.
            assert f"resumed from {checkpoints / f'step_{newest_complete - 2:08d}'}" in killed.stderr
            assert f"moving {checkpoints / f'step_{previous_kill:08d}'} aside" in killed.stderr
        previous_kill = step

    finished = run_entry("train.py", run, nproc=2, tmp=tmp_path)
    assert f"resumed from {checkpoints / 'step_00000006'} (step 6)" in finished.stderr
    assert committed_steps(checkpoints) == [2, 4, 6, 8]
    # Each half-written save was moved aside (not deleted, not overwritten) by the relaunch that followed it.
    assert sorted(p.name.split(".")[0] for p in checkpoints.glob("step_*.incomplete-*")) == [
        "step_00000004",
        "step_00000006",
        "step_00000008",
    ]
    assert train_losses(tmp_path / "run" / "train.jsonl") == reference_losses(tmp_path_factory)
    assert len(reference_losses(tmp_path_factory)) == STEPS
    assert (tmp_path / "run" / "final_model" / "model.safetensors").is_file()


def test_sigkill_during_the_very_first_save_lets_the_relaunch_start_from_step_zero(
    tmp_path, tmp_path_factory
):
    """Nothing was ever committed, so nothing is lost by starting over; the half-written save is kept aside."""
    run = [*COMMON, f"output_dir={tmp_path / 'run'}"]
    checkpoints = tmp_path / "run" / "checkpoints"
    killed = run_entry(
        "train.py", run, nproc=2, tmp=tmp_path, env=fault_env("kill_mid_shard", 1, 2), check=False
    )
    assert killed.returncode != 0 and committed_steps(checkpoints) == []
    assert (checkpoints / "step_00000002").is_dir()
    finished = run_entry("train.py", run, nproc=2, tmp=tmp_path)
    assert f"moving {checkpoints / 'step_00000002'} aside" in finished.stderr
    assert "resumed from" not in finished.stderr
    assert committed_steps(checkpoints) == [2, 4, 6, 8]
    assert [p.name.split(".")[0] for p in checkpoints.glob("step_*.incomplete-*")] == ["step_00000002"]
    assert train_losses(tmp_path / "run" / "train.jsonl") == reference_losses(tmp_path_factory)
