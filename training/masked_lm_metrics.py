"""Masked-LM metrics on held-out cells with fixed masks, for one model or several side by side.

Every model sees the same masked cells; KL and top-1 agreement are measured against the first model.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from common.collectives import all_reduce_sum
from common.device import move_batch
from dataset.batch import model_inputs

_SUM_KEYS = ("tokens", "ce", "top1", "top5", "kl_to_ref", "agree_ref")


def _masked_logits(model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    out = model(**model_inputs(batch))
    return out.logits.float(), out.masked_labels


def _batch_sums(logits: torch.Tensor, labels: torch.Tensor, ref_logits: torch.Tensor | None) -> torch.Tensor:
    """The batch's share of each of _SUM_KEYS, float64 on the logits' device: summed there, read once at the end."""
    top5 = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
    log_probs = logits.log_softmax(-1)
    zero = logits.new_zeros(())
    sums = [
        logits.new_full(
            (), float(labels.numel())
        ),  # filled on the device: a host scalar would be a blocking copy
        F.nll_loss(log_probs, labels, reduction="sum"),
        (top5[:, 0] == labels).sum(),
        (top5 == labels[:, None]).any(-1).sum(),
    ]
    if ref_logits is None:
        sums += [zero, zero]
    else:
        ref_log_probs = ref_logits.log_softmax(-1)
        sums.append(F.kl_div(log_probs, ref_log_probs, log_target=True, reduction="sum"))
        sums.append((logits.argmax(-1) == ref_logits.argmax(-1)).sum())
    return torch.stack([value.double() for value in sums])


@torch.no_grad()
def masked_lm_metrics(
    models: dict[str, nn.Module], batches: Iterable[dict], device: torch.device
) -> dict[str, dict]:
    """Accuracy, top-5 accuracy, token-weighted perplexity, and KL / agreement to the first model."""
    names = list(models)
    was_training = {name: m.training for name, m in models.items()}
    for model in models.values():
        model.eval()
    totals = {name: torch.zeros(len(_SUM_KEYS), dtype=torch.float64, device=device) for name in names}
    try:
        for batch in batches:
            batch = move_batch(batch, device)
            ref_logits = None
            for i, name in enumerate(names):
                logits, labels = _masked_logits(models[name], batch)
                totals[name] += _batch_sums(logits, labels, ref_logits if i > 0 else None)
                if i == 0:
                    ref_logits = logits
    finally:
        for name, model in models.items():
            model.train(was_training[name])
    return {
        name: _summarize(all_reduce_sum(totals[name].cpu()), with_ref=i > 0) for i, name in enumerate(names)
    }


def _summarize(sums: torch.Tensor, with_ref: bool) -> dict[str, float]:
    values = dict(zip(_SUM_KEYS, sums.tolist(), strict=True))
    n = max(values["tokens"], 1.0)
    loss = values["ce"] / n
    metrics = {
        "loss": loss,
        "perplexity": math.exp(min(loss, 50.0)),
        "accuracy": values["top1"] / n,
        "top5_accuracy": values["top5"] / n,
        "masked_tokens": values["tokens"],
    }
    if with_ref:
        metrics["kl_to_reference"] = values["kl_to_ref"] / n
        metrics["top1_agreement"] = values["agree_ref"] / n
    return metrics


def format_side_by_side(results: dict[str, dict], extra_rows: dict[str, dict] | None = None) -> str:
    """A table with a row per metric and a column per model."""
    rows = {}
    for name, metrics in results.items():
        for key, value in {**metrics, **(extra_rows or {}).get(name, {})}.items():
            rows.setdefault(key, {})[name] = value
    width = max(12, *(len(n) for n in results))
    lines = ["metric".ljust(20) + "".join(n.rjust(width + 2) for n in results)]
    for key, per_model in rows.items():
        cells = [_fmt(per_model.get(n)) for n in results]
        lines.append(key.ljust(20) + "".join(c.rjust(width + 2) for c in cells))
    return "\n".join(lines)


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not value.is_integer():
        return f"{value:.4f}"
    return f"{int(value):,}"
