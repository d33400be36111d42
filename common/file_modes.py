"""Temporary folders that become outputs keep the permissions of a normal folder under the user's umask.

`tempfile.mkdtemp` creates 0700 folders; renamed into place as an export, a checkpoint or a corpus they would
stay private to whoever wrote them, so colleagues (or a host user, when a container writes as root) could not read.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def current_umask() -> int:
    """The process umask, read without changing it where /proc allows (changing it is not thread-safe)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def public_mkdtemp(parent: Path, prefix: str) -> Path:
    """`tempfile.mkdtemp` in `parent`, then given the mode `mkdir` would give (0777 minus the umask)."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    os.chmod(path, 0o777 & ~current_umask())
    return path


def make_umask_readable(path: Path) -> None:
    """Give a file written through a private temporary file the mode `open` would give (0666 minus the umask)."""
    os.chmod(path, 0o666 & ~current_umask())
