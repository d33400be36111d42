"""The cells to embed, in chunks of consecutive input rows: from a tokenized corpus, or raw counts tokenized on the fly.

Chunk k is rows [k * chunk_cells, (k + 1) * chunk_cells); cells the tokenizer filters out are absent from `rows`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

from dataset.corpus import CellCorpus, truncate_cell
from dataset.prepare.tokenize import encode_counts
from dataset.vocab import Vocabulary

log = logging.getLogger(__name__)
COUNT_SUFFIXES = (".h5ad", ".loom", ".csv", ".tsv", ".txt", ".csv.gz", ".tsv.gz", ".txt.gz")


@dataclass
class CellChunk:
    index: int
    rows: np.ndarray  # int64 input rows of the cells to embed, ascending
    cells: list[np.ndarray]  # their token ids, truncated to the model's positions


def is_count_file(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(COUNT_SUFFIXES)


class CorpusCells:
    """A tokenized corpus (parquet / Arrow, as training reads it); every cell is embedded."""

    format = "corpus"

    def __init__(
        self, path: Path, vocab: Vocabulary, max_length: int, chunk_cells: int, cache_dir: str | None = None
    ) -> None:
        check_corpus_vocabulary(path, vocab)
        self.corpus = CellCorpus(
            path, vocab_size=vocab.size, max_length=max_length, cache_dir=cache_dir, ends=vocab.cell_ends
        )
        self.chunk_cells = chunk_cells
        self.n_rows = len(self.corpus)

    def chunks(self, wanted: Callable[[int], bool]) -> Iterator[CellChunk]:
        for k in range(-(-self.n_rows // self.chunk_cells)):
            if wanted(k):
                rows = np.arange(
                    k * self.chunk_cells, min((k + 1) * self.chunk_cells, self.n_rows), dtype=np.int64
                )
                yield CellChunk(k, rows, self.corpus.get_many(rows))

    def columns(self) -> dict[str, np.ndarray | list]:
        """Per-cell columns for the output: every corpus column except the tokens (cell_id, cell_type, ...)."""
        return {
            c: self.corpus.column(c) for c in self.corpus.column_names if c not in ("input_ids", "length")
        }


def check_corpus_vocabulary(path: Path, vocab: Vocabulary) -> None:
    """A corpus's vocab.txt (written beside it by the tokenizer) must be the model's, token for token."""
    beside = (path if path.is_dir() else path.parent) / "vocab.txt"
    if not beside.is_file():
        log.warning(
            "%s has no vocab.txt beside it: cannot check it was tokenized with the model's vocabulary "
            "(token ids are only range-checked)",
            path,
        )
        return
    theirs = Vocabulary.load(beside)
    if theirs.tokens != vocab.tokens:
        differ = next(
            (i for i, (a, b) in enumerate(zip(theirs.tokens, vocab.tokens, strict=False)) if a != b),
            min(theirs.size, vocab.size),
        )
        raise ValueError(
            f"{path} was tokenized with another vocabulary ({beside}: {theirs.size} tokens, first "
            f"difference at id {differ}) than the model's ({vocab.size} tokens); tokenize the raw "
            "counts again with the model's vocab.txt, or give the raw counts to embed directly"
        )


class CountCells:
    """Raw counts (.h5ad, .loom, CSV/TSV) tokenized chunk by chunk with the model's vocabulary."""

    def __init__(
        self, path: Path, vocab: Vocabulary, max_length: int, chunk_cells: int, options: dict
    ) -> None:
        self.path, self.vocab, self.max_length, self.chunk_cells = path, vocab, max_length, chunk_cells
        self.options = options
        self.format = path.name.lower().removesuffix(".gz").rsplit(".", 1)[-1]
        self.obs = input_obs(path, self.format)
        self.n_rows = len(self.obs)
        self._wanted: Callable[[int], bool] = lambda k: True
        # Opened now, so that a gene list without vocabulary genes is refused before any work starts.
        self._encoded = encode_counts(
            path, vocab=vocab, chunk_size=chunk_cells, skip_chunk=lambda k: not self._wanted(k), **options
        )

    def chunks(self, wanted: Callable[[int], bool]) -> Iterator[CellChunk]:
        """This source's one pass over the input: the chunks `wanted(k)`, tokenized (the others are skipped)."""
        self._wanted = wanted
        for chunk in self._encoded:
            if wanted(chunk.index):
                yield CellChunk(
                    chunk.index,
                    chunk.rows,
                    [truncate_cell(c, self.max_length, self.vocab.cell_ends) for c in chunk.cells],
                )

    def columns(self) -> dict[str, np.ndarray | list]:
        """cell_id and, for an .h5ad, every obs column (categories as strings, missing values as null)."""
        columns = {"cell_id": [str(v) for v in self.obs.index]}
        for name in self.obs.columns:
            values = self.obs[name]
            numeric = pd.api.types.is_numeric_dtype(values) or pd.api.types.is_bool_dtype(values)
            columns[name] = values.to_numpy() if numeric else [None if pd.isna(v) else str(v) for v in values]
        return columns


def input_obs(path: Path, fmt: str) -> pd.DataFrame:
    """Every input cell in row order, indexed by its id: obs (.h5ad), CellID (.loom, else the row number), or a
    table's first column."""
    if fmt == "h5ad":
        from anndata.io import read_elem

        with h5py.File(path, "r") as f:
            return read_elem(f["obs"])
    if fmt == "loom":
        with h5py.File(path, "r") as f:
            attrs = f["col_attrs"]
            if "CellID" in attrs:
                ids = [v.decode() if isinstance(v, bytes) else str(v) for v in attrs["CellID"][:]]
            else:
                ids = [str(i) for i in range(f["matrix"].shape[1])]
        return pd.DataFrame(index=ids)
    sep = "," if fmt == "csv" else "\t"
    return pd.DataFrame(index=pd.read_csv(path, sep=sep, usecols=[0]).iloc[:, 0].astype(str))
