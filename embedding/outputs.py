"""Write a finished run's parts as the output: parquet (one row per input cell) or a copy of the input AnnData.

Both are written to a temporary name and renamed when whole, and carry a record of how they were made.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

RECORD_KEY = "embedding_record"  # parquet schema metadata key / AnnData uns key of the run's record


def _temporary(out: Path) -> Path:
    return out.parent / f".{out.name}.tmp-{os.getpid()}{out.suffix}"


def chunk_arrays(
    part: dict, first_row: int, n_rows: int, dim: int, dtype: np.dtype, n_classes: int
) -> dict[str, np.ndarray]:
    """A part's vectors spread over all rows of its chunk; NaN and embedded=False where a cell was filtered out."""
    at = part["rows"] - first_row
    vectors = np.full((n_rows, dim), np.nan, dtype=dtype)
    vectors[at] = part["vectors"]
    embedded = np.zeros(n_rows, dtype=bool)
    embedded[at] = True
    arrays = {"vectors": vectors, "embedded": embedded}
    if n_classes:
        probabilities = np.full((n_rows, n_classes), np.nan, dtype=np.float32)
        probabilities[at] = part["probabilities"]
        arrays["probabilities"] = probabilities
    return arrays


def _fixed_size_list(matrix: np.ndarray) -> pa.Array:
    return pa.FixedSizeListArray.from_arrays(
        pa.array(np.ascontiguousarray(matrix).reshape(-1)), matrix.shape[1]
    )


def _take(column: np.ndarray | list, start: int, stop: int) -> pa.Array:
    values = column[start:stop]
    return pa.array(values if isinstance(values, np.ndarray) else list(values))


def write_parquet(
    out: Path, chunks: Iterator[tuple[int, int, dict]], columns: dict, labels: list[str] | None, record: dict
) -> Path:
    """Parquet with cell_index, the cell id / metadata columns, embedded, embedding (+ predicted_label and
    probabilities for a classifier), streamed chunk by chunk; the record is in the schema metadata."""
    tmp = _temporary(out)
    writer = None
    try:
        for first_row, n_rows, arrays in chunks:
            table = {"cell_index": pa.array(np.arange(first_row, first_row + n_rows, dtype=np.int64))}
            table |= {name: _take(values, first_row, first_row + n_rows) for name, values in columns.items()}
            table["embedded"] = pa.array(arrays["embedded"])
            table["embedding"] = _fixed_size_list(arrays["vectors"])
            if labels is not None:
                best = np.nan_to_num(arrays["probabilities"], nan=-1.0).argmax(1)
                table["predicted_label"] = pa.array(
                    [labels[i] if ok else None for i, ok in zip(best, arrays["embedded"], strict=True)],
                    type=pa.string(),
                )
                table["probabilities"] = _fixed_size_list(arrays["probabilities"])
            batch = pa.table(table)
            if writer is None:
                schema = batch.schema.with_metadata({RECORD_KEY: json.dumps(record)})
                writer = pq.ParquetWriter(tmp, schema)
            writer.write_table(batch.cast(writer.schema))
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out


def write_h5ad(
    out: Path,
    source: Path,
    chunks: Iterator[tuple[int, int, dict]],
    key: str,
    labels: list[str] | None,
    record: dict,
) -> Path:
    """A copy of `source` with the embedding in obsm[key], obs[key + '_embedded'], and for a classifier
    obs[key + '_predicted_label'] and obsm[key + '_probabilities']; the record goes to uns[RECORD_KEY][key]."""
    import anndata

    adata = anndata.read_h5ad(source)
    parts = [arrays for _, _, arrays in chunks]
    vectors = np.concatenate([p["vectors"] for p in parts])
    if len(vectors) != adata.n_obs:
        raise ValueError(
            f"{source} has {adata.n_obs} cells but {len(vectors)} were embedded; was it changed "
            "during the run? rerun with --overwrite"
        )
    adata.obsm[key] = vectors
    embedded = np.concatenate([p["embedded"] for p in parts])
    adata.obs[f"{key}_embedded"] = embedded
    if labels is not None:
        probabilities = np.concatenate([p["probabilities"] for p in parts])
        best = np.nan_to_num(probabilities, nan=-1.0).argmax(1)
        adata.obs[f"{key}_predicted_label"] = pd.Categorical(
            [labels[i] if ok else None for i, ok in zip(best, embedded, strict=True)], categories=labels
        )
        adata.obsm[f"{key}_probabilities"] = probabilities
    adata.uns.setdefault(RECORD_KEY, {})[key] = json.dumps(record)
    tmp = _temporary(out)
    try:
        adata.write_h5ad(tmp)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out
