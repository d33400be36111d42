"""Error exits of 2-rank jobs always finish: no worker hangs in the process-group teardown, none aborts.

An error raised with the DDP model still referenced by its traceback once hung about one exit in fifteen (the
gloo group's destructor joined its thread while that thread waited for the GIL), or aborted with SIGABRT.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.launch import REPO, launch_env

pytestmark = pytest.mark.slow
TRIALS, TIMEOUT_S = 30, 20


def test_thirty_error_exits_of_two_rank_jobs_all_end_with_exit_code_2(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "tests" / "error_exit_jobs.py"), str(TRIALS), str(TIMEOUT_S)],
        cwd=tmp_path,
        env=launch_env(),
        capture_output=True,
        text=True,
        timeout=TRIALS * (TIMEOUT_S + 5) + 60,
    )
    trials = [line for line in result.stdout.splitlines() if line.startswith("trial ")]
    assert len(trials) == TRIALS, result.stdout[-2000:] + result.stderr[-3000:]
    wrong = [line for line in trials if not line.endswith("rank0=2 rank1=2")]  # 'hung', 'signal 6', 99
    assert not wrong, "\n".join(wrong)
    assert result.stderr.count("ERROR run: rank 0: refused") == TRIALS  # each message flushed before the exit
