"""SIGTERM (cluster preemption) to one worker during a step: every rank checkpoints at the step boundary, exit 0.

The relaunch resumes from that checkpoint and ends with the same per-step losses as an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.fault_runs import COMMON, STEPS, committed_steps, reference_losses
from tests.launch import FAST, REPO, run_entry, train_losses

pytestmark = pytest.mark.slow


def _worker_pid(agent_pid: int, rank: int, timeout: float = 120) -> int:
    """The pid of torchrun's worker process with RANK=rank."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        children = Path(f"/proc/{agent_pid}/task/{agent_pid}/children").read_text().split()
        for pid in children:
            try:
                env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except FileNotFoundError:
                continue
            if f"RANK={rank}".encode() in env:
                return int(pid)
        time.sleep(0.05)
    raise AssertionError(f"no worker with RANK={rank} under torchrun pid {agent_pid}")


def _logged_steps(metrics: Path) -> int:
    if not metrics.is_file():
        return 0
    return sum(1 for line in metrics.read_text().splitlines() if line.endswith("}") and '"train"' in line)


def test_sigterm_checkpoints_at_the_step_boundary_and_the_relaunch_continues(tmp_path, tmp_path_factory):
    run = [*COMMON, f"output_dir={tmp_path / 'run'}"]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(REPO / "train.py"),
        f"data.builtin_dir={tmp_path / 'builtin'}",
        f"data.cache_dir={tmp_path / 'cache'}",
        *FAST,
        *run,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    with subprocess.Popen(
        cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as agent:
        rank1 = _worker_pid(agent.pid, rank=1)
        metrics = tmp_path / "run" / "train.jsonl"
        deadline = time.monotonic() + 240
        while _logged_steps(metrics) < 1 and agent.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(rank1, signal.SIGTERM)  # only rank 1 is told: the ranks must still agree on where to stop
        _, stderr = agent.communicate(timeout=240)
    assert agent.returncode == 0, stderr[-4000:]
    assert "received SIGTERM" in stderr
    stopped_at = max(train_losses(metrics))
    assert stopped_at < STEPS, "the run finished before the signal arrived"
    assert (
        committed_steps(tmp_path / "run" / "checkpoints")[-1] == stopped_at
    )  # the step it stopped at is saved
    assert f"stopped at step {stopped_at} after checkpointing" in stderr
    assert not (tmp_path / "run" / "final_model").exists()

    resumed = run_entry("train.py", run, nproc=2, tmp=tmp_path)
    assert f"(step {stopped_at})" in resumed.stderr and "resumed from" in resumed.stderr
    assert train_losses(metrics) == reference_losses(tmp_path_factory)
    assert (tmp_path / "run" / "final_model" / "model.safetensors").is_file()
    # Every step was logged once before the stop and once after; none was repeated or skipped.
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines() if '"train"' in line]
    assert steps == list(range(1, STEPS + 1))
