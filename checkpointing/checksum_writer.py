"""A torch.distributed.checkpoint writer that computes each file's CRC32C while writing it.

Summing as the bytes go out costs a fraction of reading a large checkpoint back, and a large buffer is summed on a
second thread while the first writes it, so the sum hides behind the write; the manifest records the result.
"""

from __future__ import annotations

import contextlib
import io
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.filesystem import FileSystem

from common.checksums import extend_crc32c

# Below this, handing the buffer to the other thread costs more than summing it here.
_OVERLAP_BYTES = 1 << 20
# One summing thread per writing thread DCP may use; threads start on first use and idle between saves.
_SUMMER = ThreadPoolExecutor(max_workers=4, thread_name_prefix="crc32c")


class _SummingStream:
    """A write-only file that keeps the CRC32C of what was written; a seek makes the sum unusable."""

    def __init__(self, stream: io.IOBase) -> None:
        self._stream = stream
        self.crc = 0
        self.sequential = True
        self.waited_s = 0.0  # what the sums added to the writing thread's time

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        if view.nbytes < _OVERLAP_BYTES:
            written = self._stream.write(data)
            start = time.perf_counter()
            self.crc = extend_crc32c(self.crc, view if written is None else view[:written])
            self.waited_s += time.perf_counter() - start
            return written
        # Both calls release the GIL, so the sum runs beside the write. The buffer may belong to the caller only
        # for this call (torch.save passes views of its own memory), hence the wait before returning, even on error.
        summed = _SUMMER.submit(extend_crc32c, self.crc, view)
        try:
            written = self._stream.write(data)
        finally:
            start = time.perf_counter()
            crc = summed.result()
            self.waited_s += time.perf_counter() - start
        if written is not None and written != view.nbytes:
            crc = extend_crc32c(self.crc, view[:written])  # a short write: sum only what reached the file
        self.crc = crc
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
        self.waited_s = 0.0

    @contextlib.contextmanager
    def create_stream(self, path: str | Path, mode: str) -> Iterator[io.IOBase]:
        with super().create_stream(path, mode) as stream:
            if "w" not in mode:
                yield stream
                return
            summing = _SummingStream(stream)
            yield summing  # type: ignore[misc]
        self.waited_s += summing.waited_s
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

    @property
    def waited_s(self) -> float:
        """Seconds the writing threads spent waiting for sums (the checksums' cost to the save)."""
        return self.fs.waited_s
