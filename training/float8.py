"""FP8 training on plain nn.Linear layers through torchao float8 (the portable path; it also runs on CPU).

Only encoder-layer GEMMs whose dimensions FP8 kernels accept (multiples of 16) are converted; the log lists the rest.
"""

from __future__ import annotations

import logging

from torch import nn

log = logging.getLogger(__name__)
FP8_ALIGNMENT = 16


def float8_eligible(module: nn.Module, fqn: str) -> bool:
    """Encoder linears with both dimensions divisible by 16; the embedding-tied decoder and head stay in bf16."""
    if not isinstance(module, nn.Linear) or "encoder.layer." not in fqn:
        return False
    return module.in_features % FP8_ALIGNMENT == 0 and module.out_features % FP8_ALIGNMENT == 0


def apply_float8(model: nn.Module) -> list[str]:
    """Swap eligible nn.Linear modules for torchao Float8Linear in place (parameter names do not change)."""
    try:
        from torchao.float8 import convert_to_float8_training
    except ImportError as error:
        raise ImportError("training.fp8=torchao needs torchao: pip install torchao") from error
    converted: list[str] = []
    left = [fqn for fqn, m in model.named_modules()
            if isinstance(m, nn.Linear) and "encoder.layer." in fqn and not float8_eligible(m, fqn)]

    def keep(module: nn.Module, fqn: str) -> bool:
        eligible = float8_eligible(module, fqn)
        if eligible:
            converted.append(fqn)
        return eligible

    convert_to_float8_training(model, module_filter_fn=keep)
    log.info("float8: %d linear layers converted", len(converted))
    if left:
        log.info("float8: %d encoder linears left in higher precision (dimensions not multiples of %d): %s",
                 len(left), FP8_ALIGNMENT, ", ".join(left[:8]))
    return converted
