"""A torch.distributed.checkpoint writer that computes each file's CRC32C while writing it.

Summing as the bytes go out costs a fraction of reading a large checkpoint back; the manifest records the result.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.filesystem import FileSystem

from common.checksums import extend_crc32c


class _SummingStream:
    """A write-only file that keeps the CRC32C of what was written; a seek makes the sum unusable."""

    def __init__(self, stream: io.IOBase) -> None:
        self._stream = stream
        self.crc = 0
        self.sequential = True

    def write(self, data: Any) -> int:
        written = self._stream.write(data)
        view = memoryview(data).cast("B")
        self.crc = extend_crc32c(self.crc, view if written is None else view[:written])
        return written

    def seek(self, *args: Any) -> int:
        self.sequential = False  # bytes may be overwritten: the running sum no longer describes the file
        return self._stream.seek(*args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


class _SummingFileSystem(FileSystem):
    def __init__(self) -> None:
        super().__init__()
        self.checksums: dict[str, str] = {}

    @contextlib.contextmanager
    def create_stream(self, path: str | Path, mode: str) -> Iterator[io.IOBase]:
        with super().create_stream(path, mode) as stream:
            if "w" not in mode:
                yield stream
                return
            summing = _SummingStream(stream)
            yield summing  # type: ignore[misc]
        if summing.sequential:
            # `.metadata` is written as `.metadata.tmp`, then renamed.
            self.checksums[Path(path).name.removesuffix(".tmp")] = f"{summing.crc:08x}"


class ChecksummingWriter(FileSystemWriter):
    """FileSystemWriter whose `checksums` map each file this rank wrote to its CRC32C (8 hex digits)."""

    def __init__(self, path: str | Path, **kwargs: Any) -> None:
        super().__init__(path, **kwargs)
        self.fs = _SummingFileSystem()

    @property
    def checksums(self) -> dict[str, str]:
        return self.fs.checksums
