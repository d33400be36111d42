"""Held-out batches for evaluation: every chosen cell exactly once, masks fixed per cell, equal counts per rank.

Unlike training batches, none is dropped to even out ranks: a batch is split instead, so all cells are scored.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch

from dataset.corpus import CellCorpus
from dataset.sampler import TokenBudgetSampler


def heldout_plan(
    lengths: np.ndarray,
    cells: np.ndarray,
    *,
    max_tokens: int,
    max_cells: int | None,
    pad_to_multiple_of: int,
    world_size: int,
) -> list[np.ndarray]:
    """Token-budget batches of `cells` (length-sorted), split until their number is a multiple of world_size."""
    if len(cells) < world_size:
        raise ValueError(
            f"{len(cells)} held-out cells cannot be shared by {world_size} ranks; raise "
            "data.heldout_fraction or eval.max_cells"
        )
    plan = TokenBudgetSampler(
        lengths,
        cells,
        max_tokens=max_tokens,
        max_cells=max_cells,
        rank=0,
        world_size=1,
        seed=0,
        shuffle=False,
        pad_to_multiple_of=pad_to_multiple_of,
    ).global_batches(0)
    plan = list(plan)
    while len(plan) % world_size:
        largest = max(range(len(plan)), key=lambda i: len(plan[i]))
        if len(plan[largest]) < 2:  # one cell per batch and a cell count that is no multiple of world_size
            raise ValueError(
                f"{len(cells)} held-out cells cannot be shared evenly by {world_size} ranks; set "
                f"eval.max_cells to a multiple of {world_size}"
            )
        batch = plan.pop(largest)
        plan[largest:largest] = [batch[: len(batch) // 2], batch[len(batch) // 2 :]]
    return plan


class HeldoutBatches:
    """This rank's share of the held-out batches, each with `cell_index` (the corpus ids of its cells);
    `collate(cells, cell_ids)` builds one, e.g. `MLMCollator.fixed_masks`."""

    def __init__(
        self,
        corpus: CellCorpus,
        cells: np.ndarray,
        collate: Callable[[list[np.ndarray], np.ndarray], dict],
        *,
        max_tokens: int,
        max_cells: int | None,
        pad_to_multiple_of: int,
        rank: int,
        world_size: int,
    ) -> None:
        self.corpus, self.collate, self.rank, self.world_size = corpus, collate, rank, world_size
        self.plan = heldout_plan(
            corpus.lengths,
            np.asarray(cells, dtype=np.int64),
            max_tokens=max_tokens,
            max_cells=max_cells,
            pad_to_multiple_of=pad_to_multiple_of,
            world_size=world_size,
        )

    def epoch_batches(self, epoch: int = 0) -> Iterator[dict]:
        """The same batches and masks for every epoch (the argument keeps the loaders' interface)."""
        for ids in self.plan[self.rank :: self.world_size]:
            batch = self.collate(self.corpus.get_many(ids), ids)
            batch["cell_index"] = torch.from_numpy(np.asarray(ids, dtype=np.int64))
            yield batch
