"""Packed-cell attention: each cell attends only to itself, through the portable grid path or CUDA flash kernels.

The CUDA tests are skipped on machines without a GPU; they compare the flash kernels with the grid path.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model.varlen_attention import flash_varlen_attention, flash_varlen_supported, grid_attention
from modeling_bert_te import BertForMaskedLM, BertTEConfig

NO_CUDA = not torch.cuda.is_available()
LENGTHS = [5, 17, 1, 9]


def packed_layout(lengths: list[int], device: str = "cpu"):
    """cu_seqlens, each token's slot in the [n, longest] grid, and the grid's key mask."""
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    longest = max(lengths)
    slots = torch.cat([i * longest + torch.arange(n) for i, n in enumerate(lengths)]).to(device)
    mask = (torch.arange(longest)[None, :] < torch.tensor(lengths)[:, None]).to(device)[:, None, None, :]
    return cu, longest, slots, mask


def per_cell_reference(q, k, v, lengths):
    """Plain SDPA on each cell alone: what packed attention must equal."""
    outs, start = [], 0
    for n in lengths:
        cell = [t[start : start + n].transpose(0, 1)[None] for t in (q, k, v)]  # [1, heads, n, d]
        outs.append(F.scaled_dot_product_attention(*cell)[0].transpose(0, 1))
        start += n
    return torch.cat(outs)


def qkv(total: int, heads: int = 2, dim: int = 16, device: str = "cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return [
        torch.randn(total, heads, dim, generator=g).to(device=device, dtype=dtype).requires_grad_()
        for _ in range(3)
    ]


def test_grid_path_equals_attention_over_each_cell_alone():
    q, k, v = qkv(sum(LENGTHS))
    cu, longest, slots, mask = packed_layout(LENGTHS)
    torch.testing.assert_close(grid_attention(q, k, v, slots, mask), per_cell_reference(q, k, v, LENGTHS))


def test_flash_path_is_not_chosen_for_cpu_or_fp32_tensors():
    assert not flash_varlen_supported(torch.zeros(4, 2, 16))
    assert not flash_varlen_supported(torch.zeros(4, 2, 16, dtype=torch.bfloat16))


@pytest.mark.skipif(NO_CUDA, reason="the flash varlen kernels need a CUDA GPU")
def test_flash_varlen_matches_the_grid_path_forward_and_backward():
    q, k, v = qkv(sum(LENGTHS), heads=4, dim=64, device="cuda", dtype=torch.bfloat16)
    cu, longest, slots, mask = packed_layout(LENGTHS, "cuda")
    assert flash_varlen_supported(q)
    grad = torch.randn_like(q)
    flash = flash_varlen_attention(q, k, v, cu, longest)
    flash_grads = torch.autograd.grad(flash, (q, k, v), grad)
    grid = grid_attention(q, k, v, slots, mask)
    grid_grads = torch.autograd.grad(grid, (q, k, v), grad)
    torch.testing.assert_close(flash, grid, atol=2e-2, rtol=2e-2)
    for a, b in zip(flash_grads, grid_grads, strict=True):
        torch.testing.assert_close(a, b, atol=5e-2, rtol=5e-2)


@pytest.mark.skipif(NO_CUDA, reason="the flash varlen kernels need a CUDA GPU")
def test_flash_varlen_dropout_is_applied_and_replayed_in_backward():
    q, k, v = qkv(sum(LENGTHS), heads=4, dim=64, device="cuda", dtype=torch.bfloat16)
    cu, longest, _, _ = packed_layout(LENGTHS, "cuda")
    torch.manual_seed(1)
    first = flash_varlen_attention(q, k, v, cu, longest, dropout_p=0.5)
    torch.manual_seed(1)
    again = flash_varlen_attention(q, k, v, cu, longest, dropout_p=0.5)
    assert torch.equal(first, again)  # the mask comes from the torch RNG, so seeds reproduce it
    assert not torch.allclose(first, flash_varlen_attention(q, k, v, cu, longest))
    first.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


@pytest.mark.skipif(NO_CUDA, reason="the flash varlen kernels need a CUDA GPU")
def test_model_loss_is_the_same_padded_or_packed_on_cuda_in_bf16():
    config = BertTEConfig(
        vocab_size=64,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    model = BertForMaskedLM(config).cuda().eval()
    ids = torch.randint(3, 64, (3, 20), device="cuda")
    mask = (
        torch.arange(20, device="cuda")[None, :] < torch.tensor([20, 7, 13], device="cuda")[:, None]
    ).long()
    labels = torch.where((torch.rand(3, 20, device="cuda") < 0.3) & mask.bool(), ids, -100)
    labels[:, 0] = ids[:, 0]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        unpadded = model(ids, mask, labels).loss  # labels given: the model drops pad tokens and runs packed
        padded = model(ids, mask, labels, full_logits=True).loss  # full logits keep the padded SDPA path
    torch.testing.assert_close(unpadded, padded, atol=2e-2, rtol=2e-2)
