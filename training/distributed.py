"""Process-group setup for torchrun (NCCL and gloo on CUDA, gloo on CPU); the collectives are in common/.

A plain `python train.py` runs as a world of one without any process group.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistributedContext:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()


def _pick_device(requested: str, local_rank: int) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            "config 'training.device': cuda requested but no CUDA GPU is visible; use training.device=cpu"
        )
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def process_group_backend(device: torch.device) -> str:
    """NCCL for CUDA tensors plus gloo for CPU ones on GPUs; gloo alone on CPUs. The loop reduces small host-side
    values (masked-token counts, step metrics, the preemption flag) as CPU tensors, which an NCCL-only group
    refuses ("No backend type associated with device type cpu")."""
    return "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"


def init_distributed(device: str = "auto") -> DistributedContext:
    """Join the torchrun process group if launched by torchrun; pick the device for this rank."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    chosen = _pick_device(device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        # device_id binds NCCL eagerly to this rank's GPU; gloo takes none.
        extra = {"device_id": chosen} if chosen.type == "cuda" else {}
        dist.init_process_group(
            backend=process_group_backend(chosen), timeout=datetime.timedelta(minutes=30), **extra
        )
    return DistributedContext(rank=rank, local_rank=local_rank, world_size=world_size, device=chosen)


def shutdown_distributed(wait_for_others: bool = True) -> None:
    if dist.is_available() and dist.is_initialized():
        if wait_for_others:
            dist.barrier()
        dist.destroy_process_group()
