"""Multi-node shown on one machine: two torchrun agents (--nnodes=2, c10d rendezvous on localhost).

The two "nodes" train one model together and commit shared checkpoints, as on a cluster with a shared filesystem.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest

from tests.launch import entry_command, launch_env, train_losses

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_train_and_checkpoint_together(tmp_path):
    launcher = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=2",
        "--nproc_per_node=1",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{_free_port()}",
        "--rdzv-id=two-nodes",
    ]
    overrides = [
        "training.strategy=fsdp2",
        "training.num_train_steps=4",
        "training.warmup_steps=1",
        "checkpoint.every_steps=2",
        "eval.every_steps=4",
        f"output_dir={tmp_path / 'run'}",
    ]
    cmd = entry_command("train.py", overrides, tmp=tmp_path, launcher=launcher)
    nodes = [
        subprocess.Popen(
            cmd, cwd=tmp_path, env=launch_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for _ in range(2)
    ]
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    assert sorted(train_losses(tmp_path / "run" / "train.jsonl")) == [1, 2, 3, 4]
    manifest = json.loads((tmp_path / "run" / "checkpoints" / "step_00000004" / "COMMITTED.json").read_text())
    assert manifest["meta"]["world_size"] == 2
    assert len([f for f in manifest["files"] if f.endswith(".distcp")]) == 2  # one shard file per node
    assert (tmp_path / "run" / "final_model" / "model.safetensors").is_file()
