"""Geneformer rank-value encoding of a chunk of cells held as a SciPy CSR matrix of raw counts.

Counts are summed per vocabulary gene, normalized, ranked and truncated, all vectorized over the chunk.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from dataset.gene_tables import GeneColumnMap

TARGET_SUM = 10_000.0

# Ordering rule, exactly: value descending; exactly equal values in ascending token id (vocabulary order).
# Geneformer ranks with np.argsort(-values), an unstable quicksort whose order of equal values depends on the
# input's column order and on numpy's build; any cell without two exactly equal values therefore matches it
# token for token, and for exact ties this rule is the deterministic one.
_TOKEN_BITS = np.uint64(16)
_TOKEN_MASK = np.uint64((1 << 16) - 1)
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
    """[cells, input columns] -> [cells, vocabulary slots]: drop unmapped columns and zeros, sum duplicate ids.

    Counts are summed before normalizing, as Geneformer does, so float rounding matches it. Indices within a
    row may be unsorted (the encoding orders by token itself).
    """
    target = column_map.target[counts.indices]
    keep = (target >= 0) & (counts.data != 0)
    if keep.all() and not column_map.has_duplicates:  # every entry maps to its own gene: no copy needed
        out = sp.csr_matrix((counts.data.astype(np.float64, copy=False), target, counts.indptr),
                            shape=(counts.shape[0], column_map.n_slots))
        out.has_sorted_indices = False
        return out
    kept_before = np.zeros(len(keep) + 1, dtype=np.int64)
    np.cumsum(keep, out=kept_before[1:])
    indptr = kept_before[counts.indptr]
    out = sp.csr_matrix(
        (counts.data[keep].astype(np.float64), target[keep], indptr), shape=(counts.shape[0], column_map.n_slots)
    )
    out.has_sorted_indices = False
    if column_map.has_duplicates:
        out.sum_duplicates()  # sorts each row's indices and adds up columns of the same gene
    return out


def normalized_values(aggregated: sp.csr_matrix, totals: np.ndarray, medians: np.ndarray) -> np.ndarray:
    """count / cell total * 10,000 / gene median, in float64 and in Geneformer's order of operations."""
    values = aggregated.data / np.repeat(np.asarray(totals, dtype=np.float64), np.diff(aggregated.indptr))
    values *= TARGET_SUM  # in place: same rounding as the expression, fewer temporaries
    values /= medians[aggregated.indices]
    return values


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
    begins = offsets[:-1] + (1 if extra else 0)
    out = np.empty(offsets[-1], dtype=np.int64)
    if len(tokens) and tokens.max() >= 1 << int(_TOKEN_BITS):
        exact_rows = np.arange(n_cells)  # ids do not fit the key: rank every row exactly
    else:
        exact_rows = _rank_by_keys(values, tokens, indptr, offsets, begins, kept, out)
    for i in exact_rows:
        start, stop = indptr[i], indptr[i + 1]
        order = np.lexsort((tokens[start:stop], -values[start:stop]))[:max_genes]
        begin = offsets[i] + (1 if extra else 0)
        out[begin : begin + kept[i]] = tokens[start:stop][order]
    if extra:
        out[offsets[:-1]] = cls_id
        out[offsets[1:] - 1] = eos_id
    return EncodedChunk(tokens=out, offsets=offsets, n_genes=n_genes.astype(np.int64))


def _rank_by_keys(
    values: np.ndarray,
    tokens: np.ndarray,
    indptr: np.ndarray,
    offsets: np.ndarray,
    begins: np.ndarray,
    kept: np.ndarray,
    out: np.ndarray,
) -> np.ndarray:
    """Write each row's top `kept` tokens to `out[begin:]` through uint64 sort keys; return rows to redo exactly.

    Key = the value's float64 bits (for positive floats they order like the value), complemented for descending
    order, with the low 16 bits replaced by the token id. Sorting keys in place is several times faster than an
    argsort; two keys of a row equal above the token bits (values within ~1e-11 relative, or exact ties) among
    the kept genes or across the truncation point send that row to the exact path, so the result is always
    exactly "value descending, then token id ascending".
    """
    keys = ~values.view(np.uint64)
    keys >>= _TOKEN_BITS
    keys <<= _TOKEN_BITS
    keys |= tokens.view(np.uint64)  # ids are >= 0 and < 2^16
    out_keys = out.view(np.uint64)
    first_dropped = np.zeros(len(kept), dtype=np.uint64)  # smallest key past the truncation point, if any
    bounds, starts, lengths = indptr.tolist(), begins.tolist(), kept.tolist()
    for i, begin in enumerate(starts):
        row, n = keys[bounds[i] : bounds[i + 1]], lengths[i]
        if len(row) > n:  # only the top n need sorting: put the (n+1)-th key in place, the n smaller before it
            row.partition(n)
            first_dropped[i] = row[n]
            row = row[:n]
        row.sort()
        out_keys[begin : begin + n] = row
    coarse = out_keys >> _TOKEN_BITS
    same = coarse[1:] == coarse[:-1]
    # Pairs that straddle two cells or touch the (not yet written) <cls>/<eos> slots do not count.
    last = begins + kept - 1
    for edge in (begins - 1, last, offsets[1:] - 1):
        same[edge[(edge >= 0) & (edge < len(same))]] = False
    tied = np.zeros(len(kept) + 1, dtype=bool)
    tied[np.searchsorted(begins, np.flatnonzero(same), side="right") - 1] = True
    truncated = np.flatnonzero(first_dropped)
    tied[truncated] |= (first_dropped[truncated] >> _TOKEN_BITS) == coarse[last[truncated]]
    out_keys &= _TOKEN_MASK  # every slot but <cls>/<eos> (set later) holds a key: keep its token bits
    return np.flatnonzero(tied[:-1])
