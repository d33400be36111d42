"""Cell embeddings (and a classifier's class probabilities) from one forward pass over packed cells.

The one implementation behind `embed.py` and `evaluate.py`: cells run packed, without padding, and are pooled per cell.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from model.attention_layout import packed_layout

POOLINGS = ("mean", "cls")  # mean over gene tokens; the first token (<cls> in V2 vocabularies)


@dataclass
class PooledCells:
    vectors: np.ndarray  # float32 [n, hidden]
    probabilities: np.ndarray | None = None  # float32 [n, classes], for a classifier


def inference_autocast(
    precision: str, device: torch.device
) -> Callable[[], contextlib.AbstractContextManager]:
    """`--precision` of the inference tools: auto = bf16 autocast on CUDA and fp32 on CPU; fp32; bf16."""
    bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if not bf16:
        return contextlib.nullcontext
    return functools.partial(torch.autocast, device_type=device.type, dtype=torch.bfloat16)


def check_layer(model: nn.Module, layer: int) -> int:
    """The index into the hidden states (0 = embeddings output, L = last layer; negative counts from the end)."""
    n = len(model.bert.encoder.layer)
    if not -(n + 1) <= layer <= n:
        raise ValueError(
            f"--layer {layer} is out of range for a model of {n} layers; use -{n + 1}..{n} "
            "(0 = embedding output, -1 = last layer)"
        )
    return layer


def check_pooling(pooling: str, cls_id: int | None) -> None:
    """`cls` pooling needs a vocabulary with a <cls> token (V2); V1 cells start with their top gene."""
    if pooling not in POOLINGS:
        raise ValueError(f"--pooling {pooling!r} unknown; use one of {POOLINGS}")
    if pooling == "cls" and cls_id is None:
        raise ValueError(
            "--pooling cls needs a model whose vocabulary has <cls> (Geneformer V2); "
            "use --pooling mean for V1 models"
        )


def pack_cells(cells: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids of all cells end to end [1, T] and their boundaries (cu_seqlens, int32 [n + 1])."""
    lengths = np.array([len(c) for c in cells], dtype=np.int64)
    if len(lengths) == 0 or (lengths == 0).any():
        raise ValueError("every cell needs at least one token to be embedded")
    cu = np.zeros(len(cells) + 1, dtype=np.int64)
    np.cumsum(lengths, out=cu[1:])
    ids = torch.from_numpy(np.concatenate(cells).astype(np.int64)).unsqueeze(0)
    return ids, torch.from_numpy(cu).to(torch.int32)


def _segment_mean(
    hidden: torch.Tensor, cell_of_token: torch.Tensor, keep: torch.Tensor, n: int
) -> torch.Tensor:
    """Mean of the kept rows of `hidden` [T, H] within each cell, in float32."""
    weights = keep.to(torch.float32)
    # A sparse [n, T] selection times the hidden states: several times faster on CPU than index_add_.
    at = torch.stack([cell_of_token, torch.arange(len(cell_of_token), device=hidden.device)])
    select = torch.sparse_coo_tensor(
        at, weights, (n, hidden.shape[0]), is_coalesced=True, check_invariants=False
    )
    sums = torch.sparse.mm(select, hidden.float())
    counts = torch.zeros(n, dtype=torch.float32, device=hidden.device).index_add_(0, cell_of_token, weights)
    if bool((counts == 0).any()):
        raise ValueError("a cell has no gene tokens (only special tokens); it has no mean embedding")
    return sums / counts[:, None]


@torch.no_grad()
def pool_cells(
    model: nn.Module,
    cells: Sequence[np.ndarray],
    *,
    layer: int,
    pooling: str,
    special_ids: tuple[int, ...],
    device: torch.device,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> PooledCells:
    """Embeddings of `cells` (token-id arrays) at hidden state `layer`, pooled by `pooling`; a model with a
    classification head (finetuning's BertForCellClassification) also gives its class probabilities."""
    ids, cu = pack_cells(cells)
    ids = ids.to(device)
    body = model.bert
    layout, positions = packed_layout(cu, None, ids.shape[1], device)
    with autocast():
        last, hidden, _ = body.encode(ids, layout, positions, layout.max_seqlen, output_hidden_states=True)
    starts = layout.cu_seqlens[:-1].long()
    if pooling == "cls":
        vectors = hidden[layer][0, starts].float()
    else:
        cell_of_token = torch.repeat_interleave(
            torch.arange(len(cells), device=device), (layout.cu_seqlens[1:] - layout.cu_seqlens[:-1]).long()
        )
        keep = ~torch.isin(ids[0], torch.tensor(special_ids, dtype=ids.dtype, device=device))
        vectors = _segment_mean(hidden[layer][0], cell_of_token, keep, len(cells))
    out = PooledCells(vectors=vectors.cpu().numpy().astype(np.float32))
    if hasattr(model, "classify_first_tokens"):
        with autocast():
            logits = model.classify_first_tokens(last[0, starts])
        out.probabilities = torch.softmax(logits.float(), dim=-1).cpu().numpy().astype(np.float32)
    return out
