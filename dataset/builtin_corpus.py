"""Synthetic Genecorpus-like corpus: the embedded default for the quick start, tests and benchmarks.

Cells are rank-value encoded expression profiles drawn from cell types, cell states and co-expressed modules.

How a cell is made, and why:
- Genes come in co-expressed modules of MODULE_SIZE genes, each gene with a fixed weight in its module. A
  few housekeeping modules are expressed in every cell, each cell type has its own modules (its program),
  and a large pool of weakly expressed background modules fills the long tail of long cells.
- A cell has a type and one of its type's states; a state switches a few of the type's modules up. Each
  module's activity in a cell is its type's level, times the state's boost, times a per-cell factor shared
  by all its genes (co-expression); each gene adds its own small noise. Genes are ranked by expression and
  the cell keeps its top `length` genes (log-normal lengths: a few hundred on average, up to 2,048).
- A few ranks hold a gene from outside every program (dropout / rare expression).
So, as in real cells, a gene's rank alone says little (the types put different genes at the same rank, and
states and per-cell module activities move modules up and down), while the other genes of a cell tell its
type, state and modules, and with them the masked gene: masked-LM is learnable far beyond frequency baselines.
The noise is small enough that a tiny model learns this in a few hundred steps (the CPU quick start).
"""

from __future__ import annotations

import argparse
import fcntl
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dataset.vocab import V1_VOCAB_SIZE, Vocabulary

log = logging.getLogger(__name__)

DEFAULT_CELLS = 4000
N_CELL_TYPES = 16
GENERATOR_VERSION = 2  # part of the cache name: a corpus written by another generator is never reused
MIN_LENGTH, MAX_LENGTH = 64, 2048
MEDIAN_LENGTH, LENGTH_SIGMA = 320, 0.7  # log-normal: mean about 400 genes, a tail reaching 2,048
MODULE_SIZE = 16
HOUSEKEEPING_MODULES = 3  # expressed in every cell, at levels that differ by type
TYPE_MODULES = 40  # each type's own program
BACKGROUND_MODULES = 110  # shared, weakly expressed: the tail of long cells
TOP_LEVEL, LEVEL_STEP = 4.0, 0.1  # log-expression of a type's strongest module, and the gap between modules
STATES_PER_TYPE, STATE_MODULES, STATE_BOOST = 3, 3, 0.15  # a state raises a few modules (log-expression)
MODULE_NOISE, GENE_NOISE = 0.02, 0.0005  # per-cell log-activity noise of a module, and of each gene
GENE_SPREAD = 0.03  # spread of the genes' fixed weights inside a module (log-expression)
DROPOUT_RATE = 0.02  # share of ranks holding a gene from outside every program


@dataclass
class _Programs:
    """Per cell type: the genes it can express ([n_types, G]), their base log-expression and module index."""

    genes: np.ndarray
    base: np.ndarray
    module: np.ndarray  # [n_types, G] module id of each column (shared ids for shared modules)
    state_boost: np.ndarray  # [n_types, n_states, G]
    outside: np.ndarray  # gene ids in no program (dropout genes)


def _programs(rng: np.random.Generator, n_types: int, first_gene: int, vocab_size: int) -> _Programs:
    n_modules = HOUSEKEEPING_MODULES + n_types * TYPE_MODULES + BACKGROUND_MODULES
    genes = first_gene + rng.permutation(vocab_size - first_gene)
    module_genes = genes[: n_modules * MODULE_SIZE].reshape(n_modules, MODULE_SIZE)
    gene_weight = -GENE_SPREAD * np.sort(rng.random((n_modules, MODULE_SIZE)), axis=1)
    housekeeping = np.arange(HOUSEKEEPING_MODULES)
    background = HOUSEKEEPING_MODULES + n_types * TYPE_MODULES + np.arange(BACKGROUND_MODULES)
    level_bg = (
        TOP_LEVEL
        - LEVEL_STEP * (HOUSEKEEPING_MODULES + TYPE_MODULES)
        - 1.0
        + rng.normal(0.0, 0.3, BACKGROUND_MODULES)
    )
    rows = []
    for t in range(n_types):
        own = HOUSEKEEPING_MODULES + t * TYPE_MODULES + np.arange(TYPE_MODULES)
        # The type's own and housekeeping modules, strongly to weakly expressed in an order of the type's own.
        levels = TOP_LEVEL - LEVEL_STEP * rng.permutation(HOUSEKEEPING_MODULES + TYPE_MODULES)
        level_hk, level_own = levels[:HOUSEKEEPING_MODULES], levels[HOUSEKEEPING_MODULES:]
        mods = np.concatenate([housekeeping, own, background])
        levels = np.concatenate([level_hk, level_own, level_bg])
        boost = np.zeros((STATES_PER_TYPE, len(mods)))
        for s in range(STATES_PER_TYPE):
            up = HOUSEKEEPING_MODULES + rng.choice(TYPE_MODULES, size=STATE_MODULES, replace=False)
            boost[s, up] = STATE_BOOST
        rows.append((mods, levels, boost))
    mods = np.stack([r[0] for r in rows])
    expand = lambda a: np.repeat(a, MODULE_SIZE, axis=-1)  # noqa: E731  module -> its genes' columns
    return _Programs(
        genes=module_genes[mods].reshape(n_types, -1),
        base=(expand(np.stack([r[1] for r in rows])) + gene_weight[mods].reshape(n_types, -1)).astype(
            np.float32
        ),
        module=expand(mods),
        state_boost=expand(np.stack([r[2] for r in rows])).astype(np.float32),
        outside=genes[n_modules * MODULE_SIZE :],
    )


