"""CRC32C checksums of files, streamed in large chunks (hardware CRC32C: several GB/s, a few % of a save).

Checkpoint manifests and exported model directories record one per file; readers verify them before loading.
"""

from __future__ import annotations

from pathlib import Path

import crc32c

CHECKSUM_ALGORITHM = "crc32c"
_CHUNK = 16 << 20


def extend_crc32c(crc: int, data: bytes | bytearray | memoryview) -> int:
    """`crc` extended by `data` (any contiguous buffer, no copy)."""
    return crc32c.crc32c(memoryview(data).cast("B"), crc)


def file_crc32c(path: Path) -> str:
    """The CRC32C of a file's bytes as 8 hex digits."""
    crc = 0
    with Path(path).open("rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            crc = extend_crc32c(crc, chunk)
    return f"{crc:08x}"


def checksum_problem(path: Path, expected: str) -> str | None:
    """None when `path` still has checksum `expected`; otherwise a sentence naming the file and what differs."""
    try:
        actual = file_crc32c(path)
    except OSError as error:
        return f"{path.name} is unreadable ({error.strerror or error})"
    if actual != expected:
        return f"{path.name} fails its {CHECKSUM_ALGORITHM} checksum ({actual}, the manifest says {expected}: corrupted)"
    return None
