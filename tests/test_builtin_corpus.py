"""Built-in synthetic corpus: valid Genecorpus-like cells, realistic length spread, cell-type programs whose
context predicts a masked gene far better than its rank, written once and atomically, and a command line."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq

from dataset.builtin_corpus import ensure_builtin_corpus, main, write_builtin_corpus
from dataset.collator import IGNORE_INDEX, MLMCollator
from dataset.corpus import CellCorpus
from dataset.vocab import Vocabulary


def test_corpus_is_valid_with_v1_vocabulary_and_cell_types(tmp_path):
    out = write_builtin_corpus(tmp_path / "c", n_cells=2000, n_shards=3, n_cell_types=5)
    assert len(list(out.glob("*.parquet"))) == 3
    vocab = Vocabulary.load(out / "vocab.txt")
    assert vocab.size == 25426 and vocab.pad_id == 0 and vocab.mask_id == 1
    corpus = CellCorpus(out, vocab_size=vocab.size, max_length=2048, cache_dir=tmp_path / "cache")
    assert len(corpus) == 2000
    assert set(corpus.column("cell_type")) == {f"cell_type_{t}" for t in range(5)}
    lengths = corpus.lengths
    assert lengths.min() >= 32 and lengths.max() <= 2048
    assert 250 < lengths.mean() < 600  # a few hundred tokens on average, as in Genecorpus-30M
    assert (lengths < 100).any() and (lengths > 1000).any()
    assert all(corpus[i].min() >= vocab.first_gene_id for i in range(0, 2000, 97))
    assert schema_names(out) == ["input_ids", "length", "cell_type"]


def schema_names(out):
    return pq.read_schema(sorted(out.glob("*.parquet"))[0]).names


def test_cell_types_have_distinct_gene_programs(tmp_path):
    out = write_builtin_corpus(tmp_path / "c", n_cells=600, n_cell_types=3, n_shards=1)
    corpus = CellCorpus(out, vocab_size=25426, max_length=2048, cache_dir=tmp_path / "cache")
    types = np.array(corpus.column("cell_type"))
    tops = [set(corpus[i][:50].tolist()) for i in range(len(corpus))]

    def overlap(a, b):
        return np.mean([len(tops[i] & tops[j]) / 50 for i, j in zip(a[:40], b[:40], strict=False)])

    same_a = np.flatnonzero(types == "cell_type_0")
    other = np.flatnonzero(types == "cell_type_1")
    within = overlap(same_a[:40], same_a[40:80])
    across = overlap(same_a[:40], other[:40])
    assert within > 0.6 and within > across + 0.1  # a cell's top genes tell its type: MLM is learnable


def test_generation_is_deterministic_by_seed(tmp_path):
    a = write_builtin_corpus(tmp_path / "a", n_cells=200, n_shards=1, seed=1)
    b = write_builtin_corpus(tmp_path / "b", n_cells=200, n_shards=1, seed=1)
    c = write_builtin_corpus(tmp_path / "c", n_cells=200, n_shards=1, seed=2)
    read = [pq.read_table(next(p.glob("*.parquet"))) for p in (a, b, c)]
    assert read[0].equals(read[1]) and not read[0].equals(read[2])


def test_ensure_creates_once_and_reuses(tmp_path):
    first = ensure_builtin_corpus(tmp_path, n_cells=100)
    stamp = (first / "vocab.txt").stat().st_mtime_ns
    assert ensure_builtin_corpus(tmp_path, n_cells=100) == first
    assert (first / "vocab.txt").stat().st_mtime_ns == stamp
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]  # no half-written leftovers


def test_command_line(tmp_path, capsys):
    main(["--out", str(tmp_path / "cli"), "--cells", "50", "--shards", "2"])
    assert "wrote 50 cells" in capsys.readouterr().out
    assert len(list((tmp_path / "cli").glob("*.parquet"))) == 2


def test_the_other_genes_of_a_cell_predict_a_masked_gene_far_better_than_its_rank(tmp_path):
    """A simple context predictor (the cell's type, read from its unmasked genes, then the most frequent gene of
    that type at the masked rank) scores at least 3x the rank-position baseline on the same masked tokens."""
    out = write_builtin_corpus(tmp_path / "c", n_cells=1500, n_shards=1)
    corpus = CellCorpus(out, vocab_size=25426, max_length=256, cache_dir=tmp_path / "cache")
    vocab = Vocabulary.load(out / "vocab.txt")
    train, heldout = np.arange(1200), np.arange(1200, 1500)
    n_types = len(set(corpus.column("cell_type")))
    types = np.array([int(name.rsplit("_", 1)[1]) for name in corpus.column("cell_type")])
    by_type_rank = np.zeros((n_types, 256, vocab.size), dtype=np.int32)
    for i in train:
        by_type_rank[types[i], np.arange(corpus.lengths[i]), corpus[i]] += 1
    type_of_gene = by_type_rank.sum(1).argmax(0)  # the type in whose cells a gene is seen most
    context_table, rank_table = by_type_rank.argmax(2), by_type_rank.sum(0).argmax(1)
    batch = MLMCollator(vocab, seed=7).fixed_masks([corpus[i] for i in heldout], heldout)
    hits = {"context": 0, "rank": 0}
    n_masked = 0
    for row, cell in enumerate(heldout):
        labels = batch["labels"][row].numpy()
        masked = np.flatnonzero(labels != IGNORE_INDEX)
        visible = np.setdiff1d(corpus[cell], labels[masked])
        guessed_type = np.bincount(type_of_gene[visible], minlength=n_types).argmax()
        hits["context"] += int((context_table[guessed_type, masked] == labels[masked]).sum())
        hits["rank"] += int((rank_table[masked] == labels[masked]).sum())
        n_masked += len(masked)
    context, rank = hits["context"] / n_masked, hits["rank"] / n_masked
    assert context >= 3 * rank, (context, rank)
    assert rank > 0.01  # rank position still carries some signal, as in real rank-value cells
