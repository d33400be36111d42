"""Fault injection for launched test runs: put this folder on PYTHONPATH and set RECIPE_FAULT=point:rank:step.

Inert unless RECIPE_FAULT is set; production code carries no test hooks, the faults are patched in from outside.
"""

from __future__ import annotations

import errno
import os
import signal

# point: where in the save of checkpoint step `step` the process of torchrun rank `rank` fails.
#   kill_before_shards  SIGKILL as dcp.save starts (the step directory exists, no shard written yet)
#   kill_mid_shard      SIGKILL after the first item of this rank's shard file is on disk (a partial file)
#   kill_before_commit  SIGKILL when COMMITTED.json is about to be published (all shards and .metadata written)
#   enospc_shard        raise OSError(ENOSPC) while writing this rank's shard (disk full), no kill
#   enospc_commit       raise OSError(ENOSPC) when COMMITTED.json is about to be published (only rank 0 commits)
POINTS = ("kill_before_shards", "kill_mid_shard", "kill_before_commit", "enospc_shard", "enospc_commit")


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _install(point: str, step_dir: str) -> None:
    import torch.distributed.checkpoint as dcp
    import torch.distributed.checkpoint.filesystem as dcp_fs

    active = {"id": ""}
    original_save, original_write_item, original_replace = dcp.save, dcp_fs._write_item, os.replace

    def save(*args, **kwargs):
        active["id"] = str(kwargs.get("checkpoint_id", ""))
        if point == "kill_before_shards" and active["id"].endswith(step_dir):
            _die()
        return original_save(*args, **kwargs)

    def write_item(transforms, stream, *args, **kwargs):
        if not active["id"].endswith(step_dir):
            return original_write_item(transforms, stream, *args, **kwargs)
        if point == "enospc_shard":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), getattr(stream, "name", active["id"]))
        result = original_write_item(transforms, stream, *args, **kwargs)
        if point == "kill_mid_shard":
            stream.flush()
            _die()
        return result

    def replace(src, dst, *args, **kwargs):
        if str(dst).endswith(f"{step_dir}/COMMITTED.json"):
            if point == "kill_before_commit":
                _die()
            if point == "enospc_commit":
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
        return original_replace(src, dst, *args, **kwargs)

    dcp.save = save
    dcp_fs._write_item = write_item
    os.replace = replace


def _from_environment() -> None:
    spec = os.environ.get("RECIPE_FAULT")
    if not spec or "RANK" not in os.environ:  # the torchrun agent itself has no RANK: leave it alone
        return
    point, rank, step = spec.split(":")
    if point not in POINTS:
        raise ValueError(f"RECIPE_FAULT point '{point}' unknown; allowed: {', '.join(POINTS)}")
    if int(os.environ["RANK"]) == int(rank):
        _install(point, f"step_{int(step):08d}")


_from_environment()
