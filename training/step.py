"""One optimizer step over a list of micro-batches: loss normalization, accumulation, clipping, finiteness.

The loss is the mean over every masked token of the global step (all ranks, all micro-batches).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from common.collectives import all_reduce_sum
from common.device import move_batch
from common.errors import RecipeError
from training.parallelize import no_gradient_sync

# A task maps (model, batch) to summed loss terms over the batch's masked tokens; "loss" is what to minimise.
LossFn = Callable[[nn.Module, dict], dict[str, torch.Tensor]]


class NonFiniteLossError(RecipeError):
    """Loss or gradient norm became NaN/inf and the policy is to stop."""


def count_masked(micro_batches: list[dict]) -> int:
    """Masked tokens of the whole global step (summed over ranks)."""
    local = sum(int((b["labels"] != -100).sum()) for b in micro_batches)
    return int(all_reduce_sum(torch.tensor([float(local)])).item())


def mark_graph_step() -> None:
    """Tell CUDA graph replay (training.cuda_graphs) that a new micro-batch starts: the previous one's graph outputs
    are dead and their memory may be reused. Free, and without effect, when nothing is captured."""
    if torch.cuda.is_available():
        torch.compiler.cudagraph_mark_step_begin()


def _grad_norm(model: nn.Module, max_norm: float) -> torch.Tensor:
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm if max_norm > 0 else float("inf"))
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


def train_step(
    model: nn.Module,
    loss_fn: LossFn,
    optimizer: torch.optim.Optimizer,
    micro_batches: list[dict],
    *,
    device: torch.device,
    world_size: int,
    grad_clip: float,
    autocast: Callable[[], contextlib.AbstractContextManager],
) -> dict[str, float]:
    """Run forward/backward on every micro-batch, then report per-token means of each loss term.

    The optimizer is not stepped here: the caller decides after looking at `finite`.
    """
    n_masked = count_masked(micro_batches)
    optimizer.zero_grad(set_to_none=True)
    sums: dict[str, torch.Tensor] = {}
    for index, batch in enumerate(micro_batches):
        batch = move_batch(batch, device)
        mark_graph_step()
        last = index == len(micro_batches) - 1
        with no_gradient_sync(model, skip_sync=not last), autocast():
            terms = loss_fn(model, batch)
            # DDP and FSDP2 average gradients over ranks; scaling by world_size makes the result a global sum
            # divided by the global masked-token count.
            (terms["loss"] * (world_size / n_masked)).backward()
        for name, value in terms.items():
            sums[name] = sums.get(name, 0.0) + value.detach().float()
    grad_norm = _grad_norm(model, grad_clip).detach().float().cpu()
    names = sorted(sums)
    totals = all_reduce_sum(torch.stack([sums[n].cpu() for n in names])) / n_masked
    metrics = {name: float(value) for name, value in zip(names, totals, strict=True)}
    metrics["grad_norm"] = float(grad_norm)
    metrics["masked_tokens"] = float(n_masked)
    metrics["finite"] = bool(torch.isfinite(totals).all() and torch.isfinite(grad_norm))
    return metrics
