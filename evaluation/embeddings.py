"""Cell embeddings: the mean over a cell's gene tokens of one layer's hidden states, written as parquet.

Special tokens (<cls>, <eos>, <pad>, <mask>) and padding never enter the mean.
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

from common.device import move_batch


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


def gene_token_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                    special_ids: tuple[int, ...]) -> torch.Tensor:
    """True at real gene tokens: inside the cell (attention mask) and not a special token."""
    mask = ~torch.isin(input_ids, torch.tensor(special_ids, dtype=input_ids.dtype, device=input_ids.device))
    if attention_mask is not None:
        mask &= attention_mask.bool()
    return mask


def mean_over_genes(hidden: torch.Tensor, gene_mask: torch.Tensor) -> torch.Tensor:
    """[B, S, H] hidden states -> [B, H] mean over each cell's gene tokens (in float32)."""
    weights = gene_mask.to(torch.float32).unsqueeze(-1)
    counts = weights.sum(dim=1)
    if bool((counts == 0).any()):
        raise ValueError("a cell has no gene tokens (only special tokens or padding); it has no embedding")
    return (hidden.float() * weights).sum(dim=1) / counts


def check_layer(model: nn.Module, layer: int) -> int:
    """The index into `hidden_states` (0 = embeddings output, L = last layer; negative counts from the end)."""
    n = len(model.bert.encoder.layer)
    if not -(n + 1) <= layer <= n:
        raise ValueError(f"--layer {layer} is out of range for a model of {n} layers; use -{n + 1}..{n} "
                         "(0 = embedding output, -1 = last layer)")
    return layer


@torch.no_grad()
def extract_embeddings(model: nn.Module, batches: Iterable[dict], *, layer: int, special_ids: tuple[int, ...],
                       device: torch.device,
                       autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                       ) -> CellEmbeddings:
    """Embeddings of every cell in `batches` (masked-LM batches; the unmasked tokens are restored)."""
    check_layer(model, layer)
    was_training = model.training
    model.eval()
    indices, vectors = [], []
    seconds = 0.0
    try:
        for batch in batches:
            batch = move_batch(batch, device)
            input_ids = unmasked_input_ids(batch)
            attention_mask = batch.get("attention_mask")
            # All-ignored labels: the model decodes no positions, so no full-vocabulary logits are computed.
            no_labels = torch.full_like(input_ids, -100)
            _synchronize(device)
            start = time.perf_counter()
            with autocast():
                out = model(input_ids=input_ids, attention_mask=attention_mask, labels=no_labels,
                            output_hidden_states=True)
            pooled = mean_over_genes(out.hidden_states[layer], gene_token_mask(input_ids, attention_mask, special_ids))
            _synchronize(device)
            seconds += time.perf_counter() - start
            indices.append(batch["cell_index"].cpu().numpy())
            vectors.append(pooled.cpu().numpy().astype(np.float32))
    finally:
        model.train(was_training)
    if not indices:
        return CellEmbeddings(np.zeros(0, np.int64), np.zeros((0, 0), np.float32), seconds)
    return CellEmbeddings(np.concatenate(indices), np.concatenate(vectors), seconds)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def write_embeddings(path: str | Path, embeddings: CellEmbeddings, metadata: dict[str, list | np.ndarray]) -> Path:
    """Parquet with `cell_index`, the metadata columns (e.g. cell_type) and `embedding` (fixed-size float32 list)."""
    n, dim = embeddings.vectors.shape
    for name, values in metadata.items():
        if len(values) != n:
            raise ValueError(f"metadata column '{name}' has {len(values)} values for {n} cells")
    flat = pa.array(np.ascontiguousarray(embeddings.vectors).reshape(-1), type=pa.float32())
    columns = {"cell_index": pa.array(embeddings.cell_index, type=pa.int64())}
    columns.update({name: pa.array(list(values) if not isinstance(values, np.ndarray) else values)
                    for name, values in metadata.items()})
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
    metadata = {name: table.column(name).to_pylist() for name in table.column_names
                if name not in ("cell_index", "embedding")}
    return table.column("cell_index").to_numpy(), vectors, metadata
