"""Attention probabilities of every layer and head for one cell, from each layer's q and k, and PNG heat maps
of them over the cell's top genes (named by the vocabulary).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from dataset.vocab import Vocabulary
from modeling_bert_te import BertForMaskedLM


@torch.no_grad()
def attention_probs(
    model: BertForMaskedLM, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> list[torch.Tensor]:
    """softmax(q k^T / sqrt(d)) with padded keys excluded, per layer: a list of L tensors [B, heads, S, S].

    The model's SDPA never materialises the probabilities, so they are rebuilt from q and k; that takes one
    forward per layer, which is cheap for the small models this is meant for.
    """
    model.eval()
    probs = []
    for layer in range(len(model.bert.encoder.layer)):
        q, k, _ = model(input_ids, attention_mask, return_qkv_layer=layer, output_hidden_states=True).qkv
        scores = q.float() @ k.float().transpose(-1, -2) / math.sqrt(q.shape[-1])
        if attention_mask is not None:
            scores = scores.masked_fill(~attention_mask.bool()[:, None, None, :], float("-inf"))
        probs.append(scores.softmax(-1))
    return probs


def top_gene_positions(input_ids: torch.Tensor, vocab: Vocabulary, n: int) -> list[int]:
    """Positions of the first n gene tokens of a cell: rank-value encoding puts its most expressed genes first."""
    special = set(vocab.special_ids)
    return [p for p, t in enumerate(input_ids.tolist()) if t not in special][:n]


def save_attention_maps(
    probs: list[torch.Tensor],
    input_ids: torch.Tensor,
    vocab: Vocabulary,
    out_dir: str | Path,
    *,
    top_n: int = 20,
    cell: int = 0,
) -> list[Path]:
    """One PNG per layer (a panel per head) of cell `cell`: attention among its top_n genes, rows = queries.

    The panels show the probabilities of the full softmax (over all of the cell's genes), not renormalised, so
    a row's shade is comparable between heads and layers.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ids = input_ids[cell]
    keep = top_gene_positions(ids, vocab, top_n)
    if not keep:
        raise ValueError(f"cell {cell} has no gene tokens to draw")
    names = [vocab.tokens[int(ids[p])] for p in keep]
    paths = []
    for layer, p in enumerate(probs):
        heads = p.shape[1]
        cols = min(heads, 4)
        rows = math.ceil(heads / cols)
        size = max(4.0, 0.22 * len(keep) + 1.5)
        fig, axes = plt.subplots(
            rows, cols, figsize=(size * cols + 1.5, size * rows), squeeze=False, layout="constrained"
        )
        vmax = float(p[cell][:, keep][:, :, keep].max())
        for h in range(rows * cols):
            ax = axes[h // cols][h % cols]
            if h >= heads:
                ax.axis("off")
                continue
            grid = p[cell, h][keep][:, keep].cpu().numpy()
            image = ax.imshow(grid, cmap="viridis", vmin=0.0, vmax=vmax, interpolation="nearest")
            ax.set_title(f"layer {layer} head {h}", fontsize=9)
            ax.set_xticks(np.arange(len(keep)), names, rotation=90, fontsize=6)
            ax.set_xlabel("key (attended gene)", fontsize=7)
            if h % cols == 0:  # gene names once per row of panels: they would overlap the neighbour's map
                ax.set_yticks(np.arange(len(keep)), names, fontsize=6)
                ax.set_ylabel("query gene", fontsize=7)
            else:
                ax.set_yticks([])
        fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.6, label="attention probability")
        path = out / f"attention_layer{layer}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
