"""Endless, resumable loader of masked-LM batches: sampler plan -> cell reads -> collator, optional workers.

Its state names the next batch not yet handed to the caller, so a resumed run sees exactly the same batches.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader

from dataset.collator import MLMCollator
from dataset.corpus import CellCorpus
from dataset.sampler import TokenBudgetSampler

# One micro-batch to read: (epoch, global batch index, global position after it, corpus indices).
BatchSpec = tuple[int, int, int, np.ndarray]


class _BatchReader:
    """Map-style 'dataset' whose items are batch specs: reads the cells of one micro-batch and collates them."""

    def __init__(self, corpus: CellCorpus, collator: MLMCollator, rank: int) -> None:
        self.corpus, self.collator, self.rank = corpus, collator, rank

    def __getitem__(self, spec: BatchSpec) -> dict:
        epoch, batch_index, next_position, indices = spec
        batch = self.collator(
            self.corpus.get_many(indices), epoch=epoch, batch_index=batch_index, rank=self.rank
        )
        batch["cell_index"] = torch.from_numpy(np.asarray(indices, dtype=np.int64))
        batch["epoch"], batch["batch_index"] = epoch, batch_index
        batch["_next_position"] = next_position
        return batch


class CellBatchLoader:
    """Iterates batches forever, epoch after epoch (calling `sampler.set_epoch`).

    Each batch is the collator's dict plus `cell_index` (LongTensor [B] of corpus indices) and python
    ints `epoch` and `batch_index` (the global batch index in the epoch's plan). With `num_workers > 0`,
    torch DataLoader workers read and collate ahead (`prefetch_factor` batches each); the plan itself is
    made in this process, so prefetched batches never move the saved position.
    """

    def __init__(
        self,
        corpus: CellCorpus,
        sampler: TokenBudgetSampler,
        collator: MLMCollator,
        *,
        num_workers: int = 0,
        rank: int,
        prefetch_factor: int = 4,
        pin_memory: bool = False,
    ) -> None:
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if rank != sampler.rank:
            raise ValueError(
                f"loader rank {rank} differs from sampler rank {sampler.rank}; pass the same rank"
            )
        self.corpus, self.sampler, self.collator = corpus, sampler, collator
        self.num_workers, self.rank = num_workers, rank
        self.prefetch_factor, self.pin_memory = prefetch_factor, pin_memory
        self._epoch, self._position = sampler.epoch, sampler.global_position
        self._iterator: Iterator[dict] | None = None

    def _tasks(self, epoch: int, start: int, endless: bool) -> Iterator[BatchSpec]:
        ws = self.sampler.world_size
        while True:
            self.sampler.set_epoch(epoch)
            for g, indices in self.sampler.rank_batches(epoch, start):
                yield epoch, g, g - self.rank + ws, indices
            if not endless:
                return
            epoch, start = epoch + 1, 0

    def _batches(self, tasks: Iterable[BatchSpec]) -> Iterator[dict]:
        work = _BatchReader(self.corpus, self.collator, self.rank)
        if self.num_workers == 0:
            return (work[t] for t in tasks)
        return iter(
            DataLoader(
                work,
                batch_size=None,
                sampler=tasks,
                num_workers=self.num_workers,
                prefetch_factor=self.prefetch_factor,
                pin_memory=self.pin_memory,
            )
        )

    def __iter__(self) -> CellBatchLoader:
        return self

    def __next__(self) -> dict:
        if self._iterator is None:
            self._iterator = self._batches(self._tasks(self._epoch, self._position, endless=True))
        batch = next(self._iterator)
        self._epoch, self._position = batch["epoch"], batch.pop("_next_position")
        return batch

    def state_dict(self) -> dict:
        """Position of the next batch not yet returned (epoch, global_position) plus the sampler's checks."""
        state = self.sampler.state_dict()
        state["epoch"], state["global_position"] = self._epoch, self._position
        return state

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)
        self._epoch, self._position = self.sampler.epoch, self.sampler.global_position
        self._iterator = None  # drops any prefetched batches (and their workers)

    def epoch_batches(self, epoch: int = 0) -> Iterator[dict]:
        """A finite pass over this rank's batches of one epoch, e.g. held-out evaluation with fixed masks
        (a sampler with shuffle=False and the same epoch give the same cells and masks every time).
        Does not touch the endless iteration's position."""
        for batch in self._batches(self._finite_tasks(epoch)):
            batch.pop("_next_position")
            yield batch

    def _finite_tasks(self, epoch: int) -> Iterator[BatchSpec]:
        ws = self.sampler.world_size
        for g, indices in self.sampler.rank_batches(epoch, 0):
            yield epoch, g, g - self.rank + ws, indices
