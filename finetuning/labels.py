"""Cell labels of a corpus column as class ids, and a stratified train / held-out split of the labelled cells.

The split is a pure function of (labels, fraction, seed), like dataset.split, so it is the same on every rank.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from dataset.split import cell_hashes

UNLABELLED = -100  # class id of a cell without a label; the loss and the split skip it


def _is_missing(value) -> bool:
    return (
        value is None
        or (isinstance(value, float) and math.isnan(value))
        or (isinstance(value, str) and not value)
    )


@dataclass
class CellLabels:
    names: list[str]  # class id -> label, sorted so the ids do not depend on the order of cells
    ids: np.ndarray  # int64 [n_cells]: class id per corpus cell, UNLABELLED where the column is empty

    @classmethod
    def from_column(cls, values, column: str) -> CellLabels:
        """Class ids of a corpus column (strings or numbers); at least two classes are needed."""
        raw = [None if _is_missing(v) else str(v) for v in values]
        names = sorted({v for v in raw if v is not None})
        if len(names) < 2:
            raise ValueError(
                f"column '{column}' has {len(names)} distinct label(s) ({names}); classification "
                "needs at least two: set finetune.label_column to a column of cell classes"
            )
        index = {name: i for i, name in enumerate(names)}
        ids = np.array([UNLABELLED if v is None else index[v] for v in raw], dtype=np.int64)
        return cls(names=names, ids=ids)

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.names))


def stratified_split(ids: np.ndarray, heldout_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train_idx, heldout_idx) of the labelled cells, sorted int64, holding out `fraction` of every class.

    Within a class the cells of lowest hash are held out (round(fraction * n), at least one when the class has
    two cells or more); a class of one cell trains only. Unlabelled cells are in neither list.
    """
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}; 0.1-0.2 is typical")
    hashes = cell_hashes(len(ids), seed)
    train, heldout = [], []
    for label in np.unique(ids[ids != UNLABELLED]):
        members = np.flatnonzero(ids == label)
        members = members[np.argsort(hashes[members], kind="stable")]
        n_out = (
            0 if len(members) < 2 else min(len(members) - 1, max(1, round(heldout_fraction * len(members))))
        )
        heldout.append(members[:n_out])
        train.append(members[n_out:])
    return np.sort(np.concatenate(train)).astype(np.int64), np.sort(np.concatenate(heldout)).astype(np.int64)
