"""The masked-LM pretraining job: a model, its cross-entropy loss and held-out masked-LM evaluation.

train.py runs it; distill.py runs it too when it must first pretrain a teacher.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from training.baselines import masked_lm_baselines
from training.builders import build_data, build_model, model_config_from_dict
from training.config import RunConfig
from training.distributed import DistributedContext
from training.evaluation import masked_lm_metrics
from training.loop import LoopResult
from training.parallelize import unwrap
from training.run import Task, masked_lm_loss, run_training


def _device_of(module: nn.Module):
    return next(module.parameters()).device


def pretraining_task(run: RunConfig) -> Task:
    config = model_config_from_dict(run.model)
    model = build_model(config, run.seed)

    def evaluate(wrapped: nn.Module, batches: list[dict]) -> dict[str, float]:
        return masked_lm_metrics({"model": unwrap(wrapped)}, batches, _device_of(wrapped))["model"]

    return Task(trainable=model, layers=list(model.bert.encoder.layer), loss_fn=masked_lm_loss,
                evaluate=evaluate, export_config=config, meta={"task": "masked_lm"}, baselines=masked_lm_baselines)


def pretrain(run: RunConfig, ctx: DistributedContext) -> tuple[LoopResult, Path | None]:
    task = pretraining_task(run)
    config = task.export_config
    data = build_data(run, ctx, vocab_size=config.vocab_size, max_length=config.max_position_embeddings)
    return run_training(run, ctx, data, task, name="train")
