"""Finished chunks of an embedding run, one file each beside the output, so a relaunch continues where it stopped.

Each part is written to a temporary name and renamed when whole; the output appears only after every part exists.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


class PartStore:
    """`.<output name>.partial/`: plan.json (what the run computes) and part-<k>.npz per finished chunk."""

    def __init__(self, out: Path, plan: dict) -> None:
        self.out, self.plan = out, plan
        self.dir = out.parent / f".{out.name}.partial"

    def prepare(self, overwrite: bool) -> None:
        """Start (or, with the same plan, continue) a run; refuse to replace an existing output unasked."""
        if self.out.exists():
            if not overwrite:
                raise FileExistsError(f"output {self.out} exists; choose another --out or pass --overwrite")
            shutil.rmtree(self.out) if self.out.is_dir() else self.out.unlink()
        if self.dir.is_dir() and overwrite:
            shutil.rmtree(self.dir)
        if self.dir.is_dir():
            saved = json.loads((self.dir / "plan.json").read_text())
            if saved != self.plan:
                changed = sorted(
                    k for k in self.plan.keys() | saved.keys() if saved.get(k) != self.plan.get(k)
                )
                raise ValueError(
                    f"{self.dir} holds an unfinished run with other settings ({', '.join(changed)}); "
                    "rerun with the same settings to continue it, or pass --overwrite to start over"
                )
            log.info(
                "continuing the unfinished run in %s (%d chunks done)", self.dir, len(self.done_chunks())
            )
            return
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.parent / f".{self.out.name}.partial-{os.getpid()}"
        tmp.mkdir()
        (tmp / "plan.json").write_text(json.dumps(self.plan, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, self.dir)

    def _path(self, k: int) -> Path:
        return self.dir / f"part-{k:07d}.npz"

    def done_chunks(self) -> set[int]:
        return {int(p.stem.split("-")[1]) for p in self.dir.glob("part-*.npz")}

    def write(self, k: int, rows: np.ndarray, vectors: np.ndarray, probabilities: np.ndarray | None) -> None:
        tmp = self.dir / f".part-{k:07d}.tmp-{os.getpid()}.npz"
        arrays = {"rows": rows, "vectors": vectors}
        if probabilities is not None:
            arrays["probabilities"] = probabilities
        np.savez(tmp, **arrays)
        os.replace(tmp, self._path(k))

    def read(self, k: int) -> dict[str, np.ndarray]:
        with np.load(self._path(k)) as part:
            return {name: part[name] for name in part.files}

    def finish(self) -> None:
        shutil.rmtree(self.dir)
