"""CellCorpus: reading parquet files, shard dirs and Arrow dirs; the index cache; every validation error.

Real cells come from ../shared/data/genecorpus_500_samples.parquet when present.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dataset.corpus import CellCorpus
from dataset.split import split_indices

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SAMPLE = SHARED / "genecorpus_500_samples.parquet"
needs_sample = pytest.mark.skipif(
    not SAMPLE.exists(), reason=f"{SAMPLE} (real Genecorpus cells) is not present"
)


def write_cells(path: Path, cells: list[list[int]], lengths: list[int] | None = None, **extra) -> Path:
    columns = {"input_ids": pa.array(cells, type=pa.list_(pa.int64()))}
    columns["length"] = pa.array([len(c) for c in cells] if lengths is None else lengths, type=pa.int64())
    columns.update({k: pa.array(v) for k, v in extra.items()})
    pq.write_table(pa.table(columns), path)
    return path


@needs_sample
def test_real_cells_read_back_exactly_and_truncation_is_counted(tmp_path, caplog):
    table = pq.read_table(SAMPLE)
    with caplog.at_level(logging.WARNING, logger="dataset.corpus"):
        corpus = CellCorpus(SAMPLE, vocab_size=25426, max_length=2040, cache_dir=tmp_path)
    assert len(corpus) == 500
    first = table.column("input_ids")[7].as_py()
    np.testing.assert_array_equal(corpus[7], first[:2040])
    assert corpus[-1].dtype == np.int32
    full = np.array(table.column("length").to_pylist())
    assert corpus.n_truncated == int((full > 2040).sum()) > 0
    np.testing.assert_array_equal(corpus.lengths, np.minimum(full, 2040))
    assert "truncated" in caplog.text and str(corpus.n_truncated) in caplog.text
    np.testing.assert_array_equal(corpus.column("length"), full)


def test_dir_of_shards_keeps_order_and_extra_columns(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    write_cells(data / "a.parquet", [[2, 3], [4, 5, 6]], cell_type=["B", "T"])
    write_cells(data / "b.parquet", [[7]], cell_type=["NK"])
    corpus = CellCorpus(data, vocab_size=10, max_length=8, cache_dir=tmp_path / "cache")
    assert [c.tolist() for c in corpus] == [[2, 3], [4, 5, 6], [7]]
    assert corpus.column("cell_type") == ["B", "T", "NK"]
    assert corpus.column_names == ["input_ids", "length", "cell_type"]
    assert corpus.locate(2) == (data / "b.parquet", 0)


def test_hf_save_to_disk_arrow_dir(tmp_path):
    # The layout `datasets.Dataset.save_to_disk` writes: Arrow IPC stream shards listed in state.json.
    arrow = tmp_path / "arrow"
    arrow.mkdir()
    shards = [
        {"input_ids": [[2, 3, 4], [5, 6]], "length": [3, 2], "donor": ["x", "y"]},
        {"input_ids": [[7]], "length": [1], "donor": ["z"]},
    ]
    for k, shard in enumerate(shards):
        table = pa.table(shard)
        with (
            pa.OSFile(str(arrow / f"data-0000{k}-of-00002.arrow"), "wb") as sink,
            pa.ipc.new_stream(sink, table.schema) as writer,
        ):
            writer.write_table(table)
    (arrow / "state.json").write_text(
        '{"_data_files": [{"filename": "data-00000-of-00002.arrow"}, {"filename": "data-00001-of-00002.arrow"}]}'
    )
    (arrow / "dataset_info.json").write_text("{}")
    corpus = CellCorpus(arrow, vocab_size=10, max_length=8, cache_dir=tmp_path / "cache")
    assert [c.tolist() for c in corpus] == [[2, 3, 4], [5, 6], [7]]
    assert corpus.column("donor") == ["x", "y", "z"]


def test_index_is_reused_and_rebuilt_when_the_source_changes(tmp_path):
    path = write_cells(tmp_path / "c.parquet", [[2, 3], [4]])
    corpus = CellCorpus(path, vocab_size=10, max_length=8, cache_dir=tmp_path / "cache")
    built = (corpus.index_dir / "meta.json").stat().st_mtime_ns
    again = CellCorpus(path, vocab_size=10, max_length=8, cache_dir=tmp_path / "cache")
    assert (again.index_dir / "meta.json").stat().st_mtime_ns == built
    write_cells(path, [[5, 6, 7]])
    os.utime(path, ns=(built + 10**9, built + 10**9))
    changed = CellCorpus(path, vocab_size=10, max_length=8, cache_dir=tmp_path / "cache")
    assert [c.tolist() for c in changed] == [[5, 6, 7]]


def test_random_access_is_out_of_range_checked(tmp_path):
    corpus = CellCorpus(
        write_cells(tmp_path / "c.parquet", [[2]]), vocab_size=10, max_length=8, cache_dir=tmp_path
    )
    with pytest.raises(IndexError, match="out of range"):
        corpus[1]


@pytest.mark.parametrize(
    ("table", "match"),
    [
        (pa.table({"tokens": [[2, 3]]}), r"no 'input_ids' column .*rename"),
        (pa.table({"input_ids": ["2 3"]}), r"'input_ids' has type string; it must be a list of integers"),
        (pa.table({"input_ids": [[2.0, 3.0]]}), r"'input_ids' has type list<\w+: double>"),
        (
            pa.table({"input_ids": [[2, 3]], "length": ["2"]}),
            r"'length' has type string; it must be an integer",
        ),
        (
            pa.table({"input_ids": [[2, 3], []], "length": [2, 0]}),
            r"row 1 \(0-based\) has an empty input_ids.*drop",
        ),
        (pa.table({"input_ids": [[2, 3], None]}), r"row 1 \(0-based\) has a null input_ids"),
        (
            pa.table({"input_ids": [[2, 3], [4, 10]]}),
            r"row 1 \(0-based\) has input_ids token 10 outside \[0, 10\)",
        ),
        (pa.table({"input_ids": [[2, -1]]}), r"row 0 \(0-based\) has input_ids token -1 outside"),
        (
            pa.table({"input_ids": [[2, 3], [4]], "length": [2, 3]}),
            r"row 1 \(0-based\) has length 3 but 1 input_ids; recompute the length column",
        ),
    ],
)
def test_validation_errors_name_file_row_and_fix(tmp_path, table, match):
    path = tmp_path / "bad.parquet"
    pq.write_table(table, path)
    with pytest.raises(ValueError, match=match) as err:
        CellCorpus(path, vocab_size=10, max_length=8, cache_dir=tmp_path / "cache")
    assert str(path) in str(err.value)


def test_a_smaller_vocabulary_than_the_index_was_built_for_is_caught(tmp_path):
    path = write_cells(tmp_path / "c.parquet", [[2, 3], [4, 9]])
    CellCorpus(path, vocab_size=10, max_length=8, cache_dir=tmp_path / "cache")
    with pytest.raises(
        ValueError, match=r"c.parquet: row 1 \(0-based\) has input_ids token 9 outside \[0, 5\)"
    ):
        CellCorpus(path, vocab_size=5, max_length=8, cache_dir=tmp_path / "cache")


def test_missing_path_and_dataset_dict_are_explained(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        CellCorpus(tmp_path / "nope", vocab_size=10, max_length=8, cache_dir=tmp_path)
    (tmp_path / "dd").mkdir()
    (tmp_path / "dd" / "dataset_dict.json").write_text('{"splits": ["train"]}')
    with pytest.raises(ValueError, match="DatasetDict; pass one split directory"):
        CellCorpus(tmp_path / "dd", vocab_size=10, max_length=8, cache_dir=tmp_path)


def test_corpus_pickles_for_dataloader_workers(tmp_path):
    import pickle

    corpus = CellCorpus(
        write_cells(tmp_path / "c.parquet", [[2, 3]]), vocab_size=10, max_length=8, cache_dir=tmp_path
    )
    corpus[0]
    assert pickle.loads(pickle.dumps(corpus))[0].tolist() == [2, 3]


def test_split_is_deterministic_disjoint_and_independent_of_world_size():
    train, heldout = split_indices(10_000, 0.05, seed=3)
    assert len(heldout) == 500 and len(train) == 9_500
    assert np.intersect1d(train, heldout).size == 0
    np.testing.assert_array_equal(np.union1d(train, heldout), np.arange(10_000))
    again_train, again_heldout = split_indices(10_000, 0.05, seed=3)  # e.g. computed on another rank
    np.testing.assert_array_equal(heldout, again_heldout)
    np.testing.assert_array_equal(train, again_train)
    assert not np.array_equal(split_indices(10_000, 0.05, seed=4)[1], heldout)
    assert len(split_indices(10, 0.01, seed=0)[1]) == 1  # a positive fraction always holds out a cell
    with pytest.raises(ValueError, match="heldout_fraction"):
        split_indices(10, 1.0, seed=0)
