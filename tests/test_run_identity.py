"""A relaunch resumes only the run that wrote the checkpoints: a changed teacher, model, data or optimizer stops it.

Settings that may change on resume (more steps, cadences, world size) are allowed and logged.
"""

from __future__ import annotations

import logging

import pytest

from checkpointing.checkpointer import Checkpointer
from checkpointing.run_identity import IDENTITY_KEY, RESUMABLE_KEY, RunChangedError
from tests.launch import run_entry
from tests.test_checkpointer import _state


def _meta(teacher: str = "aaa", steps: int = 8, world_size: int = 2) -> dict:
    return {
        IDENTITY_KEY: {"distill.teacher_sha256": teacher, "model.hidden_size": 32},
        RESUMABLE_KEY: {"training.num_train_steps": steps, "world_size": world_size},
    }


def _saved(root, meta) -> None:
    state = _state()
    state.step = 2
    Checkpointer(root, rank=0, meta=meta).save(state)


def test_another_teacher_stops_the_resume_naming_the_field_both_values_and_the_fix(tmp_path):
    _saved(tmp_path, _meta(teacher="aaa"))
    state = _state(seed=1)
    with pytest.raises(RunChangedError) as error:
        Checkpointer(tmp_path, rank=0, meta=_meta(teacher="bbb")).resume(state)
    message = str(error.value)
    assert (
        "distill.teacher_sha256 was 'aaa', now 'bbb'" in message
        and str(tmp_path / "step_00000002") in message
    )
    assert "new checkpoint.dir" in message and "checkpoint.allow_changed_run=true" in message
    assert state.step == 0  # nothing was loaded


def test_allow_changed_run_resumes_and_logs_the_change(tmp_path, caplog):
    _saved(tmp_path, _meta(teacher="aaa"))
    checkpointer = Checkpointer(tmp_path, rank=0, meta=_meta(teacher="bbb"), allow_changed_run=True)
    assert checkpointer.resume(_state(seed=1)) == 2
    assert "changed run settings" in caplog.text and "'aaa', now 'bbb'" in caplog.text


def test_more_steps_and_another_world_size_resume_and_are_logged(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    _saved(tmp_path, _meta(steps=8, world_size=2))
    assert Checkpointer(tmp_path, rank=0, meta=_meta(steps=16, world_size=1)).resume(_state(seed=1)) == 2
    assert "training.num_train_steps changed from 8 to 16" in caplog.text
    assert "world_size changed from 2 to 1" in caplog.text


@pytest.mark.slow
def test_a_torchrun_relaunch_with_another_learning_rate_stops_before_any_step(tmp_path):
    run = [
        "training.num_train_steps=6",
        "training.warmup_steps=1",
        "checkpoint.every_steps=2",
        "eval.every_steps=100",
        f"output_dir={tmp_path / 'run'}",
    ]
    run_entry("train.py", [*run, "training.stop_after_steps=2"], nproc=2, tmp=tmp_path)
    refused = run_entry("train.py", [*run, "training.lr=0.0123"], nproc=2, tmp=tmp_path, check=False)
    assert refused.returncode != 0 and refused.stderr.count("exitcode  : 2") == 2  # both ranks: a user error
    assert (
        "ERROR run:" in refused.stderr
        and "training.lr was " in refused.stderr
        and ", now 0.0123" in refused.stderr
    )
    assert "Error executing job" not in refused.stderr and not (tmp_path / "run" / "final_model").exists()
