"""Masked-LM pretraining of a Geneformer-style BERT, from one CPU process to many GPUs with torchrun.

python train.py --config-name l0_sanity
torchrun --nproc_per_node=8 train.py --config-name 10m training.strategy=fsdp2
"""

from __future__ import annotations

from omegaconf import DictConfig

from training.entry import run_entry
from training.hydra_main import recipe_main
from training.pretrain import pretrain


@recipe_main(config_path="hydra_config", config_name="l0_sanity")
def main(cfg: DictConfig) -> None:
    run_entry(cfg, pretrain)


if __name__ == "__main__":
    main()
