"""Filler cells: how packed batches are topped up to a token count (FP8's multiple, or a static shape) with cells
no longer than the longest real one, so attention kernels keep their shapes.
"""

from __future__ import annotations


def filler_cell_sizes(filler: int, longest: int) -> list[int]:
    """Cell lengths that add up to `filler` tokens, each at most `longest`: as few cells as possible."""
    return [longest] * (filler // longest) + ([filler % longest] if filler % longest else [])