def _cells(
    rng: np.random.Generator, programs: _Programs, types: np.ndarray, lengths: np.ndarray
) -> np.ndarray:
    """Flat token ids of cells: each cell's genes ranked by its sampled expression, top `length` kept."""
    n_cells, width = len(types), programs.genes.shape[1]
    n_modules = int(programs.module.max()) + 1
    states = rng.integers(0, STATES_PER_TYPE, size=n_cells)
    module_factor = rng.normal(0.0, MODULE_NOISE, size=(n_cells, n_modules)).astype(np.float32)
    expression = (
        programs.base[types]
        + programs.state_boost[types, states]
        + np.take_along_axis(module_factor, programs.module[types], axis=1)
        + rng.normal(0.0, GENE_NOISE, size=(n_cells, width)).astype(np.float32)
    )
    order = np.argsort(-expression, axis=1, kind="stable")
    ranked = np.take_along_axis(programs.genes[types], order, axis=1)
    keep = np.arange(width)[None, :] < lengths[:, None]
    tokens = ranked[keep]
    dropout = np.flatnonzero(rng.random(len(tokens)) < DROPOUT_RATE)
    tokens[dropout] = rng.choice(programs.outside, size=len(dropout))
    return tokens


def write_builtin_corpus(
    out_dir: str | os.PathLike,
    *,
    n_cells: int = DEFAULT_CELLS,
    seed: int = 0,
    vocab_size: int = V1_VOCAB_SIZE,
    n_cell_types: int = N_CELL_TYPES,
    n_shards: int = 4,
) -> Path:
    """Writes `shard-XXXXX.parquet` (input_ids list<int32>, length int32, cell_type string) and vocab.txt."""
    if n_cells < 1 or n_cell_types < 1 or n_shards < 1:
        raise ValueError(
            f"n_cells, n_cell_types, n_shards must be >= 1 (got {n_cells}, {n_cell_types}, {n_shards})"
        )
    vocab = Vocabulary.synthetic(vocab_size)
    n_program_genes = (HOUSEKEEPING_MODULES + n_cell_types * TYPE_MODULES + BACKGROUND_MODULES) * MODULE_SIZE
    if vocab_size - vocab.first_gene_id < n_program_genes + 1000:
        raise ValueError(
            f"vocab_size={vocab_size} is too small for {n_cell_types} cell types; "
            f"use >= {n_program_genes + 1000 + vocab.first_gene_id} or fewer cell types"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    programs = _programs(np.random.default_rng(seed), n_cell_types, vocab.first_gene_id, vocab_size)
    type_names = np.array([f"cell_type_{t}" for t in range(n_cell_types)])
    shard_sizes = np.diff(np.linspace(0, n_cells, n_shards + 1).astype(np.int64))
    for s, size in enumerate(shard_sizes):
        shard_rng = np.random.default_rng([seed, s])
        lengths = np.clip(
            np.round(shard_rng.lognormal(np.log(MEDIAN_LENGTH), LENGTH_SIGMA, size)), MIN_LENGTH, MAX_LENGTH
        ).astype(np.int32)
        types = shard_rng.integers(0, n_cell_types, size=size)
        tokens = np.concatenate(
            [
                _cells(shard_rng, programs, types[a : a + 256], lengths[a : a + 256])
                for a in range(0, size, 256)
            ]
            or [np.zeros(0, np.int64)]
        ).astype(np.int32)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        table = pa.table(
            {
                "input_ids": pa.ListArray.from_arrays(pa.array(offsets), pa.array(tokens)),
                "length": pa.array(lengths),
                "cell_type": pa.array(type_names[types]),
            }
        )
        pq.write_table(table, out / f"shard-{s:05d}.parquet", row_group_size=16_384)
    vocab.save(out / "vocab.txt")
    return out


def ensure_builtin_corpus(
    cache_dir: str | os.PathLike, *, n_cells: int = DEFAULT_CELLS, seed: int = 0, **kwargs
) -> Path:
    """The built-in corpus under cache_dir (named by its size and seed), written once, atomically."""
    cache = Path(cache_dir)
    out = cache / f"builtin_corpus-v{GENERATOR_VERSION}-{n_cells}cells-seed{seed}"
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
    parser = argparse.ArgumentParser(
        description="Write the synthetic built-in cell corpus (parquet shards + vocab.txt)."
    )
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--cells", type=int, default=DEFAULT_CELLS, help="number of cells")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cell-types", type=int, default=N_CELL_TYPES)
    parser.add_argument("--shards", type=int, default=4)
    args = parser.parse_args(argv)
    out = write_builtin_corpus(
        args.out, n_cells=args.cells, seed=args.seed, n_cell_types=args.cell_types, n_shards=args.shards
    )
    print(f"wrote {args.cells} cells to {out}")


if __name__ == "__main__":
    main()
