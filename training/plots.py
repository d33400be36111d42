"""PNG figures of training curves from one or more runs' metrics.jsonl files.

Used at the end of every run and by evaluate.py to put several runs on one figure.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from training.metrics_log import read_metrics

if TYPE_CHECKING:
    from matplotlib.figure import Figure

_PANELS = (("train", "loss"), ("eval", "loss"), ("eval", "accuracy"), ("train", "lr"))


def plot_training_curves(metrics_files: dict[str, Path], out_png: str | Path) -> Path:
    """One panel per curve (train loss, eval loss, eval accuracy, learning rate), one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(_PANELS), figsize=(4.2 * len(_PANELS), 3.4))
    for run_name, path in metrics_files.items():
        records = read_metrics(path)
        for ax, (kind, key) in zip(axes, _PANELS, strict=True):
            points = [(r["step"], r[key]) for r in records if r.get("kind") == kind and key in r]
            if points:
                steps, values = zip(*points, strict=True)
                ax.plot(steps, values, label=run_name, marker="." if kind == "eval" else None)
    for ax, (kind, key) in zip(axes, _PANELS, strict=True):
        ax.set_title(f"{kind} {key}")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    return save_figure(fig, out_png)


def save_figure(fig: Figure, out_png: str | Path) -> Path:
    """Write a matplotlib figure as PNG (creating the folder) and release it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
