"""Wrap a model for data parallelism: DDP replicas or FSDP2 shards (one unit per encoder layer plus root).

Activation checkpointing, per-layer torch.compile and CUDA graph capture are applied here too, without renaming
parameters.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel


def compute_dtype(precision: str, device: torch.device) -> torch.dtype:
    """'auto' trains in bf16 on CUDA and fp32 on CPU (CPU bf16 matmuls are slow and imprecise)."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return torch.float32


def enable_activation_checkpointing(layers: Sequence[nn.Module]) -> None:
    """Recompute each encoder layer in backward; the model honours `gradient_checkpointing` per layer."""
    for layer in layers:
        layer.gradient_checkpointing = True


def compile_layers(layers: Sequence[nn.Module]) -> None:
    # Batch size and length change every micro-batch (token-budget batches): compiling with dynamic shapes from
    # the start gives one graph per layer variant instead of a recompile for each new length.
    for layer in layers:
        layer.compile(dynamic=True)


def check_cuda_graphs(device: torch.device) -> None:
    """Refuse graph capture where there is no CUDA device to capture on (the config cannot know an 'auto' device)."""
    if device.type != "cuda":
        raise ValueError(
            f"training.cuda_graphs=true captures CUDA graphs, but this run is on {device.type}; "
            "set training.cuda_graphs=false (static shapes gain nothing without a GPU)"
        )


def capture_cuda_graphs(module: nn.Module) -> None:
    """Compile the whole forward (and so its backward) with fixed shapes and replay it as CUDA graphs: one launch
    per graph instead of one per kernel, for models too small to keep the GPU busy between launches."""
    module.compile(mode="reduce-overhead", dynamic=False)


def parallelize(
    model: nn.Module,
    layers: Sequence[nn.Module],
    *,
    strategy: str,
    device: torch.device,
    dtype: torch.dtype,
    activation_checkpointing: bool = False,
    compile: bool = False,
    cuda_graphs: bool = False,
) -> nn.Module:
    """Move `model` to `device` and wrap it for the chosen strategy; returns the module to train."""
    model.to(device)
    if activation_checkpointing:
        enable_activation_checkpointing(layers)
    if cuda_graphs:
        check_cuda_graphs(device)
        capture_cuda_graphs(model)
    elif compile:
        compile_layers(layers)
    if not (dist.is_available() and dist.is_initialized()):
        return model
    if strategy == "fsdp2":
        policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
        for layer in layers:
            fully_shard(layer, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
        return model
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def unwrap(model: nn.Module) -> nn.Module:
    """The module whose parameter names are the model's own (DDP adds a `module.` prefix)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def no_gradient_sync(model: nn.Module, skip_sync: bool) -> contextlib.AbstractContextManager:
    """Context for one micro-batch: while accumulating, gradients are not all-reduced."""
    if not skip_sync:
        return contextlib.nullcontext()
    if isinstance(model, DistributedDataParallel):
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2 module
        return _fsdp_no_sync(model)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _fsdp_no_sync(model: nn.Module):
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)
