"""Tokenize raw single-cell counts into the corpus format: parquet shards of rank-value encoded cells.

`python -m dataset.prepare.tokenize INPUT... --out DIR` or `tokenize_counts(...)`; writes shards, vocab.txt, manifest.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import scipy.sparse as sp

from dataset.prepare.count_checks import NEAR_INTEGER, check_counts
from dataset.prepare.count_readers import CELL_ID, CountSource, open_counts
from dataset.prepare.gene_medians import NonzeroMedians
from dataset.prepare.gene_tables import (
    GeneColumnMap,
    build_column_map,
    load_gene_mapping,
    load_medians,
    load_symbol_table,
    load_vocabulary,
    to_ensembl_ids,
    vocabulary_from_genes,
)
from dataset.prepare.rank_value import TIE_BREAK, aggregate_to_vocabulary, encode_chunk, normalized_values
from dataset.vocab import CLS, EOS, Vocabulary

logger = logging.getLogger(__name__)

LAYOUTS = {"v1": 2048, "v2": 4094}  # genes per cell; V2 adds <cls> and <eos> for 4,096 tokens
RESERVED_COLUMNS = ("input_ids", "length", CELL_ID)
INPUT_ROW = "_input_row"  # obs key of each cell's row in its input (to mark filtered cells); never written
# Token ids are near-random 15-bit numbers: delta + bit packing (a long-standing Parquet encoding every reader
# knows) stores them as compactly as pyarrow's default dictionary + snappy, writes ~2x faster, reads as fast.
PARQUET_OPTIONS = {
    "use_dictionary": ["length"],
    "column_encoding": {"input_ids.list.element": "DELTA_BINARY_PACKED"},
    "compression": "none",
}


def genes_per_cell(layout: str, max_length: int | None = None) -> int:
    """Genes a cell keeps for a model of `max_length` positions (default: the layout's full Geneformer input);
    a V2 cell's <cls> and <eos> take two of them. Pass the result to `encode_chunk(max_genes=...)`."""
    specials = 2 if layout == "v2" else 0
    if max_length is None:
        return LAYOUTS[layout]
    if max_length < specials + 1:
        raise ValueError(
            f"--max-length {max_length} leaves no gene per cell; use the model's input size "
            "(max_position_embeddings, e.g. 2048 for V1, 4096 for V2)"
        )
    return max_length - specials


@dataclass
class _Stats:
    cells_read: int = 0
    filtered_min_counts: int = 0
    filtered_min_genes: int = 0
    no_vocabulary_genes: int = 0
    kept: int = 0
    truncated: int = 0
    non_integer_cells: int = 0
    rounded_cells: int = 0
    rounded_values: int = 0
    counts_total: float = 0.0
    counts_in_vocabulary: float = 0.0
    shards: list[dict] = field(default_factory=list)


@dataclass
class _Input:
    source: CountSource
    ensembl_ids: list[str | None]
    renamed_by_mapping: int = 0  # columns whose gene the --gene-mapping changed
    column_map: GeneColumnMap | None = None


def _row_sums(matrix: sp.csr_matrix) -> np.ndarray:
    """Each cell's total count over all its genes, in float64."""
    totals = np.zeros(matrix.shape[0])
    nonempty = np.diff(matrix.indptr) > 0
    if nonempty.any():  # reduceat misreads empty rows, so only rows with entries take part
        totals[nonempty] = np.add.reduceat(matrix.data, matrix.indptr[:-1][nonempty])
    return totals


def _row_nonzeros(matrix: sp.csr_matrix) -> np.ndarray:
    nonzero_before = np.zeros(matrix.nnz + 1, dtype=np.int64)
    np.cumsum(matrix.data != 0, out=nonzero_before[1:])
    return np.diff(nonzero_before[matrix.indptr])


def _passing_chunks(
    item: _Input, column_map: GeneColumnMap, settings: dict, stats: _Stats | None, obs_columns: Sequence[str]
) -> Iterator[tuple[sp.csr_matrix, np.ndarray, dict[str, np.ndarray]]]:
    """Chunks of cells that pass the filters: (counts per vocabulary slot, cell totals over all genes, obs)."""
    first_row = 0
    for matrix, obs in item.source.iter_chunks(settings["chunk_size"], obs_columns):
        checked = check_counts(
            matrix,
            f"{item.source.path}: {item.source.matrix}",
            first_row,
            allow_non_integer=settings["allow_non_integer"],
        )
        matrix.data = matrix.data.astype(np.float64, copy=False)  # once, for exact sums and Geneformer's math
        obs = obs | {
            INPUT_ROW: np.arange(first_row, first_row + matrix.shape[0])
        }  # filters keep them aligned
        first_row += matrix.shape[0]
        totals = _row_sums(matrix)
        n_expressed = _row_nonzeros(matrix) if settings["min_genes"] > 0 else None
        aggregated = aggregate_to_vocabulary(matrix, column_map)
        enough_counts = totals >= settings["min_counts"]
        enough_genes = (
            n_expressed >= settings["min_genes"] if n_expressed is not None else np.ones_like(enough_counts)
        )
        has_vocab_gene = np.diff(aggregated.indptr) > 0
        keep = enough_counts & enough_genes & has_vocab_gene
        if stats is not None:
            stats.cells_read += matrix.shape[0]
            stats.non_integer_cells += checked.non_integer_cells
            stats.rounded_cells += checked.rounded_cells
            stats.rounded_values += checked.rounded_values
            stats.filtered_min_counts += int((~enough_counts).sum())
            stats.filtered_min_genes += int((enough_counts & ~enough_genes).sum())
            stats.no_vocabulary_genes += int((enough_counts & enough_genes & ~has_vocab_gene).sum())
            stats.counts_total += float(totals[keep].sum())
            in_kept = (
                aggregated.data
                if keep.all()
                else aggregated.data[np.repeat(keep, np.diff(aggregated.indptr))]
            )
            stats.counts_in_vocabulary += float(in_kept.sum())
        if keep.all():
            yield aggregated, totals, obs
        elif keep.any():
            yield aggregated[keep], totals[keep], {k: v[keep] for k, v in obs.items()}


def _compute_medians(
    inputs: list[_Input], vocab: Vocabulary | None, settings: dict, layout: str
) -> tuple[Vocabulary, dict[str, float], dict[str, float]]:
    """Two streaming passes over all inputs: (vocabulary, medians of genes seen, medians for column maps)."""
    built_here = vocab is None
    if built_here:
        genes = sorted({g for item in inputs for g in item.ensembl_ids if g is not None})
        if not genes:
            raise ValueError(
                f"{inputs[0].source.path}: no gene name is an Ensembl id; pass --gene-names with a symbol -> "
                "Ensembl table (e.g. gene_name_id_dict_gc30M.pkl) so genes can be identified"
            )
        vocab = vocabulary_from_genes(genes, layout=layout)
    maps = [build_column_map(item.ensembl_ids, vocab, None, source=str(item.source.path)) for item in inputs]
    union = sorted({g for m in maps for g in m.gene_ids})
    slot_of = {g: s for s, g in enumerate(union)}
    accumulator = NonzeroMedians(len(union))
    for step in (accumulator.count, accumulator.collect):
        for item, column_map in zip(inputs, maps, strict=True):
            to_union = np.array([slot_of[g] for g in column_map.gene_ids], dtype=np.int64)
            for aggregated, totals, _ in _passing_chunks(item, column_map, settings, None, ()):
                values = normalized_values(aggregated, totals, column_map.medians)
                step(to_union[aggregated.indices], values)
    medians = accumulator.result()
    seen = {g: float(m) for g, m in zip(union, medians, strict=True) if np.isfinite(m)}
    if not seen:
        raise ValueError(
            f"{inputs[0].source.path}: no cell passing the filters has a count in a vocabulary gene"
        )
    if built_here:
        # Only genes with a count in some kept cell enter a vocabulary built from the input.
        vocab = vocabulary_from_genes(list(seen), layout=layout)
    # Vocabulary genes that never have a count in a kept cell never reach the encoding: any median works.
    for_map = dict.fromkeys(union, 1.0) | seen
    return vocab, seen, for_map


def _open_inputs(paths: Sequence[Path], layer, gene_column, symbols, mapping, obs_columns) -> list[_Input]:
    inputs: list[_Input] = []
    try:
        for path in paths:
            source = open_counts(path, layer=layer, gene_column=gene_column)
            ids = to_ensembl_ids(source.gene_names, symbols, mapping)
            renamed = 0
            if mapping is not None:
                plain = to_ensembl_ids(source.gene_names, symbols)
                renamed = sum(a != b for a, b in zip(ids, plain, strict=True) if b is not None)
            inputs.append(_Input(source=source, ensembl_ids=ids, renamed_by_mapping=renamed))
            source.check_obs_columns(obs_columns)
    except BaseException:
        for item in inputs:
            item.source.close()
        raise
    return inputs


def _shard_writer(tmp_dir: Path, index: int, schema: pa.Schema) -> tuple[str, pq.ParquetWriter]:
    name = f"part-{index:05d}.parquet"
    return name, pq.ParquetWriter(tmp_dir / name, schema, **PARQUET_OPTIONS)


def _obs_array(values: np.ndarray) -> pa.Array:
    if values.dtype.kind in ("O", "U", "S"):
        return pa.array(
            [None if pd.isna(v) else str(v) for v in values], type=pa.string()
        )  # missing stays null
    return pa.array(values)


def tokenize_counts(
    inputs: str | os.PathLike | Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    vocab: str | os.PathLike | None = None,
    medians: str | os.PathLike | None = None,
    gene_names: str | os.PathLike | None = None,
    gene_mapping: str | os.PathLike | None = None,
    layout: str = "v1",
    max_length: int | None = None,
    obs_columns: Sequence[str] = (),
    layer: str | None = None,
    gene_column: str | None = None,
    min_counts: float = 0,
    min_genes: int = 0,
    allow_non_integer: bool = False,
    chunk_size: int = 1024,
    compute_medians: bool = False,
    cells_per_shard: int = 100_000,
    overwrite: bool = False,
) -> dict:
    """Rank-value encode raw counts into `out_dir` (parquet shards, vocab.txt, manifest.json); return the manifest.

    `gene_mapping` (Geneformer's ensembl_mapping_dict .pkl for V2) maps alternate ids and symbols to vocabulary
    ids; `max_length` caps tokens per cell (default 2,048 for v1, 4,096 for v2; V2 cells keep <cls> and <eos>).
    The directory appears only when complete: everything is written to a sibling temp dir, renamed at the end.
    """
    started = time.time()
    paths = [Path(inputs)] if isinstance(inputs, str | os.PathLike) else [Path(p) for p in inputs]
    out_dir = Path(out_dir)
    layout = layout.lower()
    if layout not in LAYOUTS:
        raise ValueError(
            f"layout {layout!r} unknown; use v1 (2,048 genes) or v2 (<cls> + 4,094 genes + <eos>)"
        )
    max_genes = genes_per_cell(layout, max_length)
    obs_columns = list(obs_columns)
    _check_options(
        out_dir, obs_columns, vocab, medians, compute_medians, chunk_size, cells_per_shard, overwrite
    )
    settings = {
        "chunk_size": chunk_size,
        "min_counts": min_counts,
        "min_genes": min_genes,
        "allow_non_integer": allow_non_integer,
        "max_genes": max_genes,
    }

    symbols = load_symbol_table(gene_names) if gene_names is not None else None
    vocabulary = _open_vocabulary(vocab, layout) if vocab is not None else None

    if layout == "v2" and gene_mapping is None:
        logger.warning(
            "layout v2 without --gene-mapping: genes listed under an alternate Ensembl id are lost; "
            "Geneformer V2 maps ids through ensembl_mapping_dict_gc104M.pkl (pass it as --gene-mapping)"
        )
    mapping = None
    if gene_mapping is not None:
        mapping = load_gene_mapping(
            gene_mapping, keep=set(vocabulary.tokens) if vocabulary is not None else None
        )
    items = _open_inputs(paths, layer, gene_column, symbols, mapping, obs_columns)
    try:
        if compute_medians:
            vocabulary, computed, median_table = _compute_medians(items, vocabulary, settings, layout)
        else:
            computed, median_table = None, load_medians(medians)
        for item in items:
            _map_columns(item, vocabulary, median_table)
        manifest = _write_corpus(
            items,
            out_dir,
            vocabulary,
            layout,
            obs_columns,
            settings,
            cells_per_shard,
            overwrite,
            computed,
            describe={
                "vocab": vocab,
                "medians": medians,
                "gene_names": gene_names,
                "gene_mapping": gene_mapping,
                "compute_medians": compute_medians,
                "started": started,
            },
        )
    finally:
        for item in items:
            item.source.close()
    return manifest


def _check_options(
    out_dir: Path,
    obs_columns: list[str],
    vocab,
    medians,
    compute_medians: bool,
    chunk_size: int,
    cells_per_shard: int,
    overwrite: bool,
) -> None:
    """Refuse contradictory or missing options before any input is opened."""
    clash = [c for c in obs_columns if c in RESERVED_COLUMNS]
    if clash:
        raise ValueError(
            f"--obs-columns {clash}: these names are written for every cell (tokens, length, and "
            f"{CELL_ID} = the row names); rename those columns in the input"
        )
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise ValueError(
            f"output {out_dir} exists and is not empty; choose another --out or pass --overwrite"
        )
    if medians is not None and compute_medians:
        raise ValueError("pass either --medians (a table) or --compute-medians (from the input), not both")
    if medians is None and not compute_medians:
        raise ValueError(
            "no gene medians: pass --vocab and --medians (e.g. Geneformer's token_dictionary and "
            "gene_median_dictionary pickles) or --compute-medians to derive them from the input"
        )
    if vocab is None and not compute_medians:
        raise ValueError(
            "--medians needs --vocab (the token dictionary the medians belong to), "
            "or use --compute-medians to build both from the input"
        )
    if chunk_size < 1 or cells_per_shard < 1:
        raise ValueError("--chunk-size and --cells-per-shard must be >= 1")


def _open_vocabulary(vocab: str | os.PathLike, layout: str) -> Vocabulary:
    """The vocabulary file, refused when it lacks the special tokens the layout writes."""
    vocabulary = load_vocabulary(vocab)
    if layout == "v2" and (vocabulary.cls_id is None or vocabulary.eos_id is None):
        raise ValueError(
            f"{vocab}: layout v2 needs {CLS} and {EOS} tokens in the vocabulary (Geneformer V2 "
            "dictionaries have them); use --layout v1 with a V1 vocabulary"
        )
    if layout == "v1" and vocabulary.cls_id is not None:
        logger.warning(
            "%s has %s/%s tokens but layout is v1 (no special tokens); V2 models expect --layout v2",
            vocab,
            CLS,
            EOS,
        )
    return vocabulary


def _map_columns(item: _Input, vocabulary: Vocabulary, median_table: dict[str, float]) -> None:
    item.column_map = build_column_map(
        item.ensembl_ids, vocabulary, median_table, source=str(item.source.path)
    )
    if item.column_map.n_slots == 0:
        src = item.source
        raise ValueError(
            f"{src.path}: none of the {len(src.gene_names)} genes in {src.gene_column} "
            f"(e.g. {src.gene_names[:3]}) is in the vocabulary. Fix: pass --gene-names with a symbol -> "
            "Ensembl table if genes are symbols, or --gene-column naming the Ensembl id column"
        )


class _ShardedWriter:
    """Appends cell tables to parquet shards of at most `cells_per_shard` cells each, listed in `shards`."""

    def __init__(self, out_dir: Path, cells_per_shard: int, shards: list[dict]) -> None:
        self.out_dir, self.cells_per_shard, self.shards = out_dir, cells_per_shard, shards
        self.writer, self.schema, self.in_shard = None, None, 0

    def write(self, table: pa.Table) -> None:
        start = 0
        while start < table.num_rows:
            if self.writer is None:
                self.schema = self.schema or table.schema
                name, self.writer = _shard_writer(self.out_dir, len(self.shards), self.schema)
                self.shards.append({"file": name, "n_cells": 0})
            take = min(self.cells_per_shard - self.in_shard, table.num_rows - start)
            self.writer.write_table(table.slice(start, take).cast(self.schema))
            self.shards[-1]["n_cells"] += take
            self.in_shard += take
            start += take
            if self.in_shard == self.cells_per_shard:
                self.close()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer, self.in_shard = None, 0


def _write_shards(items, tmp_dir, vocabulary, layout, obs_columns, settings, cells_per_shard, stats) -> None:
    max_genes = settings["max_genes"]
    cls_id, eos_id = (vocabulary.cls_id, vocabulary.eos_id) if layout == "v2" else (None, None)
    shards = _ShardedWriter(tmp_dir, cells_per_shard, stats.shards)
    try:
        for item in items:
            for aggregated, totals, obs in _passing_chunks(
                item, item.column_map, settings, stats, obs_columns
            ):
                encoded = encode_chunk(
                    aggregated, totals, item.column_map, max_genes=max_genes, cls_id=cls_id, eos_id=eos_id
                )
                stats.kept += len(totals)
                stats.truncated += int((encoded.n_genes > max_genes).sum())
                columns = {
                    "input_ids": pa.ListArray.from_arrays(
                        pa.array(encoded.offsets), pa.array(encoded.tokens)
                    ),
                    "length": pa.array(encoded.lengths, type=pa.int64()),
                } | {c: _obs_array(obs[c]) for c in (CELL_ID, *obs_columns)}
                shards.write(pa.table(columns))
    finally:
        shards.close()


def _report(stats: _Stats, items, layout: str, max_genes: int) -> None:
    """Refuse a run that kept no cell; log what the filters, rounding and truncation did."""
    if stats.kept == 0:
        raise ValueError(
            f"{items[0].source.path}: no cell left to tokenize ({stats.cells_read} read, "
            f"{stats.filtered_min_counts} below --min-counts, {stats.filtered_min_genes} below --min-genes, "
            f"{stats.no_vocabulary_genes} without a vocabulary gene); lower the filters or check the input"
        )
    if stats.non_integer_cells:
        logger.warning(
            "%d cells hold non-integer counts (tokenized because --allow-non-integer)",
            stats.non_integer_cells,
        )
    if stats.no_vocabulary_genes:
        logger.warning(
            "%d cells have no vocabulary gene with a nonzero count and were left out (empty droplets?)",
            stats.no_vocabulary_genes,
        )
    if stats.rounded_values:
        logger.info(
            "%d counts in %d cells were within %g of an integer (float noise) and were rounded",
            stats.rounded_values,
            stats.rounded_cells,
            NEAR_INTEGER,
        )
    if stats.truncated:
        logger.info(
            "%d of %d cells had more than %d vocabulary genes and were truncated to their top %d%s",
            stats.truncated,
            stats.kept,
            max_genes,
            max_genes,
            " (between <cls> and <eos>)" if layout == "v2" else "",
        )


def _write_corpus(
    items,
    out_dir,
    vocabulary,
    layout,
    obs_columns,
    settings,
    cells_per_shard,
    overwrite,
    computed_medians,
    describe,
) -> dict:
    """Shards, vocab.txt, medians and manifest.json in a sibling temporary folder, renamed into place when whole."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir()
    stats = _Stats()
    try:
        _write_shards(items, tmp_dir, vocabulary, layout, obs_columns, settings, cells_per_shard, stats)
        _report(stats, items, layout, settings["max_genes"])
        vocabulary.save(tmp_dir / "vocab.txt")
        if computed_medians is not None:
            (tmp_dir / "gene_medians.tsv").write_text(
                "gene\tmedian\n" + "".join(f"{g}\t{m!r}\n" for g, m in sorted(computed_medians.items()))
            )
        manifest = _manifest(items, vocabulary, layout, obs_columns, settings, stats, describe)
        (tmp_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        if out_dir.exists():
            if not overwrite and any(out_dir.iterdir()):
                raise ValueError(f"output {out_dir} appeared while tokenizing; not replacing it")
            shutil.rmtree(out_dir)
        os.rename(tmp_dir, out_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    logger.info("tokenized %d of %d cells into %s", stats.kept, stats.cells_read, out_dir)
    return manifest


def _manifest(items, vocabulary, layout, obs_columns, settings, stats, describe) -> dict:
    def path_or_none(p):
        return str(Path(p).resolve()) if p is not None else None

    genes = []
    for item in items:
        m = item.column_map
        genes.append(
            {
                "input": str(item.source.path),
                "columns": m.n_columns,
                "mapped_to_ensembl": m.n_mapped_to_ensembl,
                "columns_in_vocabulary": int((m.target >= 0).sum()),
                "vocabulary_genes_present": m.n_slots,
                "duplicate_columns_summed": int((m.target >= 0).sum()) - m.n_slots,
                "renamed_by_gene_mapping": item.renamed_by_mapping,
            }
        )
    return {
        "created_by": "python -m dataset.prepare.tokenize",
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(describe["started"])),
        "seconds": round(time.time() - describe["started"], 3),
        "inputs": [
            {
                "path": str(i.source.path.resolve()),
                "format": i.source.format,
                "matrix": i.source.matrix,
                "gene_identifiers": i.source.gene_column,
                "size_bytes": i.source.path.stat().st_size,
            }
            for i in items
        ],
        "vocabulary": {
            "source": path_or_none(describe["vocab"]) or "built from genes seen in the input",
            "size": vocabulary.size,
            "file": "vocab.txt",
        },
        "medians": {
            "source": "computed from the input (exact nonzero median per gene; file gene_medians.tsv)"
            if describe["compute_medians"]
            else path_or_none(describe["medians"])
        },
        "gene_names": path_or_none(describe["gene_names"]),
        "gene_mapping": path_or_none(describe["gene_mapping"]),
        "layout": layout,
        "max_genes": settings["max_genes"],
        "max_tokens": settings["max_genes"] + (2 if layout == "v2" else 0),
        "tie_break": TIE_BREAK,
        "filters": {
            "min_counts": settings["min_counts"],
            "min_genes": settings["min_genes"],
            "allow_non_integer": settings["allow_non_integer"],
        },
        "cells": {
            "read": stats.cells_read,
            "kept": stats.kept,
            "filtered_min_counts": stats.filtered_min_counts,
            "filtered_min_genes": stats.filtered_min_genes,
            "no_vocabulary_genes": stats.no_vocabulary_genes,
            "truncated": stats.truncated,
            "non_integer": stats.non_integer_cells,
            "rounded_near_integer": stats.rounded_cells,
        },
        "genes": genes,
        "counts": {
            "total_in_kept_cells": stats.counts_total,
            "in_vocabulary": stats.counts_in_vocabulary,
            "rounded_near_integer": stats.rounded_values,
            "share_in_vocabulary": stats.counts_in_vocabulary / stats.counts_total
            if stats.counts_total
            else 0.0,
        },
        "obs_columns": [CELL_ID, *obs_columns],
        "shards": stats.shards,
    }


@dataclass
class EncodedCounts:
    """One chunk of an input's cells, encoded in memory: rows [first_row, first_row + n_rows) of the input."""

    index: int
    first_row: int
    n_rows: int
    rows: np.ndarray  # int64 input rows of the cells that passed the filters, ascending
    cells: list[np.ndarray]  # their token ids, exactly as tokenize_counts writes them
    obs: dict[str, np.ndarray]  # the chosen per-cell columns of those cells


class _SkippedChunks:
    """A count source whose chunks `skip(k)` arrive without counts, so none of their cells is encoded."""

    def __init__(self, source: CountSource, skip: Callable[[int], bool]) -> None:
        self.source, self.skip, self.sizes = source, skip, []

    def __getattr__(self, name: str):
        return getattr(self.source, name)

    def iter_chunks(self, chunk_size: int, obs_columns: Sequence[str] = ()):
        for k, (matrix, obs) in enumerate(self.source.iter_chunks(chunk_size, obs_columns)):
            self.sizes.append(matrix.shape[0])
            yield (sp.csr_matrix(matrix.shape) if self.skip(k) else matrix), obs


def encode_counts(
    path: str | os.PathLike,
    *,
    vocab: Vocabulary,
    medians: str | os.PathLike,
    gene_names: str | os.PathLike | None = None,
    gene_mapping: str | os.PathLike | None = None,
    layout: str = "v1",
    max_length: int | None = None,
    obs_columns: Sequence[str] = (),
    layer: str | None = None,
    gene_column: str | None = None,
    min_counts: float = 0,
    min_genes: int = 0,
    allow_non_integer: bool = False,
    chunk_size: int = 1024,
    skip_chunk: Callable[[int], bool] | None = None,
) -> Iterator[EncodedCounts]:
    """Every chunk of one count file (chunk k = rows [k * chunk_size, ...)) rank-value encoded in memory with the
    same filters and encoding as `tokenize_counts`; chunks `skip_chunk(k)` come back with no cells encoded.
    Options, gene names and the vocabulary are checked at the call, before the first chunk is read."""
    if layout not in LAYOUTS:
        raise ValueError(
            f"layout {layout!r} unknown; use v1 (2,048 genes) or v2 (<cls> + 4,094 genes + <eos>)"
        )
    settings = {
        "chunk_size": chunk_size,
        "min_counts": min_counts,
        "min_genes": min_genes,
        "allow_non_integer": allow_non_integer,
        "max_genes": genes_per_cell(layout, max_length),
    }
    symbols = load_symbol_table(gene_names) if gene_names is not None else None
    mapping = load_gene_mapping(gene_mapping, keep=set(vocab.tokens)) if gene_mapping is not None else None
    median_table = load_medians(medians)
    [item] = _open_inputs([Path(path)], layer, gene_column, symbols, mapping, obs_columns)
    try:
        _map_columns(item, vocab, median_table)
    except BaseException:
        item.source.close()
        raise
    item.source = _SkippedChunks(item.source, skip_chunk or (lambda k: False))
    return _encoded_chunks(item, vocab, layout, settings, obs_columns)


def _encoded_chunks(
    item: _Input, vocab: Vocabulary, layout: str, settings: dict, obs_columns: Sequence[str]
) -> Iterator[EncodedCounts]:
    source = item.source
    try:
        cls_id, eos_id = (vocab.cls_id, vocab.eos_id) if layout == "v2" else (None, None)
        reported = 0
        for aggregated, totals, obs in _passing_chunks(item, item.column_map, settings, None, obs_columns):
            encoded = encode_chunk(
                aggregated,
                totals,
                item.column_map,
                max_genes=settings["max_genes"],
                cls_id=cls_id,
                eos_id=eos_id,
            )
            while reported < len(source.sizes) - 1:  # earlier chunks in which no cell passed the filters
                yield _chunk(source.sizes, reported, None, None)
                reported += 1
            yield _chunk(source.sizes, reported, encoded, obs)
            reported += 1
        while reported < len(source.sizes):
            yield _chunk(source.sizes, reported, None, None)
            reported += 1
    finally:
        item.source.close()


def _chunk(sizes: list[int], k: int, encoded, obs) -> EncodedCounts:
    first = int(sum(sizes[:k]))
    if encoded is None:
        return EncodedCounts(k, first, sizes[k], np.zeros(0, np.int64), [], {})
    cells = np.split(encoded.tokens, encoded.offsets[1:-1])
    rows = obs.pop(INPUT_ROW).astype(np.int64)
    return EncodedCounts(k, first, sizes[k], rows, cells, obs)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dataset.prepare.tokenize",
        description="Rank-value encode raw counts (.h5ad, .loom, cells x genes CSV/TSV) into parquet corpus shards.",
    )
    parser.add_argument(
        "inputs", nargs="+", metavar="INPUT", help=".h5ad, .loom, .csv or .tsv (.gz ok) of raw counts"
    )
    parser.add_argument("--out", required=True, help="output directory (created atomically)")
    parser.add_argument("--vocab", help="vocab.txt, token_dictionary .pkl or token<TAB>id TSV")
    parser.add_argument("--medians", help="gene_median_dictionary .pkl or gene<TAB>median TSV")
    parser.add_argument(
        "--gene-names", help="symbol -> Ensembl id table (.pkl, or TSV/CSV) when genes are symbols"
    )
    parser.add_argument(
        "--gene-mapping",
        help="id/symbol -> vocabulary Ensembl id (.pkl or TSV), e.g. Geneformer V2's "
        "ensembl_mapping_dict_gc104M.pkl; duplicate targets are summed",
    )
    parser.add_argument(
        "--gene-column",
        help="var column / loom row attribute with gene ids (default: var index; loom: ensembl_id)",
    )
    parser.add_argument("--layout", choices=sorted(LAYOUTS), default="v1")
    parser.add_argument(
        "--max-length",
        type=int,
        help="tokens per cell, <cls>/<eos> included (default: 2048 for v1, "
        "4096 for v2); the model's max_position_embeddings",
    )
    parser.add_argument(
        "--obs-columns", default="", help="comma-separated per-cell columns to keep (cell_type,donor)"
    )
    parser.add_argument("--layer", help="matrix to read: X (default), raw, or a layer name")
    parser.add_argument("--min-counts", type=float, default=0, help="drop cells with fewer total counts")
    parser.add_argument("--min-genes", type=int, default=0, help="drop cells with fewer expressed genes")
    parser.add_argument(
        "--allow-non-integer",
        action="store_true",
        help="warn instead of failing on non-integers (counts within 1e-6 of an integer are rounded)",
    )
    parser.add_argument("--chunk-size", type=int, default=1024, help="cells per chunk (bounds memory)")
    parser.add_argument("--cells-per-shard", type=int, default=100_000)
    parser.add_argument(
        "--compute-medians",
        action="store_true",
        help="derive gene medians (and, without --vocab, the vocabulary) from the input",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        manifest = tokenize_counts(
            args.inputs,
            args.out,
            vocab=args.vocab,
            medians=args.medians,
            gene_names=args.gene_names,
            gene_mapping=args.gene_mapping,
            layout=args.layout,
            max_length=args.max_length,
            obs_columns=[c for c in args.obs_columns.split(",") if c],
            layer=args.layer,
            gene_column=args.gene_column,
            min_counts=args.min_counts,
            min_genes=args.min_genes,
            allow_non_integer=args.allow_non_integer,
            chunk_size=args.chunk_size,
            compute_medians=args.compute_medians,
            cells_per_shard=args.cells_per_shard,
            overwrite=args.overwrite,
        )
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(
        json.dumps(
            {
                "out": args.out,
                "cells": manifest["cells"],
                "genes": manifest["genes"],
                "counts": manifest["counts"],
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
