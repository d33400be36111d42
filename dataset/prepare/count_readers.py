"""Chunked readers of raw count matrices: AnnData .h5ad, .loom, and cells x genes CSV/TSV.

Each yields [cells, genes] SciPy CSR chunks plus the cell ids and chosen per-cell columns; memory follows the chunk.
"""

from __future__ import annotations

import csv
import gzip
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

logger = logging.getLogger(__name__)

CountChunk = tuple[sp.csr_matrix, dict[str, np.ndarray]]
CELL_ID = (
    "cell_id"  # every chunk's obs holds the cells' row names under this key (.h5ad obs index, loom CellID)
)
LOOM_CELL_IDS = ("CellID", "obs_names", "cell_id")  # loom column attributes that name cells, by convention


def _decode(values: np.ndarray) -> np.ndarray:
    if values.dtype.kind in ("S", "O"):
        return np.array([v.decode() if isinstance(v, bytes) else str(v) for v in values], dtype=object)
    return values


@dataclass
class CountSource:
    """An open count matrix. `gene_names` are the raw identifiers of its columns, in column order."""

    path: Path
    format: str
    matrix: str  # which matrix: "X", "layers/counts", "raw/X", "matrix", "table"
    gene_column: str
    gene_names: list[str]
    n_cells: int
    obs_available: list[str]
    _handle: object = field(default=None, repr=False)

    def check_obs_columns(self, columns: Sequence[str]) -> None:
        missing = [c for c in columns if c not in self.obs_available]
        if missing:
            raise ValueError(
                f"{self.path}: per-cell column(s) {missing} not found; available: {self.obs_available or 'none'}. "
                "Fix --obs-columns."
            )

    def iter_chunks(self, chunk_size: int, obs_columns: Sequence[str] = ()) -> Iterator[CountChunk]:
        raise NotImplementedError

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def __enter__(self) -> CountSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _H5adSource(CountSource):
    def _matrix_element(self) -> h5py.Dataset | h5py.Group:
        return self._handle[self.matrix]

    def iter_chunks(self, chunk_size: int, obs_columns: Sequence[str] = ()) -> Iterator[CountChunk]:
        from anndata.io import read_elem, sparse_dataset

        self.check_obs_columns(columns=obs_columns)
        group = self._handle["obs"]
        obs = {c: np.asarray(read_elem(group[c])) for c in obs_columns}
        obs[CELL_ID] = _decode(np.asarray(read_elem(group[group.attrs.get("_index", "_index")])))
        element = self._matrix_element()
        encoding = element.attrs.get("encoding-type", "array") if isinstance(element, h5py.Group) else "array"
        if encoding == "csc_matrix":
            logger.warning(
                "%s: %s is stored column-major (CSC); reading rows from it is slow", self.path, self.matrix
            )
            csc = sparse_dataset(element)
        for start in range(0, self.n_cells, chunk_size):
            stop = min(start + chunk_size, self.n_cells)
            if encoding == "csr_matrix":
                indptr = element["indptr"][start : stop + 1].astype(np.int64)
                lo, hi = int(indptr[0]), int(indptr[-1])
                indptr -= lo
                if (
                    hi - lo < 1 << 31
                ):  # int32 like the indices: SciPy then takes them as they are, without a scan
                    indptr = indptr.astype(np.int32)
                matrix = sp.csr_matrix(
                    (element["data"][lo:hi], element["indices"][lo:hi], indptr),
                    shape=(stop - start, len(self.gene_names)),
                )
            elif encoding == "csc_matrix":
                matrix = sp.csr_matrix(csc[start:stop])
            else:
                matrix = sp.csr_matrix(element[start:stop])
            yield matrix, {c: v[start:stop] for c, v in obs.items()}


def _open_h5ad(path: Path, layer: str | None, gene_column: str | None) -> CountSource:
    from anndata.io import read_elem

    handle = h5py.File(path, "r")
    if layer in (None, "X"):
        matrix, var_group = "X", "var"
    elif layer in ("raw", "raw/X", "raw.X"):
        matrix, var_group = "raw/X", "raw/var"
    else:
        matrix, var_group = f"layers/{layer}", "var"
    if matrix not in handle:
        layers = list(handle["layers"].keys()) if "layers" in handle else []
        layers += ["raw"] if "raw" in handle else []
        handle.close()
        raise ValueError(
            f"{path}: no count matrix '{matrix}'; other matrices in this file: {layers or 'none'}. "
            "Fix --layer (X, raw, or a layer name)."
        )
    var = handle[var_group]
    index_name = var.attrs.get("_index", "_index")
    column = gene_column or index_name
    if column not in var:
        available = [k for k in var if k != "__categories"]
        handle.close()
        raise ValueError(
            f"{path}: {var_group} has no column '{column}'; available: {available}. Fix --gene-column."
        )
    genes = [str(g) for g in np.asarray(read_elem(var[column]))]
    obs = handle["obs"]
    obs_available = [k for k in obs if k != "__categories" and k != obs.attrs.get("_index", "_index")]
    element = handle[matrix]
    n_cells = element.attrs["shape"][0] if isinstance(element, h5py.Group) else element.shape[0]
    return _H5adSource(
        path=path,
        format="h5ad",
        matrix=matrix,
        gene_column=column if gene_column else f"{var_group} index",
        gene_names=genes,
        n_cells=int(n_cells),
        obs_available=obs_available,
        _handle=handle,
    )


