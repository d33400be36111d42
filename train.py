"""Masked-LM pretraining of a Geneformer-style BERT, from one CPU process to many GPUs with torchrun.

    python train.py --config-name l0_sanity
    torchrun --nproc_per_node=8 train.py --config-name 10m training.strategy=fsdp2
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from training.builders import build_data, build_model, model_config_from_dict
from training.config import RunConfig
from training.distributed import DistributedContext
from training.evaluation import masked_lm_metrics
from training.parallelize import unwrap
from training.run import Task, masked_lm_loss, run_training


def pretraining_task(run: RunConfig) -> Task:
    config = model_config_from_dict(run.model)
    model = build_model(config, run.seed)

    def evaluate(wrapped, batches):
        return masked_lm_metrics({"model": unwrap(wrapped)}, batches, next(wrapped.parameters()).device)["model"]

    return Task(trainable=model, layers=list(model.bert.encoder.layer), loss_fn=masked_lm_loss,
                evaluate=evaluate, export_config=config, meta={"task": "masked_lm"})


def pretrain(run: RunConfig, ctx: DistributedContext):
    task = pretraining_task(run)
    config = task.export_config
    data = build_data(run, ctx, vocab_size=config.vocab_size, max_length=config.max_position_embeddings)
    return run_training(run, ctx, data, task, name="train")


@hydra.main(config_path="hydra_config", config_name="l0_sanity", version_base=None)
def main(cfg: DictConfig) -> None:
    from training.entry import run_entry

    run_entry(cfg, pretrain)


if __name__ == "__main__":
    main()
