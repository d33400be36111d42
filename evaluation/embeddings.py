"""Cell embeddings of evaluate.py's masked-LM batches (mean over gene tokens of one layer), written as parquet.

The forward pass and pooling are model.cell_embeddings', shared with embed.py; special tokens never enter the mean.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn

from model.cell_embeddings import check_layer, pool_cells


@dataclass
class CellEmbeddings:
    cell_index: np.ndarray  # int64 [n] corpus indices
    vectors: np.ndarray  # float32 [n, hidden]
    seconds: float  # wall time of the forward passes on this rank

    def sorted(self) -> CellEmbeddings:
        """The same embeddings ordered by corpus index, so models and ranks line up row by row."""
        order = np.argsort(self.cell_index, kind="stable")
        return CellEmbeddings(self.cell_index[order], self.vectors[order], self.seconds)


def unmasked_input_ids(batch: dict) -> torch.Tensor:
    """The cells' original tokens: a masked-LM batch keeps each replaced token in `labels`."""
    labels = batch["labels"]
    return torch.where(labels != -100, labels, batch["input_ids"])


@torch.no_grad()
def extract_embeddings(
    model: nn.Module,
    batches: Iterable[dict],
    *,
    layer: int,
    special_ids: tuple[int, ...],
    device: torch.device,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> CellEmbeddings:
    """Mean gene-token embeddings of every cell in `batches` (masked-LM batches; the unmasked tokens are
    restored), computed by the same packed forward pass as `embed.py`, so both give the same vectors."""
    check_layer(model, layer)
    was_training = model.training
    model.eval()
    indices, vectors = [], []
    seconds = 0.0
    try:
        for batch in batches:
            input_ids = unmasked_input_ids(batch)
            attention_mask = batch.get("attention_mask")
            lengths = (
                attention_mask.sum(1)
                if attention_mask is not None
                else torch.full((len(input_ids),), input_ids.shape[1])
            ).tolist()
            cells = [row[:n].numpy() for row, n in zip(input_ids, lengths, strict=True)]
            _synchronize(device)
            start = time.perf_counter()
            pooled = pool_cells(
                model,
                cells,
                layer=layer,
                pooling="mean",
                special_ids=special_ids,
                device=device,
                autocast=autocast,
            )
            _synchronize(device)
            seconds += time.perf_counter() - start
            indices.append(batch["cell_index"].cpu().numpy())
            vectors.append(pooled.vectors)
    finally:
        model.train(was_training)
    if not indices:
        return CellEmbeddings(np.zeros(0, np.int64), np.zeros((0, 0), np.float32), seconds)
    return CellEmbeddings(np.concatenate(indices), np.concatenate(vectors), seconds)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def write_embeddings(
    path: str | Path, embeddings: CellEmbeddings, metadata: dict[str, list | np.ndarray]
) -> Path:
    """Parquet with `cell_index`, the metadata columns (e.g. cell_type) and `embedding` (fixed-size float32 list)."""
    n, dim = embeddings.vectors.shape
    for name, values in metadata.items():
        if len(values) != n:
            raise ValueError(f"metadata column '{name}' has {len(values)} values for {n} cells")
    flat = pa.array(np.ascontiguousarray(embeddings.vectors).reshape(-1), type=pa.float32())
    columns = {"cell_index": pa.array(embeddings.cell_index, type=pa.int64())}
    columns.update(
        {
            name: pa.array(list(values) if not isinstance(values, np.ndarray) else values)
            for name, values in metadata.items()
        }
    )
    columns["embedding"] = pa.FixedSizeListArray.from_arrays(flat, dim)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)
    return path


def read_embeddings(path: str | Path) -> tuple[np.ndarray, np.ndarray, dict[str, list]]:
    """(cell_index, embeddings [n, dim], metadata columns) of a file written by `write_embeddings`."""
    table = pq.read_table(path)
    vectors = np.asarray(table.column("embedding").combine_chunks().flatten().to_numpy(), dtype=np.float32)
    n = table.num_rows
    vectors = vectors.reshape(n, -1) if n else vectors.reshape(0, 0)
    metadata = {
        name: table.column(name).to_pylist()
        for name in table.column_names
        if name not in ("cell_index", "embedding")
    }
    return table.column("cell_index").to_numpy(), vectors, metadata