class _LoomSource(CountSource):
    def iter_chunks(self, chunk_size: int, obs_columns: Sequence[str] = ()) -> Iterator[CountChunk]:
        self.check_obs_columns(obs_columns)
        matrix = self._handle[self.matrix]  # genes x cells
        col_attrs = self._handle["col_attrs"]
        for start in range(0, self.n_cells, chunk_size):
            stop = min(start + chunk_size, self.n_cells)
            obs = {c: _decode(col_attrs[c][start:stop]) for c in obs_columns}
            obs[CELL_ID] = _loom_cell_ids(col_attrs, start, stop)
            yield sp.csr_matrix(matrix[:, start:stop].T), obs


def _loom_cell_ids(col_attrs: h5py.Group, start: int, stop: int) -> np.ndarray:
    """The loom's cell names (its CellID attribute), or the 0-based column number where it names none."""
    for name in LOOM_CELL_IDS:
        if name in col_attrs:
            return np.array([str(v) for v in _decode(col_attrs[name][start:stop])], dtype=object)
    return np.array([str(i) for i in range(start, stop)], dtype=object)


def _open_loom(path: Path, layer: str | None, gene_column: str | None) -> CountSource:
    handle = h5py.File(path, "r")
    matrix = "matrix" if layer in (None, "X", "matrix") else f"layers/{layer}"
    if matrix not in handle:
        layers = list(handle["layers"].keys()) if "layers" in handle else []
        handle.close()
        raise ValueError(f"{path}: no loom matrix '{matrix}'; layers: {layers or 'none'}. Fix --layer.")
    column = gene_column or "ensembl_id"
    row_attrs = handle["row_attrs"]
    if column not in row_attrs:
        available = list(row_attrs.keys())
        handle.close()
        raise ValueError(
            f"{path}: loom row attribute '{column}' not found; available: {available}. "
            "Fix --gene-column (e.g. --gene-column Accession for Ensembl ids, Gene with --gene-names for symbols)."
        )
    return _LoomSource(
        path=path,
        format="loom",
        matrix=matrix,
        gene_column=column,
        gene_names=[str(g) for g in _decode(row_attrs[column][:])],
        n_cells=int(handle[matrix].shape[1]),
        obs_available=list(handle["col_attrs"].keys()),
        _handle=handle,
    )


class _TableSource(CountSource):
    def iter_chunks(self, chunk_size: int, obs_columns: Sequence[str] = ()) -> Iterator[CountChunk]:
        self.check_obs_columns(obs_columns)
        reader = pd.read_csv(self.path, sep=self._sep, index_col=0, chunksize=chunk_size)
        for frame in reader:
            try:
                values = frame.to_numpy(dtype=np.float64)
            except ValueError as error:
                raise ValueError(
                    f"{self.path}: non-numeric value in the count table near cell '{frame.index[0]}' ({error}); "
                    "the table must be cells x genes with a cell id first column and numbers elsewhere"
                ) from error
            names = np.asarray(frame.index.astype(str), dtype=object)
            yield sp.csr_matrix(values), {c: names for c in obs_columns} | {CELL_ID: names}

    @property
    def _sep(self) -> str:
        name = self.path.name.lower().removesuffix(".gz")
        return "," if name.endswith(".csv") else "\t"


def _open_table(path: Path, layer: str | None, gene_column: str | None) -> CountSource:
    if layer not in (None, "X"):
        raise ValueError(f"{path}: --layer {layer} applies to .h5ad/.loom only; a CSV/TSV holds one matrix")
    if gene_column is not None:
        raise ValueError(
            f"{path}: --gene-column applies to .h5ad/.loom; a CSV/TSV's genes are its header row"
        )
    name = path.name.lower().removesuffix(".gz")
    index_name, genes = _table_header(path, "," if name.endswith(".csv") else "\t")
    return _TableSource(
        path=path,
        format="csv" if name.endswith(".csv") else "tsv",
        matrix="table",
        gene_column="header row",
        gene_names=genes,
        n_cells=-1,  # unknown without reading the whole table; the tokenizer counts rows as it goes
        obs_available=[index_name] if index_name and index_name != CELL_ID else [],
        _handle=None,
    )


def _table_header(path: Path, sep: str) -> tuple[str, list[str]]:
    """(name of the cell id column, gene names) from the first line. The csv module reads a 30,000-gene header
    in milliseconds; pandas' parser takes seconds on it."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rt", newline="", encoding="utf-8-sig") as handle:  # a BOM is not part of a name
        header = next(csv.reader(handle, delimiter=sep), None)
    if not header or len(header) < 2:
        raise ValueError(
            f"{path}: the first line must be a header: a cell id column, then one column per gene"
        )
    return header[0].strip(), [g.strip() for g in header[1:]]


def open_counts(path: str | Path, *, layer: str | None = None, gene_column: str | None = None) -> CountSource:
    """Open .h5ad, .loom, or .csv/.tsv(.gz) (cells x genes, header = genes, first column = cell id).

    `layer` picks another matrix (.h5ad: a layer name or `raw`; .loom: a layer); `gene_column` the var / row
    attribute holding gene identifiers (default: the .h5ad var index, the .loom `ensembl_id` attribute).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"input {path} does not exist")
    name = path.name.lower().removesuffix(".gz")
    try:
        if name.endswith(".h5ad"):
            return _open_h5ad(path, layer, gene_column)
        if name.endswith(".loom"):
            return _open_loom(path, layer, gene_column)
    except OSError as error:
        raise ValueError(
            f"{path}: cannot read as HDF5 ({error}); is the file complete and really {path.suffix}?"
        ) from error
    if name.endswith((".csv", ".tsv", ".txt")):
        return _open_table(path, layer, gene_column)
    raise ValueError(f"{path}: unknown input format; expected .h5ad, .loom, .csv, .tsv (optionally .gz)")
