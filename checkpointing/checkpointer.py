"""Save and resume training state as committed `step_N` torch.distributed.checkpoint directories.

DDP and FSDP2 share one path (get_state_dict / set_state_dict); per-rank RNG state has rank-unique keys.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from checkpointing.checksum_writer import ChecksummingWriter
from checkpointing.manifest import (
    MANIFEST_NAME,
    checksum_problems,
    is_uncommitted,
    read_manifest,
    write_manifest,
)
from checkpointing.run_identity import check_same_run
from checkpointing.save_errors import save_errors_named
from common.checksums import file_crc32c
from common.collectives import all_gather_objects, barrier, broadcast_object
from common.errors import RecipeError

log = logging.getLogger(__name__)
STEP_PREFIX = "step_"


class NoUsableCheckpointError(RecipeError):
    """Checkpoints exist but none is complete and readable: starting from step 0 would lose them."""


@dataclass
class TrainState:
    """Everything a resumed run needs; `extra` holds small picklable objects (step, sampler, scheduler)."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    loader: Any
    step: int = 0

    def to_checkpoint(self, rank: int) -> dict:
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        return {
            "model": model_sd,
            "optim": optim_sd,
            "extra": {
                "step": self.step,
                "scheduler": self.scheduler.state_dict(),
                "loader": self.loader.state_dict(),
            },
            f"rng_rank{rank}": _rng_state(),
        }

    def from_checkpoint(self, state: dict, rank: int) -> None:
        set_state_dict(
            self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
        )
        extra = state["extra"]
        self.step = int(extra["step"])
        self.scheduler.load_state_dict(extra["scheduler"])
        self.loader.load_state_dict(extra["loader"])
        rng = state.get(f"rng_rank{rank}")
        if rng is None:
            # Resumed on more ranks than saved: this rank's dropout stream starts fresh, deterministically.
            log.warning("rank %d: no saved RNG state (checkpoint from fewer ranks); reseeding", rank)
            torch.manual_seed(1_000_003 * (self.step + 1) + rank)
        else:
            _set_rng_state(rng)


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def step_dir_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:08d}"


def _parse_step(path: Path) -> int | None:
    suffix = path.name[len(STEP_PREFIX) :]
    return int(suffix) if path.name.startswith(STEP_PREFIX) and suffix.isdigit() else None


def list_step_dirs(root: Path) -> list[tuple[int, Path]]:
    """All `step_N` directories under root, newest first (committed or not)."""
    if not root.is_dir():
        return []
    found = [(_parse_step(p), p) for p in root.iterdir() if p.is_dir()]
    return sorted(((s, p) for s, p in found if s is not None), reverse=True)


def committed_checkpoints(root: Path) -> tuple[list[tuple[int, Path]], list[str]]:
    """(complete checkpoints newest first, a message per broken one); uncommitted saves are neither."""
    good, broken = [], []
    for step, path in list_step_dirs(root):
        if is_uncommitted(path):
            continue
        try:
            read_manifest(path)
            good.append((step, path))
        except ValueError as error:
            broken.append(str(error))
    return good, broken


