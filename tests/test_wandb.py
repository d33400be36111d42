"""Weights & Biases, offline: the run's name, group, tags and entity come from logging.*, a resume logs into the same
W&B run (its id is in the checkpoint manifest), and a distillation's teacher and student share one group.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
from hydra import compose, initialize_config_dir

from tests.launch import REPO, run_entry
from training.config import ConfigError, LoggingConfig, parse_config
from training.metrics_log import MetricsLogger

pytest.importorskip("wandb")


def _offline(tmp_path, **settings) -> LoggingConfig:
    return LoggingConfig(progress_bar=False, wandb=True, wandb_mode="offline", **settings)


def test_the_wandb_run_takes_its_name_group_and_tags_from_the_config_and_a_given_id_resumes_it(
    tmp_path, monkeypatch
):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = _offline(tmp_path, wandb_name="teacher-10m", wandb_group="v1-distill", wandb_tags=["10m", "v1"])
    first = MetricsLogger(tmp_path, cfg, is_main=True, total_steps=2, run_config={"seed": 1}, name="train")
    run = first._wandb
    assert (run.name, run.group, tuple(run.tags), run.settings.mode) == (
        "teacher-10m",
        "v1-distill",
        ("10m", "v1"),
        "offline",
    )
    run_id = first.wandb_run_id
    first.close()
    again = MetricsLogger(
        tmp_path, cfg, is_main=True, total_steps=2, run_config={"seed": 1}, name="train", wandb_id=run_id
    )
    assert again.wandb_run_id == run_id
    again.close()


def test_without_a_name_the_wandb_run_is_named_after_the_output_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    logger = MetricsLogger(
        tmp_path / "teacher_10m", _offline(tmp_path), is_main=True, total_steps=1, run_config={}
    )
    assert logger._wandb.name == "teacher_10m" and logger._wandb.group in (None, "")
    logger.close()


def test_wandb_asked_for_but_not_installed_is_refused_before_any_work(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    with pytest.raises(ConfigError, match="config 'logging.wandb'.*pip install"):
        LoggingConfig(wandb=True).validate()


def test_a_distillation_and_the_teacher_it_pretrains_share_one_wandb_group():
    from distill import teacher_run_config
    from training.metrics_log import job_wandb

    with initialize_config_dir(config_dir=str(REPO / "hydra_config" / "distill"), version_base=None):
        run = parse_config(compose(config_name="l0_sanity", overrides=["output_dir=/tmp/distill_4m"]))
    student = dataclasses.replace(run, logging=job_wandb(run))
    teacher = teacher_run_config(student).logging
    assert student.logging.wandb_group == teacher.wandb_group == "distill_4m"
    assert (student.logging.wandb_name, teacher.wandb_name) == ("distill_4m", "distill_4m-teacher")


@pytest.mark.slow
def test_a_resumed_run_logs_into_the_wandb_run_its_checkpoint_recorded(tmp_path):
    run = [
        f"output_dir={tmp_path / 'run'}",
        "training.warmup_steps=0",
        "eval.every_steps=100",
        "logging.wandb=true",
    ]
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    run_entry("train.py", [*run, "training.num_train_steps=2"], tmp=tmp_path, env=env)
    run_entry("train.py", [*run, "training.num_train_steps=3"], tmp=tmp_path, env=env)
    ids = {
        json.loads((step / "COMMITTED.json").read_text())["meta"]["wandb_run_id"]
        for step in (tmp_path / "run" / "checkpoints").iterdir()
    }
    launches = sorted((tmp_path / "run" / "wandb").glob("offline-run-*"))
    [run_id] = ids  # every checkpoint of the run records the same W&B run
    assert [folder.name.rsplit("-", 1)[1] for folder in launches] == [
        run_id,
        run_id,
    ]  # both launches logged to it
