"""Held-out batches: every chosen cell scored once, the same batch count on every rank, and each cell's mask
a pure function of (eval seed, cell id), so any token budget or world size scores exactly the same tokens."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dataset.builtin_corpus import write_builtin_corpus
from dataset.collator import IGNORE_INDEX, MLMCollator
from dataset.corpus import CellCorpus
from dataset.heldout import HeldoutBatches
from dataset.vocab import Vocabulary


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("heldout")
    path = write_builtin_corpus(root / "corpus", n_cells=120, n_shards=1)
    return CellCorpus(path, vocab_size=25426, max_length=256, cache_dir=root / "cache")


def _masked_by_cell(corpus, cells, *, max_tokens, world_size, packed=False) -> dict[int, tuple]:
    """cell id -> (input ids, labels) over the batches of every rank."""
    collate = MLMCollator(Vocabulary.synthetic(), seed=1234, packed=packed).fixed_masks
    found = {}
    for rank in range(world_size):
        for batch in HeldoutBatches(
            corpus,
            cells,
            collate,
            max_tokens=max_tokens,
            max_cells=None,
            pad_to_multiple_of=8,
            rank=rank,
            world_size=world_size,
        ).epoch_batches():
            ids, labels = batch["input_ids"], batch["labels"]
            starts = batch["cu_seqlens"].tolist() if packed else None
            for row, cell in enumerate(batch["cell_index"].tolist()):
                n = int(corpus.lengths[cell])
                if packed:
                    a = starts[row]
                    found[cell] = (ids[0, a : a + n].tolist(), labels[0, a : a + n].tolist())
                else:
                    found[cell] = (ids[row, :n].tolist(), labels[row, :n].tolist())
    return found


def test_each_cells_mask_is_the_same_for_any_token_budget_world_size_and_layout(corpus):
    cells = np.arange(0, 120, 3)
    reference = _masked_by_cell(corpus, cells, max_tokens=4096, world_size=1)
    assert sorted(reference) == cells.tolist()
    assert sum(sum(label != IGNORE_INDEX for label in labels) for _, labels in reference.values()) > 100
    assert _masked_by_cell(corpus, cells, max_tokens=512, world_size=1) == reference
    assert _masked_by_cell(corpus, cells, max_tokens=1024, world_size=2) == reference
    assert _masked_by_cell(corpus, cells, max_tokens=2048, world_size=3, packed=True) == reference


def test_every_rank_gets_the_same_number_of_batches_and_no_cell_is_dropped(corpus):
    cells = np.arange(37)
    collate = MLMCollator(Vocabulary.synthetic(), seed=0).fixed_masks
    per_rank = [
        list(
            HeldoutBatches(
                corpus,
                cells,
                collate,
                max_tokens=2048,
                max_cells=None,
                pad_to_multiple_of=8,
                rank=rank,
                world_size=4,
            ).epoch_batches()
        )
        for rank in range(4)
    ]
    assert len({len(batches) for batches in per_rank}) == 1
    scored = np.sort(np.concatenate([b["cell_index"].numpy() for batches in per_rank for b in batches]))
    assert scored.tolist() == cells.tolist()


def test_another_eval_seed_masks_other_tokens(corpus):
    cells = [corpus[i] for i in range(4)]
    a = MLMCollator(Vocabulary.synthetic(), seed=1).fixed_masks(cells, [0, 1, 2, 3])
    b = MLMCollator(Vocabulary.synthetic(), seed=2).fixed_masks(cells, [0, 1, 2, 3])
    assert not torch.equal(a["labels"], b["labels"])


def test_fewer_held_out_cells_than_ranks_names_the_setting_to_change(corpus):
    collate = MLMCollator(Vocabulary.synthetic(), seed=0).fixed_masks
    with pytest.raises(ValueError, match="eval.max_cells"):
        HeldoutBatches(
            corpus,
            np.arange(3),
            collate,
            max_tokens=4096,
            max_cells=None,
            pad_to_multiple_of=8,
            rank=0,
            world_size=4,
        )
