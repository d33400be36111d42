"""How alike two models' cell embeddings are: linear CKA (any widths) and mean per-cell cosine (same width).

Both take [n_cells, dim] arrays whose rows are the same cells in the same order.
"""

from __future__ import annotations

import numpy as np


def _check_pair(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.ndim != 2 or y.ndim != 2:
        raise ValueError(f"embeddings must be [cells, dim] arrays; got shapes {x.shape} and {y.shape}")
    if x.shape[0] != y.shape[0]:
        raise ValueError(
            f"embeddings cover different numbers of cells ({x.shape[0]} vs {y.shape[0]}); "
            "compare the same cells in the same order"
        )
    return x, y


def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear centered kernel alignment (Kornblith et al. 2019): 1 for identical representations, invariant to
    orthogonal transforms and isotropic scaling of either side, defined for different embedding widths."""
    x, y = _check_pair(x, y)
    x = x - x.mean(axis=0)
    y = y - y.mean(axis=0)
    # The feature-space form ||Y^T X||_F^2 costs O(n d^2), not the O(n^2) of n x n Gram matrices.
    cross = np.linalg.norm(y.T @ x, "fro") ** 2
    norm = np.linalg.norm(x.T @ x, "fro") * np.linalg.norm(y.T @ y, "fro")
    if norm == 0.0:
        raise ValueError(
            "linear CKA is undefined when one side's embeddings are all identical (zero variance)"
        )
    return float(cross / norm)


def mean_cosine(x: np.ndarray, y: np.ndarray) -> float | None:
    """Mean over cells of the cosine between the two models' embeddings of that cell; None when the widths
    differ, because the coordinates of different-width models do not correspond."""
    x, y = _check_pair(x, y)
    if x.shape[1] != y.shape[1]:
        return None
    denom = np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1)
    cos = np.einsum("ij,ij->i", x, y) / np.maximum(denom, 1e-12)
    return float(cos.mean())
