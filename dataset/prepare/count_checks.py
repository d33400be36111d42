"""Checks that a chunk of counts is raw counts: finite, non-negative, whole numbers (float noise rounded).

Used by the corpus tokenizer; callers that encode cells held in memory can run the same check on their chunks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

# Counts this close to an integer are float noise of a pipeline (0.999999999999999): rounded.
NEAR_INTEGER = 1e-6
# Normalized values sit anywhere between integers; counts recovered from float32 log1p data sit within ~0.08.
RECOVERED_COUNTS = 0.1


def _whole_non_negative(data: np.ndarray) -> bool:
    """True if every value is a finite whole number >= 0 (raw counts), checked in the input's own dtype."""
    if len(data) == 0 or data.dtype.kind == "u":
        return True
    if data.dtype.kind == "i":
        return bool(data.min() >= 0)
    if data.dtype.kind != "f":
        return False
    # Read as unsigned integers, floats in [+0, inf) have bits below those of +inf; negatives (also -0.0), inf
    # and NaN have higher ones. One max instead of min, max and an isfinite.
    unsigned = np.dtype(f"u{data.dtype.itemsize}")
    if data.view(unsigned).max() >= np.array(np.inf, dtype=data.dtype).view(unsigned):
        return False
    return bool((np.floor(data) == data).all())


def _cells_of(matrix: sp.csr_matrix, entries: np.ndarray) -> np.ndarray:
    """The distinct rows (cells) that hold the given stored entries."""
    return np.unique(np.searchsorted(matrix.indptr, entries, side="right") - 1)


@dataclass(frozen=True)
class CountCheck:
    """What `check_counts` found in a chunk."""

    rounded_cells: int = 0  # cells with a count within NEAR_INTEGER of an integer, now rounded
    rounded_values: int = 0
    non_integer_cells: int = 0  # cells still holding non-integers (only when allowed)


def check_counts(
    matrix: sp.csr_matrix, where: str, first_row: int = 0, *, allow_non_integer: bool = False
) -> CountCheck:
    """Raise on negative/NaN counts and on non-integers (unless allowed); round float noise in place.

    `where` names the matrix in messages (`path: X`); `first_row` is the chunk's first cell in the input.
    """
    if _whole_non_negative(
        matrix.data
    ):  # the usual case, on the stored (often float32) values: half the bytes
        return CountCheck()
    data = matrix.data.astype(np.float64, copy=False)
    whole = np.floor(data) == data  # False for NaN
    bad = ~np.isfinite(data) | (data < 0)
    if bad.any():
        row = first_row + int(np.searchsorted(matrix.indptr, np.flatnonzero(bad)[0], side="right") - 1)
        raise ValueError(
            f"{where} holds a negative or non-finite value in cell row {row}; "
            "the tokenizer needs raw counts (pick the counts matrix with --layer)"
        )
    fractional = np.flatnonzero(~whole)
    nearest = np.rint(data[fractional])
    noise = np.abs(data[fractional] - nearest) <= NEAR_INTEGER
    matrix.data[fractional[noise]] = nearest[noise]  # exact in any float dtype: they are small integers
    rounded_cells = len(_cells_of(matrix, fractional[noise]))
    fractional = fractional[
        ~noise
    ]  # what is left is not a count (none at all for -0.0, sent here by the bit test)
    if len(fractional) == 0:
        return CountCheck(rounded_cells, int(noise.sum()))
    data = matrix.data.astype(np.float64, copy=False)
    rows = _cells_of(matrix, fractional)
    if not allow_non_integer:
        example = data[fractional[0]]
        off = np.abs(data[fractional] - np.rint(data[fractional]))
        if off.max() < RECOVERED_COUNTS:
            hint = (
                f"all are within {RECOVERED_COUNTS} of an integer, like counts recovered from log-normalized "
                "data (expm1(x) * total / 1e4): if they are counts, round them (np.rint) before tokenizing"
            )
        else:
            hint = (
                "they look normalized, not raw counts: pick the raw counts with --layer (e.g. --layer counts or "
                "--layer raw)"
            )
        raise ValueError(
            f"{where} holds non-integer values (cell row {first_row + int(rows[0])}: "
            f"{example!r}); {hint}, or pass --allow-non-integer to tokenize them as they are"
        )
    return CountCheck(rounded_cells, int(noise.sum()), len(rows))
