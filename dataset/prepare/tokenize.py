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

from dataset.prepare.count_readers import CountSource, open_counts
from dataset.prepare.gene_medians import NonzeroMedians
from dataset.prepare.gene_tables import (
    GeneColumnMap,
    build_column_map,
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
RESERVED_COLUMNS = ("input_ids", "length")
INPUT_ROW = "_input_row"  # obs key of each cell's row in its input (to mark filtered cells); never written
# Token ids are near-random 15-bit numbers: delta + bit packing (a long-standing Parquet encoding every reader
# knows) stores them as compactly as pyarrow's default dictionary + snappy, writes ~2x faster, reads as fast.
PARQUET_OPTIONS = {
    "use_dictionary": ["length"],
    "column_encoding": {"input_ids.list.element": "DELTA_BINARY_PACKED"},
    "compression": "none",
}


@dataclass
class _Stats:
    cells_read: int = 0
    filtered_min_counts: int = 0
    filtered_min_genes: int = 0
    no_vocabulary_genes: int = 0
    kept: int = 0
    truncated: int = 0
    non_integer_cells: int = 0
    counts_total: float = 0.0
    counts_in_vocabulary: float = 0.0
    shards: list[dict] = field(default_factory=list)


@dataclass
class _Input:
    source: CountSource
    ensembl_ids: list[str | None]
    column_map: GeneColumnMap | None = None


def _whole_non_negative(data: np.ndarray) -> bool:
    """True if every value is a finite whole number >= 0 (raw counts), checked in the input's own dtype."""
    if len(data) == 0 or data.dtype.kind == "u":
        return True
    if data.dtype.kind == "i":
        return bool(data.min() >= 0)
    if data.dtype.kind != "f":
        return False
    # Read as unsigned integers, floats in [+0, inf) have bits below those of +inf; negatives (also -0.0), inf
    # and NaN have higher ones. One max instead of min, max and an isfinite.
    unsigned = np.dtype(f"u{data.dtype.itemsize}")
    if data.view(unsigned).max() >= np.array(np.inf, dtype=data.dtype).view(unsigned):
        return False
    return bool((np.floor(data) == data).all())


def _check_counts(matrix: sp.csr_matrix, source: CountSource, first_row: int, allow_non_integer: bool) -> int:
    """Raise on negative/NaN counts; return how many cells hold non-integer counts (an error unless allowed)."""
    if _whole_non_negative(matrix.data):  # the usual case, on the stored (often float32) values: half the bytes
        return 0
    data = matrix.data.astype(np.float64, copy=False)
    whole = np.floor(data) == data  # False for NaN
    bad = ~np.isfinite(data) | (data < 0)
    if bad.any():
        row = first_row + int(np.searchsorted(matrix.indptr, np.flatnonzero(bad)[0], side="right") - 1)
        raise ValueError(
            f"{source.path}: {source.matrix} holds a negative or non-finite value in cell row {row}; "
            "the tokenizer needs raw counts (pick the counts matrix with --layer)"
        )
    fractional = ~whole
    if not fractional.any():  # -0.0, which the sign-bit test above sends here
        return 0
    rows = np.unique(np.searchsorted(matrix.indptr, np.flatnonzero(fractional), side="right") - 1)
    if not allow_non_integer:
        example = data[np.flatnonzero(fractional)[0]]
        if np.allclose(data[fractional], np.rint(data[fractional]), rtol=1e-6, atol=0):
            hint = ("they are integers up to float noise (counts recovered from normalized data?): round them "
                    "(np.rint) before tokenizing")
        else:
            hint = ("they look normalized, not raw counts: pick the raw counts with --layer (e.g. --layer counts or "
                    "--layer raw)")
        raise ValueError(
            f"{source.path}: {source.matrix} holds non-integer values (cell row {first_row + int(rows[0])}: "
            f"{example!r}); {hint}, or pass --allow-non-integer to tokenize them as they are"
        )
    return len(rows)


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
        non_integer = _check_counts(matrix, item.source, first_row, settings["allow_non_integer"])
        matrix.data = matrix.data.astype(np.float64, copy=False)  # once, for exact sums and Geneformer's math
        obs = obs | {INPUT_ROW: np.arange(first_row, first_row + matrix.shape[0])}  # filters keep them aligned
        first_row += matrix.shape[0]
        totals = _row_sums(matrix)
        n_expressed = _row_nonzeros(matrix) if settings["min_genes"] > 0 else None
        aggregated = aggregate_to_vocabulary(matrix, column_map)
        enough_counts = totals >= settings["min_counts"]
        enough_genes = n_expressed >= settings["min_genes"] if n_expressed is not None else np.ones_like(enough_counts)
        has_vocab_gene = np.diff(aggregated.indptr) > 0
        keep = enough_counts & enough_genes & has_vocab_gene
        if stats is not None:
            stats.cells_read += matrix.shape[0]
            stats.non_integer_cells += non_integer
            stats.filtered_min_counts += int((~enough_counts).sum())
            stats.filtered_min_genes += int((enough_counts & ~enough_genes).sum())
            stats.no_vocabulary_genes += int((enough_counts & enough_genes & ~has_vocab_gene).sum())
            stats.counts_total += float(totals[keep].sum())
            in_kept = aggregated.data if keep.all() else aggregated.data[np.repeat(keep, np.diff(aggregated.indptr))]
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
        raise ValueError(f"{inputs[0].source.path}: no cell passing the filters has a count in a vocabulary gene")
    if built_here:
        # Only genes with a count in some kept cell enter a vocabulary built from the input.
        vocab = vocabulary_from_genes(list(seen), layout=layout)
    # Vocabulary genes that never have a count in a kept cell never reach the encoding: any median works.
    for_map = dict.fromkeys(union, 1.0) | seen
    return vocab, seen, for_map


def _open_inputs(paths: Sequence[Path], layer, gene_column, symbols, obs_columns) -> list[_Input]:
    inputs: list[_Input] = []
    try:
        for path in paths:
            source = open_counts(path, layer=layer, gene_column=gene_column)
            inputs.append(_Input(source=source, ensembl_ids=to_ensembl_ids(source.gene_names, symbols)))
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
        return pa.array([None if pd.isna(v) else str(v) for v in values], type=pa.string())  # missing stays null
    return pa.array(values)


def tokenize_counts(
    inputs: str | os.PathLike | Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    vocab: str | os.PathLike | None = None,
    medians: str | os.PathLike | None = None,
    gene_names: str | os.PathLike | None = None,
    layout: str = "v1",
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

    The directory appears only when complete: everything is written to a sibling temp dir, renamed at the end.
    """
    started = time.time()
    paths = [Path(inputs)] if isinstance(inputs, str | os.PathLike) else [Path(p) for p in inputs]
    out_dir = Path(out_dir)
    layout = layout.lower()
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r} unknown; use v1 (2,048 genes) or v2 (<cls> + 4,094 genes + <eos>)")
    obs_columns = list(obs_columns)
    clash = [c for c in obs_columns if c in RESERVED_COLUMNS]
    if clash:
        raise ValueError(f"--obs-columns {clash}: these names are the tokenized columns; rename them in the input")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise ValueError(f"output {out_dir} exists and is not empty; choose another --out or pass --overwrite")
    if medians is not None and compute_medians:
        raise ValueError("pass either --medians (a table) or --compute-medians (from the input), not both")
    if medians is None and not compute_medians:
        raise ValueError(
            "no gene medians: pass --vocab and --medians (e.g. Geneformer's token_dictionary and "
            "gene_median_dictionary pickles) or --compute-medians to derive them from the input"
        )
    if vocab is None and not compute_medians:
        raise ValueError("--medians needs --vocab (the token dictionary the medians belong to), "
                         "or use --compute-medians to build both from the input")
    if chunk_size < 1 or cells_per_shard < 1:
        raise ValueError("--chunk-size and --cells-per-shard must be >= 1")
    settings = {"chunk_size": chunk_size, "min_counts": min_counts, "min_genes": min_genes,
                "allow_non_integer": allow_non_integer}

    symbols = load_symbol_table(gene_names) if gene_names is not None else None
    vocabulary = load_vocabulary(vocab) if vocab is not None else None
    if vocabulary is not None and layout == "v2" and (vocabulary.cls_id is None or vocabulary.eos_id is None):
        raise ValueError(f"{vocab}: layout v2 needs {CLS} and {EOS} tokens in the vocabulary (Geneformer V2 "
                         "dictionaries have them); use --layout v1 with a V1 vocabulary")
    if vocabulary is not None and layout == "v1" and vocabulary.cls_id is not None:
        logger.warning("%s has %s/%s tokens but layout is v1 (no special tokens); V2 models expect --layout v2",
                       vocab, CLS, EOS)

    items = _open_inputs(paths, layer, gene_column, symbols, obs_columns)
    try:
        if compute_medians:
            vocabulary, computed, median_table = _compute_medians(items, vocabulary, settings, layout)
        else:
            computed, median_table = None, load_medians(medians)
        for item in items:
            _map_columns(item, vocabulary, median_table)
        manifest = _write_corpus(items, out_dir, vocabulary, layout, obs_columns, settings, cells_per_shard,
                                 overwrite, computed,
                                 describe={"vocab": vocab, "medians": medians, "gene_names": gene_names,
                                           "compute_medians": compute_medians, "started": started})
    finally:
        for item in items:
            item.source.close()
    return manifest


def _map_columns(item: _Input, vocabulary: Vocabulary, median_table: dict[str, float]) -> None:
    item.column_map = build_column_map(item.ensembl_ids, vocabulary, median_table, source=str(item.source.path))
    if item.column_map.n_slots == 0:
        src = item.source
        raise ValueError(
            f"{src.path}: none of the {len(src.gene_names)} genes in {src.gene_column} "
            f"(e.g. {src.gene_names[:3]}) is in the vocabulary. Fix: pass --gene-names with a symbol -> "
            "Ensembl table if genes are symbols, or --gene-column naming the Ensembl id column"
        )


def _write_corpus(items, out_dir, vocabulary, layout, obs_columns, settings, cells_per_shard, overwrite,
                  computed_medians, describe) -> dict:
    max_genes = LAYOUTS[layout]
    cls_id, eos_id = (vocabulary.cls_id, vocabulary.eos_id) if layout == "v2" else (None, None)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir()
    stats = _Stats()
    try:
        writer, name, in_shard, schema = None, None, 0, None
        for item in items:
            for aggregated, totals, obs in _passing_chunks(item, item.column_map, settings, stats, obs_columns):
                encoded = encode_chunk(aggregated, totals, item.column_map, max_genes=max_genes,
                                       cls_id=cls_id, eos_id=eos_id)
                stats.kept += len(totals)
                stats.truncated += int((encoded.n_genes > max_genes).sum())
                columns = {
                    "input_ids": pa.ListArray.from_arrays(pa.array(encoded.offsets), pa.array(encoded.tokens)),
                    "length": pa.array(encoded.lengths, type=pa.int64()),
                } | {c: _obs_array(obs[c]) for c in obs_columns}
                table = pa.table(columns)
                start = 0
                while start < table.num_rows:
                    if writer is None:
                        schema = schema or table.schema
                        name, writer = _shard_writer(tmp_dir, len(stats.shards), schema)
                        stats.shards.append({"file": name, "n_cells": 0})
                    take = min(cells_per_shard - in_shard, table.num_rows - start)
                    writer.write_table(table.slice(start, take).cast(schema))
                    stats.shards[-1]["n_cells"] += take
                    in_shard += take
                    start += take
                    if in_shard == cells_per_shard:
                        writer.close()
                        writer, in_shard = None, 0
        if writer is not None:
            writer.close()
        if stats.kept == 0:
            raise ValueError(
                f"{items[0].source.path}: no cell left to tokenize ({stats.cells_read} read, "
                f"{stats.filtered_min_counts} below --min-counts, {stats.filtered_min_genes} below --min-genes, "
                f"{stats.no_vocabulary_genes} without a vocabulary gene); lower the filters or check the input"
            )
        if stats.non_integer_cells:
            logger.warning("%d cells hold non-integer counts (tokenized because --allow-non-integer)",
                           stats.non_integer_cells)
        if stats.no_vocabulary_genes:
            logger.warning("%d cells have no vocabulary gene with a nonzero count and were left out "
                           "(empty droplets?)", stats.no_vocabulary_genes)
        if stats.truncated:
            logger.info("%d cells had more than %d vocabulary genes and were truncated", stats.truncated, max_genes)
        vocabulary.save(tmp_dir / "vocab.txt")
        if computed_medians is not None:
            (tmp_dir / "gene_medians.tsv").write_text(
                "gene\tmedian\n" + "".join(f"{g}\t{m!r}\n" for g, m in sorted(computed_medians.items())))
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
        genes.append({
            "input": str(item.source.path),
            "columns": m.n_columns,
            "mapped_to_ensembl": m.n_mapped_to_ensembl,
            "columns_in_vocabulary": int((m.target >= 0).sum()),
            "vocabulary_genes_present": m.n_slots,
            "duplicate_columns_summed": int((m.target >= 0).sum()) - m.n_slots,
        })
    return {
        "created_by": "python -m dataset.prepare.tokenize",
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(describe["started"])),
        "seconds": round(time.time() - describe["started"], 3),
        "inputs": [{"path": str(i.source.path.resolve()), "format": i.source.format, "matrix": i.source.matrix,
                    "gene_identifiers": i.source.gene_column, "size_bytes": i.source.path.stat().st_size}
                   for i in items],
        "vocabulary": {"source": path_or_none(describe["vocab"]) or "built from genes seen in the input",
                       "size": vocabulary.size, "file": "vocab.txt"},
        "medians": {"source": "computed from the input (exact nonzero median per gene; file gene_medians.tsv)"
                    if describe["compute_medians"] else path_or_none(describe["medians"])},
        "gene_names": path_or_none(describe["gene_names"]),
        "layout": layout,
        "max_genes": LAYOUTS[layout],
        "max_tokens": LAYOUTS[layout] + (2 if layout == "v2" else 0),
        "tie_break": TIE_BREAK,
        "filters": {"min_counts": settings["min_counts"], "min_genes": settings["min_genes"],
                    "allow_non_integer": settings["allow_non_integer"]},
        "cells": {"read": stats.cells_read, "kept": stats.kept, "filtered_min_counts": stats.filtered_min_counts,
                  "filtered_min_genes": stats.filtered_min_genes, "no_vocabulary_genes": stats.no_vocabulary_genes,
                  "truncated": stats.truncated, "non_integer": stats.non_integer_cells},
        "genes": genes,
        "counts": {"total_in_kept_cells": stats.counts_total, "in_vocabulary": stats.counts_in_vocabulary,
                   "share_in_vocabulary": stats.counts_in_vocabulary / stats.counts_total
                   if stats.counts_total else 0.0},
        "obs_columns": obs_columns,
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
    path: str | os.PathLike, *, vocab: Vocabulary, medians: str | os.PathLike,
    gene_names: str | os.PathLike | None = None,
    layout: str = "v1", obs_columns: Sequence[str] = (), layer: str | None = None, gene_column: str | None = None,
    min_counts: float = 0, min_genes: int = 0, allow_non_integer: bool = False, chunk_size: int = 1024,
    skip_chunk: Callable[[int], bool] | None = None,
) -> Iterator[EncodedCounts]:
    """Every chunk of one count file (chunk k = rows [k * chunk_size, ...)) rank-value encoded in memory with the
    same filters and encoding as `tokenize_counts`; chunks `skip_chunk(k)` come back with no cells encoded.
    Options, gene names and the vocabulary are checked at the call, before the first chunk is read."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r} unknown; use v1 (2,048 genes) or v2 (<cls> + 4,094 genes + <eos>)")
    settings = {"chunk_size": chunk_size, "min_counts": min_counts, "min_genes": min_genes,
                "allow_non_integer": allow_non_integer}
    symbols = load_symbol_table(gene_names) if gene_names is not None else None
    median_table = load_medians(medians)
    [item] = _open_inputs([Path(path)], layer, gene_column, symbols, obs_columns)
    try:
        _map_columns(item, vocab, median_table)
    except BaseException:
        item.source.close()
        raise
    item.source = _SkippedChunks(item.source, skip_chunk or (lambda k: False))
    return _encoded_chunks(item, vocab, layout, settings, obs_columns)


def _encoded_chunks(item: _Input, vocab: Vocabulary, layout: str, settings: dict,
                    obs_columns: Sequence[str]) -> Iterator[EncodedCounts]:
    source = item.source
    try:
        cls_id, eos_id = (vocab.cls_id, vocab.eos_id) if layout == "v2" else (None, None)
        reported = 0
        for aggregated, totals, obs in _passing_chunks(item, item.column_map, settings, None, obs_columns):
            encoded = encode_chunk(aggregated, totals, item.column_map, max_genes=LAYOUTS[layout],
                                   cls_id=cls_id, eos_id=eos_id)
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
        description="Rank-value encode raw counts (.h5ad, .loom, cells x genes CSV/TSV) into parquet corpus shards.")
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help=".h5ad, .loom, .csv or .tsv (.gz ok) of raw counts")
    parser.add_argument("--out", required=True, help="output directory (created atomically)")
    parser.add_argument("--vocab", help="vocab.txt, token_dictionary .pkl or token<TAB>id TSV")
    parser.add_argument("--medians", help="gene_median_dictionary .pkl or gene<TAB>median TSV")
    parser.add_argument("--gene-names", help="symbol -> Ensembl id table (.pkl, or TSV/CSV) when genes are symbols")
    parser.add_argument("--gene-column", help="var column / loom row attribute with gene ids (default: var index; "
                                              "loom: ensembl_id)")
    parser.add_argument("--layout", choices=sorted(LAYOUTS), default="v1")
    parser.add_argument("--obs-columns", default="", help="comma-separated per-cell columns to keep (cell_type,donor)")
    parser.add_argument("--layer", help="matrix to read: X (default), raw, or a layer name")
    parser.add_argument("--min-counts", type=float, default=0, help="drop cells with fewer total counts")
    parser.add_argument("--min-genes", type=int, default=0, help="drop cells with fewer expressed genes")
    parser.add_argument("--allow-non-integer", action="store_true", help="warn instead of failing on non-integers")
    parser.add_argument("--chunk-size", type=int, default=1024, help="cells per chunk (bounds memory)")
    parser.add_argument("--cells-per-shard", type=int, default=100_000)
    parser.add_argument("--compute-medians", action="store_true",
                        help="derive gene medians (and, without --vocab, the vocabulary) from the input")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        manifest = tokenize_counts(
            args.inputs, args.out, vocab=args.vocab, medians=args.medians, gene_names=args.gene_names,
            layout=args.layout, obs_columns=[c for c in args.obs_columns.split(",") if c], layer=args.layer,
            gene_column=args.gene_column, min_counts=args.min_counts, min_genes=args.min_genes,
            allow_non_integer=args.allow_non_integer, chunk_size=args.chunk_size,
            compute_medians=args.compute_medians, cells_per_shard=args.cells_per_shard, overwrite=args.overwrite)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps({"out": args.out, "cells": manifest["cells"], "genes": manifest["genes"],
                      "counts": manifest["counts"]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
