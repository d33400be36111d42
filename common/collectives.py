"""Collectives over the torchrun process group that are identities on a single process.

Checkpointing, training and the jobs all use them, so they sit below every one of them.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks (a no-op on a single process); returns a new tensor."""
    value = value.clone()
    if is_distributed():
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def broadcast_object(obj: object, src: int = 0) -> object:
    """Send a picklable object from `src` to every rank (identity on a single process)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_objects(obj: object) -> list:
    """Every rank's picklable `obj`, in rank order, on every rank ([obj] on a single process)."""
    if not is_distributed():
        return [obj]
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered
