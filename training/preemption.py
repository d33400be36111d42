"""Turn SIGTERM / SIGUSR1 (cluster preemption) into a flag the loop reads at a step boundary.

All ranks agree on the flag, so every rank checkpoints the same step before exiting cleanly.
"""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

import torch

from common.collectives import all_reduce_sum

log = logging.getLogger(__name__)
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
# Set by a launcher (scripts/torchrun_node.sh) that must tell a clean stop from a failure after the agent's own exit 1.
STOPPED_FILE_ENV = "RECIPE_STOPPED_FILE"


def report_committed_stop(step: int) -> None:
    """Record, for the launcher, that this rank stopped early on the committed checkpoint of `step`."""
    path = os.environ.get(STOPPED_FILE_ENV)
    if path:
        Path(path).write_text(f"{step}\n")


class PreemptionWatcher:
    def __init__(self) -> None:
        self._received: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> PreemptionWatcher:
        for sig in PREEMPTION_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, _frame) -> None:
        self._received = signum
        log.warning(
            "received %s: will checkpoint at the end of this step and exit", signal.Signals(signum).name
        )

    def stop_requested(self) -> bool:
        """True on every rank once any rank got a preemption signal (a collective call)."""
        flag = torch.tensor([1.0 if self._received is not None else 0.0])
        return bool(all_reduce_sum(flag).item() > 0)
