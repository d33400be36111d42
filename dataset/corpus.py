"""Tokenized cell corpus on disk (parquet file, dir of parquet shards, or HF `save_to_disk` Arrow dir).

A one-time validated index (flat token file + offsets) gives O(1) random access with flat resident memory.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from common.collectives import barrier

log = logging.getLogger(__name__)

INDEX_FORMAT = 1
_READ_ROWS = 65_536  # rows per record batch while indexing: bounded memory, few Python iterations


def default_cache_dir() -> Path:
    """Where indexes go when no cache_dir is given: the user's cache, so read-only corpora work too."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "geneformer_recipe" / "cell_index"


def truncate_cell(tokens: np.ndarray, max_length: int, ends: tuple[int, int] | None = None) -> np.ndarray:
    """The cell's first `max_length` tokens. A cell that opens with `ends[0]` and closes with `ends[1]` (V2:
    <cls> ... <eos>) keeps both and loses genes in between, so a truncated V2 cell still ends as the model expects."""
    if len(tokens) <= max_length:
        return tokens
    out = np.array(tokens[:max_length])
    if ends is not None and tokens[0] == ends[0] and tokens[-1] == ends[1]:
        out[-1] = ends[1]
    return out


class CellCorpus:
    """Cells of gene token ids; `corpus[i]` is cell i truncated to `max_length` tokens (see `truncate_cell`).

    The first open writes an index (tokens as one flat uint16/int32 file, int64 offsets, full lengths)
    under `cache_dir`; later opens reuse it until a source file's size or mtime changes. Cells are read
    with positional reads, so the page cache is shared between processes and process memory stays flat.
    """

    @classmethod
    def open_on_all_ranks(
        cls,
        path: str | os.PathLike,
        *,
        is_main: bool,
        vocab_size: int,
        max_length: int,
        cache_dir: str | os.PathLike | None = None,
        ends: tuple[int, int] | None = None,
    ) -> CellCorpus:
        """Rank 0 prepares the index first; the other ranks then open the finished one instead of racing it."""
        kwargs = dict(vocab_size=vocab_size, max_length=max_length, cache_dir=cache_dir, ends=ends)
        corpus = cls(path, **kwargs) if is_main else None
        barrier()
        return corpus if corpus is not None else cls(path, **kwargs)

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        vocab_size: int,
        max_length: int,
        cache_dir: str | os.PathLike | None = None,
        ends: tuple[int, int] | None = None,
    ) -> None:
        if vocab_size <= 0:
            raise ValueError(f"vocab_size must be positive, got {vocab_size}")
        if max_length <= 0:
            raise ValueError(f"max_length must be positive, got {max_length}")
        self.path = Path(path).resolve()
        self.vocab_size = int(vocab_size)
        self.max_length = int(max_length)
        self.ends = ends  # (<cls>, <eos>) ids of a V2 vocabulary (Vocabulary.cell_ends): kept by truncation
        self.format, self.files = _discover_sources(self.path)
        cache_root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        digest = hashlib.sha1(str(self.path).encode()).hexdigest()[:12]
        self.index_dir = cache_root / f"{self.path.name}-{digest}"
        self.meta = _ensure_index(self.index_dir, self.format, self.files, self.vocab_size)
        self._check_vocab_range()
        self.full_lengths = np.load(self.index_dir / "lengths.npy")
        self.lengths = np.minimum(self.full_lengths, self.max_length).astype(np.int32)
        self.n_truncated = int(np.count_nonzero(self.full_lengths > self.max_length))
        if self.n_truncated:
            log.warning(
                "%s: %d of %d cells are longer than max_length=%d and are truncated to %d tokens%s",
                self.path,
                self.n_truncated,
                len(self),
                self.max_length,
                self.max_length,
                " (cells wrapped in <cls> ... <eos> keep both; genes are cut in between)" if ends else "",
            )
        self._dtype = np.dtype(self.meta["token_dtype"])
        self._fds: tuple[int, int, int] | None = None  # (pid, tokens fd, offsets fd), reopened after fork
        self._columns: dict[str, object] = {}

    def __len__(self) -> int:
        return int(self.meta["n_cells"])

    @property
    def column_names(self) -> list[str]:
        return list(self.meta["columns"])

    def __getitem__(self, i: int) -> np.ndarray:
        n = len(self)
        i = int(i)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"cell index {i} out of range for a corpus of {n} cells")
        _, tok_fd, off_fd = self._open()
        start = int(np.frombuffer(os.pread(off_fd, 8, 8 * i), dtype=np.int64)[0])
        count, full = int(self.lengths[i]), int(self.full_lengths[i])
        size = self._dtype.itemsize
        tokens = np.frombuffer(os.pread(tok_fd, count * size, start * size), dtype=self._dtype).astype(
            np.int32
        )
        if self.ends is None or count == full:
            return tokens
        # The head plus the cell's last token is all truncate_cell looks at: no need to read the genes between.
        last = np.frombuffer(os.pread(tok_fd, size, (start + full - 1) * size), dtype=self._dtype)
        return truncate_cell(np.concatenate([tokens, last.astype(np.int32)]), count, self.ends)

    def get_many(self, indices: np.ndarray | list[int]) -> list[np.ndarray]:
        return [self[i] for i in indices]

    def __iter__(self) -> Iterator[np.ndarray]:
        for i in range(len(self)):
            yield self[i]

    def column(self, name: str) -> np.ndarray | list:
        """A whole extra column (e.g. `cell_type`), read from the source files once and cached."""
        if name == "input_ids":
            raise ValueError("column('input_ids') would load every token into memory; use corpus[i]")
        if name not in self.meta["columns"]:
            raise KeyError(f"{self.path} has no column '{name}'; columns are {self.column_names}")
        if name not in self._columns:
            chunks = [_read_column(f, self.format, name) for f in self.files]
            array = pa.concat_arrays([c for chunk in chunks for c in chunk.chunks])
            kind = array.type
            if pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind):
                self._columns[name] = array.to_numpy(zero_copy_only=False)
            else:
                self._columns[name] = array.to_pylist()
        return self._columns[name]

    def locate(self, i: int) -> tuple[Path, int]:
        """(source file, row within that file) of cell i, for error messages."""
        rows = np.cumsum([0] + list(self.meta["rows_per_file"]))
        f = int(np.searchsorted(rows, i, side="right") - 1)
        return self.files[f], int(i - rows[f])

    def _open(self) -> tuple[int, int, int]:
        pid = os.getpid()
        if self._fds is None or self._fds[0] != pid:
            self._fds = (
                pid,
                os.open(self.index_dir / "tokens.bin", os.O_RDONLY),
                os.open(self.index_dir / "offsets.bin", os.O_RDONLY),
            )
        return self._fds

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_fds"] = None  # file descriptors do not travel to DataLoader worker processes
        return state

    def __del__(self) -> None:
        fds = self.__dict__.get("_fds")
        if fds is not None and fds[0] == os.getpid():
            os.close(fds[1])
            os.close(fds[2])

    def _check_vocab_range(self) -> None:
        lo, hi = self.meta["min_token"], self.meta["max_token"]
        if lo >= 0 and hi < self.vocab_size:
            return
        # The index was built for a larger vocabulary: find the first offending cell for the message.
        tokens = np.memmap(self.index_dir / "tokens.bin", dtype=self.meta["token_dtype"], mode="r")
        offsets = np.memmap(self.index_dir / "offsets.bin", dtype=np.int64, mode="r")
        chunk = 1 << 24
        for start in range(0, len(tokens), chunk):
            bad = np.flatnonzero(tokens[start : start + chunk] >= self.vocab_size)
            if len(bad):
                pos = start + int(bad[0])
                cell = int(np.searchsorted(offsets, pos, side="right") - 1)
                f, row = self.locate(cell)
                raise ValueError(_bad_token_message(f, row, int(tokens[pos]), self.vocab_size))
        raise AssertionError("index metadata says a token is out of range but none was found")


