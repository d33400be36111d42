"""A non-finite loss or gradient follows training.nonfinite: stop naming the step and cells, or skip and count.

The loop runs in-process with a small model whose loss is poisoned at a chosen step; one real train.py run
with an absurd learning rate shows the same stop from the command line.
"""

from __future__ import annotations

import contextlib
import json

import pytest
import torch

from checkpointing.checkpointer import Checkpointer
from tests.launch import run_entry
from training.config import CheckpointConfig, LoggingConfig, RunConfig, TrainingConfig
from training.distributed import DistributedContext
from training.loop import LoopParts, run_loop
from training.metrics_log import MetricsLogger
from training.step import NonFiniteLossError

POISONED_STEP = 3


class _Batches:
    """Endless batches of 2 cells; the batch of POISONED_STEP carries the poison and cells 30, 31."""

    def __init__(self, poison: str):
        self.position, self.poison = 0, poison

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        self.position += 1
        poisoned = self.position == POISONED_STEP
        return {
            "input_ids": torch.full((2, 4), float(self.position)),
            "labels": torch.zeros(2, dtype=torch.long),
            "cell_index": torch.tensor([10 * self.position, 10 * self.position + 1]),
            "poison": self.poison if poisoned else "",
        }

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = state["position"]


def _loss(model: torch.nn.Module, batch: dict) -> dict[str, torch.Tensor]:
    loss = ((model(batch["input_ids"]) - 1.0) ** 2).sum()
    if batch["poison"] == "loss":
        loss = loss * float("nan")
    elif batch["poison"] == "gradient":
        # Adds exactly 0 to the loss, but d sqrt(|0 * w|) / dw is inf * 0 = NaN: only the gradient is poisoned.
        loss = loss + (model.weight[0, 0] * 0.0).abs().sqrt()
    return {"loss": loss}


def _run(tmp_path, poison: str, policy: str):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    cfg = RunConfig(
        model={"tiny": True},
        checkpoint=CheckpointConfig(dir=str(tmp_path / "ckpt"), every_steps=100),
        training=TrainingConfig(num_train_steps=5, warmup_steps=0, nonfinite=policy),
        logging=LoggingConfig(log_every=1, progress_bar=False, plot=False),
    )
    weights = []
    parts = LoopParts(
        ctx=DistributedContext(rank=0, local_rank=0, world_size=1, device=torch.device("cpu")),
        model=model,
        loss_fn=_loss,
        optimizer=optimizer,
        scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0),
        train_loader=_Batches(poison),
        checkpointer=Checkpointer(cfg.checkpoint.dir, rank=0),
        evaluate=lambda: weights.append(model.weight.clone()) or {},
        logger=MetricsLogger(tmp_path, cfg.logging, is_main=True, total_steps=5, run_config={}, name="train"),
        autocast=contextlib.nullcontext,
    )
    cfg.eval.every_steps = 1  # the evaluate hook records the weights after every step
    return run_loop(parts, cfg), weights, tmp_path / "train.jsonl"


@pytest.mark.parametrize("poison", ["loss", "gradient"])
def test_stop_policy_names_the_step_and_the_cells(tmp_path, poison):
    with pytest.raises(NonFiniteLossError) as error:
        _run(tmp_path, poison, "stop")
    message = str(error.value)
    assert f"step {POISONED_STEP}:" in message and "[30, 31]" in message
    assert "training.nonfinite=skip" in message  # the way out is named
    assert not (tmp_path / "ckpt").exists()  # nothing poisoned was checkpointed


@pytest.mark.parametrize("poison", ["loss", "gradient"])
def test_skip_policy_skips_the_update_and_counts_it(tmp_path, poison, caplog):
    result, weights, metrics = _run(tmp_path, poison, "skip")
    assert result.step == 5 and result.skipped_steps == 1
    assert f"step {POISONED_STEP}: non-finite loss or gradient" in caplog.text
    # The poisoned step left the weights as they were; the steps around it moved them, and all stay finite.
    assert torch.equal(weights[POISONED_STEP - 1], weights[POISONED_STEP - 2])
    assert not torch.equal(weights[POISONED_STEP], weights[POISONED_STEP - 1])
    assert all(torch.isfinite(w).all() for w in weights)
    records = [json.loads(line) for line in metrics.read_text().splitlines() if '"train"' in line]
    assert [r["skipped_steps"] for r in records] == [0, 0, 1, 1, 1]


@pytest.mark.slow
def test_train_py_with_a_diverging_learning_rate_stops_with_the_step_and_cells(tmp_path):
    result = run_entry(
        "train.py",
        [
            "training.lr=1e30",
            "training.warmup_steps=0",
            "training.lr_schedule=constant",
            "training.num_train_steps=5",
            "checkpoint.every_steps=100",
            f"output_dir={tmp_path / 'run'}",
        ],
        tmp=tmp_path,
        check=False,
    )
    assert result.returncode == 2
    assert "ERROR run: step 2: loss or gradient is not finite" in result.stderr, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert "cells of this rank's batch: [" in result.stderr
    assert not (tmp_path / "run" / "final_model").exists()
