"""The masked-LM pretraining job: a model, its cross-entropy loss and held-out masked-LM evaluation.

train.py runs it; distill.py runs it too when it must first pretrain a teacher.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from torch import nn

from training.baselines import BASELINE_NAMES, masked_lm_baselines, split_columns
from training.builders import build_data, build_model, model_config_from_dict
from training.config import RunConfig
from training.distributed import DistributedContext
from training.loop import LoopResult
from training.masked_lm_metrics import format_side_by_side, masked_lm_metrics
from training.metrics_log import last_eval_record, stage_wandb
from training.parallelize import unwrap
from training.run import Task, masked_lm_loss, run_training

log = logging.getLogger("pretrain")


def _device_of(module: nn.Module):
    return next(module.parameters()).device


def pretraining_task(run: RunConfig) -> Task:
    config = model_config_from_dict(run.model)
    model = build_model(config, run.seed)

    def evaluate(wrapped: nn.Module, batches: list[dict]) -> dict[str, float]:
        return masked_lm_metrics({"model": unwrap(wrapped)}, batches, _device_of(wrapped))["model"]

    return Task(
        trainable=model,
        layers=list(model.bert.encoder.layer),
        loss_fn=masked_lm_loss,
        evaluate=evaluate,
        export_config=config,
        meta={"task": "masked_lm"},
        baselines=masked_lm_baselines,
    )


def pretrain(run: RunConfig, ctx: DistributedContext) -> tuple[LoopResult, Path | None]:
    task = pretraining_task(run)
    config = task.export_config
    data = build_data(run, ctx, vocab_size=config.vocab_size, max_length=config.max_position_embeddings)
    result, export_dir = run_training(run, ctx, data, task, name="train")
    if ctx.is_main and not result.preempted:
        print_last_eval(Path(run.output_dir) / "train.jsonl")
    return result, export_dir


def first_stage_run(run: RunConfig, stage: str, steps: int, lr: float, **changes: Any) -> RunConfig:
    """The masked-LM run a job trains before its own (a teacher, a model to fine-tune): the job's data, seed and
    settings, `steps` at `lr`, in its own folder `<output_dir>/<stage>` with its own checkpoints and W&B stage.
    `changes` replaces more RunConfig fields (`model`) or, as `training_changes`, training settings."""
    out = Path(run.output_dir) / stage
    training = dataclasses.replace(
        run.training,
        num_train_steps=steps,
        lr=lr,
        warmup_steps=max(1, steps // 10),
        **changes.pop("training_changes", {}),
    )
    return dataclasses.replace(
        run,
        output_dir=str(out),
        training=training,
        distill=None,
        finetune=None,
        logging=stage_wandb(run, stage),
        checkpoint=dataclasses.replace(run.checkpoint, dir=str(out / "checkpoints")),
        **changes,
    )


def pretrain_first(run: RunConfig, ctx: DistributedContext, what: str) -> Path:
    """The exported model of the masked-LM pretraining `run` that a job needs before its own, trained now.

    A finished pretraining resumes at its last step and only exports again; a preemption during it ends this
    launch with exit code 0, and the relaunch resumes it.
    """
    log.info("pretraining %s first (%d steps, %s)", what, run.training.num_train_steps, run.output_dir)
    _, export_dir = pretrain(run, ctx)
    if export_dir is None:
        raise SystemExit(0)
    return export_dir


def print_last_eval(metrics_path: Path) -> None:
    """The run's last held-out evaluation beside the trivial baselines, as a table."""
    last = last_eval_record(metrics_path)
    if last is None:
        return
    model = {k: v for k, v in last.items() if k not in ("step", "kind") and not k.startswith(BASELINE_NAMES)}
    print(
        f"\nheld-out masked-LM at step {last['step']} (same masked cells for the model and the baselines)\n"
        + format_side_by_side({"model": model, **split_columns(last, BASELINE_NAMES)}),
        flush=True,
    )
