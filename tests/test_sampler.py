"""TokenBudgetSampler: token budget, equal batch counts per rank, per-epoch shuffling, exact resume,
resume with another world size."""

from __future__ import annotations

import numpy as np
import pytest

from dataset.sampler import TokenBudgetSampler


def lengths_mix(n: int = 3000, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(np.log(300), 0.75, n), 32, 2048).astype(np.int32)


def make(
    lengths, *, rank=0, world_size=1, seed=0, max_tokens=8192, max_cells=None, shuffle=True, indices=None
):
    indices = np.arange(len(lengths)) if indices is None else indices
    return TokenBudgetSampler(
        lengths,
        indices,
        max_tokens=max_tokens,
        max_cells=max_cells,
        rank=rank,
        world_size=world_size,
        seed=seed,
        shuffle=shuffle,
        pad_to_multiple_of=8,
    )


def padded_size(lengths, batch):
    return len(batch) * int(-(-lengths[batch].max() // 8) * 8)


def test_budget_and_max_cells_are_respected_and_every_cell_appears_once():
    lengths = lengths_mix()
    sampler = make(lengths, max_tokens=4096, max_cells=16)
    batches = list(sampler)
    assert all(padded_size(lengths, b) <= 4096 and len(b) <= 16 for b in batches)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))  # world_size 1: nothing cut


def test_batches_hold_similar_lengths_so_padding_is_small():
    lengths = lengths_mix()
    batches = list(make(lengths, max_tokens=16384))
    pad = sum(padded_size(lengths, b) - lengths[b].sum() for b in batches)
    assert pad / sum(padded_size(lengths, b) for b in batches) < 0.05


def test_every_rank_gets_the_same_number_of_batches_and_ranks_do_not_overlap():
    lengths = lengths_mix(1000)
    for world_size in (1, 2, 3, 7):
        per_rank = [list(make(lengths, rank=r, world_size=world_size)) for r in range(world_size)]
        counts = {len(b) for b in per_rank}
        assert len(counts) == 1 and counts == {len(make(lengths, world_size=world_size))}
        seen = [i for batches in per_rank for b in batches for i in b]
        assert len(seen) == len(set(seen))


def test_the_global_plan_is_the_same_for_any_world_size():
    lengths = lengths_mix(1000)
    one = list(make(lengths, world_size=1))
    two = [list(make(lengths, rank=r, world_size=2)) for r in range(2)]
    interleaved = [b for pair in zip(*two, strict=True) for b in pair]
    assert interleaved == one[: len(interleaved)]


def test_shuffle_varies_by_epoch_and_is_fixed_by_seed():
    lengths = lengths_mix(1000)
    sampler = make(lengths, seed=5)
    epoch0 = list(sampler)
    sampler.set_epoch(1)
    epoch1 = list(sampler)
    assert epoch0 != epoch1
    again = make(lengths, seed=5)
    assert list(again) == epoch0
    assert list(make(lengths, seed=6)) != epoch0


def test_no_shuffle_gives_batches_in_length_order():
    lengths = lengths_mix(500)
    batches = list(make(lengths, shuffle=False))
    maxima = [lengths[b].max() for b in batches]
    assert maxima == sorted(maxima)


def test_state_save_and_restore_is_exact():
    lengths = lengths_mix(1000)
    sampler = make(lengths, rank=1, world_size=2, seed=3)
    sampler.set_epoch(2)
    it = iter(sampler)
    consumed = [next(it) for _ in range(5)]
    state = sampler.state_dict()
    assert state["epoch"] == 2 and state["global_position"] == 10
    rest = list(it)
    resumed = make(lengths, rank=1, world_size=2, seed=3)
    resumed.load_state_dict(state)
    resumed.set_epoch(2)  # the loader calls set_epoch; the same epoch keeps the restored position
    assert list(resumed) == rest
    assert len(consumed) + len(rest) == len(sampler)


def test_resume_with_another_world_size_continues_from_the_same_global_position():
    lengths = lengths_mix(1000)
    plan = list(make(lengths, world_size=1))
    old = [make(lengths, rank=r, world_size=2) for r in range(2)]
    for sampler in old:
        it = iter(sampler)
        for _ in range(3):
            next(it)
    state = old[0].state_dict()
    assert state["global_position"] == 6
    new = [make(lengths, rank=r, world_size=3) for r in range(3)]
    for sampler in new:
        sampler.load_state_dict(state)
    continued = [list(s) for s in new]
    assert len({len(c) for c in continued}) == 1
    interleaved = [b for triple in zip(*continued, strict=True) for b in triple]
    assert interleaved == plan[6 : 6 + len(interleaved)]


def test_resume_refuses_another_plan_with_a_reason():
    lengths = lengths_mix(500)
    state = make(lengths, seed=1).state_dict()
    with pytest.raises(ValueError, match="saved with seed=1 but this run has 2"):
        make(lengths, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="max_tokens"):
        make(lengths, seed=1, max_tokens=4096).load_state_dict(state)
    with pytest.raises(ValueError, match="other cells or lengths"):
        make(lengths, seed=1, indices=np.arange(400)).load_state_dict(state)


def test_budget_smaller_than_the_longest_cell_is_an_error():
    with pytest.raises(
        ValueError, match=r"max_tokens=100 is smaller than the longest cell .*\(2048 tokens\)"
    ):
        make(np.array([50, 2045]), max_tokens=100)


def test_bad_rank_is_an_error():
    with pytest.raises(ValueError, match="rank=2 must be in"):
        make(lengths_mix(10), rank=2, world_size=2)
