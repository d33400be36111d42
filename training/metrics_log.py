"""Run logging on rank 0: a JSON-lines metrics file, a progress bar, and Weights & Biases when enabled.

W&B is offline by default; a resume passes the run id its checkpoints recorded, so it logs into the same W&B run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path

from training.config import LoggingConfig, RunConfig

log = logging.getLogger(__name__)


class MetricsLogger:
    def __init__(
        self,
        output_dir: Path,
        cfg: LoggingConfig,
        *,
        is_main: bool,
        total_steps: int,
        run_config: dict,
        name: str = "metrics",
        wandb_id: str | None = None,
    ) -> None:
        self.is_main = is_main
        self.path = Path(output_dir) / f"{name}.jsonl"
        self._file = None
        self._bar = None
        self._wandb = None
        if not is_main:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a")
        if cfg.progress_bar:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, desc=name, dynamic_ncols=True)
        if cfg.wandb:
            self._wandb = _start_wandb(cfg, Path(output_dir), run_config, wandb_id)

    @property
    def wandb_run_id(self) -> str | None:
        """The W&B run this process logs to (rank 0 with logging.wandb=true), for the checkpoint manifest."""
        return None if self._wandb is None else self._wandb.id

    def set_position(self, step: int) -> None:
        if self._bar is not None:
            self._bar.n = step
            self._bar.refresh()

    def log(self, step: int, metrics: dict, *, kind: str = "train") -> None:
        if not self.is_main:
            return
        record = {"step": step, "kind": kind, **metrics}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._wandb is not None:
            self._wandb.log(
                {f"{kind}/{k}": v for k, v in metrics.items() if isinstance(v, int | float)}, step=step
            )
        if self._bar is not None and kind == "train":
            self._bar.n = step
            self._bar.set_postfix(
                {k: f"{metrics[k]:.4g}" for k in ("loss", "lr") if k in metrics}, refresh=True
            )
        elif kind != "train":
            log.info("step %d %s: %s", step, kind, _short(metrics))

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._file is not None:
            self._file.close()
        if self._wandb is not None:
            self._wandb.finish()


def _short(metrics: dict) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())


def _start_wandb(cfg: LoggingConfig, output_dir: Path, run_config: dict, run_id: str | None):
    import wandb  # installed: the config check refuses logging.wandb=true without it

    return wandb.init(
        project=cfg.wandb_project,
        entity=cfg.wandb_entity,
        name=cfg.wandb_name or output_dir.name,
        group=cfg.wandb_group,
        tags=list(cfg.wandb_tags) or None,
        id=run_id,
        resume="allow",
        mode=os.environ.get("WANDB_MODE", cfg.wandb_mode),
        dir=str(output_dir),
        config=run_config,
    )


def job_wandb(run: RunConfig) -> LoggingConfig:
    """The logging of a job that runs a first stage (a teacher, a model to fine-tune): its W&B run is named (the
    output folder's name unless logging.wandb_name is set) and heads a group (logging.wandb_group, else that name)."""
    name = run.logging.wandb_name or Path(run.output_dir).name
    return dataclasses.replace(run.logging, wandb_name=name, wandb_group=run.logging.wandb_group or name)


def stage_wandb(run: RunConfig, stage: str) -> LoggingConfig:
    """The logging of the job's first stage: a W&B run named <job>-<stage> in the job's group."""
    job = job_wandb(run)
    return dataclasses.replace(job, wandb_name=f"{job.wandb_name}-{stage}")


def read_metrics(path: str | Path) -> list[dict]:
    """Records of a metrics.jsonl file (for plots and comparisons)."""
    with Path(path).open() as handle:
        return [json.loads(line) for line in handle if line.strip()]


def last_eval_record(path: str | Path) -> dict | None:
    """The newest held-out evaluation record of a metrics.jsonl file; None when the run has none (yet)."""
    if not Path(path).is_file():
        return None
    evals = [record for record in read_metrics(path) if record.get("kind") == "eval"]
    return evals[-1] if evals else None
