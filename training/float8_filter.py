"""Which linear layers run in FP8: only GEMMs large enough to gain, judged from their shapes and the token count.

FP8 casts and scales every operand before each GEMM; on a small GEMM that memory traffic costs more than the
faster matmul saves, so such layers stay in bf16 (the thresholds follow torchao's H100 tables per scaling).
"""

from __future__ import annotations

import re
from collections.abc import Callable

from torch import nn

from training.config import FP8_ALIGNMENT

SCALINGS = ("tensorwise", "rowwise")
# Fewer token rows than this per GEMM and every encoder GEMM is bound by memory or launches, not by its FLOPs.
MIN_FP8_TOKENS = 4096


def _gains_tensorwise(n_out: int, k_in: int) -> bool:
    return not (k_in <= 4096 and n_out <= 1024)


def _gains_rowwise(n_out: int, k_in: int) -> bool:
    # Rowwise scales cost more (one scale per row, a CUTLASS kernel): only the larger GEMMs gain.
    return n_out > 2048 and k_in > 1024 and not (n_out <= 4096 and k_in <= 2048)


_GAINS = {"tensorwise": _gains_tensorwise, "rowwise": _gains_rowwise}


def fp8_capable(module: nn.Module, fqn: str) -> bool:
    """Encoder linears whose dimensions FP8 tensor cores take (multiples of 16); the tied decoder and head never."""
    if not isinstance(module, nn.Linear) or "encoder.layer." not in fqn:
        return False
    return module.in_features % FP8_ALIGNMENT == 0 and module.out_features % FP8_ALIGNMENT == 0


def fp8_gains(module: nn.Linear, tokens: int, scaling: str) -> bool:
    """Whether a [tokens, in] x [in, out] GEMM (and its two backward GEMMs) runs faster in FP8 than in bf16."""
    if scaling not in _GAINS:
        raise ValueError(f"training.fp8_scaling: unknown scaling {scaling!r}; use {' or '.join(SCALINGS)}")
    return tokens >= MIN_FP8_TOKENS and _GAINS[scaling](module.out_features, module.in_features)


def fp8_layer_filter(tokens: int, scaling: str, layers: str = "auto") -> Callable[[nn.Module, str], bool]:
    """The (module, fqn) -> bool filter for torchao's conversion: `auto` keeps the layers that gain, `all` every
    FP8-capable one (to measure FP8 on small models, or to test it on CPU)."""
    if layers not in ("auto", "all"):
        raise ValueError(f"training.fp8_layers: unknown choice {layers!r}; use auto or all")

    def keep(module: nn.Module, fqn: str) -> bool:
        return fp8_capable(module, fqn) and (layers == "all" or fp8_gains(module, tokens, scaling))

    return keep


def summarize_layers(fqns: list[str]) -> str:
    """'encoder.layer.{0-11}.intermediate.dense, ...': one entry per layer role instead of one per layer."""
    roles: dict[tuple[str, str], list[int]] = {}
    others: list[str] = []
    for fqn in fqns:
        match = re.search(r"^(.*encoder\.layer\.)(\d+)\.(.+)$", fqn)
        if match is None:
            others.append(fqn)
            continue
        roles.setdefault((match[1], match[3]), []).append(int(match[2]))
    parts = [f"{prefix}{{{_ranges(indices)}}}.{role}" for (prefix, role), indices in roles.items()]
    return ", ".join(parts + others) or "none"


def _ranges(indices: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5'."""
    spans: list[list[int]] = []
    for i in sorted(set(indices)):
        if spans and i == spans[-1][1] + 1:
            spans[-1][1] = i
        else:
            spans.append([i, i])
    return ",".join(f"{a}-{b}" if a != b else f"{a}" for a, b in spans)
