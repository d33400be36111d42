"""Integrated gradients on the input (word) embeddings: how much each gene of a cell contributes to a scalar
prediction, e.g. the masked-LM logit of the true gene at a masked position. Own implementation, no captum.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from dataset.vocab import Vocabulary
from modeling_bert_te import BertForMaskedLM

METHODS = ("trapezoid", "riemann_left", "riemann_right", "riemann_middle")


def _alphas_and_weights(steps: int, method: str) -> tuple[torch.Tensor, torch.Tensor]:
    if steps < 1:
        raise ValueError(f"integrated gradients needs steps >= 1, got {steps}")
    if method == "trapezoid":
        alphas = torch.linspace(0.0, 1.0, steps + 1)
        weights = torch.full((steps + 1,), 1.0 / steps)
        weights[0] = weights[-1] = 0.5 / steps
        return alphas, weights
    offset = {"riemann_left": 0.0, "riemann_right": 1.0, "riemann_middle": 0.5}.get(method)
    if offset is None:
        raise ValueError(f"integration method {method!r} is unknown; choose one of {METHODS}")
    return (torch.arange(steps) + offset) / steps, torch.full((steps,), 1.0 / steps)


def integrated_gradients(
    f: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    baseline: torch.Tensor,
    *,
    steps: int = 32,
    method: str = "trapezoid",
    batch_size: int = 8,
) -> torch.Tensor:
    """Attributions (x - baseline) * mean over the path of df/dx, same shape as x.

    f maps a batch of inputs [k, *x.shape] to k scalars; the path points go through it `batch_size` at a time.
    Completeness: the attributions sum to f(x) - f(baseline), up to the integration error of `steps`.
    """
    if x.shape != baseline.shape:
        raise ValueError(f"baseline shape {tuple(baseline.shape)} differs from the input's {tuple(x.shape)}")
    alphas, weights = _alphas_and_weights(steps, method)
    x, baseline = x.detach(), baseline.detach()
    total = torch.zeros_like(x, dtype=torch.float32)
    for start in range(0, len(alphas), batch_size):
        a = alphas[start : start + batch_size].to(x.device, x.dtype).view(-1, *([1] * x.dim()))
        path = (baseline + a * (x - baseline)).requires_grad_(True)
        out = f(path)
        if out.shape != (len(a),):
            raise ValueError(
                f"f must return one scalar per path point, shape ({len(a)},); got {tuple(out.shape)}"
            )
        (grads,) = torch.autograd.grad(out.sum(), path)
        w = weights[start : start + batch_size].to(x.device).view(-1, *([1] * x.dim()))
        total += (w * grads.float()).sum(0)
    return (x - baseline).float() * total


def masked_lm_target(
    model: BertForMaskedLM, input_ids: torch.Tensor, position: int, gene_id: int
) -> Callable[[torch.Tensor], torch.Tensor]:
    """f(word embeddings [k, S, H]) -> the logit of `gene_id` at `position` of one cell [S], for each of k inputs.

    The word-embedding lookup is replaced by the given embeddings through a forward hook (positions, LayerNorm
    and every layer stay the model's own); only the target position is decoded.
    """
    if input_ids.dim() != 1:
        raise ValueError(f"input_ids must be one cell [S]; got shape {tuple(input_ids.shape)}")
    if not 0 <= position < input_ids.numel():
        raise ValueError(f"position {position} is outside the cell (length {input_ids.numel()})")
    embedding = model.bert.embeddings.word_embeddings

    def f(embeds: torch.Tensor) -> torch.Tensor:
        k = embeds.shape[0]
        ids = input_ids.unsqueeze(0).expand(k, -1)
        labels = torch.full_like(ids, -100)
        labels[:, position] = gene_id
        handle = embedding.register_forward_hook(lambda module, args, output: embeds)
        try:
            logits = model(ids, labels=labels).logits  # [k, V]: one masked row per path point, in batch order
        finally:
            handle.remove()
        return logits[:, gene_id]

    return f


def embedding_baseline(model: BertForMaskedLM, input_ids: torch.Tensor, kind: str = "pad") -> torch.Tensor:
    """'zero': all zeros; 'pad': the <pad> embedding at every position (the model's notion of 'no gene')."""
    weight = model.bert.embeddings.word_embeddings.weight.detach()
    if kind == "zero":
        return torch.zeros(input_ids.numel(), weight.shape[1], dtype=weight.dtype, device=weight.device)
    if kind == "pad":
        return weight[model.config.pad_token_id].expand(input_ids.numel(), -1).clone()
    raise ValueError(f"baseline {kind!r} is unknown; choose 'zero' or 'pad'")


@dataclass
class GeneAttribution:
    position: int
    token_id: int
    gene: str
    attribution: float  # summed over the hidden dimension


def gene_attributions(
    model: BertForMaskedLM,
    vocab: Vocabulary,
    input_ids: torch.Tensor,
    position: int,
    gene_id: int,
    *,
    steps: int = 32,
    baseline: str = "pad",
    method: str = "trapezoid",
) -> tuple[list[GeneAttribution], float, float]:
    """Per-gene IG of the masked-LM logit of gene_id at position; sorted by |attribution|, largest first.
    Also returns f(x) - f(baseline) and the completeness gap (sum of attributions minus that)."""
    model.eval()
    f = masked_lm_target(model, input_ids, position, gene_id)
    x = model.bert.embeddings.word_embeddings.weight.detach()[input_ids]
    base = embedding_baseline(model, input_ids, baseline)
    attr = integrated_gradients(f, x, base, steps=steps, method=method).sum(-1)
    with torch.no_grad():
        end, start = f(torch.stack([x, base])).tolist()
    delta = end - start
    rows = [
        GeneAttribution(p, int(t), vocab.tokens[int(t)], float(a))
        for p, (t, a) in enumerate(zip(input_ids.tolist(), attr.tolist(), strict=True))
    ]
    rows.sort(key=lambda r: -abs(r.attribution))
    return rows, delta, float(attr.sum()) - delta
