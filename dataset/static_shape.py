"""Static-shape packed batches: every micro-batch gets the same tensor shapes, so a CUDA graph can replay the step.

Tokens are filled up to exactly the budget with filler cells, `cu_seqlens` is padded with empty cells to a fixed
cell count, `max_seqlen` is fixed, and the masked rows are rounded up to a multiple, padded with unlabelled rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from common.packing import filler_cell_sizes
from dataset.batch import IGNORE_INDEX


@dataclass(frozen=True)
class StaticShape:
    """The fixed sizes of every packed micro-batch."""

    tokens: int  # input_ids [1, tokens]: data.max_tokens
    cells: int  # cu_seqlens [cells + 1]: real cells plus filler cells plus empty ones
    max_seqlen: int  # the longest cell the corpus may hold (filler cells are no longer)
    masked_multiple: int = (
        256  # masked rows rounded up to this: one or two head shapes instead of one per step
    )

    @classmethod
    def for_budget(cls, max_tokens: int, max_cells: int, max_seqlen: int) -> StaticShape:
        """Room for `max_cells` real cells and the filler cells that can top up any batch of the budget."""
        return cls(
            tokens=max_tokens, cells=max_cells + -(-max_tokens // max_seqlen) + 1, max_seqlen=max_seqlen
        )


def fill_to_static_shape(
    input_ids: np.ndarray, labels: np.ndarray, lengths: np.ndarray, shape: StaticShape, pad_id: int
) -> dict[str, torch.Tensor | int]:
    """A packed batch of `lengths` cells (flat ids and labels) in `shape`; filler tokens carry no label and an
    attention_mask of 0, so losses and real-token counts are those of the cells alone."""
    total = int(lengths.sum())
    if total > shape.tokens or int(lengths.max()) > shape.max_seqlen:
        raise ValueError(
            f"a batch of {total} tokens (longest cell {int(lengths.max())}) does not fit the static "
            f"shape of {shape.tokens} tokens and cells of at most {shape.max_seqlen}; raise "
            "data.max_tokens, or set training.cuda_graphs=false"
        )
    sizes = filler_cell_sizes(shape.tokens - total, shape.max_seqlen)
    if len(lengths) + len(sizes) > shape.cells:
        raise ValueError(
            f"a batch of {len(lengths)} cells needs {len(sizes)} filler cells, more than the static "
            f"{shape.cells} cell slots; set data.max_cells to the most cells a micro-batch may hold"
        )
    ends = np.concatenate([np.cumsum(lengths), total + np.cumsum(sizes, dtype=np.int64)])
    cu = np.full(shape.cells + 1, shape.tokens, dtype=np.int32)  # trailing empty cells repeat the end
    cu[0], cu[1 : len(ends) + 1] = 0, ends
    ids = np.full(shape.tokens, pad_id, dtype=np.int64)
    ids[:total] = input_ids
    lab = np.full(shape.tokens, IGNORE_INDEX, dtype=np.int64)
    lab[:total] = labels
    mask = np.zeros(shape.tokens, dtype=np.int64)
    mask[:total] = 1
    return {
        "input_ids": torch.from_numpy(ids).unsqueeze(0),
        "attention_mask": torch.from_numpy(mask).unsqueeze(0),
        "labels": torch.from_numpy(lab).unsqueeze(0),
        "cu_seqlens": torch.from_numpy(cu),
        "max_seqlen": shape.max_seqlen,
        "masked_positions": _padded_positions(lab, shape.masked_multiple),
    }


def _padded_positions(labels: np.ndarray, multiple: int) -> torch.Tensor:
    """The labelled positions, then an unlabelled one repeated up to the next multiple (the model drops such rows
    from every loss: their label is IGNORE_INDEX)."""
    positions = np.flatnonzero(labels != IGNORE_INDEX)
    rows = min(-(-len(positions) // multiple) * multiple, len(labels))
    if rows == len(positions):
        return torch.from_numpy(positions)
    pad = int(np.flatnonzero(labels == IGNORE_INDEX)[-1])
    return torch.from_numpy(np.concatenate([positions, np.full(rows - len(positions), pad, dtype=np.int64)]))
