"""Helpers for tests that launch the recipe's entry points as real processes (plain python or torchrun).

Runs are small (tiny models, the built-in corpus or real cells truncated to short lengths) to fit CI's two cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
REAL_CELLS = SHARED_DATA / "genecorpus_500_samples.parquet"
V1_VOCAB = SHARED_DATA / "geneformer" / "V1" / "vocab.txt"

# Small, fast settings shared by every launched run: tiny model, short cells, frequent logging.
FAST = [
    "logging.progress_bar=false",
    "logging.log_every=1",
    "logging.plot=false",
    "data.num_workers=0",
    "data.max_tokens=512",
    "data.builtin_cells=300",
    "data.heldout_fraction=0.1",
    "model.max_position_embeddings=128",
    "eval.max_cells=16",
]


def entry_command(script: str, overrides: list[str], *, tmp: Path, launcher: list[str]) -> list[str]:
    """The command line of an entry point with the fast test settings and a per-test data directory."""
    return [
        *launcher,
        str(REPO / script),
        f"data.builtin_dir={tmp / 'builtin'}",
        f"data.cache_dir={tmp / 'cache'}",
        *FAST,
        *overrides,
    ]


def launch_env(extra: dict | None = None) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(extra or {})}


def run_entry(
    script: str,
    overrides: list[str],
    *,
    nproc: int = 1,
    tmp: Path,
    timeout: int = 300,
    env: dict | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess:
    """Run `script` (train.py / distill.py / evaluate.py) with hydra overrides, under torchrun when nproc > 1."""
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd = entry_command(script, overrides, tmp=tmp, launcher=launcher)
    result = subprocess.run(
        cmd, cwd=tmp, env=launch_env(env), capture_output=True, text=True, timeout=timeout
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)}\nexit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
        )
    return result


def train_losses(metrics_file: Path) -> dict[int, float]:
    """step -> training loss from a metrics.jsonl file (the last record wins if a step repeats)."""
    losses = {}
    for line in metrics_file.read_text().splitlines():
        record = json.loads(line)
        if record["kind"] == "train":
            losses[record["step"]] = record["loss"]
    return losses


def eval_records(metrics_file: Path) -> list[dict]:
    return [r for r in map(json.loads, metrics_file.read_text().splitlines()) if r["kind"] == "eval"]
