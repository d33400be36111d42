"""A hydra sweep (`train.py -m`) trains every job in its own folder under outputs/sweeps/; no job resumes another.

The sweep runs in a scratch working directory, as a user's `outputs/` would sit in theirs.
"""

from __future__ import annotations

import json

import pytest

from tests.launch import run_entry

pytestmark = pytest.mark.slow


def test_a_two_job_learning_rate_sweep_gives_two_trained_runs_each_with_its_own_lr(tmp_path):
    # hydra.mode=MULTIRUN is `-m` written as an override (flags must precede the overrides on the command line).
    sweep = [
        "hydra.mode=MULTIRUN",
        "training.lr=1e-3,2e-3",
        "training.num_train_steps=3",
        "training.warmup_steps=0",
        "training.lr_schedule=constant",
    ]
    done = run_entry("train.py", sweep, tmp=tmp_path)
    assert "resumed from" not in done.stderr
    [sweep_dir] = (tmp_path / "outputs" / "sweeps").iterdir()
    assert sweep_dir.name.startswith("train-l0_sanity-")
    lrs = {}
    for job in ("0", "1"):
        records = [json.loads(line) for line in (sweep_dir / job / "train.jsonl").read_text().splitlines()]
        steps = [r["step"] for r in records if r["kind"] == "train"]
        assert steps == [1, 2, 3]  # trained from step 0, not resumed from the other job
        lrs[job] = [r["lr"] for r in records if r["kind"] == "train"]
        assert (sweep_dir / job / "final_model" / "model.safetensors").is_file()
        assert (sweep_dir / job / "checkpoints").is_dir()
    assert lrs == {"0": pytest.approx([1e-3] * 3), "1": pytest.approx([2e-3] * 3)}
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "builtin",
        "cache",
        "outputs",
    ]  # no multirun/ beside them


def test_a_sweep_under_torchrun_is_refused_in_one_line_before_any_job_starts(tmp_path):
    sweep = ["hydra.mode=MULTIRUN", "training.lr=1e-3,2e-3"]
    done = run_entry(
        "train.py", sweep, tmp=tmp_path, env={"WORLD_SIZE": "2", "RANK": "0"}, check=False, timeout=120
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "launch one torchrun per setting instead" in done.stderr
    assert not list(tmp_path.rglob("train.jsonl"))  # no job started
