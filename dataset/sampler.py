"""Distributed token-budget sampler: micro-batches of similar-length cells, identical plan on every rank.

The global batch list is a pure function of (seed, epoch); rank r takes every world_size-th batch.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator

import numpy as np


class TokenBudgetSampler:
    """Yields lists of corpus indices whose padded size (cells x longest padded length) fits `max_tokens`.

    Each epoch: cells are shuffled, sorted by padded length (ties stay shuffled, so batches mix cells
    of the same length differently each epoch), packed greedily up to the budget, then the batch order
    is shuffled. The list is cut to a multiple of world_size so every rank gets the same count; rank r
    takes global batches p + r, p + r + world_size, ... from the epoch's start position p.
    `global_position` counts batches consumed by all ranks, so a resumed run with any world size
    continues with the first global batch no rank has consumed.
    """

    @classmethod
    def every_cell(cls, lengths: np.ndarray, max_tokens: int, seed: int = 0) -> TokenBudgetSampler:
        """One process's shuffled batches over every cell, with no cell-count cap (benchmarks, probes)."""
        return cls(
            lengths,
            np.arange(len(lengths)),
            max_tokens=max_tokens,
            max_cells=None,
            rank=0,
            world_size=1,
            seed=seed,
        )

    def __init__(
        self,
        lengths: np.ndarray,
        indices: np.ndarray,
        *,
        max_tokens: int,
        max_cells: int | None,
        rank: int,
        world_size: int,
        seed: int,
        shuffle: bool = True,
        pad_to_multiple_of: int = 8,
    ) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        if pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
        if max_cells is not None and max_cells < 1:
            raise ValueError(f"max_cells must be >= 1 or None, got {max_cells}")
        self.indices = np.asarray(indices, dtype=np.int64)
        if len(self.indices) == 0:
            raise ValueError(
                "the sampler got no cell indices; check the split (heldout_fraction) and the corpus"
            )
        lengths = np.asarray(lengths)
        m = pad_to_multiple_of
        self.padded = ((lengths[self.indices].astype(np.int64) + m - 1) // m) * m
        longest = int(self.padded.max())
        if max_tokens < longest:
            raise ValueError(
                f"max_tokens={max_tokens} is smaller than the longest cell padded to a multiple of {m} "
                f"({longest} tokens); raise max_tokens to at least {longest} or lower max_length"
            )
        self.max_tokens, self.max_cells = int(max_tokens), max_cells
        self.rank, self.world_size, self.seed = rank, world_size, int(seed)
        self.shuffle, self.pad_to_multiple_of = shuffle, m
        # Identifies the cells and lengths the plan is built from, to refuse resuming onto another dataset.
        self.fingerprint = zlib.crc32(self.padded.tobytes(), zlib.crc32(self.indices.tobytes()))
        self.epoch = 0
        self.global_position = 0
        self._cache: tuple[int, list[np.ndarray]] | None = None

    def global_batches(self, epoch: int) -> list[np.ndarray]:
        """All micro-batches of `epoch` in consumption order, before the cut to a multiple of world_size."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.indices)) if self.shuffle else np.arange(len(self.indices))
        order = order[np.argsort(self.padded[order], kind="stable")]
        padded_sorted = self.padded[order]
        bounds = self._pack(padded_sorted)
        batches = [self.indices[order[a:b]] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        self._cache = (epoch, batches)
        return batches

    def _pack(self, padded_sorted: np.ndarray) -> list[int]:
        """Greedy batch boundaries over ascending padded lengths, one step per distinct length."""
        values, starts = np.unique(padded_sorted, return_index=True)
        ends = np.append(starts[1:], len(padded_sorted))
        bounds, open_start = [0], 0  # open_start: first cell of the batch being filled
        for length, start, end in zip(values.tolist(), starts.tolist(), ends.tolist(), strict=True):
            cap = self.max_tokens // length
            if self.max_cells is not None:
                cap = min(cap, self.max_cells)
            if start - open_start >= cap:
                bounds.append(start)  # the open batch has no room for a cell this long
                open_start = start
            room = cap - (start - open_start)
            if end - start >= room:  # close the open batch, then full batches; the rest stays open
                pos = start + room
                full = (end - pos) // cap
                bounds.extend(range(pos, pos + cap * full + 1, cap))
                open_start = pos + cap * full
        if bounds[-1] != len(padded_sorted):
            bounds.append(len(padded_sorted))
        return bounds

    def _usable(self, epoch: int) -> int:
        n = len(self.global_batches(epoch))
        if n < self.world_size:
            raise ValueError(
                f"epoch {epoch} has {n} micro-batches, fewer than world_size={self.world_size}; "
                f"lower max_tokens/max_cells or use more cells"
            )
        return n - n % self.world_size

    def __len__(self) -> int:
        """Micro-batches per rank in a full epoch (the same on every rank)."""
        return self._usable(self.epoch) // self.world_size

    def set_epoch(self, epoch: int) -> None:
        """Moving to another epoch restarts at its beginning; the same epoch keeps a restored position."""
        if epoch != self.epoch:
            self.epoch, self.global_position = int(epoch), 0

    def rank_batches(self, epoch: int, start: int = 0) -> Iterator[tuple[int, np.ndarray]]:
        """(global batch index, cell indices) of this rank's batches in `epoch` from global position `start`."""
        batches = self.global_batches(epoch)
        usable = self._usable(epoch)
        for k in range(max(0, usable - start) // self.world_size):
            g = start + k * self.world_size + self.rank
            yield g, batches[g]

    def __iter__(self) -> Iterator[list[int]]:
        for g, batch in self.rank_batches(self.epoch, self.global_position):
            self.global_position = g - self.rank + self.world_size
            yield batch.tolist()

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "global_position": self.global_position,
            "seed": self.seed,
            "world_size": self.world_size,
            "max_tokens": self.max_tokens,
            "max_cells": self.max_cells,
            "pad_to_multiple_of": self.pad_to_multiple_of,
            "shuffle": self.shuffle,
            "fingerprint": self.fingerprint,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restores (epoch, global_position); any world size works as long as the batch plan is the same."""
        for key in ("seed", "max_tokens", "max_cells", "pad_to_multiple_of", "shuffle"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(
                    f"sampler state was saved with {key}={state[key]!r} but this run has "
                    f"{getattr(self, key)!r}; the batch plan would differ, so resume with the same {key}"
                )
        if "fingerprint" in state and state["fingerprint"] != self.fingerprint:
            raise ValueError(
                "sampler state was saved for other cells or lengths (corpus, max_length or held-out "
                "split changed); resume with the same corpus, max_length, heldout_fraction and split seed"
            )
        epoch, position = int(state["epoch"]), int(state["global_position"])
        total = len(self.global_batches(epoch))
        if not 0 <= position <= total:
            raise ValueError(
                f"sampler state position {position} is outside epoch {epoch}'s {total} micro-batches"
            )
        self.epoch, self.global_position = epoch, position
