"""Knowledge distillation of a Geneformer teacher into a small student, on one CPU or many GPUs with torchrun.

python distill.py --config-name l0_sanity                 # pretrains a tiny teacher first, then distils
torchrun --nproc_per_node=8 distill.py --config-name 4m distill.teacher=/path/to/Geneformer-V1-10M
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

from omegaconf import DictConfig

from distillation.student_init import init_student_from_teacher
from distillation.task import (
    DistillationLoss,
    StudentWithProjections,
    default_layer_map,
    evaluate_side_by_side,
)
from distillation.teacher import check_teacher, load_teacher, weights_sha256
from training.baselines import BASELINE_NAMES, masked_lm_baselines, split_columns
from training.builders import (
    DataBundle,
    build_data,
    build_model,
    model_config_by_name,
    model_config_from_dict,
)
from training.config import RunConfig
from training.distributed import DistributedContext
from training.entry import run_entry
from training.hydra_main import recipe_main
from training.masked_lm_metrics import format_side_by_side
from training.metrics_log import job_wandb, last_eval_record
from training.parallelize import capture_cuda_graphs, check_cuda_graphs, compile_layers, compute_dtype
from training.pretrain import first_stage_run, pretrain_first
from training.run import Task, run_training

log = logging.getLogger("distill")


def teacher_run_config(run: RunConfig) -> RunConfig:
    """The pretraining run that makes a teacher when none is given: same data and seed, own output dir."""
    cfg = run.distill
    # The teacher reads cells truncated as the student will see them.
    model = {
        **model_config_by_name(cfg.teacher_model),
        "max_position_embeddings": run.model["max_position_embeddings"],
    }
    return first_stage_run(run, "teacher", cfg.teacher_steps, cfg.teacher_lr, model=model)


def resolve_teacher(run: RunConfig, ctx: DistributedContext) -> Path:
    if run.distill.teacher is not None:
        return Path(run.distill.teacher)
    return pretrain_first(
        teacher_run_config(run), ctx, f"a '{run.distill.teacher_model}' teacher (no distill.teacher given)"
    )


def distillation_task(run: RunConfig, ctx: DistributedContext, data: DataBundle, teacher_dir: Path) -> Task:
    cfg = run.distill
    student_config = model_config_from_dict(run.model)
    teacher_dtype = compute_dtype(cfg.teacher_precision, ctx.device)
    teacher = load_teacher(teacher_dir, ctx.device, teacher_dtype)
    if run.training.cuda_graphs:
        check_cuda_graphs(ctx.device)
        capture_cuda_graphs(teacher)  # the teacher's forward is a large share of each step
    elif run.training.compile:
        compile_layers(teacher.bert.encoder.layer)
    check_teacher(teacher_dir, teacher.config, student_config, data.vocab, int(data.corpus.lengths.max()))
    student = build_model(student_config, run.seed)
    layer_map = (
        [tuple(pair) for pair in cfg.layer_map]
        if cfg.layer_map
        else default_layer_map(student_config.num_hidden_layers, teacher.config.num_hidden_layers)
    )
    if cfg.student_init == "teacher":
        init_student_from_teacher(student, teacher, [(s - 1, t - 1) for s, t in layer_map if s > 0 and t > 0])
    n_projections = len(layer_map) if cfg.hidden_weight > 0 else 0
    trainable = StudentWithProjections(student, teacher.config.hidden_size, n_projections)
    return Task(
        trainable=trainable,
        layers=list(student.bert.encoder.layer),
        loss_fn=DistillationLoss(teacher, cfg, layer_map, student_config.num_attention_heads),
        evaluate=lambda wrapped, batches: evaluate_side_by_side(teacher, wrapped, batches),
        export_config=student_config,
        export_prefix="student.",
        meta={
            "task": "distillation",
            "teacher_dir": str(teacher_dir.resolve()),
            "teacher_sha256": weights_sha256(teacher_dir),
        },
        baselines=masked_lm_baselines,
    )


def report(run: RunConfig, ctx: DistributedContext, task: Task, metrics_path: Path) -> None:
    """Print the last held-out evaluation side by side and write it as JSON."""
    last = last_eval_record(metrics_path) if ctx.is_main else None
    if last is None:
        return
    results = split_columns(last, ("teacher", "student", *BASELINE_NAMES))
    params = {
        "teacher": {"parameters": sum(p.numel() for p in task.loss_fn.teacher.parameters())},
        "student": {"parameters": sum(p.numel() for p in task.trainable.student.parameters())},
    }
    print(
        f"\nheld-out masked-LM at step {last['step']} (same masked cells for the models and the baselines)\n"
        + format_side_by_side(results, params)
    )
    out = Path(run.output_dir) / "distill_eval.json"
    counts = {side: rows["parameters"] for side, rows in params.items()}
    out.write_text(json.dumps({"step": last["step"], "results": results, "parameters": counts}, indent=2))


def distil(run: RunConfig, ctx: DistributedContext) -> None:
    run = dataclasses.replace(
        run, logging=job_wandb(run)
    )  # a pretrained teacher's W&B run joins this one's group
    student_config = model_config_from_dict(run.model)
    teacher_dir = resolve_teacher(run, ctx)
    data = build_data(
        run, ctx, vocab_size=student_config.vocab_size, max_length=student_config.max_position_embeddings
    )
    task = distillation_task(run, ctx, data, teacher_dir)
    result, _ = run_training(run, ctx, data, task, name="distill")
    if not result.preempted:
        report(run, ctx, task, Path(run.output_dir) / "distill.jsonl")


@recipe_main(config_path="hydra_config/distill", config_name="l0_sanity")
def main(cfg: DictConfig) -> None:
    run_entry(cfg, distil, section="distill")


if __name__ == "__main__":
    main()
