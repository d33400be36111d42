"""Start-up shared by the entry points: logging format, typed config, distributed context, clean exit.

A user error (bad config, path, vocabulary) ends the run with one clear line; RECIPE_DEBUG=1 adds the traceback.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import sys
from collections.abc import Callable
from types import TracebackType
from typing import NoReturn

import torch
from omegaconf import DictConfig

from common.collectives import is_distributed
from common.cpu_allocator import keep_freed_cpu_memory
from common.errors import USER_ERRORS
from training.config import RunConfig, parse_config
from training.distributed import DistributedContext, init_distributed, shutdown_distributed
from training.run_log import attach_log_file


def setup_logging() -> None:
    """Log to stderr: rank 0 from INFO, other ranks their warnings and errors; Python warnings and uncaught
    errors go through the same handlers, so the run's log file (training/run_log.py) holds them too."""
    rank = os.environ.get("RANK", "0")
    level = logging.INFO if rank == "0" else logging.WARNING
    if os.environ.get("RECIPE_DEBUG"):
        level = logging.DEBUG
    logging.basicConfig(
        level=level, format=f"[rank{rank}] %(asctime)s %(levelname)s %(name)s: %(message)s", force=True
    )
    logging.captureWarnings(True)
    sys.excepthook = _log_uncaught


def _log_uncaught(kind: type[BaseException], error: BaseException, traceback: TracebackType | None) -> None:
    logging.getLogger("run").critical("uncaught %s", kind.__name__, exc_info=(kind, error, traceback))


def run_entry(
    cfg: DictConfig, job: Callable[[RunConfig, DistributedContext], None], *, section: str | None = None
) -> None:
    """Parse and validate the config before any heavy work, then run `job` inside a process group.

    `section`: the config section the job needs (distill, finetune), refused early when missing.
    """
    if section is not None and cfg.get(section) is None:
        raise SystemExit(
            f"this entry point needs a config with a '{section}' section (hydra_config/{section}/)"
        )
    setup_logging()
    torch.set_float32_matmul_precision("high")  # TF32 matmuls on GPUs that have them; no effect on CPU
    try:
        run = parse_config(cfg)
        attach_log_file(run.output_dir)
        ctx = init_distributed(run.training.device)
        if ctx.device.type == "cpu":
            keep_freed_cpu_memory()  # CPU steps otherwise page-fault their logits in anew every time
    except USER_ERRORS as error:
        logging.getLogger("config").error("%s", error)
        end_process(2)
    try:
        job(run, ctx)
    except SystemExit as stop:  # the job ended itself (a preempted teacher pretraining: code 0)
        if stop.code not in (0, None):
            end_failed_run(stop)
    except BaseException as error:  # noqa: BLE001 - every failure ends through the same safe exit
        end_failed_run(error)
    # The job's model and optimizer sit in reference cycles (module hooks) that can still hold the process group
    # and gloo work. Free them while the interpreter is whole, not during its teardown, where freeing gloo work
    # can abort the process after a clean run.
    gc.collect()
    shutdown_distributed()


def end_failed_run(error: BaseException) -> NoReturn:
    """Log why the run failed (a user error in one line, anything else with its traceback), then end it:
    exit code 2 for user errors, 1 otherwise (or the code a job's SystemExit carries)."""
    log = logging.getLogger("run")
    if isinstance(error, SystemExit):
        if isinstance(error.code, str):
            log.error("%s", error.code)
        end_process(error.code if isinstance(error.code, int) else 1)
    if isinstance(error, USER_ERRORS):
        log.error("%s", error)
        log.debug("traceback of the error above", exc_info=error)
        end_process(2)
    # A bug, a peer rank gone in the middle of a collective, Ctrl-C.
    log.error("the run failed", exc_info=error)
    end_process(1)


def end_process(code: int) -> NoReturn:
    """End a failed run with `code`, logs flushed. Under torchrun the process ends at once, without teardown.

    Tearing down a live gloo process group while the error's traceback (holding the DDP model, its reducer and
    gloo work) is freed can deadlock (the group joins its thread, which waits for the GIL) or abort; healthy
    ranks may also sit in a collective this one will never join, so no closing barrier either. The torchrun
    agent sees the exit code and stops the other ranks.
    """
    if not is_distributed():
        sys.exit(code)
    logging.shutdown()  # flush and close every handler (console, metrics files), as a normal exit would
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a closed or broken pipe must not keep the process alive
            stream.flush()
    os._exit(code)
