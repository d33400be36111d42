"""The run's text log on disk: every line this process logs, appended to <output_dir>/run.log across resumes.

Rank 0 writes its full log there and every other rank its warnings and errors (the levels setup_logging gives them).
"""

from __future__ import annotations

import logging
from pathlib import Path

LOG_NAME = "run.log"
_MAX_HELD = 10_000  # lines held while the output folder does not exist yet


class RunLogFile(logging.Handler):
    """Appends records to `output_dir/run.log` once the run has made its output folder.

    Records logged before that (config checks, data preparation) are held and written first; a run that stops
    before making its folder (a bad config, a missing file) writes nothing.
    """

    def __init__(self, output_dir: str | Path) -> None:
        super().__init__()
        self.path = Path(output_dir) / LOG_NAME
        self._held: list[str] = []
        self._file = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + "\n"
            if self._file is None and self.path.parent.is_dir():
                self._file = self.path.open("a")
                self._write("".join(self._held))
                self._held.clear()
            if self._file is None:
                self._held = [*self._held[-_MAX_HELD + 1 :], line]
            else:
                self._write(line)
        except Exception:  # a full disk must not stop training; logging reports it once on stderr
            self.handleError(record)

    def _write(self, text: str) -> None:
        # One flush per record: ranks appending to the same file each add whole records, not interleaved lines.
        self._file.write(text)
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        super().close()


def attach_log_file(output_dir: str | Path) -> RunLogFile:
    """Send this process's log records (at the levels already set) to the run's log file too."""
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, RunLogFile)]:
        root.removeHandler(old)
        old.close()
    handler = RunLogFile(output_dir)
    if root.handlers:
        handler.setFormatter(root.handlers[0].formatter)
    root.addHandler(handler)
    return handler
