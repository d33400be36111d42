"""The one training loop of the recipe: steps, logging, held-out evaluation, checkpoints, preemption.

train.py and distill.py differ only in the loss function and evaluation they hand to `run_loop`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from checkpointing.checkpointer import Checkpointer, TrainState, committed_checkpoints
from training.config import RunConfig
from training.distributed import DistributedContext
from training.metrics_log import MetricsLogger
from training.preemption import PreemptionWatcher, report_committed_stop
from training.step import LossFn, NonFiniteLossError, train_step
from training.throughput import ThroughputMeter

log = logging.getLogger(__name__)


@dataclass
class LoopParts:
    ctx: DistributedContext
    model: nn.Module  # wrapped for DDP / FSDP2
    loss_fn: LossFn
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    train_loader: object  # CellBatchLoader: endless iterator with state_dict / load_state_dict
    checkpointer: Checkpointer
    logger: MetricsLogger
    evaluate: Callable[[], dict[str, float]] | None
    autocast: Callable[[], contextlib.AbstractContextManager]
    flops_per_token: float | None = None


@dataclass
class LoopResult:
    step: int
    preempted: bool
    skipped_steps: int


def _start_state(parts: LoopParts, cfg: RunConfig) -> TrainState:
    state = TrainState(parts.model, parts.optimizer, parts.scheduler, parts.train_loader)
    if cfg.checkpoint.resume:
        parts.checkpointer.resume(state)
    elif committed_checkpoints(parts.checkpointer.root)[0]:
        raise FileExistsError(
            f"checkpoint.dir {parts.checkpointer.root} already holds checkpoints and "
            "checkpoint.resume=false; pick a new checkpoint.dir or resume"
        )
    return state


def _handle_nonfinite(metrics: dict, micro_batches: list[dict], step: int, cfg: RunConfig) -> None:
    if cfg.training.nonfinite == "skip":
        log.warning(
            "step %d: non-finite loss or gradient (loss=%s, grad_norm=%s); update skipped",
            step,
            metrics.get("loss"),
            metrics["grad_norm"],
        )
        return
    cells = [int(i) for b in micro_batches if "cell_index" in b for i in b["cell_index"]]
    raise NonFiniteLossError(
        f"step {step}: loss or gradient is not finite (loss={metrics.get('loss')}, grad_norm={metrics['grad_norm']}); "
        f"cells of this rank's batch: {cells[:64]}{' ...' if len(cells) > 64 else ''}. Lower training.lr, check "
        "those cells, or set training.nonfinite=skip to skip such steps."
    )


def run_loop(parts: LoopParts, cfg: RunConfig) -> LoopResult:
    """Train until `num_train_steps` or a preemption signal; checkpoints are committed on the way."""
    tcfg = cfg.training
    state = _start_state(parts, cfg)
    parts.logger.set_position(state.step)
    batches = iter(parts.train_loader)
    meter = ThroughputMeter(parts.ctx.device, parts.ctx.world_size)
    skipped, preempted, first_step = 0, False, state.step
    with PreemptionWatcher() as watcher:
        while state.step < tcfg.num_train_steps and not preempted:
            micro_batches = [next(batches) for _ in range(tcfg.grad_accum_steps)]
            metrics = train_step(
                parts.model,
                parts.loss_fn,
                parts.optimizer,
                micro_batches,
                device=parts.ctx.device,
                world_size=parts.ctx.world_size,
                grad_clip=tcfg.grad_clip,
                autocast=parts.autocast,
            )
            if metrics.pop("finite"):
                parts.optimizer.step()
            else:
                _handle_nonfinite(metrics, micro_batches, state.step + 1, cfg)
                skipped += 1
            metrics["lr"] = parts.scheduler.get_last_lr()[0]
            parts.scheduler.step()
            state.step += 1
            meter.add(micro_batches)
            _log_and_evaluate(parts, cfg, state.step, metrics, meter, skipped)
            preempted = watcher.stop_requested() or (
                tcfg.stop_after_steps is not None and state.step - first_step >= tcfg.stop_after_steps
            )
            if (
                preempted
                or state.step % cfg.checkpoint.every_steps == 0
                or state.step == tcfg.num_train_steps
            ):
                parts.checkpointer.save(state)
    parts.checkpointer.wait()
    if preempted:
        log.warning(
            "stopped at step %d after checkpointing (preemption signal or stop_after_steps); relaunch to "
            "continue",
            state.step,
        )
        report_committed_stop(state.step)
    return LoopResult(step=state.step, preempted=preempted, skipped_steps=skipped)


def _log_and_evaluate(
    parts: LoopParts, cfg: RunConfig, step: int, metrics: dict, meter: ThroughputMeter, skipped: int
) -> None:
    last = step == cfg.training.num_train_steps
    if step % cfg.logging.log_every == 0 or last:
        metrics.update(meter.report(parts.flops_per_token), skipped_steps=skipped)
        parts.logger.log(step, metrics)
    if parts.evaluate is not None and (step % cfg.eval.every_steps == 0 or last):
        parts.logger.log(step, parts.evaluate(), kind="eval")
