"""What defines a run (teacher, model shape, vocabulary, data, seed, optimization), compared on every resume.

A relaunch that changed one of these would continue another run's state silently; it stops before any step.
"""

from __future__ import annotations

import logging
from pathlib import Path

from common.errors import RecipeError

log = logging.getLogger(__name__)
IDENTITY_KEY = "run_identity"  # manifest meta: settings a resume must not change
RESUMABLE_KEY = "resumable_settings"  # manifest meta: settings a resume may change (logged)


class RunChangedError(RecipeError):
    """The relaunch differs from the run that wrote the checkpoints in a setting that defines the run."""


def check_same_run(directory: Path, saved_meta: dict, current_meta: dict, *, allow_changed: bool) -> None:
    """Refuse (or, with `allow_changed`, log) a resume whose run identity differs from the checkpoint's."""
    saved, current = saved_meta.get(IDENTITY_KEY), current_meta.get(IDENTITY_KEY)
    if saved is None or current is None:
        return  # written before identities were recorded, or a caller that records none
    changed = [
        (key, saved.get(key), current.get(key))
        for key in sorted(set(saved) | set(current))
        if saved.get(key) != current.get(key)
    ]
    described = "; ".join(f"{key} was {old!r}, now {new!r}" for key, old, new in changed)
    if changed and not allow_changed:
        raise RunChangedError(
            f"{directory} was written by another run: {described}. Set a new checkpoint.dir to start a new run, "
            "or checkpoint.allow_changed_run=true to resume these checkpoints with the change"
        )
    if changed:
        log.warning(
            "resuming %s with changed run settings (checkpoint.allow_changed_run=true): %s",
            directory,
            described,
        )
    _log_resumable_changes(directory, saved_meta.get(RESUMABLE_KEY, {}), current_meta.get(RESUMABLE_KEY, {}))


def _log_resumable_changes(directory: Path, saved: dict, current: dict) -> None:
    for key in sorted(set(saved) & set(current)):
        if saved[key] != current[key]:
            log.info("resuming %s with %s changed from %r to %r", directory, key, saved[key], current[key])
