"""Training's own held-out evaluation and evaluate.py score the same masked tokens with 1 or 2 ranks, so their
figures agree exactly, baselines included."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.launch import REPO, eval_records, launch_env, run_entry

pytestmark = pytest.mark.slow

RUN = [
    "training.num_train_steps=2",
    "training.warmup_steps=1",
    "checkpoint.every_steps=100",
    "eval.every_steps=2",
]


def _evaluate(model_dir, tmp, out, nproc: int) -> dict:
    launcher = (
        [sys.executable]
        if nproc == 1
        else [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    )
    # The run's settings (tests/launch.py FAST): 10% held out, the first 16 of them, cells cut to 128 genes.
    cmd = [
        *launcher,
        str(REPO / "evaluate.py"),
        str(model_dir),
        "--builtin-dir",
        str(tmp / "builtin"),
        "--builtin-cells",
        "300",
        "--cache-dir",
        str(tmp / "cache"),
        "--heldout-fraction",
        "0.1",
        "--max-cells",
        "16",
        "--out",
        str(out),
        "--label-column",
        "none",
    ]
    result = subprocess.run(cmd, cwd=tmp, env=launch_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads((out / "results.json").read_text())


def test_one_rank_two_ranks_and_evaluate_py_score_the_same_masked_tokens(tmp_path):
    run_entry("train.py", [*RUN, f"output_dir={tmp_path / 'one'}"], tmp=tmp_path)
    run_entry("train.py", [*RUN, f"output_dir={tmp_path / 'two'}"], nproc=2, tmp=tmp_path)
    one = eval_records(tmp_path / "one" / "train.jsonl")[-1]
    two = eval_records(tmp_path / "two" / "train.jsonl")[-1]
    for key in ("masked_tokens", "unigram_accuracy", "rank_position_accuracy", "uniform_loss"):
        assert one[key] == two[key], key
    for nproc in (1, 2):
        results = _evaluate(tmp_path / "one" / "final_model", tmp_path, tmp_path / f"eval{nproc}", nproc)
        model = next(iter(results["models"].values()))
        assert model["masked_tokens"] == one["masked_tokens"]
        assert model["accuracy"] == pytest.approx(one["accuracy"], abs=1e-9)
        assert model["loss"] == pytest.approx(one["loss"], rel=1e-5)
        assert results["baselines"]["rank_position"]["accuracy"] == one["rank_position_accuracy"]