def _bad_token_message(f: Path, row: int, token: int, vocab_size: int) -> str:
    return (
        f"{f}: row {row} (0-based) has input_ids token {token} outside [0, {vocab_size}); "
        f"tokenize with the model's vocabulary or set vocab_size to the vocabulary the corpus was tokenized with"
    )


def _discover_sources(path: Path) -> tuple[str, list[Path]]:
    if not path.exists():
        raise FileNotFoundError(
            f"corpus path {path} does not exist; pass a .parquet file, a dir of shards or an Arrow dir"
        )
    if path.is_file():
        if path.suffix == ".arrow":
            return "arrow", [path]
        if path.suffix != ".parquet":
            raise ValueError(
                f"{path}: unsupported corpus file; pass a .parquet file, a dir of .parquet shards or a HF Arrow dir"
            )
        return "parquet", [path]
    if (path / "dataset_dict.json").exists():
        splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
        raise ValueError(
            f"{path} is a DatasetDict; pass one split directory, e.g. {path / (splits[0] if splits else 'train')}"
        )
    state = path / "state.json"
    if state.exists():
        names = [d["filename"] for d in json.loads(state.read_text()).get("_data_files", [])]
        files = [path / n for n in names] if names else sorted(path.glob("*.arrow"))
        if not files:
            raise ValueError(
                f"{path}/state.json lists no Arrow data files; re-save the dataset with save_to_disk"
            )
        return "arrow", files
    files = sorted(
        p
        for p in path.rglob("*.parquet")
        if not any(part.startswith(".") for part in p.relative_to(path).parts)
    )
    if files:
        return "parquet", files
    arrows = sorted(path.glob("*.arrow"))
    if arrows:
        return "arrow", arrows
    raise FileNotFoundError(f"{path} holds no .parquet shards and no Arrow dataset (state.json + *.arrow)")


