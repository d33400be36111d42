"""Training-curve and PCA figures a user can read: every logged point visible, losses of different objectives on
their own axes, a distillation's teacher as a reference line, macro-F1 for classifiers, legends off the points.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from training.plots import plot_training_curves, training_curves_figure

pytest.importorskip("matplotlib")


def _metrics(path, train: list[dict], evals: list[dict]):
    lines = [{"step": i + 1, "kind": "train", "lr": 1e-3, **r} for i, r in enumerate(train)]
    lines += [{"step": 10 * (i + 1), "kind": "eval", **r} for i, r in enumerate(evals)]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def _panels(fig) -> dict[str, list]:
    return {ax.get_title(): ax.get_lines() for ax in fig.axes if ax.get_title()}


def test_a_run_with_a_single_logged_step_shows_a_marker_in_every_panel(tmp_path):
    one = _metrics(tmp_path / "train.jsonl", [{"loss": 9.8, "mlm": 9.8}], [{"loss": 9.7, "accuracy": 0.01}])
    panels = _panels(training_curves_figure({"run": one}))
    assert set(panels) == {
        "train loss (masked-LM)",
        "held-out loss (masked-LM)",
        "held-out accuracy (masked-LM)",
        "learning rate",
    }
    assert all(line.get_marker() not in (None, "None", "") for lines in panels.values() for line in lines)


def test_kd_and_masked_lm_training_losses_get_their_own_panels(tmp_path):
    mlm = _metrics(
        tmp_path / "train.jsonl", [{"loss": 7.0, "mlm": 7.0}] * 3, [{"loss": 7.1, "accuracy": 0.1}]
    )
    kd = _metrics(
        tmp_path / "distill.jsonl",
        [{"loss": 0.03, "kd": 0.03, "mlm": 7.2}] * 3,
        [{"loss": 7.3, "accuracy": 0.1, "teacher_loss": 7.1, "teacher_accuracy": 0.1}],
    )
    panels = _panels(training_curves_figure({"teacher": mlm, "student": kd}))
    assert [line.get_label() for line in panels["train loss (masked-LM)"]] == ["teacher"]
    assert [line.get_label() for line in panels["train loss (distillation)"]] == ["student"]
    # Held-out loss is masked-LM cross-entropy for both, so they share a panel.
    assert {line.get_label() for line in panels["held-out loss (masked-LM)"]} >= {"teacher", "student"}


def test_a_distillation_shows_its_teacher_dashed_beside_the_student_on_held_out_panels(tmp_path):
    kd = _metrics(
        tmp_path / "distill.jsonl",
        [{"loss": 0.03, "kd": 0.03}] * 2,
        [{"loss": 7.3, "accuracy": 0.1, "teacher_loss": 7.1, "teacher_accuracy": 0.12}] * 2,
    )
    lines = _panels(training_curves_figure({"distill": kd}))["held-out loss (masked-LM)"]
    teacher = [line for line in lines if line.get_label() == "distill: teacher"]
    assert len(teacher) == 1 and teacher[0].get_linestyle() == "--"
    assert list(teacher[0].get_ydata()) == [7.1, 7.1]


def test_a_fine_tuning_run_has_a_macro_f1_panel(tmp_path):
    ft = _metrics(
        tmp_path / "finetune.jsonl",
        [{"loss": 2.0, "ce": 2.0}] * 2,
        [{"loss": 1.9, "accuracy": 0.5, "macro_f1": 0.4}, {"loss": 1.5, "accuracy": 0.6, "macro_f1": 0.55}],
    )
    panels = _panels(training_curves_figure({"finetune": ft}))
    assert list(panels["held-out macro-F1 (classification)"][0].get_ydata()) == [0.4, 0.55]
    assert "train loss (classification)" in panels
    assert plot_training_curves({"finetune": ft}, tmp_path / "curves.png").stat().st_size > 1000


def test_the_pca_legend_sits_beside_the_points_not_over_them(tmp_path, monkeypatch):
    import matplotlib.figure
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from evaluation.figures import plot_embedding_pca

    saved = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: saved.append(fig))
    x = np.random.default_rng(0).normal(size=(60, 8))
    plot_embedding_pca(x, [f"type_{i % 6}" for i in range(60)], "model", tmp_path / "pca.png")
    [fig] = saved
    ax = fig.axes[0]
    renderer = FigureCanvasAgg(fig).get_renderer()  # the figure as it was saved
    legend, axes_box = ax.get_legend().get_window_extent(renderer), ax.get_window_extent(renderer)
    assert legend.x0 >= axes_box.x1  # entirely right of the axes
    assert "60 cells" in ax.get_title()
