"""The commit record of a checkpoint directory: written last, it lists every file with its size and CRC32C.

A directory without a valid manifest, or whose files disagree with it, is not a checkpoint.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from common.checksums import CHECKSUM_ALGORITHM, checksum_problem, file_crc32c

MANIFEST_NAME = "COMMITTED.json"


def write_manifest(directory: Path, step: int, meta: dict, checksums: dict[str, str] | None = None) -> None:
    """Record the directory's files, sizes and checksums, then atomically publish the manifest (the commit).

    `checksums`: those already computed (each rank sums its own shards); the rest are computed here.
    """
    known = checksums or {}
    files = {
        p.name: {"size": p.stat().st_size, CHECKSUM_ALGORITHM: known.get(p.name) or file_crc32c(p)}
        for p in sorted(directory.iterdir())
        if p.is_file()
    }
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


def is_uncommitted(directory: Path) -> bool:
    """A save that never finished: no manifest was ever published (a torn `.tmp` one does not count)."""
    return not (directory / MANIFEST_NAME).is_file()


def read_manifest(directory: Path) -> dict:
    """Return the manifest of `directory`, or raise ValueError saying what is wrong with it (sizes, not bytes:
    `checksum_problems` reads every byte and is run before loading)."""
    path = directory / MANIFEST_NAME
    if not path.is_file():
        raise ValueError(f"{directory}: incomplete, no {MANIFEST_NAME} (the save never finished)")
    try:
        record = json.loads(path.read_text())
        files, step = (
            {name: _entry(value) for name, value in dict(record["files"]).items()},
            int(record["step"]),
        )
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{path}: unreadable manifest ({error})") from error
    problems = _file_problems(directory, files)
    if problems:
        raise ValueError(f"{directory}: " + "; ".join(problems))
    return {**record, "files": files, "step": step}


def _entry(value: int | dict) -> dict:
    # Manifests written before checksums were recorded hold a bare size; those files are checked by size only.
    return {"size": int(value)} if isinstance(value, int) else {**value, "size": int(value["size"])}


def _file_problems(directory: Path, files: dict[str, dict]) -> list[str]:
    problems = []
    for name, entry in files.items():
        path = directory / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif path.stat().st_size != entry["size"]:
            problems.append(
                f"{name} has {path.stat().st_size} bytes, the manifest says {entry['size']} (truncated?)"
            )
    present = {p.name for p in directory.iterdir()} - {MANIFEST_NAME}
    foreign = sorted(present - set(files))
    if foreign:
        problems.append(f"files not written by the save: {', '.join(foreign)}")
    return problems


def checksum_problems(directory: Path, files: dict[str, dict], names: list[str] | None = None) -> list[str]:
    """One sentence per file of `names` (default: all) whose bytes no longer match the manifest's checksum."""
    problems = []
    for name in files if names is None else names:
        expected = files[name].get(CHECKSUM_ALGORITHM)
        problem = checksum_problem(directory / name, expected) if expected else None
        if problem:
            problems.append(problem)
    return problems
