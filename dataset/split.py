"""Deterministic train / held-out split of a corpus by hashing cell indices with a seed.

The split depends only on (n_cells, heldout_fraction, seed), never on the number of ranks or processes.
"""

from __future__ import annotations

import numpy as np

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """A well-mixed 64-bit hash of each element (SplitMix64 finalizer); wraps on overflow by design."""
    with np.errstate(over="ignore"):
        x = (x + np.uint64(0x9E3779B97F4A7C15)) & _MASK64
        x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK64
        x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK64
        return x ^ (x >> np.uint64(31))


def cell_hashes(n_cells: int, seed: int) -> np.ndarray:
    """Pseudo-random uint64 per cell index, a pure function of (index, seed)."""
    seed_mix = _splitmix64(np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))[0]
    return _splitmix64(np.arange(n_cells, dtype=np.uint64) ^ seed_mix)


def split_indices(n_cells: int, heldout_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train_idx, heldout_idx), both sorted int64; held out = the round(fraction * n) cells of lowest hash.

    At least one cell is held out when the fraction is positive, so evaluation never runs on nothing.
    """
    if n_cells <= 0:
        raise ValueError(f"n_cells must be positive, got {n_cells}")
    if not 0.0 <= heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}; 0.01-0.05 is typical")
    n_heldout = 0 if heldout_fraction == 0 else max(1, int(round(heldout_fraction * n_cells)))
    if n_heldout >= n_cells:
        raise ValueError(
            f"heldout_fraction={heldout_fraction} of {n_cells} cells leaves no training cells; lower it"
        )
    order = np.argsort(cell_hashes(n_cells, seed), kind="stable")
    heldout = np.sort(order[:n_heldout]).astype(np.int64)
    train = np.sort(order[n_heldout:]).astype(np.int64)
    return train, heldout
