"""scripts/slurm.sh under stand-in srun / scontrol (tests/slurm_shim): the job's exit status is the run's, and a
job preempted as Slurm does it (SIGUSR1 to the batch script, SIGTERM to every process of the step) exits 0 once
its checkpoint has committed.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.fault_runs import committed_steps
from tests.launch import FAST, REPO, train_losses

pytestmark = pytest.mark.slow
SHIM = Path(__file__).resolve().parent / "slurm_shim"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


def _job(tmp: Path, overrides: list[str], gpus: int) -> subprocess.Popen:
    """`sbatch scripts/slurm.sh l0_sanity <overrides>` on one node, as Slurm would start the batch script."""
    env = {
        **os.environ,
        "PATH": os.pathsep.join([str(SHIM), str(Path(sys.executable).parent), os.environ["PATH"]]),
        "SLURM_JOB_NODELIST": "localhost",
        "SLURM_JOB_NUM_NODES": "1",
        "SLURM_JOB_ID": "4242",
        "SLURM_SUBMIT_DIR": str(REPO),
        "GPUS_PER_NODE": str(gpus),
        "RDZV_PORT": str(_free_port()),
        "SCRIPT": str(REPO / "train.py"),
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
    }
    paths = [
        f"output_dir={tmp / 'run'}",
        f"data.builtin_dir={tmp / 'builtin'}",
        f"data.cache_dir={tmp / 'cache'}",
    ]
    return subprocess.Popen(
        ["bash", str(REPO / "scripts" / "slurm.sh"), "l0_sanity", *paths, *FAST, *overrides],
        cwd=tmp,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _agent_environment(job_pid: int) -> dict[str, str]:
    """The environment of the torchrun agent the job started (a descendant of the batch script)."""
    pending = [job_pid]
    while pending:
        pid = pending.pop()
        try:
            if Path(Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[1].decode()).name == "torchrun":
                pairs = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                return dict(item.decode().split("=", 1) for item in pairs if b"=" in item)
            pending += [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
        except (FileNotFoundError, IndexError):
            continue
    raise AssertionError("no torchrun agent under the job")


def test_a_failing_run_fails_the_slurm_job(tmp_path):
    with _job(tmp_path, ["training.strategy=zero3"], gpus=1) as job:
        _, stderr = job.communicate(timeout=240)
    assert job.returncode != 0, stderr[-3000:]
    assert "config 'training.strategy'" in stderr


def test_a_preempted_slurm_job_exits_0_once_its_checkpoint_has_committed(tmp_path):
    steps = ["training.num_train_steps=200", "training.warmup_steps=2", "checkpoint.every_steps=100"]
    metrics = tmp_path / "run" / "train.jsonl"
    with _job(tmp_path, steps, gpus=2) as job:
        deadline = time.monotonic() + 240
        while (
            not (metrics.is_file() and train_losses(metrics))
            and job.poll() is None
            and time.monotonic() < deadline
        ):
            time.sleep(0.05)
        # The agent waits long enough for a large model's checkpoint, not torch's default 30 s.
        assert _agent_environment(job.pid)["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] == "270"
        job.send_signal(signal.SIGUSR1)  # what `#SBATCH --signal=B:USR1@300` does before the time limit
        _, stderr = job.communicate(timeout=240)
    assert job.returncode == 0, stderr[-4000:]
    assert "death signal" in stderr  # the torchrun agent itself was signalled, not only its ranks
    stopped_at = max(train_losses(metrics))
    assert stopped_at < 200 and committed_steps(tmp_path / "run" / "checkpoints")[-1] == stopped_at
    assert f"stopped on the committed checkpoint of step {stopped_at}" in stderr
    assert not (tmp_path / "run" / "final_model").exists()
