"""Distillation loss terms: softened-logit KL, hidden-state regression, and MiniLMv2 self-attention relations.

Each returns a sum over its tokens so the loop can divide by the global masked-token count.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kd_kl_sum(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float,
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """T^2 * KL(teacher || student) on temperature-softened distributions, summed over rows ([M, V] logits);
    with `rows` ([M] bool), over those rows only (static-shape batches pad their masked rows)."""
    student_log_probs = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher_log_probs = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if rows is None:
        kl = F.kl_div(student_log_probs, teacher_log_probs, log_target=True, reduction="sum")
    else:
        per_row = F.kl_div(student_log_probs, teacher_log_probs, log_target=True, reduction="none").sum(-1)
        kl = torch.where(rows, per_row, 0).sum()
    return kl * temperature**2


def token_mask(attention_mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """[B, S] bool of real tokens (all True for packed or unpadded input)."""
    if attention_mask is None:
        return torch.ones(like.shape[:2], dtype=torch.bool, device=like.device)
    return attention_mask.bool()


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values` [B, S, ...] over the tokens where `mask` [B, S] is True, every trailing element counted.

    No boolean indexing: its data-dependent size would make the host wait for the GPU on every call.
    """
    mask = mask.reshape(mask.shape + (1,) * (values.dim() - mask.dim()))
    per_token = values[0, 0].numel() if values.dim() > 2 else 1
    return torch.where(mask, values, 0).sum() / (mask.sum() * per_token)


def hidden_mse_mean(
    student_projected: torch.Tensor, teacher_hidden: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Mean squared error over real tokens and the teacher's width."""
    return masked_mean((student_projected.float() - teacher_hidden.float()).pow(2), mask)


def _relation_heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """[B, heads, S, d] -> [B, n_heads, S, (heads*d)/n_heads]: re-split the layer's width into relation heads."""
    batch, heads, seq, dim = x.shape
    width = heads * dim
    if width % n_heads:
        raise ValueError(f"distill.relation_heads={n_heads} does not divide the width {width}")
    return x.transpose(1, 2).reshape(batch, seq, n_heads, width // n_heads).transpose(1, 2)


def _relation_log_probs(x: torch.Tensor, n_heads: int, key_mask: torch.Tensor) -> torch.Tensor:
    x = _relation_heads(x.float(), n_heads)
    scores = x @ x.transpose(-1, -2) / x.shape[-1] ** 0.5
    scores = scores.masked_fill(~key_mask[:, None, None, :], torch.finfo(scores.dtype).min)
    return scores.log_softmax(-1)


def relation_kl_mean(
    student_qkv: tuple[torch.Tensor, ...],
    teacher_qkv: tuple[torch.Tensor, ...],
    n_heads: int,
    mask: torch.Tensor,
) -> torch.Tensor:
    """MiniLMv2: KL between teacher and student query-query, key-key and value-value relations.

    Both sides are re-split into `n_heads` relation heads, so teacher and student widths may differ.
    Averaged over relation types, heads and real query tokens.
    """
    total = 0.0
    for s, t in zip(student_qkv, teacher_qkv, strict=True):
        log_s = _relation_log_probs(s, n_heads, mask)
        log_t = _relation_log_probs(t, n_heads, mask)
        kl = (log_t.exp() * (log_t - log_s)).sum(-1)  # [B, heads, S]
        total = total + masked_mean(kl.permute(0, 2, 1), mask)
    return total / len(student_qkv)
