"""The commit record of a checkpoint directory: written last, it lists every file with its size.

A directory without a valid manifest, or whose files disagree with it, is not a checkpoint.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

MANIFEST_NAME = "COMMITTED.json"


def write_manifest(directory: Path, step: int, meta: dict) -> None:
    """Record the directory's files and sizes, then atomically publish the manifest (the commit)."""
    files = {p.name: p.stat().st_size for p in sorted(directory.iterdir()) if p.is_file()}
    record = {"step": step, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "files": files, "meta": meta}
    tmp = directory / (MANIFEST_NAME + ".tmp")
    with tmp.open("w") as handle:
        json.dump(record, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, directory / MANIFEST_NAME)
    _fsync_dir(directory)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_manifest(directory: Path) -> dict:
    """Return the manifest of `directory`, or raise ValueError saying what is wrong with it."""
    path = directory / MANIFEST_NAME
    if not path.is_file():
        raise ValueError(f"{directory}: incomplete, no {MANIFEST_NAME} (the save never finished)")
    try:
        record = json.loads(path.read_text())
        files, step = dict(record["files"]), int(record["step"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{path}: unreadable manifest ({error})") from error
    problems = _file_problems(directory, files)
    if problems:
        raise ValueError(f"{directory}: " + "; ".join(problems))
    return {**record, "step": step}


def _file_problems(directory: Path, files: dict[str, int]) -> list[str]:
    problems = []
    for name, size in files.items():
        path = directory / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif path.stat().st_size != size:
            problems.append(f"{name} has {path.stat().st_size} bytes, the manifest says {size} (truncated?)")
    present = {p.name for p in directory.iterdir()} - {MANIFEST_NAME}
    foreign = sorted(present - set(files))
    if foreign:
        problems.append(f"files not written by the save: {', '.join(foreign)}")
    return problems