class Checkpointer:
    """Writes committed checkpoints every N steps, keeps the last k, and resumes from the newest usable one."""

    def __init__(
        self,
        root: str | Path,
        *,
        rank: int,
        keep_last: int = 3,
        async_save: bool = False,
        meta: dict | None = None,
        allow_changed_run: bool = False,
    ) -> None:
        self.root = Path(root)
        self.allow_changed_run = allow_changed_run
        self.rank = rank
        self.keep_last = keep_last
        self.meta = meta or {}
        self._pending: tuple[Any, int, Path, ChecksummingWriter] | None = None
        self._group = None
        if async_save and dist.is_available() and dist.is_initialized():
            # Async writes talk over their own gloo group so they never queue behind NCCL collectives.
            self._group = dist.new_group(backend="gloo")
        self.async_save = async_save

    # --- saving -----------------------------------------------------------------------------------
    def save(self, state: TrainState) -> Path:
        self.wait()
        directory = self.root / step_dir_name(state.step)
        with save_errors_named(directory):
            if self.rank == 0:
                self.root.mkdir(parents=True, exist_ok=True)
                _move_aside_if_present(directory)
                directory.mkdir()
            barrier()
            payload = state.to_checkpoint(self.rank)
            writer = ChecksummingWriter(directory)
            if self.async_save:
                future = dcp.async_save(
                    payload, checkpoint_id=str(directory), storage_writer=writer, process_group=self._group
                )
                self._pending = (future, state.step, directory, writer)
            else:
                dcp.save(payload, checkpoint_id=str(directory), storage_writer=writer)
                self._commit(state.step, directory, writer.checksums)
        return directory

    def wait(self) -> None:
        """Finish (and commit) an async save in flight."""
        if self._pending is None:
            return
        future, step, directory, writer = self._pending
        self._pending = None
        with save_errors_named(directory):
            future.result()
            self._commit(step, directory, writer.checksums)

    def _commit(self, step: int, directory: Path, written: dict[str, str]) -> None:
        barrier()  # every rank's shards are on disk before rank 0 publishes the manifest
        # Each rank's writer summed its files while writing them; anything it could not sum is read back here.
        own = {
            p.name: written.get(p.name) or file_crc32c(p)
            for p in sorted(directory.glob(f"__{self.rank}_*"))
            if p.is_file()
        }
        checksums = {
            **written,
            **{name: crc for part in all_gather_objects(own) for name, crc in part.items()},
        }
        if self.rank == 0:
            write_manifest(directory, step, {**self.meta, "world_size": _world_size()}, checksums)
            self._prune()
            log.info("checkpoint committed: %s", directory)
        barrier()

    def _prune(self) -> None:
        good, _ = committed_checkpoints(self.root)
        for _, path in good[self.keep_last :]:
            shutil.rmtree(path)

    # --- resuming ---------------------------------------------------------------------------------
    def resume(self, state: TrainState) -> int | None:
        """Load the newest complete checkpoint into `state`; returns its step, or None when there is none."""
        candidates = broadcast_object(self._candidates() if self.rank == 0 else None)
        failures = list(candidates["broken"])
        for step, path, saved_meta in candidates["good"]:
            check_same_run(Path(path), saved_meta, self.meta, allow_changed=self.allow_changed_run)
            problems = self._checksum_problems(Path(path))
            if problems:
                failures.append(f"{path}: " + "; ".join(problems))
                continue
            try:
                self._load(state, Path(path))
            # CheckpointException (what dcp.load raises) derives from BaseException, not Exception.
            except (Exception, CheckpointException) as error:  # noqa: BLE001 - any failure to read: try the previous
                failures.append(f"{path}: unreadable ({type(error).__name__}: {error})")
                continue
            for failure in failures:
                log.warning("skipped checkpoint %s", failure)
            log.info("resumed from %s (step %d)", path, step)
            return step
        if failures:
            raise NoUsableCheckpointError(
                f"{self.root} holds checkpoints but none is complete and readable:\n  "
                + "\n  ".join(failures)
                + "\nNothing was deleted. Fix or move these directories away, or point checkpoint.dir elsewhere "
                "to start a new run."
            )
        return None

    def _candidates(self) -> dict:
        for _, path in list_step_dirs(self.root):
            if is_uncommitted(path):  # a save that never finished is no checkpoint: keep it aside as evidence
                _move_aside_if_present(path, f"no {MANIFEST_NAME}, the save never finished")
        good, broken = committed_checkpoints(self.root)
        return {"good": [(s, str(p), read_manifest(p)["meta"]) for s, p in good], "broken": broken}

    def _checksum_problems(self, directory: Path) -> list[str]:
        """Every file's checksum, verified before loading; the ranks share the reading."""
        files = read_manifest(directory)["files"] if self.rank == 0 else None
        files = broadcast_object(files)
        names = sorted(files)[self.rank :: _world_size()]
        return [p for part in all_gather_objects(checksum_problems(directory, files, names)) for p in part]

    def _load(self, state: TrainState, directory: Path) -> None:
        template = state.to_checkpoint(self.rank)
        saved_keys = set(dcp.FileSystemReader(str(directory)).read_metadata().state_dict_metadata)
        rng_key = f"rng_rank{self.rank}"
        if not any(k.startswith(rng_key + ".") or k == rng_key for k in saved_keys):
            template.pop(rng_key)
        dcp.load(template, checkpoint_id=str(directory))
        state.from_checkpoint(template, self.rank)


def _move_aside_if_present(directory: Path, why: str = "a leftover of an earlier save") -> None:
    """A leftover directory at this step (a crashed save) is kept as evidence under another name."""
    if directory.exists():
        aside = directory.with_name(f"{directory.name}.incomplete-{time.strftime('%Y%m%d-%H%M%S')}")
        log.warning("moving %s aside to %s (%s)", directory, aside, why)
        directory.rename(aside)


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
