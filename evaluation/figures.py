"""PNG figures of cell embeddings: a 2-D PCA projection per model, cells coloured by their label.

Training curves of several runs come from training/plots.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from training.plots import save_figure


def pca_2d(vectors: np.ndarray) -> np.ndarray:
    """[n, dim] -> [n, 2] first two principal components (zeros where fewer than 2 components exist)."""
    from sklearn.decomposition import PCA

    vectors = np.asarray(vectors, dtype=np.float64)
    n_components = min(2, *vectors.shape)
    coords = np.zeros((len(vectors), 2))
    if n_components > 0:
        coords[:, :n_components] = PCA(n_components=n_components, random_state=0).fit_transform(vectors)
    return coords


def plot_embedding_pca(vectors: np.ndarray, labels: list | None, title: str, out_png: str | Path) -> Path:
    """Scatter of the PCA projection; one colour (and legend entry) per label, or a single colour without labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    coords = pca_2d(vectors)
    names = [] if labels is None else sorted({str(v) for v in labels})
    legend = 0 < len(names) <= 20  # a longer legend would be taller than the figure
    # The legend sits right of the axes, so it never covers a point.
    fig, ax = plt.subplots(figsize=(7.4 if legend else 5.5, 4.5))
    if labels is None:
        ax.scatter(coords[:, 0], coords[:, 1], s=8, alpha=0.7)
    else:
        labels = np.asarray([str(v) for v in labels])
        cmap = plt.get_cmap("tab20" if len(names) > 10 else "tab10")
        for i, name in enumerate(names):
            rows = labels == name
            ax.scatter(coords[rows, 0], coords[rows, 1], s=8, alpha=0.7, color=cmap(i % cmap.N), label=name)
        if legend:
            ax.legend(
                fontsize=7,
                markerscale=2,
                loc="upper left",
                bbox_to_anchor=(1.02, 1.0),
                borderaxespad=0,
                frameon=False,
            )
    shown = f"{len(coords)} cells" + (f", {len(names)} labels" if names and not legend else "")
    ax.set_title(f"{title}: {shown}", fontsize=10)
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    return save_figure(fig, out_png)
