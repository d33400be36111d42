"""Trivial masked-LM baselines: exact counts on a hand-made corpus, scoring on padded and packed held-out
batches, the cache beside the corpus index, and a clear error when nothing is masked."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import dataset.baselines as baselines_module
from dataset.baselines import FrequencyBaselines, cached_baselines, count_baselines, heldout_hits
from dataset.collator import IGNORE_INDEX, MLMCollator
from dataset.corpus import CellCorpus
from dataset.vocab import Vocabulary

VOCAB = Vocabulary.synthetic(20)  # <pad> 0, <mask> 1, genes 2..19
CELLS = [
    [5, 6, 7, 8],
    [5, 7, 6],
    [9, 6, 7, 8, 10],
    [5, 6, 9],
    [11, 12, 13],  # held out: counted by no baseline
]


def _corpus(tmp_path, cells=CELLS, max_length=8) -> CellCorpus:
    pq.write_table(pa.table({"input_ids": pa.array(cells, pa.list_(pa.int32()))}), tmp_path / "cells.parquet")
    return CellCorpus(
        tmp_path / "cells.parquet", vocab_size=VOCAB.size, max_length=max_length, cache_dir=tmp_path / "cache"
    )


def test_baselines_are_the_most_frequent_gene_overall_and_at_each_rank_of_the_training_cells(tmp_path):
    found = count_baselines(_corpus(tmp_path), np.arange(4), VOCAB.special_ids)
    assert found.unigram == 6  # 6 appears 4 times in the training cells; 5 and 7 three times
    assert found.by_rank.tolist() == [5, 6, 7, 8, 10]  # rank 0: 5 (3 of 4 cells); rank 1: 6 (3 of 4)
    assert found.uniform_loss == pytest.approx(math.log(20))


def test_cells_are_cut_to_max_length_and_special_tokens_are_not_counted(tmp_path):
    cells = [[2, 5, 6, 7], [2, 5, 8, 9], [2, 6, 8, 9]]  # 2 plays <cls>, first in every cell as in V2 corpora
    found = count_baselines(_corpus(tmp_path, cells, max_length=3), np.arange(3), (*VOCAB.special_ids, 2))
    assert found.by_rank.tolist() == [-1, 5, 8]  # rank 0 only ever holds <cls>, which is never masked
    assert found.unigram in (5, 6, 8)


def test_held_out_scoring_counts_hits_at_the_masked_positions_of_padded_and_packed_batches():
    baselines = FrequencyBaselines(unigram=6, by_rank=np.array([5, 6, 7, 8, 10]), vocab_size=20)
    labels = np.full((2, 8), IGNORE_INDEX)
    labels[0, [0, 2, 3]] = [5, 9, 8]  # cells of 4 and 3 genes; rank hits at 0 and 3
    labels[1, [1, 2]] = [6, 7]  # unigram hit at 1, rank hits at 1 and 2
    padded = {"labels": torch.from_numpy(labels)}
    assert heldout_hits(baselines, [padded]).tolist() == [5, 1, 4]
    packed_labels = np.concatenate([labels[0, :4], labels[1, :3]])[None]
    packed = {
        "labels": torch.from_numpy(packed_labels),
        "cu_seqlens": torch.tensor([0, 4, 7], dtype=torch.int32),
    }
    assert heldout_hits(baselines, [packed]).tolist() == [5, 1, 4]


def test_masked_tokens_beyond_every_training_cell_count_as_misses():
    baselines = FrequencyBaselines(unigram=6, by_rank=np.array([5]), vocab_size=20)
    labels = torch.tensor([[5, 5, IGNORE_INDEX]])
    assert heldout_hits(baselines, [{"labels": labels}]).tolist() == [2, 0, 1]


def test_baselines_are_cached_beside_the_corpus_index_and_read_back(tmp_path, monkeypatch):
    corpus = _corpus(tmp_path)
    first = cached_baselines(corpus, np.arange(4), VOCAB.special_ids)
    assert len(list(corpus.index_dir.glob("baselines-*.npz"))) == 1
    monkeypatch.setattr(baselines_module, "count_baselines", lambda *a: pytest.fail("counted twice"))
    again = cached_baselines(corpus, np.arange(4), VOCAB.special_ids)
    assert again.unigram == first.unigram and again.by_rank.tolist() == first.by_rank.tolist()
    assert not [p for p in corpus.index_dir.iterdir() if ".tmp-" in p.name]


def test_another_training_split_gets_its_own_cache(tmp_path):
    corpus = _corpus(tmp_path)
    assert cached_baselines(corpus, np.arange(4), VOCAB.special_ids).unigram == 6
    assert cached_baselines(corpus, np.array([4]), VOCAB.special_ids).by_rank.tolist() == [11, 12, 13, -1, -1]


def test_a_held_out_split_without_masked_tokens_names_the_setting_to_change():
    baselines = FrequencyBaselines(unigram=6, by_rank=np.array([5]), vocab_size=20)
    with pytest.raises(ValueError, match="data.heldout_fraction"):
        baselines.metrics(heldout_hits(baselines, []))


def test_no_training_cells_names_the_setting_to_change(tmp_path):
    with pytest.raises(ValueError, match="data.heldout_fraction"):
        count_baselines(_corpus(tmp_path), np.zeros(0, np.int64), VOCAB.special_ids)


def test_scores_equal_a_direct_count_on_collated_held_out_cells(tmp_path):
    corpus = _corpus(tmp_path)
    found = count_baselines(corpus, np.arange(4), VOCAB.special_ids)
    batch = MLMCollator(VOCAB, mask_prob=0.5, seed=3).fixed_masks([corpus[i] for i in range(5)], np.arange(5))
    labels = batch["labels"].numpy()
    rows, ranks = np.nonzero(labels != IGNORE_INDEX)
    genes = labels[rows, ranks]
    expected_rank = sum(int(r < 5 and found.by_rank[r] == g) for r, g in zip(ranks, genes, strict=True))
    assert heldout_hits(found, [batch]).tolist() == [len(genes), int((genes == 6).sum()), expected_rank]
