"""Synthetic Genecorpus-like corpus: the embedded default for the quick start, tests and benchmarks.

Cells of a few types, each with its own ranked gene program plus noise, so masked-LM is learnable.
"""

from __future__ import annotations

import argparse
import fcntl
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dataset.vocab import V1_VOCAB_SIZE, Vocabulary

log = logging.getLogger(__name__)

DEFAULT_CELLS = 4000
MIN_LENGTH, MAX_LENGTH = 32, 2048
MEDIAN_LENGTH, LENGTH_SIGMA = 300, 0.75  # log-normal: mean about 400 tokens, a tail reaching 2048
N_MARKERS = 300  # type-specific genes promoted into each program's top ranks


def _programs(rng: np.random.Generator, n_types: int, first_gene: int, vocab_size: int) -> np.ndarray:
    """[n_types, n_genes] gene rankings: a shared base ranking (housekeeping genes on top) into which each
    type promotes its own marker genes, like real cell types sharing most of their expressed genes."""
    n_genes = vocab_size - first_gene
    base = first_gene + rng.permutation(n_genes)
    programs = np.empty((n_types, n_genes), dtype=np.int64)
    for t in range(n_types):
        marker_pos = 200 + rng.choice(n_genes - 200, size=N_MARKERS, replace=False)
        markers = base[marker_pos]
        rest = np.delete(base, marker_pos)
        # Markers land at random ranks among the first ~1000, keeping their relative order.
        slots = np.sort(rng.choice(1000, size=N_MARKERS, replace=False))
        program = np.insert(rest, slots - np.arange(N_MARKERS), markers)
        programs[t] = program
    return programs


def _cells(rng: np.random.Generator, programs: np.ndarray, types: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Flat token ids of cells: each type's ranking, locally reshuffled, with a few genes swapped in."""
    total = int(lengths.sum())
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int32)
    slot = np.arange(total, dtype=np.int32) - np.repeat(starts, lengths)
    cell_len = np.repeat(lengths.astype(np.int32), lengths)
    type_of = np.repeat(types, lengths)
    # Rank noise: swap disjoint pairs of slots (distance 1, 2, 4, 8, 16) with probability 1/2 each,
    # so a gene drifts a few ranks from its program position, as expression noise does.
    coin = rng.integers(0, 256, size=total, dtype=np.uint8)  # one random bit per round, drawn at once
    rank = slot.copy()
    for k, d in enumerate((1, 2, 4, 8, 16)):
        src = np.flatnonzero(((slot & d) == 0) & (slot + d < cell_len) & ((coin >> k) & 1).astype(bool))
        rank[src], rank[src + d] = rank[src + d], rank[src].copy()
    tokens = programs[type_of, rank]
    # About 5% of ranks hold a gene from deep in the type's ranking (dropout / rare expression).
    noisy = np.flatnonzero(rng.integers(0, 256, size=total, dtype=np.uint8) < 13)
    deep = MAX_LENGTH + rng.integers(0, programs.shape[1] - MAX_LENGTH, size=len(noisy))
    tokens[noisy] = programs[type_of[noisy], deep]
    return tokens


def write_builtin_corpus(
    out_dir: str | os.PathLike,
    *,
    n_cells: int = DEFAULT_CELLS,
    seed: int = 0,
    vocab_size: int = V1_VOCAB_SIZE,
    n_cell_types: int = 8,
    n_shards: int = 4,
) -> Path:
    """Writes `shard-XXXXX.parquet` (input_ids list<int32>, length int32, cell_type string) and vocab.txt."""
    if n_cells < 1 or n_cell_types < 1 or n_shards < 1:
        raise ValueError(f"n_cells, n_cell_types, n_shards must be >= 1 (got {n_cells}, {n_cell_types}, {n_shards})")
    vocab = Vocabulary.synthetic(vocab_size)
    if vocab_size - vocab.first_gene_id < MAX_LENGTH + 1000:
        raise ValueError(f"vocab_size={vocab_size} is too small for {MAX_LENGTH}-gene cells; use >= {MAX_LENGTH + 1002}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    programs = _programs(rng, n_cell_types, vocab.first_gene_id, vocab_size)
    type_names = np.array([f"cell_type_{t}" for t in range(n_cell_types)])
    shard_sizes = np.diff(np.linspace(0, n_cells, n_shards + 1).astype(np.int64))
    for s, size in enumerate(shard_sizes):
        shard_rng = np.random.default_rng([seed, s])
        lengths = np.clip(np.round(shard_rng.lognormal(np.log(MEDIAN_LENGTH), LENGTH_SIGMA, size)),
                          MIN_LENGTH, MAX_LENGTH).astype(np.int32)
        types = shard_rng.integers(0, n_cell_types, size=size)
        tokens = _cells(shard_rng, programs, types, lengths).astype(np.int32)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        table = pa.table({
            "input_ids": pa.ListArray.from_arrays(pa.array(offsets), pa.array(tokens)),
            "length": pa.array(lengths),
            "cell_type": pa.array(type_names[types]),
        })
        pq.write_table(table, out / f"shard-{s:05d}.parquet", row_group_size=16_384)
    vocab.save(out / "vocab.txt")
    return out


def ensure_builtin_corpus(cache_dir: str | os.PathLike, *, n_cells: int = DEFAULT_CELLS, seed: int = 0, **kwargs) -> Path:
    """The built-in corpus under cache_dir (named by its size and seed), written once, atomically."""
    cache = Path(cache_dir)
    out = cache / f"builtin_corpus-{n_cells}cells-seed{seed}"
    if (out / "vocab.txt").exists():
        return out
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # concurrent ranks: one writes, the others wait and reuse
        if (out / "vocab.txt").exists():
            return out
        tmp = cache / f".{out.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            write_builtin_corpus(tmp, n_cells=n_cells, seed=seed, **kwargs)
            os.replace(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("wrote the built-in corpus (%d cells) to %s", n_cells, out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write the synthetic built-in cell corpus (parquet shards + vocab.txt).")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--cells", type=int, default=DEFAULT_CELLS, help="number of cells")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cell-types", type=int, default=8)
    parser.add_argument("--shards", type=int, default=4)
    args = parser.parse_args(argv)
    out = write_builtin_corpus(args.out, n_cells=args.cells, seed=args.seed,
                               n_cell_types=args.cell_types, n_shards=args.shards)
    print(f"wrote {args.cells} cells to {out}")


if __name__ == "__main__":
    main()
