"""Launch 2-rank gloo jobs that fail inside `run_entry` again and again; print each rank's exit status.

    python tests/error_exit_jobs.py TRIALS TIMEOUT_S

Each trial forks two workers with the environment torchrun gives its workers (RANK, WORLD_SIZE, MASTER_ADDR/PORT),
from a parent that already imported torch, so a trial costs a fraction of a second rather than a fresh interpreter.
Each worker builds a DDP model, trains two steps, broadcasts an object (as resume does) and then raises the error a
refused resume or a failed save raises on every rank, with the model still referenced by the traceback.
Prints one line per trial: `trial N: rank0=<status> rank1=<status>` (exit code, `signal N` or `hung`).
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402 - after the path, before the forks
import torch._dynamo  # noqa: E402, F401 - DDP imports it (seconds); once here, not in every worker
import torch.distributed as dist  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from common.collectives import broadcast_object  # noqa: E402
from common.errors import RecipeError  # noqa: E402
from training.entry import run_entry  # noqa: E402


def failing_job(run, ctx) -> None:
    model = torch.nn.parallel.DistributedDataParallel(
        torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 8))
    )
    optimizer = torch.optim.AdamW(model.parameters())
    for _ in range(2):
        model(torch.randn(16, 64)).square().mean().backward()
        optimizer.step()
    broadcast_object({"good": [], "broken": []})
    dist.broadcast(torch.zeros(1 << 14), src=0, async_op=True)  # gloo work still in flight at the error
    raise RecipeError(
        f"rank {ctx.rank}: refused (as a changed run or a failed save is), model still referenced"
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, port: int) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE="2",
        LOCAL_WORLD_SIZE="2",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    config = OmegaConf.create(
        {
            "model": OmegaConf.load(REPO / "hydra_config" / "model" / "tiny.yaml"),
            "training": {"device": "cpu"},
        }
    )
    run_entry(config, failing_job)
    # A SystemExit out of run_entry unwinds through main() into a normal interpreter exit, as a real worker's would.
    os._exit(99)  # run_entry returned: the error was lost


def _status(pid: int, deadline: float) -> str:
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return f"signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status) else str(os.WEXITSTATUS(status))
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return "hung"


def main(trials: int, timeout_s: float) -> None:
    for trial in range(trials):
        port = _free_port()
        pids = []
        for rank in range(2):
            pid = os.fork()
            if pid == 0:
                _worker(rank, port)
            pids.append(pid)
        deadline = time.monotonic() + timeout_s
        statuses = [_status(pid, deadline) for pid in pids]
        print(f"trial {trial}: rank0={statuses[0]} rank1={statuses[1]}", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), float(sys.argv[2]))
