"""FP8 training: torchao float8 on plain nn.Linear layers (portable, runs on CPU too; GEMMs too small to gain stay in
bf16, logged), or Transformer Engine's FP8 autocast with a scaling recipe over TE layers. Off by default.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn

from modeling_bert_te import BertForMaskedLM
from training.config import FP8_ALIGNMENT
from training.float8_filter import fp8_layer_filter, summarize_layers

if TYPE_CHECKING:
    from transformer_engine.common.recipe import Recipe

log = logging.getLogger(__name__)


def align_packed_tokens(model: nn.Module, multiple: int = FP8_ALIGNMENT) -> None:
    """Round the token count of every packed batch up to `multiple` with filler cells, in each BertForMaskedLM of
    `model`: the weight-gradient GEMM contracts over tokens, and FP8 GEMMs need that count divisible by 16."""
    for module in model.modules():
        if isinstance(module, BertForMaskedLM):
            module.token_multiple = multiple


def apply_float8(
    model: nn.Module, *, tokens: int, scaling: str = "tensorwise", layers: str = "auto"
) -> list[str]:
    """Swap the encoder linears that gain from FP8 at `tokens` rows per micro-batch for torchao Float8Linear in
    place (parameter names do not change), align packed token counts for them, and log which layers run in FP8."""
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except ImportError as error:
        raise ImportError("training.fp8=torchao needs torchao: pip install torchao") from error
    keep = fp8_layer_filter(tokens, scaling, layers)
    encoder = [
        fqn for fqn, m in model.named_modules() if isinstance(m, nn.Linear) and "encoder.layer." in fqn
    ]
    converted: list[str] = []

    def record(module: nn.Module, fqn: str) -> bool:
        if keep(module, fqn):
            converted.append(fqn)
            return True
        return False

    convert_to_float8_training(
        model, module_filter_fn=record, config=Float8LinearConfig.from_recipe_name(scaling)
    )
    if converted:
        align_packed_tokens(model)
    left = [fqn for fqn in encoder if fqn not in converted]
    log.info(
        "float8 (%s, %d tokens per micro-batch): %d of %d encoder linears run in FP8: %s",
        scaling,
        tokens,
        len(converted),
        len(encoder),
        summarize_layers(converted),
    )
    if left:
        log.info(
            "float8: left in bf16 (GEMMs too small to gain, or dimensions not multiples of %d): %s",
            FP8_ALIGNMENT,
            summarize_layers(left),
        )
    return converted


# Minimum CUDA compute capability per TE recipe: FP8 tensor cores from Ada/Hopper; MXFP8 from Blackwell.
_TE_RECIPE_CAPABILITY = {"delayed": (8, 9), "current": (8, 9), "mxfp8": (10, 0)}


def te_fp8_recipe(name: str) -> Recipe:
    """The Transformer Engine scaling recipe: delayed (amax history), current (per-tensor, per step) or MXFP8."""
    from transformer_engine.common import recipe

    if name == "delayed":
        return recipe.DelayedScaling(
            fp8_format=recipe.Format.HYBRID, amax_history_len=16, amax_compute_algo="max"
        )
    if name == "current":
        return recipe.Float8CurrentScaling(fp8_format=recipe.Format.HYBRID)
    if name == "mxfp8":
        return recipe.MXFP8BlockScaling(fp8_format=recipe.Format.E4M3)
    raise ValueError(f"training.fp8_recipe: unknown recipe {name!r}; use delayed, current or mxfp8")


def check_te_fp8_device(name: str, device: torch.device) -> None:
    """Refuse, before any step, a recipe the GPU cannot run (instead of failing inside a TE kernel)."""
    if device.type != "cuda":
        raise ValueError(
            "training.fp8=te needs a CUDA GPU (Transformer Engine); on CPU use training.fp8=torchao"
        )
    needed = _TE_RECIPE_CAPABILITY[name]
    have = torch.cuda.get_device_capability(device)
    if have < needed:
        raise ValueError(
            f"training.fp8_recipe={name} needs compute capability {needed[0]}.{needed[1]} or newer; "
            f"{torch.cuda.get_device_name(device)} has {have[0]}.{have[1]}"
            + ("; use delayed or current" if name == "mxfp8" else "")
        )


def te_fp8_autocast(name: str, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    """Factory of TE's FP8 autocast context for one forward; amax is reduced over all ranks when distributed."""
    check_te_fp8_device(name, device)
    try:
        import transformer_engine.pytorch as te
    except ImportError as error:
        raise ImportError(
            f"training.fp8=te needs Transformer Engine ({error}); use the container, or "
            "training.fp8=torchao on plain layers"
        ) from error

    fp8_recipe = te_fp8_recipe(name)
    group = dist.group.WORLD if dist.is_available() and dist.is_initialized() else None
    if hasattr(te, "autocast"):  # TE >= 2.8 name; fp8_autocast is its deprecated alias
        return functools.partial(te.autocast, enabled=True, recipe=fp8_recipe, amax_reduction_group=group)
    return functools.partial(te.fp8_autocast, enabled=True, fp8_recipe=fp8_recipe, fp8_group=group)


def nest_contexts(
    *factories: Callable[[], contextlib.AbstractContextManager],
) -> Callable[[], contextlib.AbstractContextManager]:
    """One context factory entering each of `factories` in order (e.g. bf16 autocast, then FP8 autocast)."""

    @contextlib.contextmanager
    def nested():
        with contextlib.ExitStack() as stack:
            for factory in factories:
                stack.enter_context(factory())
            yield

    return nested
