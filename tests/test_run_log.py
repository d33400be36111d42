"""Every run keeps its full text log in <output_dir>/run.log: rank 0's lines, every rank's warnings and errors,
appended across resumes; a run that stops before making its folder writes none.
"""

from __future__ import annotations

import logging

import pytest

from tests.launch import run_entry
from training.run_log import LOG_NAME, RunLogFile


def _logger(handler: logging.Handler) -> logging.Logger:
    logger = logging.getLogger(f"test_run_log.{id(handler)}")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    return logger


def test_lines_logged_before_the_output_folder_exists_are_written_first_once_it_does(tmp_path):
    handler = RunLogFile(tmp_path / "run")
    log = _logger(handler)
    log.info("checking the config")
    assert not (tmp_path / "run").exists()  # the handler never makes the folder itself
    (tmp_path / "run").mkdir()
    log.info("step 1")
    handler.close()
    assert (tmp_path / "run" / LOG_NAME).read_text().splitlines() == ["checking the config", "step 1"]


def test_a_second_launch_appends_to_the_log_of_the_first(tmp_path):
    for launch in ("first", "second"):
        handler = RunLogFile(tmp_path)
        _logger(handler).info("%s launch", launch)
        handler.close()
    assert (tmp_path / LOG_NAME).read_text().splitlines() == ["first launch", "second launch"]


@pytest.mark.slow
def test_a_two_rank_run_and_its_resume_share_one_log_with_every_ranks_warnings(tmp_path):
    run = [f"output_dir={tmp_path / 'run'}", "training.warmup_steps=0", "eval.every_steps=100"]
    run_entry("train.py", [*run, "training.num_train_steps=2"], nproc=2, tmp=tmp_path)
    first = (tmp_path / "run" / LOG_NAME).read_text()
    run_entry("train.py", [*run, "training.num_train_steps=3"], nproc=2, tmp=tmp_path)
    text = (tmp_path / "run" / LOG_NAME).read_text()
    assert text.startswith(first)  # the first launch's log is kept whole
    resumed = text[len(first) :]
    assert "resumed from" in resumed and "checkpoint committed" in resumed
    for part in (first, resumed):  # the truncation warning every rank gives when it reads the corpus
        assert "[rank0]" in part and any(
            line.startswith("[rank1]") and " WARNING " in line for line in part.splitlines()
        )
    assert not any(line.startswith("[rank1]") and " INFO " in line for line in text.splitlines())
