"""Name the real cause of a failed save: a full disk or a file-size limit hidden under the writer's own error.

torch.save reports a failed write as "enforce fail ... unexpected pos"; the OSError survives only in the chain.
"""

from __future__ import annotations

import contextlib
import errno
import shutil
from collections.abc import Iterator
from pathlib import Path

from torch.distributed.checkpoint.api import CheckpointException

from common.errors import RecipeError

_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
# Below this much free space a failed write is taken for a full disk even when the OSError itself was lost.
_NEARLY_FULL_BYTES = 16 << 20


class CheckpointSaveError(RecipeError):
    """Writing a checkpoint failed (disk full, unwritable directory); the directory is left uncommitted."""


def exception_chain(error: BaseException) -> Iterator[BaseException]:
    """`error`, then its causes and contexts, each once."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def free_mib(directory: Path) -> float | None:
    """Free space (MiB) of the file system holding `directory` (or its nearest existing parent)."""
    for place in (directory, *directory.parents):
        if place.exists():
            try:
                return shutil.disk_usage(place).free / (1 << 20)
            except OSError:
                return None
    return None


def _nearly_full(free: float | None) -> bool:
    return free is not None and free * (1 << 20) < _NEARLY_FULL_BYTES


def write_failure_cause(error: BaseException, directory: Path) -> str:
    """What went wrong, in words (a full disk, the file-size limit), followed by the error that says so."""
    oserrors = [e for e in exception_chain(error) if isinstance(e, OSError)]
    codes = {e.errno for e in oserrors}
    first = oserrors[0] if oserrors else error
    original = f"{type(first).__name__}: {first}"
    free = free_mib(directory)
    where = f"{directory.parent} ({free:.0f} MiB free)" if free is not None else str(directory.parent)
    if codes & set(_DISK_FULL) or _nearly_full(free):
        return f"no space left on device at {where}; {original}"
    if errno.EFBIG in codes:
        return f"the file-size limit (ulimit -f) stopped the write at {where}; {original}"
    return original


def _per_rank_causes(error: BaseException, directory: Path) -> str:
    if isinstance(error, CheckpointException):
        return "; ".join(
            f"rank {rank}: {write_failure_cause(exc, directory)}" for rank, (exc, _) in error.failures.items()
        )
    return write_failure_cause(error, directory)


def _is_write_failure(error: BaseException, directory: Path) -> bool:
    """A RuntimeError is a failed write when an OSError lies in its chain or the disk is (nearly) full."""
    return any(isinstance(e, OSError) for e in exception_chain(error)) or _nearly_full(free_mib(directory))


@contextlib.contextmanager
def save_errors_named(directory: Path) -> Iterator[None]:
    """Turn a failed write (dcp wraps each rank's error in a CheckpointException) into one clear message."""
    try:
        yield
    except (OSError, RuntimeError, CheckpointException) as error:
        if isinstance(error, RecipeError) or (
            isinstance(error, RuntimeError) and not _is_write_failure(error, directory)
        ):
            raise
        raise CheckpointSaveError(
            f"could not write checkpoint {directory} ({_per_rank_causes(error, directory)}). It is not committed, "
            f"so resuming skips it; the earlier checkpoints in {directory.parent} are untouched. Free disk space "
            "(or set checkpoint.dir to a writable place) and relaunch to continue from the newest complete checkpoint."
        ) from error
