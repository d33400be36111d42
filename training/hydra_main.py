"""The entry points' hydra decorator: a config hydra cannot compose ends in the recipe's one line with exit 2, and
each job of a sweep (`-m`) trains in its own folder, so no job resumes another's checkpoints.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import ConfigCompositionException, HydraException
from hydra.types import RunMode
from omegaconf import DictConfig

from common.errors import USER_ERRORS
from training.config import ConfigError, unknown_key_error
from training.entry import setup_logging

log = logging.getLogger("config")


def recipe_main(
    config_path: str, config_name: str
) -> Callable[[Callable[[DictConfig], None]], Callable[[], None]]:
    """`hydra.main` for the recipe's entry points (config_path relative to the entry script, as with hydra)."""

    def decorate(task: Callable[[DictConfig], None]) -> Callable[[], None]:
        config_dir = Path(inspect.getfile(task)).resolve().parent / config_path

        @functools.wraps(task)
        def job(cfg: DictConfig) -> None:
            place_sweep_job(cfg)
            task(cfg)

        app = hydra.main(config_path=str(config_dir), config_name=config_name, version_base=None)(job)

        @functools.wraps(task)
        def main() -> None:
            # Let composition errors reach us instead of hydra's own multi-line report and exit code 1.
            os.environ["HYDRA_FULL_ERROR"] = "1"
            try:
                app()
            except (HydraException, *USER_ERRORS) as error:
                if os.environ.get("RECIPE_DEBUG"):
                    raise
                setup_logging()
                log.error("%s", one_line(error))
                sys.exit(2)

        return main

    return decorate


def one_line(error: Exception) -> str:
    """A hydra error as the recipe reports config errors: an override of a key the schema lacks is an unknown key."""
    if isinstance(error, ConfigCompositionException) and str(error).startswith("Could not override '"):
        return str(unknown_key_error(str(error).split("'")[1]))
    return " ".join(str(error).split())


def place_sweep_job(cfg: DictConfig) -> None:
    """In a sweep, point the job's output_dir (and so its checkpoints) at <sweep dir>/<job number>; its W&B run
    joins the sweep's group.

    base.yaml's hydra.sweep.subdir puts hydra's own files of the job in <job number>/hydra, beside it.
    """
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Hydra runs a sweep's jobs one after another in one process, and a process group cannot start twice.
        raise ConfigError(
            "a sweep (-m) runs its jobs one after another in one process, which torchrun's ranks "
            "cannot; launch one torchrun per setting instead, each with its own output_dir"
        )
    sweep = Path(hydra_cfg.sweep.dir)
    cfg.output_dir = str(sweep / str(hydra_cfg.job.num))
    # W&B shows the jobs of one sweep as one group, each named by its sweep and number.
    cfg.logging.wandb_group = cfg.logging.wandb_group or sweep.name
    cfg.logging.wandb_name = cfg.logging.wandb_name or f"{sweep.name}-{hydra_cfg.job.num}"
    checkpoints = Path(cfg.checkpoint.dir).resolve()
    if not checkpoints.is_relative_to(Path(cfg.output_dir).resolve()):
        raise ConfigError(
            f"config 'checkpoint.dir': {checkpoints} is shared by every job of this sweep, so each "
            "would resume the one before; leave checkpoint.dir at its default (${output_dir}/checkpoints)"
        )
