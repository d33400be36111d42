"""MLMCollator: the masking rules (15%, 80/10/10, never special tokens, at least one per cell),
determinism by (seed, epoch, batch_index, rank), padded and packed layouts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dataset.collator import MLMCollator
from dataset.vocab import Vocabulary

V1 = Vocabulary.synthetic(25426)
V2_LIKE = Vocabulary(("<pad>", "<mask>", "<cls>", "<eos>") + tuple(f"G{i}" for i in range(4, 1000)))


def random_cells(n=64, seed=0, lo=4, hi=400, vocab=V1):
    rng = np.random.default_rng(seed)
    return [
        rng.integers(vocab.first_gene_id, vocab.size, size=int(rng.integers(lo, hi))).astype(np.int32)
        for _ in range(n)
    ]


def test_about_15_percent_selected_and_80_10_10_split():
    cells = random_cells(400, hi=600)
    batch = MLMCollator(V1, seed=0)(cells, epoch=0, batch_index=0, rank=0)
    labels, ids, att = batch["labels"], batch["input_ids"], batch["attention_mask"]
    selected = labels != -100
    n_tokens = int(att.sum())
    assert abs(int(selected.sum()) / n_tokens - 0.15) < 0.01
    masked = (ids == V1.mask_id) & selected
    unchanged = (ids == labels) & selected
    random = selected & ~masked & ~unchanged
    n = int(selected.sum())
    assert abs(int(masked.sum()) / n - 0.8) < 0.02
    assert abs(int(unchanged.sum()) / n - 0.1) < 0.02 + 1 / V1.size
    assert abs(int(random.sum()) / n - 0.1) < 0.02
    assert bool((ids[random] >= V1.first_gene_id).all())  # random replacements are genes


def test_labels_hold_the_original_token_and_minus_100_elsewhere():
    cells = random_cells(8)
    batch = MLMCollator(V1, seed=1)(cells, epoch=0, batch_index=0, rank=0)
    for row, cell in enumerate(cells):
        labels = batch["labels"][row, : len(cell)]
        chosen = labels != -100
        assert torch.equal(labels[chosen], torch.from_numpy(cell.astype(np.int64))[chosen])
        assert bool((batch["labels"][row, len(cell) :] == -100).all())


def test_special_tokens_are_never_selected_and_replacements_are_genes():
    rng = np.random.default_rng(0)
    cells = [np.concatenate([[2], rng.integers(4, 1000, size=30), [3]]).astype(np.int32) for _ in range(300)]
    batch = MLMCollator(V2_LIKE, seed=0)(cells, epoch=0, batch_index=0, rank=0)
    selected = batch["labels"] != -100
    original = torch.full_like(batch["input_ids"], 0)
    for row, cell in enumerate(cells):
        original[row, : len(cell)] = torch.from_numpy(cell.astype(np.int64))
    assert not bool(torch.isin(original[selected], torch.tensor(V2_LIKE.special_ids)).any())
    changed = selected & (batch["input_ids"] != V2_LIKE.mask_id) & (batch["input_ids"] != original)
    assert bool((batch["input_ids"][changed] >= V2_LIKE.first_gene_id).all())
    assert bool((batch["input_ids"][:, 0] == 2).all())  # <cls> kept in place


def test_every_cell_gets_at_least_one_masked_token():
    cells = random_cells(500, lo=1, hi=4)  # short cells often draw no token at 15%
    batch = MLMCollator(V1, seed=0)(cells, epoch=0, batch_index=0, rank=0)
    assert bool(((batch["labels"] != -100).sum(dim=1) >= 1).all())


def test_a_cell_of_only_special_tokens_is_an_error():
    with pytest.raises(ValueError, match="cell 1 of the batch has no gene tokens"):
        MLMCollator(V2_LIKE)([np.array([2, 5, 3]), np.array([2, 3])], epoch=0, batch_index=0, rank=0)


def test_masks_are_a_pure_function_of_seed_epoch_batch_index_and_rank():
    cells = random_cells(16)
    collator = MLMCollator(V1, seed=7)
    first = collator(cells, epoch=1, batch_index=4, rank=2)
    again = MLMCollator(V1, seed=7)(cells, epoch=1, batch_index=4, rank=2)
    assert all(torch.equal(first[k], again[k]) for k in first)
    for other in (
        {"epoch": 2, "batch_index": 4, "rank": 2},
        {"epoch": 1, "batch_index": 5, "rank": 2},
        {"epoch": 1, "batch_index": 4, "rank": 3},
    ):
        assert not torch.equal(collator(cells, **other)["labels"], first["labels"])
    assert not torch.equal(
        MLMCollator(V1, seed=8)(cells, epoch=1, batch_index=4, rank=2)["labels"], first["labels"]
    )


def test_padding_to_a_multiple_and_attention_mask():
    cells = [np.arange(2, 12, dtype=np.int32), np.arange(2, 5, dtype=np.int32)]
    batch = MLMCollator(V1, pad_to_multiple_of=16)(cells, epoch=0, batch_index=0, rank=0)
    assert batch["input_ids"].shape == (2, 16) and batch["input_ids"].dtype == torch.long
    assert batch["attention_mask"].tolist() == [[1] * 10 + [0] * 6, [1] * 3 + [0] * 13]
    assert bool((batch["input_ids"][batch["attention_mask"] == 0] == V1.pad_id).all())


def test_packed_output_matches_the_padded_output():
    cells = random_cells(12)
    padded = MLMCollator(V1, seed=3)(cells, epoch=0, batch_index=9, rank=1)
    packed = MLMCollator(V1, seed=3, packed=True)(cells, epoch=0, batch_index=9, rank=1)
    real = padded["attention_mask"].bool()
    total = sum(len(c) for c in cells)
    assert packed["input_ids"].shape == (1, total)
    assert torch.equal(packed["input_ids"][0], padded["input_ids"][real])
    assert torch.equal(packed["labels"][0], padded["labels"][real])
    assert packed["cu_seqlens"].dtype == torch.int32
    assert packed["cu_seqlens"].tolist() == np.concatenate([[0], np.cumsum([len(c) for c in cells])]).tolist()
    assert packed["max_seqlen"] == max(len(c) for c in cells)
    assert torch.equal(packed["masked_positions"], torch.nonzero(packed["labels"][0] != -100).squeeze(1))
