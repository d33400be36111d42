"""Geneformer rank-value encoding of a chunk of cells held as a SciPy CSR matrix of raw counts.

Counts are summed per vocabulary gene, normalized, ranked and truncated, all vectorized over the chunk.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from dataset.gene_tables import GeneColumnMap

TARGET_SUM = 10_000.0

# Ordering rule, exactly: value descending; equal values in ascending token id (vocabulary order).
# Geneformer ranks with np.argsort(-values) (an unstable quicksort whose tie order depends on the input's
# column order and numpy's build), so any cell without two exactly equal values matches it token for token;
# for exact ties this rule is the deterministic one.
TIE_BREAK = "value descending; exactly equal values by ascending token id"


@dataclass(frozen=True)
class EncodedChunk:
    """Token ids of a chunk's cells, concatenated: cell i is `tokens[offsets[i]:offsets[i + 1]]`."""

    tokens: np.ndarray  # int64
    offsets: np.ndarray  # int64 [n_cells + 1]
    n_genes: np.ndarray  # int64 [n_cells], vocabulary genes with nonzero value before truncation

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


def aggregate_to_vocabulary(counts: sp.csr_matrix, column_map: GeneColumnMap) -> sp.csr_matrix:
    """[cells, input columns] -> [cells, vocabulary slots]: drop unmapped columns, sum duplicate Ensembl ids.

    Counts are summed before normalizing, as Geneformer does, so float rounding matches it. The result has
    sorted indices (ascending token id) and no explicit zeros.
    """
    target = column_map.target[counts.indices]
    keep = target >= 0
    keep &= counts.data != 0
    row_of_entry = np.repeat(np.arange(counts.shape[0], dtype=np.int64), np.diff(counts.indptr))[keep]
    indptr = np.zeros(counts.shape[0] + 1, dtype=np.int64)
    np.cumsum(np.bincount(row_of_entry, minlength=counts.shape[0]), out=indptr[1:])
    out = sp.csr_matrix(
        (counts.data[keep].astype(np.float64, copy=False), target[keep], indptr),
        shape=(counts.shape[0], column_map.n_slots),
    )
    out.has_canonical_format = False
    out.sum_duplicates()  # sorts indices per row and adds up duplicate genes
    out.eliminate_zeros()
    return out


def normalized_values(aggregated: sp.csr_matrix, totals: np.ndarray, medians: np.ndarray) -> np.ndarray:
    """count / cell total * 10,000 / gene median, in float64 and in Geneformer's order of operations."""
    row_total = np.repeat(np.asarray(totals, dtype=np.float64), np.diff(aggregated.indptr))
    return aggregated.data / row_total * TARGET_SUM / medians[aggregated.indices]


def encode_chunk(
    aggregated: sp.csr_matrix,
    totals: np.ndarray,
    column_map: GeneColumnMap,
    *,
    max_genes: int,
    cls_id: int | None = None,
    eos_id: int | None = None,
) -> EncodedChunk:
    """Rank-value encode each row: nonzero vocabulary genes by normalized value, top `max_genes` kept.

    `totals` is each cell's count over all its genes (also those outside the vocabulary). With `cls_id` and
    `eos_id` (V2 layout) each cell becomes `<cls>`, up to `max_genes` genes, `<eos>`.
    """
    values = normalized_values(aggregated, totals, column_map.medians)
    tokens = column_map.token_ids[aggregated.indices]
    indptr = aggregated.indptr.astype(np.int64)
    n_cells = aggregated.shape[0]
    n_genes = np.diff(indptr)
    kept = np.minimum(n_genes, max_genes)
    extra = 2 if cls_id is not None else 0
    offsets = np.zeros(n_cells + 1, dtype=np.int64)
    np.cumsum(kept + extra, out=offsets[1:])
    out = np.empty(offsets[-1], dtype=np.int64)
    neg = -values
    for i in range(n_cells):
        start, stop = indptr[i], indptr[i + 1]
        # Stable sort of -value over entries in ascending token id: ties keep vocabulary order.
        order = np.argsort(neg[start:stop], kind="stable")[:max_genes]
        begin = offsets[i] + (1 if extra else 0)
        out[begin : begin + len(order)] = tokens[start:stop][order]
    if extra:
        out[offsets[:-1]] = cls_id
        out[offsets[1:] - 1] = eos_id
    return EncodedChunk(tokens=out, offsets=offsets, n_genes=n_genes.astype(np.int64))
