"""Copies from host to device that never make the host wait, for single tensors and whole batches.

The model, the loop, evaluation and embedding all copy batches this one way.
"""

from __future__ import annotations

import torch


def host_to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`tensor` on `device` without waiting for it: a copy from pinned memory is queued on the stream, where one
    from pageable memory may first wait for the GPU to finish its queued work."""
    if device.type == "cuda" and tensor.device.type == "cpu" and not tensor.is_pinned():
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def move_batch(batch: dict, device: torch.device) -> dict:
    """The batch's tensors on `device`, copied without making the host wait (see host_to_device)."""
    return {k: host_to_device(v, device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
