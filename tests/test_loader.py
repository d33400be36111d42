"""CellBatchLoader: endless epochs, batch contents, exact resume (with and without workers),
finite held-out passes with fixed masks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dataset.builtin_corpus import write_builtin_corpus
from dataset.collator import MLMCollator
from dataset.corpus import CellCorpus
from dataset.sampler import TokenBudgetSampler
from dataset.split import split_indices
from dataset.vocab import Vocabulary


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader")
    path = write_builtin_corpus(root / "corpus", n_cells=300, n_shards=2)
    return CellCorpus(path, vocab_size=25426, max_length=512, cache_dir=root / "cache")


def make_loader(corpus, *, num_workers=0, rank=0, world_size=1, indices=None, shuffle=True, packed=False):
    from dataset.loader import CellBatchLoader

    indices = np.arange(len(corpus)) if indices is None else indices
    sampler = TokenBudgetSampler(
        corpus.lengths,
        indices,
        max_tokens=4096,
        max_cells=None,
        rank=rank,
        world_size=world_size,
        seed=11,
        shuffle=shuffle,
    )
    collator = MLMCollator(Vocabulary.synthetic(), seed=11, packed=packed)
    return CellBatchLoader(corpus, sampler, collator, num_workers=num_workers, rank=rank)


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a
    )


def test_batches_carry_cells_and_positions_and_run_over_epochs(corpus):
    loader = make_loader(corpus)
    per_epoch = len(loader.sampler)
    batches = [next(loader) for _ in range(per_epoch + 2)]
    assert [b["epoch"] for b in batches] == [0] * per_epoch + [1, 1]
    first = batches[0]
    for row, cell in enumerate(first["cell_index"].tolist()):
        n = int(corpus.lengths[cell])
        chosen = first["labels"][row, :n] != -100
        assert torch.equal(
            first["labels"][row, :n][chosen], torch.from_numpy(corpus[cell].astype(np.int64))[chosen]
        )
        assert int(first["attention_mask"][row].sum()) == n


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_yields_exactly_the_uninterrupted_batches(corpus, num_workers):
    reference = make_loader(corpus)
    expected = [next(reference) for _ in range(2 * len(reference.sampler) + 3)]
    loader = make_loader(corpus, num_workers=num_workers)
    cut = len(loader.sampler) + 1  # resume inside the second epoch
    head = [next(loader) for _ in range(cut)]
    state = loader.state_dict()  # workers have prefetched further; the state must not count those
    assert state["epoch"] == 1 and state["global_position"] == 1
    resumed = make_loader(corpus, num_workers=num_workers)
    resumed.load_state_dict(state)
    tail = [next(resumed) for _ in range(len(expected) - cut)]
    assert all(same(a, b) for a, b in zip(head + tail, expected, strict=True))


def test_state_at_an_epoch_boundary_resumes_in_the_next_epoch(corpus):
    loader = make_loader(corpus)
    for _ in range(len(loader.sampler)):
        next(loader)
    state = loader.state_dict()
    expected = next(loader)
    assert (state["epoch"], state["global_position"]) == (0, len(loader.sampler))
    resumed = make_loader(corpus)
    resumed.load_state_dict(state)
    assert same(next(resumed), expected)


def test_heldout_pass_is_finite_and_masks_are_fixed(corpus):
    _, heldout = split_indices(len(corpus), 0.2, seed=0)
    loader = make_loader(corpus, indices=heldout, shuffle=False)
    first = list(loader.epoch_batches())
    second = list(loader.epoch_batches())
    assert len(first) == len(loader.sampler) > 0
    assert all(same(a, b) for a, b in zip(first, second, strict=True))
    assert sorted(i for b in first for i in b["cell_index"].tolist()) == heldout.tolist()


def test_packed_batches_from_the_loader(corpus):
    batch = next(make_loader(corpus, packed=True))
    assert batch["input_ids"].shape[0] == 1
    assert int(batch["cu_seqlens"][-1]) == batch["input_ids"].shape[1]
    assert len(batch["cu_seqlens"]) == len(batch["cell_index"]) + 1
