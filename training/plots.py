"""PNG figures of training curves from one or more runs' metrics.jsonl files.

Used at the end of every run and by evaluate.py to put several runs on one figure.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from training.metrics_log import read_metrics

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

_MANY_POINTS = 40  # longer curves are drawn as plain lines; shorter ones show each logged point


@dataclass(frozen=True)
class _Panel:
    title: str
    kind: str  # record kind: train | eval
    key: str
    runs: tuple[str, ...]
    reference: str | None = None  # key drawn dashed beside the run's own (the teacher's held-out loss)


def _objective(records: list[dict]) -> str:
    """What a run trains: its losses are only comparable with runs of the same objective."""
    if any("kd" in r for r in records if r.get("kind") == "train"):
        return "distillation"
    if any("macro_f1" in r for r in records if r.get("kind") == "eval"):
        return "classification"
    return "masked-LM"


def _panels(runs: dict[str, list[dict]]) -> list[_Panel]:
    """Train loss per objective (KD and masked-LM losses differ by orders of magnitude); held-out loss and accuracy
    per evaluation (a student is scored by masked-LM, like its teacher); macro-F1 for classifiers; learning rate."""
    train_by, eval_by = {}, {}
    for name, records in runs.items():
        objective = _objective(records)
        train_by.setdefault(objective, []).append(name)
        eval_by.setdefault("classification" if objective == "classification" else "masked-LM", []).append(
            name
        )
    panels = [
        _Panel(f"train loss ({objective})", "train", "loss", tuple(names))
        for objective, names in train_by.items()
    ]
    for scored, names in eval_by.items():
        panels += [
            _Panel(f"held-out loss ({scored})", "eval", "loss", tuple(names), reference="teacher_loss"),
            _Panel(
                f"held-out accuracy ({scored})",
                "eval",
                "accuracy",
                tuple(names),
                reference="teacher_accuracy",
            ),
        ]
    if "classification" in eval_by:
        panels.append(
            _Panel("held-out macro-F1 (classification)", "eval", "macro_f1", tuple(eval_by["classification"]))
        )
    panels.append(_Panel("learning rate", "train", "lr", tuple(runs)))
    return [p for p in panels if any(_points(runs[name], p.kind, p.key) for name in p.runs)]


def _points(records: list[dict], kind: str, key: str | None) -> list[tuple[int, float]]:
    return [(r["step"], r[key]) for r in records if key is not None and r.get("kind") == kind and key in r]


def _draw(ax: Axes, points: list[tuple[int, float]], label: str, color, *, dashed: bool = False) -> None:
    steps, values = zip(*points, strict=True)
    # A single point is invisible as a line: every short curve shows its points.
    marker = "o" if len(points) <= _MANY_POINTS else None
    ax.plot(
        steps,
        values,
        label=label,
        color=color,
        marker=marker,
        markersize=3.5 if len(points) > 1 else 6,
        linestyle="--" if dashed else "-",
        alpha=0.8 if dashed else 1.0,
    )


def plot_training_curves(metrics_files: dict[str, Path], out_png: str | Path) -> Path:
    """One panel per comparable curve, one colour per run; a distillation's panels show its teacher dashed."""
    return save_figure(training_curves_figure(metrics_files), out_png)


def training_curves_figure(metrics_files: dict[str, Path]) -> Figure:
    """The figure plot_training_curves writes (run name -> metrics .jsonl)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    runs = {name: read_metrics(path) for name, path in metrics_files.items()}
    colors = {name: plt.get_cmap("tab10")(i % 10) for i, name in enumerate(runs)}
    panels = _panels(runs)
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(4.2 * max(1, len(panels)), 3.6), squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=False):
        for name in panel.runs:
            points = _points(runs[name], panel.kind, panel.key)
            if points:
                _draw(ax, points, name, colors[name])
            reference = _points(runs[name], panel.kind, panel.reference)
            if reference:
                _draw(ax, reference, f"{name}: teacher", colors[name], dashed=True)
        ax.set_title(panel.title, fontsize=10)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
        low, high = ax.dataLim.intervalx
        if high - low < 2:  # one logged step: widen the axis so that its ticks are whole steps too
            ax.set_xlim(low - 1, high + 1)
        ax.grid(alpha=0.3)
        if len(ax.get_lines()) > 1 or len(runs) > 1:
            ax.legend(fontsize=7)
    return fig


def save_figure(fig: Figure, out_png: str | Path) -> Path:
    """Write a matplotlib figure as PNG (creating the folder) and release it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
