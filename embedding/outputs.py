"""Write a finished run's parts as the output: parquet (one row per input cell) or a copy of the input AnnData.

Both are written to a temporary name and renamed when whole, and carry a record of how they were made.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import h5py
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
    obs[key + '_predicted_label'] and obsm[key + '_probabilities']; the record goes to uns[RECORD_KEY][key].

    The file is copied as bytes and the new elements are written into the copy chunk by chunk, so memory does not
    grow with the cells: nothing of the source (X, layers, obsm) is read into memory.
    """
    from anndata.io import read_elem  # anndata only when an .h5ad is written: a slow import

    tmp = _temporary(out)
    try:
        shutil.copyfile(source, tmp)
        with h5py.File(tmp, "r+") as f:
            _check_editable(f, source)
            n_obs = len(f["obs"][f["obs"].attrs["_index"]])
            embedded, best = _stream_obsm(f, chunks, key, n_obs, source)
            obs = f["obs"]
            _write_obs_column(obs, f"{key}_embedded", embedded)
            if labels is not None:
                names = [labels[i] if ok else None for i, ok in zip(best, embedded, strict=True)]
                _write_obs_column(obs, f"{key}_predicted_label", pd.Categorical(names, categories=labels))
            uns = f.require_group("uns")
            _set_encoding(uns, "dict", "0.1.0")
            records = dict(read_elem(uns[RECORD_KEY])) if RECORD_KEY in uns else {}
            _replace(uns, RECORD_KEY, {**records, key: json.dumps(record)})
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out


def _check_editable(f: h5py.File, source: Path) -> None:
    obs = f.get("obs")
    if not isinstance(obs, h5py.Group) or obs.attrs.get("encoding-type") != "dataframe":
        raise ValueError(
            f"{source} uses an old AnnData file layout (obs is not an encoded dataframe); rewrite it with a "
            "current anndata (anndata.read_h5ad(path).write_h5ad(path)) or ask for a .parquet output"
        )


def _stream_obsm(
    f: h5py.File, chunks: Iterator[tuple[int, int, dict]], key: str, n_obs: int, source: Path
) -> tuple[np.ndarray, np.ndarray]:
    """Write each chunk's vectors (and probabilities) into obsm datasets; return embedded and best class."""
    obsm = f.require_group("obsm")
    _set_encoding(obsm, "dict", "0.1.0")
    embedded, best, datasets, written = [], [], {}, 0
    for first_row, n_rows, arrays in chunks:
        if first_row + n_rows > n_obs:
            raise _cell_count_changed(source, n_obs, f"at least {first_row + n_rows}")
        for name, values in (("vectors", key), ("probabilities", f"{key}_probabilities")):
            if name not in arrays:
                continue
            if values not in datasets:
                datasets[values] = _new_array(
                    obsm, values, (n_obs, arrays[name].shape[1]), arrays[name].dtype
                )
            datasets[values][first_row : first_row + n_rows] = arrays[name]
        embedded.append(arrays["embedded"])
        if "probabilities" in arrays:
            best.append(np.nan_to_num(arrays["probabilities"], nan=-1.0).argmax(1))
        written = first_row + n_rows
    if written != n_obs:
        raise _cell_count_changed(source, n_obs, str(written))
    return np.concatenate(embedded), (np.concatenate(best) if best else np.zeros(0, np.int64))


def _cell_count_changed(source: Path, n_obs: int, embedded: str) -> ValueError:
    return ValueError(
        f"{source} has {n_obs} cells but {embedded} were embedded; was it changed during the run? "
        "rerun with --overwrite"
    )


def _new_array(group: h5py.Group, name: str, shape: tuple[int, int], dtype: np.dtype) -> h5py.Dataset:
    if name in group:
        del group[name]  # an earlier run's embedding under the same key is replaced
    rows = max(1, min(shape[0], (1 << 20) // max(1, shape[1] * np.dtype(dtype).itemsize)))
    dataset = group.create_dataset(name, shape=shape, dtype=dtype, chunks=(rows, shape[1]))
    _set_encoding(dataset, "array", "0.2.0")
    return dataset


def _write_obs_column(obs: h5py.Group, name: str, values: np.ndarray | pd.Categorical) -> None:
    """One more obs column (one byte or code a cell: small), registered in the dataframe's column order."""
    _replace(obs, name, values)
    order = [str(c) for c in obs.attrs.get("column-order", [])]
    if name not in order:
        obs.attrs["column-order"] = np.array([*order, name], dtype=object)


def _replace(group: h5py.Group, name: str, value: object) -> None:
    from anndata.io import write_elem

    if name in group:
        del group[name]
    write_elem(group, name, value)


def _set_encoding(node: h5py.Group | h5py.Dataset, kind: str, version: str) -> None:
    node.attrs.setdefault("encoding-type", kind)
    node.attrs.setdefault("encoding-version", version)
