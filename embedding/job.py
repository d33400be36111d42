"""The embed job: every rank embeds its share of the input's chunks into part files; rank 0 then writes the output.

Chunk k belongs to rank k % world_size, so any world size continues an interrupted run and gives the same output.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import time
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import torch
from tqdm import tqdm

from common.collectives import barrier
from common.errors import USER_ERRORS
from dataset.sampler import TokenBudgetSampler
from embedding.cells import CellChunk, CorpusCells, CountCells, is_count_file
from embedding.model_dir import EmbeddingModel, file_sha256, open_model_dir
from embedding.outputs import chunk_arrays, write_h5ad, write_parquet
from embedding.parts import PartStore
from model.cell_embeddings import PooledCells, check_layer, check_pooling, inference_autocast, pool_cells
from training.distributed import DistributedContext

log = logging.getLogger("embed")
DTYPES = {"float32": np.float32, "float16": np.float16}
Autocast = Callable[[], contextlib.AbstractContextManager]


def open_cells(
    args: argparse.Namespace, loaded: EmbeddingModel, ctx: DistributedContext
) -> CorpusCells | CountCells:
    path = Path(args.input)
    if not path.exists():
        raise FileNotFoundError(
            f"input {path} does not exist; give a tokenized corpus (parquet / Arrow) or raw "
            "counts (.h5ad, .loom, .csv, .tsv)"
        )
    if is_count_file(path):
        return CountCells(
            path, loaded.vocab, loaded.max_length, args.chunk_cells, count_options(args, loaded)
        )
    # Rank 0 builds the corpus index first; the others then open the finished one.
    if ctx.is_main:
        cells = CorpusCells(path, loaded.vocab, loaded.max_length, args.chunk_cells, args.cache_dir)
    barrier()
    return (
        cells
        if ctx.is_main
        else CorpusCells(path, loaded.vocab, loaded.max_length, args.chunk_cells, args.cache_dir)
    )


def count_options(args: argparse.Namespace, loaded: EmbeddingModel) -> dict:
    """The tokenizer's options for raw counts: the user's, with medians beside the model and its layout by default."""
    medians = args.medians
    if medians is None and (loaded.path / "gene_medians.tsv").is_file():
        medians = loaded.path / "gene_medians.tsv"
    if medians is None:
        raise ValueError(
            f"{args.input} holds raw counts: pass --medians, the gene median table that belongs to the "
            "model's vocabulary (e.g. Geneformer's gene_median_dictionary .pkl)"
        )
    layout = args.layout or ("v2" if loaded.vocab.cls_id is not None else "v1")
    return {
        "medians": medians,
        "gene_names": args.gene_names,
        "gene_mapping": args.gene_mapping,
        "layout": layout,
        "layer": args.counts_layer,
        "gene_column": args.gene_column,
        "min_counts": args.min_counts,
        "min_genes": args.min_genes,
        "allow_non_integer": args.allow_non_integer,
    }


def run_plan(args: argparse.Namespace, loaded: EmbeddingModel, cells: CorpusCells | CountCells) -> dict:
    """Everything that decides the output; a relaunch continues only a run with the same plan."""
    path = Path(args.input).resolve()
    stat = path.stat()
    plan = {
        "input": str(path),
        "input_bytes": stat.st_size,
        "input_mtime": stat.st_mtime,
        "model": str(loaded.path.resolve()),
        "weights_sha256": loaded.weights_sha256,
        "layer": args.layer,
        "pooling": args.pooling,
        "dtype": args.dtype,
        "chunk_cells": args.chunk_cells,
        "max_tokens": args.max_tokens,
        "max_length": loaded.max_length,
        "precision": args.precision,
        "key": args.key,
        "rows": cells.n_rows,
    }
    if isinstance(cells, CountCells):
        plan["tokenizer"] = {k: str(v) if isinstance(v, Path) else v for k, v in cells.options.items()}
    return plan


def embed_chunk(
    loaded: EmbeddingModel,
    chunk: CellChunk,
    args: argparse.Namespace,
    device: torch.device,
    autocast: Autocast,
) -> PooledCells:
    """The chunk's cells in token-budget batches of similar lengths, back in input order."""
    lengths = np.array([len(c) for c in chunk.cells])
    plan = TokenBudgetSampler(
        lengths,
        np.arange(len(lengths)),
        max_tokens=args.max_tokens,
        max_cells=None,
        rank=0,
        world_size=1,
        seed=0,
        shuffle=False,
    ).global_batches(0)
    vectors, probabilities = None, None
    for batch in plan:
        pooled = pool_cells(
            loaded.model,
            [chunk.cells[i] for i in batch],
            layer=args.layer,
            pooling=args.pooling,
            special_ids=loaded.vocab.special_ids,
            device=device,
            autocast=autocast,
        )
        if vectors is None:
            vectors = np.empty((len(lengths), pooled.vectors.shape[1]), dtype=DTYPES[args.dtype])
            if pooled.probabilities is not None:
                probabilities = np.empty((len(lengths), pooled.probabilities.shape[1]), dtype=np.float32)
        vectors[batch] = pooled.vectors
        if probabilities is not None:
            probabilities[batch] = pooled.probabilities
    return PooledCells(vectors, probabilities)


