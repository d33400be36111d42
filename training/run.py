"""Assemble and run one job: parallelize the trainable module, build optimizer and logging, loop, export.

A `Task` carries what differs between pretraining and distillation; everything else is shared.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from checkpointing.checkpointer import Checkpointer, committed_checkpoints
from checkpointing.manifest import read_manifest
from common.collectives import barrier
from dataset.batch import labelled_rows, model_inputs
from dataset.vocab import Vocabulary
from model.hf_dir import export_model_dir
from modeling_bert_te import BertTEConfig
from training.builders import DataBundle, autocast_factory, fixed_eval_batches
from training.config import RunConfig
from training.distributed import DistributedContext
from training.float8 import align_packed_tokens, apply_float8, nest_contexts, te_fp8_autocast
from training.identity import identity_meta
from training.loop import LoopParts, LoopResult, run_loop
from training.metrics_log import MetricsLogger
from training.optim import build_optimizer, build_scheduler
from training.parallelize import compute_dtype, parallelize
from training.plots import plot_training_curves
from training.step import LossFn
from training.throughput import train_flops_per_token

log = logging.getLogger(__name__)


@dataclass
class Task:
    """What a job trains and how it scores it."""

    trainable: nn.Module  # the module the optimizer updates (a model, or a student with projections)
    layers: list[nn.Module]  # FSDP2 units / activation-checkpointing units
    loss_fn: LossFn
    evaluate: Callable[[nn.Module, list[dict]], dict[str, float]]  # (wrapped trainable, held-out batches)
    export_config: BertTEConfig
    export_prefix: str = ""  # prefix of the exported model's keys inside `trainable` (e.g. "student.")
    meta: dict = field(default_factory=dict)  # recorded in every checkpoint's manifest
    # Writes the exported directory from full weights: a stock BertForMaskedLM directory unless a job says else.
    export: Callable[[dict[str, torch.Tensor], BertTEConfig, Path, Vocabulary], Path] = field(
        default=lambda weights, config, out_dir, vocab: export_model_dir(
            weights, config, out_dir, vocab, overwrite=True
        )
    )
    # Trivial baselines recorded beside every evaluation: (data, held-out batches, is_main) -> record entries.
    baselines: Callable[[DataBundle, list[dict], bool], dict[str, float]] | None = None


def _flops_per_token(config: BertTEConfig, data: DataBundle) -> float:
    mean_len = float(data.corpus.lengths[data.train_idx].mean())
    return train_flops_per_token(
        config.num_hidden_layers, config.hidden_size, config.intermediate_size, mean_len
    )


def run_training(
    run: RunConfig, ctx: DistributedContext, data: DataBundle, task: Task, *, name: str = "train"
) -> tuple[LoopResult, Path | None]:
    """Train `task` to `num_train_steps` (resuming if checkpoints exist); export at the end."""
    tcfg = run.training
    dtype = compute_dtype(tcfg.precision, ctx.device)
    autocast = autocast_factory(dtype, ctx.device, tcfg.strategy)
    if tcfg.fp8 == "torchao":
        apply_float8(
            task.trainable, tokens=run.data.max_tokens, scaling=tcfg.fp8_scaling, layers=tcfg.fp8_layers
        )
    elif tcfg.fp8 == "te":
        autocast = nest_contexts(autocast, te_fp8_autocast(tcfg.fp8_recipe, ctx.device))
        align_packed_tokens(task.trainable, tcfg.fp8_alignment())
    model = parallelize(
        task.trainable,
        task.layers,
        strategy=tcfg.strategy,
        device=ctx.device,
        dtype=dtype,
        activation_checkpointing=tcfg.activation_checkpointing,
        compile=tcfg.compile,
        cuda_graphs=tcfg.cuda_graphs,
    )
    optimizer = build_optimizer(model, tcfg, ctx.device)
    output_dir = Path(run.output_dir)
    meta = {
        **task.meta,
        "model_config": task.export_config.to_dict(),
        "export_prefix": task.export_prefix,
        "vocab_tokens_file": str(output_dir / "vocab.txt"),
        **identity_meta(run, ctx, task.export_config, data, task.meta),
    }
    if ctx.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        data.vocab.save(output_dir / "vocab.txt")
    eval_batches = fixed_eval_batches(data)
    baselines = task.baselines(data, eval_batches, ctx.is_main) if task.baselines is not None else {}
    logger = MetricsLogger(
        output_dir,
        run.logging,
        is_main=ctx.is_main,
        total_steps=tcfg.num_train_steps,
        run_config=dataclasses.asdict(run),
        name=name,
        wandb_id=_previous_wandb_id(run) if ctx.is_main else None,
    )
    if logger.wandb_run_id is not None:
        meta["wandb_run_id"] = logger.wandb_run_id
    parts = LoopParts(
        ctx=ctx,
        model=model,
        loss_fn=task.loss_fn,
        optimizer=optimizer,
        scheduler=build_scheduler(optimizer, tcfg),
        train_loader=data.train_loader,
        checkpointer=Checkpointer(
            run.checkpoint.dir,
            rank=ctx.rank,
            keep_last=run.checkpoint.keep_last,
            async_save=run.checkpoint.async_save,
            meta=meta,
            allow_changed_run=run.checkpoint.allow_changed_run,
        ),
        logger=logger,
        evaluate=lambda: {**task.evaluate(model, eval_batches), **baselines},
        autocast=autocast,
        flops_per_token=_flops_per_token(task.export_config, data),
    )
    try:
        result = run_loop(parts, run)
    finally:
        logger.close()
    if result.preempted:
        return result, None
    export_dir = export_trained_model(model, task, data, output_dir / "final_model", ctx)
    if ctx.is_main and run.logging.plot:
        plot_training_curves({name: logger.path}, output_dir / f"{name}_curves.png")
    return result, export_dir


def _previous_wandb_id(run: RunConfig) -> str | None:
    """The W&B run id the newest committed checkpoint recorded, so that a resume continues that W&B run."""
    if not (run.logging.wandb and run.checkpoint.resume):
        return None
    good, _ = committed_checkpoints(Path(run.checkpoint.dir))
    return read_manifest(good[0][1])["meta"].get("wandb_run_id") if good else None


def export_trained_model(
    model: nn.Module, task: Task, data: DataBundle, out_dir: Path, ctx: DistributedContext
) -> Path:
    """Gather the full weights (from FSDP2 shards too) and write a stock-loadable model directory on rank 0."""
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if ctx.is_main:
        prefix = task.export_prefix
        weights = {k[len(prefix) :]: v.float() for k, v in full.items() if k.startswith(prefix)}
        task.export(weights, task.export_config, out_dir, data.vocab)
        log.info("exported %s", out_dir)
    barrier()
    return out_dir


def masked_lm_loss(model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
    """Summed cross-entropy over the batch's masked tokens (the loop divides by the global count)."""
    out = model(**model_inputs(batch))
    # The model already computed the mean over these tokens; the sum is that mean times their count.
    ce = out.loss * labelled_rows(out.masked_labels).sum()
    return {"loss": ce, "mlm": ce.detach()}