def _schema(f: Path, fmt: str) -> pa.Schema:
    if fmt == "parquet":
        return pq.read_schema(f)
    with pa.memory_map(str(f)) as source:
        return _open_ipc(source).schema


def _open_ipc(source: pa.NativeFile):
    try:
        return pa.ipc.open_stream(source)  # what datasets' save_to_disk writes
    except pa.ArrowInvalid:
        source.seek(0)
        return pa.ipc.open_file(source)


def _record_batches(f: Path, fmt: str, columns: list[str]) -> Iterator[pa.RecordBatch]:
    if fmt == "parquet":
        yield from pq.ParquetFile(f).iter_batches(batch_size=_READ_ROWS, columns=columns)
        return
    with pa.memory_map(str(f)) as source:
        reader = _open_ipc(source)
        batches = (
            reader
            if isinstance(reader, pa.ipc.RecordBatchStreamReader)
            else (reader.get_batch(i) for i in range(reader.num_record_batches))
        )
        for batch in batches:
            yield batch.select(columns)


def _read_column(f: Path, fmt: str, name: str) -> pa.ChunkedArray:
    if fmt == "parquet":
        return pq.read_table(f, columns=[name]).column(name)
    return pa.chunked_array([b.column(0) for b in _record_batches(f, fmt, [name])])


def _validate_schema(f: Path, schema: pa.Schema) -> bool:
    """Checks column types; returns whether a `length` column is present."""
    if "input_ids" not in schema.names:
        raise ValueError(
            f"{f}: no 'input_ids' column (columns: {schema.names}); tokenize the cells first "
            f"(dataset.prepare.tokenize) or rename the token-id column to input_ids"
        )
    kind = schema.field("input_ids").type
    if not (pa.types.is_list(kind) or pa.types.is_large_list(kind)) or not pa.types.is_integer(
        kind.value_type
    ):
        raise ValueError(
            f"{f}: column 'input_ids' has type {kind}; it must be a list of integers (gene token ids)"
        )
    if "length" in schema.names and not pa.types.is_integer(schema.field("length").type):
        raise ValueError(
            f"{f}: column 'length' has type {schema.field('length').type}; it must be an integer "
            f"(the number of tokens in input_ids)"
        )
    return "length" in schema.names


def _fingerprint(files: list[Path]) -> list[list]:
    return [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files]


