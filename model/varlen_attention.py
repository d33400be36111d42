"""Attention over packed cells (THD: tokens of several cells concatenated, `cu_seqlens` marking their starts).

On CUDA in bf16/fp16 it runs PyTorch's variable-length FlashAttention kernels (with attention dropout); elsewhere
it scatters cells into a padded grid for SDPA. Either way a cell attends only to itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_FLASH_DTYPES = (torch.bfloat16, torch.float16)
_FLASH_MAX_HEAD_DIM = 256


def flash_varlen_supported(q: torch.Tensor) -> bool:
    """The flash kernels take CUDA bf16/fp16 heads of up to 256 dims in multiples of 8."""
    head_dim = q.shape[-1]
    return q.is_cuda and q.dtype in _FLASH_DTYPES and head_dim % 8 == 0 and head_dim <= _FLASH_MAX_HEAD_DIM


class _FlashVarlen(torch.autograd.Function):
    """aten's varlen flash forward/backward, which (unlike torch.nn.attention.varlen) accept dropout.

    The forward's RNG state is kept for the backward, so dropout masks are regenerated, not stored.
    """

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, max_seqlen: int, dropout_p: float):  # type: ignore[override]
        out, lse, rng_state, unused, _ = torch.ops.aten._flash_attention_forward(
            q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p, False, False
        )
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens, rng_state, unused)
        ctx.max_seqlen, ctx.dropout_p = max_seqlen, dropout_p
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        q, k, v, out, lse, cu_seqlens, rng_state, unused = ctx.saved_tensors
        dq, dk, dv = torch.ops.aten._flash_attention_backward(
            grad_out.contiguous(),
            q,
            k,
            v,
            out,
            lse,
            cu_seqlens,
            cu_seqlens,
            ctx.max_seqlen,
            ctx.max_seqlen,
            ctx.dropout_p,
            False,
            rng_state,
            unused,
        )
        return dq, dk, dv, None, None, None


def flash_varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """q, k, v: [T, heads, d] packed cells -> context [T, heads, d]; cu_seqlens: int32 [n_cells + 1] on q's device."""
    return _FlashVarlen.apply(q, k, v, cu_seqlens, max_seqlen, dropout_p)


def grid_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    packed_index: torch.Tensor,
    grid_mask: torch.Tensor,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """The portable path: q, k, v [T, heads, d] -> [T, heads, d] through an [n_cells, max_seqlen] padded grid.

    `packed_index` is each token's slot in the flattened grid and `grid_mask` [n, 1, 1, max_seqlen] its key mask;
    this costs n * max_seqlen^2 rather than the T^2 of one block-diagonal mask over the whole pack.
    """
    n, s = grid_mask.shape[0], grid_mask.shape[-1]
    heads, d = q.shape[1], q.shape[2]

    def to_grid(x: torch.Tensor) -> torch.Tensor:
        grid = x.new_zeros(n * s, heads, d)
        grid[packed_index] = x
        return grid.view(n, s, heads, d).transpose(1, 2)

    out = F.scaled_dot_product_attention(
        to_grid(q), to_grid(k), to_grid(v), attn_mask=grid_mask, dropout_p=dropout_p
    )
    return out.transpose(1, 2).reshape(n * s, heads, d)[packed_index]
