"""Fine-tune an exported model for cell classification (stock BertForSequenceClassification layout).

    python finetune.py --config-name l0_sanity                 # pretrains a tiny model first, then fine-tunes it
    torchrun --nproc_per_node=8 finetune.py --config-name l0_sanity finetune.model_dir=/path/to/student \\
        finetune.label_column=cell_type finetune.freeze_layers=2 data.path=/path/to/labelled_cells
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

from omegaconf import DictConfig

from finetuning.data import build_classification_data
from finetuning.export import export_classifier_dir
from finetuning.task import classification_loss, classification_metrics, majority_class_accuracy
from model.classifier import BertForCellClassification
from modeling_bert_te import BertTEConfig
from training.config import RunConfig
from training.distributed import DistributedContext
from training.entry import run_entry
from training.hydra_main import recipe_main
from training.metrics_log import job_wandb, last_eval_record
from training.pretrain import first_stage_run, pretrain_first
from training.run import Task, run_training

log = logging.getLogger("finetune")


def pretrain_run_config(run: RunConfig) -> RunConfig:
    """The masked-LM run that makes the model to fine-tune when none is given: same data, `model`, own output dir."""
    cfg = run.finetune
    return first_stage_run(
        run, "pretrained", cfg.pretrain_steps, cfg.pretrain_lr, training_changes={"stop_after_steps": None}
    )


def resolve_model_dir(run: RunConfig, ctx: DistributedContext) -> Path:
    if run.finetune.model_dir is not None:
        path = Path(run.finetune.model_dir)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"config 'finetune.model_dir': {path} has no config.json; give an exported "
                "model directory (final_model of train.py or distill.py, or a stock BERT)"
            )
        return path
    return pretrain_first(pretrain_run_config(run), ctx, "the configured model (no finetune.model_dir given)")


def cell_max_length(run: RunConfig, source: BertTEConfig) -> int:
    """Genes kept per cell: model.max_position_embeddings caps it (shorter cells train faster), never past the model's."""
    return min(source.max_position_embeddings, run.model.get("max_position_embeddings", 1 << 30))


def finetune(run: RunConfig, ctx: DistributedContext) -> None:
    run = dataclasses.replace(
        run, logging=job_wandb(run)
    )  # a model pretrained first joins this run's W&B group
    model_dir = resolve_model_dir(run, ctx)
    source = BertTEConfig.from_model_dir(model_dir)
    data, labels = build_classification_data(
        run, ctx, vocab_size=source.vocab_size, max_length=cell_max_length(run, source)
    )
    model = BertForCellClassification.from_masked_lm_dir(model_dir, labels.id2label, seed=run.seed)
    model.freeze(run.finetune.freeze_layers)
    log.info(
        "%d classes, %d training and %d held-out cells; %d of %d layers frozen",
        len(labels.names),
        len(data.train_idx),
        len(data.heldout_idx),
        run.finetune.freeze_layers,
        source.num_hidden_layers,
    )
    n_labels = len(labels.names)
    task = Task(
        trainable=model,
        layers=list(model.bert.encoder.layer),
        loss_fn=classification_loss,
        evaluate=lambda wrapped, batches: classification_metrics(wrapped, batches, n_labels, ctx.device),
        export_config=model.config,
        export=export_classifier_dir,
        meta={"task": "classification", "model_dir": str(model_dir.resolve()), "labels": labels.names},
        baselines=lambda data, batches, is_main: majority_class_accuracy(labels.ids[data.train_idx], batches),
    )
    result, _ = run_training(run, ctx, data, task, name="finetune")
    if not result.preempted and ctx.is_main:
        write_report(Path(run.output_dir))


def write_report(output_dir: Path) -> None:
    """The last held-out evaluation as finetune_eval.json, printed too."""
    last = last_eval_record(output_dir / "finetune.jsonl")
    if last is not None:
        (output_dir / "finetune_eval.json").write_text(json.dumps(last, indent=2) + "\n")
        print(
            f"held-out cells at step {last['step']}: accuracy {last['accuracy']:.4f}, "
            f"macro-F1 {last['macro_f1']:.4f} ({int(last['cells'])} cells); always the most common training "
            f"class: accuracy {last['majority_class_accuracy']:.4f}"
        )


@recipe_main(config_path="hydra_config/finetune", config_name="l0_sanity")
def main(cfg: DictConfig) -> None:
    run_entry(cfg, finetune, section="finetune")


if __name__ == "__main__":
    main()
