"""Masked-LM collator: pads (or packs) cells into tensors and masks 15% of gene tokens, BERT-style.

Training masks are a pure function of (seed, epoch, batch_index, rank), so a resumed run masks identically;
held-out masks (`fixed_masks`) of (seed, cell id), so every batching and world size scores the same tokens.
"""

from __future__ import annotations

import numpy as np
import torch

from dataset.batch import IGNORE_INDEX
from dataset.static_shape import StaticShape, fill_to_static_shape
from dataset.vocab import Vocabulary


class MLMCollator:
    """Selects each gene token with probability `mask_prob` (at least one per cell); of those 80% become
    `<mask>`, 10% a random gene, 10% stay. Special tokens are never selected; labels are -100 elsewhere.

    Padded output: input_ids / attention_mask / labels [B, S], S rounded up to `pad_to_multiple_of`.
    Packed output (`packed=True`): [1, T] with no padding, `cu_seqlens` (int32 [B+1]), `max_seqlen` and
    `masked_positions` (the flat indices of the labelled tokens, found here so the GPU need not be asked).
    Packed with a `static_shape`: the same shapes every batch (see dataset.static_shape), for CUDA graphs.
    """

    def __init__(
        self,
        vocab: Vocabulary,
        *,
        mask_prob: float = 0.15,
        pad_to_multiple_of: int = 8,
        packed: bool = False,
        static_shape: StaticShape | None = None,
        seed: int = 0,
    ) -> None:
        if not 0.0 < mask_prob < 1.0:
            raise ValueError(f"mask_prob must be in (0, 1), got {mask_prob}; Geneformer uses 0.15")
        if pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
        if static_shape is not None and not packed:
            raise ValueError(
                "static shapes are for packed batches; set data.packed=true with training.cuda_graphs"
            )
        self.vocab = vocab
        self.mask_prob = mask_prob
        self.pad_to_multiple_of = pad_to_multiple_of
        self.packed = packed
        self.static_shape = static_shape
        self.seed = int(seed)
        self.special_ids = np.array(vocab.special_ids, dtype=np.int64)
        self.first_gene_id = vocab.first_gene_id
        self.vocab_size = vocab.size

    def rng(self, epoch: int, batch_index: int, rank: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, epoch, batch_index, rank])

    def __call__(
        self, cells: list[np.ndarray], *, epoch: int, batch_index: int, rank: int
    ) -> dict[str, torch.Tensor | int]:
        if not cells:
            raise ValueError("MLMCollator got an empty list of cells")
        lengths = np.fromiter((len(c) for c in cells), dtype=np.int64, count=len(cells))
        flat = np.concatenate(cells).astype(np.int64, copy=False)
        input_ids, labels = self._mask(flat, lengths, self.rng(epoch, batch_index, rank))
        if self.static_shape is not None:
            return fill_to_static_shape(input_ids, labels, lengths, self.static_shape, self.vocab.pad_id)
        if self.packed:
            return self._packed(input_ids, labels, lengths)
        return self._padded(input_ids, labels, lengths)

    def fixed_masks(
        self, cells: list[np.ndarray], cell_ids: np.ndarray | list[int]
    ) -> dict[str, torch.Tensor | int]:
        """Held-out masks: each cell's mask is a pure function of (seed, its corpus id), so any batching,
        world size or tool scores exactly the same tokens."""
        if len(cells) != len(cell_ids):
            raise ValueError(f"fixed_masks got {len(cells)} cells but {len(cell_ids)} cell ids")
        if not cells:
            raise ValueError("MLMCollator got an empty list of cells")
        lengths = np.fromiter((len(c) for c in cells), dtype=np.int64, count=len(cells))
        masked = [
            self._mask(
                np.asarray(c, dtype=np.int64),
                lengths[i : i + 1],
                np.random.default_rng([self.seed, int(cell_id)]),
            )
            for i, (c, cell_id) in enumerate(zip(cells, cell_ids, strict=True))
        ]
        input_ids, labels = (np.concatenate(parts) for parts in zip(*masked, strict=True))
        if self.packed:
            return self._packed(input_ids, labels, lengths)
        return self._padded(input_ids, labels, lengths)

    def _mask(self, flat: np.ndarray, lengths: np.ndarray, rng: np.random.Generator):
        cell_of = np.repeat(np.arange(len(lengths)), lengths)
        candidate = ~np.isin(flat, self.special_ids) if len(self.special_ids) else np.ones(len(flat), bool)
        selected = candidate & (rng.random(len(flat)) < self.mask_prob)
        # Every cell contributes at least one masked token, so no cell goes without a loss term.
        n_candidates = np.bincount(cell_of, weights=candidate, minlength=len(lengths)).astype(np.int64)
        if not n_candidates.all():
            bad = int(np.flatnonzero(n_candidates == 0)[0])
            raise ValueError(
                f"cell {bad} of the batch has no gene tokens (only special tokens); "
                f"drop such cells from the corpus"
            )
        missing = np.flatnonzero(np.bincount(cell_of[selected], minlength=len(lengths)) == 0)
        if len(missing):
            cand_pos = np.flatnonzero(candidate)
            cand_start = np.concatenate([[0], np.cumsum(n_candidates)[:-1]])
            pick = (rng.random(len(missing)) * n_candidates[missing]).astype(np.int64)
            selected[cand_pos[cand_start[missing] + pick]] = True
        labels = np.full(len(flat), IGNORE_INDEX, dtype=np.int64)
        labels[selected] = flat[selected]
        sel = np.flatnonzero(selected)
        action = rng.random(len(sel))
        input_ids = flat.copy()
        input_ids[sel[action < 0.8]] = self.vocab.mask_id
        to_random = sel[(action >= 0.8) & (action < 0.9)]
        input_ids[to_random] = rng.integers(self.first_gene_id, self.vocab_size, size=len(to_random))
        return input_ids, labels

    def _padded(self, input_ids: np.ndarray, labels: np.ndarray, lengths: np.ndarray) -> dict:
        m = self.pad_to_multiple_of
        width = int(-(-lengths.max() // m) * m)
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        rows = np.repeat(np.arange(len(lengths)), lengths)
        cols = np.arange(len(input_ids)) - np.repeat(starts, lengths)
        ids = np.full((len(lengths), width), self.vocab.pad_id, dtype=np.int64)
        lab = np.full((len(lengths), width), IGNORE_INDEX, dtype=np.int64)
        att = np.zeros((len(lengths), width), dtype=np.int64)
        ids[rows, cols] = input_ids
        lab[rows, cols] = labels
        att[rows, cols] = 1
        return {
            "input_ids": torch.from_numpy(ids),
            "attention_mask": torch.from_numpy(att),
            "labels": torch.from_numpy(lab),
        }

    def _packed(self, input_ids: np.ndarray, labels: np.ndarray, lengths: np.ndarray) -> dict:
        cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        return {
            "input_ids": torch.from_numpy(input_ids).unsqueeze(0),
            "attention_mask": torch.ones(1, len(input_ids), dtype=torch.long),
            "labels": torch.from_numpy(labels).unsqueeze(0),
            "cu_seqlens": torch.from_numpy(cu),
            "max_seqlen": int(lengths.max()),
            "masked_positions": torch.from_numpy(np.flatnonzero(labels != IGNORE_INDEX)),
        }