def embed_or_empty(
    loaded: EmbeddingModel,
    chunk: CellChunk,
    args: argparse.Namespace,
    device: torch.device,
    autocast: Autocast,
) -> tuple[np.ndarray, np.ndarray | None]:
    """(vectors, probabilities) of a chunk's cells; empty arrays when the tokenizer left none of them."""
    if len(chunk.rows):
        pooled = embed_chunk(loaded, chunk, args, device, autocast)
        return pooled.vectors, pooled.probabilities
    empty = np.zeros((0, loaded.model.config.hidden_size), DTYPES[args.dtype])
    return empty, np.zeros((0, len(loaded.labels)), np.float32) if loaded.labels else None


def check_output(args: argparse.Namespace) -> None:
    out, source = Path(args.out), Path(args.input)
    if out.suffix == ".h5ad":
        if source.suffix != ".h5ad":
            raise ValueError(
                f"--out {out}: an .h5ad output is a copy of an .h5ad input, but the input is {source}; "
                "write parquet (--out cells.parquet) instead"
            )
        if out.resolve() == source.resolve():
            raise ValueError(f"--out {out} is the input itself; write the copy to another path")
        with h5py.File(source, "r") as f:
            if "obsm" in f and args.key in f["obsm"]:
                raise ValueError(
                    f"{source} already has obsm['{args.key}']; name the new embedding with --key"
                )


def embed(args: argparse.Namespace, ctx: DistributedContext) -> Path | None:
    """Embed (and for a classifier, predict) every input cell; returns the output path on rank 0."""
    check_output(args)
    loaded = open_model_dir(args.model)
    check_layer(loaded.model, args.layer)
    check_pooling(args.pooling, loaded.vocab.cls_id)
    cells = open_cells(args, loaded, ctx)
    store = PartStore(Path(args.out), run_plan(args, loaded, cells))
    if ctx.is_main:
        store.prepare(args.overwrite)
    barrier()
    n_chunks = -(-cells.n_rows // args.chunk_cells)
    started = time.perf_counter()
    embed_share(args, loaded, cells, store, n_chunks, ctx)
    seconds = time.perf_counter() - started
    barrier()
    if not ctx.is_main:
        return None
    missing = sorted(set(range(n_chunks)) - store.done_chunks())
    if missing:
        raise RuntimeError(f"chunks {missing[:5]} were not embedded; relaunch to finish them")
    out = write_output(args, loaded, cells, store, n_chunks, record(args, loaded, store, ctx, seconds))
    store.finish()
    log.info("wrote %d cells to %s", cells.n_rows, out)
    return out


def embed_share(
    args: argparse.Namespace,
    loaded: EmbeddingModel,
    cells: CorpusCells | CountCells,
    store: PartStore,
    n_chunks: int,
    ctx: DistributedContext,
) -> None:
    """This rank's chunks (k % world_size == rank) not yet done, each kept as a part file when finished."""
    done = store.done_chunks()
    mine = [k for k in range(n_chunks) if k % ctx.world_size == ctx.rank and k not in done]
    loaded.model.to(ctx.device)
    autocast = inference_autocast(args.precision, ctx.device)
    rows_of = {k: min(args.chunk_cells, cells.n_rows - k * args.chunk_cells) for k in mine}
    try:
        with tqdm(
            total=sum(rows_of.values()),
            unit="cell",
            disable=not ctx.is_main or args.no_progress,
            smoothing=0.1,
            desc=f"embedding (rank 0 of {ctx.world_size})",
        ) as progress:
            for chunk in cells.chunks(rows_of.__contains__):
                store.write(
                    chunk.index, chunk.rows, *embed_or_empty(loaded, chunk, args, ctx.device, autocast)
                )
                progress.update(rows_of[chunk.index])
    except USER_ERRORS:
        if ctx.world_size == 1 and not store.done_chunks():
            store.finish()  # bad input found before any work was kept: leave nothing behind
        raise


def record(
    args: argparse.Namespace,
    loaded: EmbeddingModel,
    store: PartStore,
    ctx: DistributedContext,
    seconds: float,
) -> dict:
    """How the output was made: model, weights hash, layer, pooling, vocabulary, time."""
    vocab_file = loaded.path / "vocab.txt"
    return {
        **store.plan,
        "weights_file": loaded.weights_file.name,
        "kind": "classifier" if loaded.labels else "masked_lm",
        "vocabulary": {
            "file": str(vocab_file.resolve()),
            "size": loaded.vocab.size,
            "sha256": file_sha256(vocab_file),
        },
        "labels": loaded.labels,
        "world_size": ctx.world_size,
        "device": str(ctx.device),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "last_launch_seconds": round(seconds, 3),
        "created_by": "embed.py",
    }


def write_output(
    args: argparse.Namespace,
    loaded: EmbeddingModel,
    cells: CorpusCells | CountCells,
    store: PartStore,
    n_chunks: int,
    made: dict,
) -> Path:
    dim, n_classes = loaded.model.config.hidden_size, len(loaded.labels or ())

    def chunks():
        for k in range(n_chunks):
            first = k * args.chunk_cells
            n = min(args.chunk_cells, cells.n_rows - first)
            yield first, n, chunk_arrays(store.read(k), first, n, dim, DTYPES[args.dtype], n_classes)

    out = Path(args.out)
    if out.suffix == ".h5ad":
        return write_h5ad(out, Path(args.input), chunks(), args.key, loaded.labels, made)
    return write_parquet(out, chunks(), cells.columns(), loaded.labels, made)
