"""Run logging on rank 0: a JSON-lines metrics file, a progress bar, and Weights & Biases when enabled.

W&B is offline by default and silently absent only when the user did not ask for it.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from training.config import LoggingConfig

log = logging.getLogger(__name__)


class MetricsLogger:
    def __init__(self, output_dir: Path, cfg: LoggingConfig, *, is_main: bool, total_steps: int,
                 run_config: dict, name: str = "metrics") -> None:
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
            self._wandb = _start_wandb(cfg, output_dir, run_config)

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
            self._wandb.log({f"{kind}/{k}": v for k, v in metrics.items() if isinstance(v, int | float)}, step=step)
        if self._bar is not None and kind == "train":
            self._bar.n = step
            self._bar.set_postfix({k: f"{metrics[k]:.4g}" for k in ("loss", "lr") if k in metrics}, refresh=True)
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


def _start_wandb(cfg: LoggingConfig, output_dir: Path, run_config: dict):
    try:
        import wandb
    except ImportError as error:
        raise ImportError("logging.wandb=true but wandb is not installed: pip install wandb, "
                          "or set logging.wandb=false") from error
    os.environ.setdefault("WANDB_MODE", cfg.wandb_mode)
    return wandb.init(project=cfg.wandb_project, dir=str(output_dir), config=run_config)


def read_metrics(path: str | Path) -> list[dict]:
    """Records of a metrics.jsonl file (for plots and comparisons)."""
    with Path(path).open() as handle:
        return [json.loads(line) for line in handle if line.strip()]