def _ensure_index(index_dir: Path, fmt: str, files: list[Path], vocab_size: int) -> dict:
    fingerprint = _fingerprint(files)
    meta = _read_meta(index_dir)
    if meta is not None and meta["fingerprint"] == fingerprint:
        return meta
    index_dir.parent.mkdir(parents=True, exist_ok=True)
    # One builder at a time (ranks on one node start together); the others wait and reuse its result.
    with open(index_dir.parent / f".{index_dir.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        meta = _read_meta(index_dir)
        if meta is not None and meta["fingerprint"] == fingerprint:
            return meta
        if meta is not None:
            log.info("%s: source files changed since the index was built; rebuilding", index_dir)
        tmp = index_dir.parent / f".{index_dir.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            meta = _build_index(tmp, fmt, files, fingerprint, vocab_size)
            if index_dir.exists():
                stale = index_dir.parent / f".{index_dir.name}.stale-{os.getpid()}"
                os.replace(index_dir, stale)
                shutil.rmtree(stale)
            os.replace(tmp, index_dir)  # atomic: readers see no index or a complete one
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return meta


def _read_meta(index_dir: Path) -> dict | None:
    meta_path = index_dir / "meta.json"
    if not meta_path.exists():
        return None
    meta = json.loads(meta_path.read_text())
    return meta if meta.get("format") == INDEX_FORMAT else None


def _build_index(out: Path, fmt: str, files: list[Path], fingerprint: list, vocab_size: int) -> dict:
    # Ids fit in uint16 for every Geneformer vocabulary: half the disk and I/O of int32.
    token_dtype = np.uint16 if vocab_size <= 1 << 16 else np.int32
    columns: list[str] | None = None
    rows_per_file, lengths_parts = [], []
    n_tokens, lo, hi = 0, None, None
    with open(out / "tokens.bin", "wb") as tok_out, open(out / "offsets.bin", "wb") as off_out:
        off_out.write(np.zeros(1, dtype=np.int64).tobytes())
        for f in files:
            schema = _schema(f, fmt)
            has_length = _validate_schema(f, schema)
            columns = columns or list(schema.names)
            row0 = 0
            for batch in _record_batches(f, fmt, ["input_ids", "length"] if has_length else ["input_ids"]):
                ids = batch.column(0)
                values, lengths = _check_batch(
                    f, row0, ids, batch.column(1) if has_length else None, vocab_size
                )
                if len(values):
                    lo = int(values.min()) if lo is None else min(lo, int(values.min()))
                    hi = int(values.max()) if hi is None else max(hi, int(values.max()))
                tok_out.write(values.astype(token_dtype, copy=False).tobytes())
                off_out.write((n_tokens + np.cumsum(lengths, dtype=np.int64)).tobytes())
                n_tokens += int(lengths.sum(dtype=np.int64))
                lengths_parts.append(lengths.astype(np.int32))
                row0 += len(ids)
            rows_per_file.append(row0)
    lengths = np.concatenate(lengths_parts) if lengths_parts else np.zeros(0, np.int32)
    if len(lengths) == 0:
        raise ValueError(f"{files[0].parent}: the corpus has no cells")
    np.save(out / "lengths.npy", lengths)
    meta = {
        "format": INDEX_FORMAT,
        "source_format": fmt,
        "fingerprint": fingerprint,
        "columns": columns,
        "rows_per_file": rows_per_file,
        "n_cells": len(lengths),
        "n_tokens": n_tokens,
        "min_token": lo,
        "max_token": hi,
        "token_dtype": np.dtype(token_dtype).name,
    }
    (out / "meta.json").write_text(json.dumps(meta))
    return meta


def _check_batch(f: Path, row0: int, ids: pa.Array, length: pa.Array | None, vocab_size: int):
    """Validates one record batch; returns (flat token values, per-cell lengths) as numpy."""
    if ids.null_count:
        row = row0 + int(np.flatnonzero(ids.is_null().to_numpy(zero_copy_only=False))[0])
        raise ValueError(f"{f}: row {row} (0-based) has a null input_ids; drop that cell or re-tokenize it")
    offsets = ids.offsets.to_numpy()
    lengths = np.diff(offsets)
    values = ids.values.slice(offsets[0], offsets[-1] - offsets[0])
    if values.null_count:
        pos = int(np.flatnonzero(values.is_null().to_numpy(zero_copy_only=False))[0])
        row = row0 + int(np.searchsorted(offsets - offsets[0], pos, side="right") - 1)
        raise ValueError(f"{f}: row {row} (0-based) has a null token in input_ids; re-tokenize that cell")
    values = values.to_numpy()
    empty = np.flatnonzero(lengths == 0)
    if len(empty):
        raise ValueError(
            f"{f}: row {row0 + int(empty[0])} (0-based) has an empty input_ids "
            f"({len(empty)} empty cells in this batch); drop cells without expressed genes"
        )
    if len(values):
        bad = np.flatnonzero((values < 0) | (values >= vocab_size))
        if len(bad):
            row = row0 + int(np.searchsorted(offsets - offsets[0], bad[0], side="right") - 1)
            raise ValueError(_bad_token_message(f, row, int(values[bad[0]]), vocab_size))
    if length is not None:
        if length.null_count:
            row = row0 + int(np.flatnonzero(length.is_null().to_numpy(zero_copy_only=False))[0])
            raise ValueError(f"{f}: row {row} (0-based) has a null length; set it to len(input_ids)")
        mismatch = np.flatnonzero(length.to_numpy() != lengths)
        if len(mismatch):
            k = int(mismatch[0])
            raise ValueError(
                f"{f}: row {row0 + k} (0-based) has length {length[k].as_py()} but {lengths[k]} "
                f"input_ids; recompute the length column as len(input_ids)"
            )
    return values, lengths
