"""Downstream probes on frozen cell embeddings: logistic regression and k-NN cell-type classification.

Every model is probed on the same stratified train / test split of the same cells, so scores compare directly.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProbeSplit:
    train: np.ndarray  # row indices into the embeddings / labels
    test: np.ndarray
    dropped_labels: tuple[str, ...]  # labels with too few cells to appear on both sides


def stratified_split(labels: list | np.ndarray, *, test_fraction: float = 0.3, seed: int = 0) -> ProbeSplit:
    """Stratified split of cells by label; labels with fewer than 2 cells are left out (and reported)."""
    from sklearn.model_selection import train_test_split

    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    labels = np.asarray([str(v) for v in labels])
    counts = Counter(labels.tolist())
    dropped = tuple(sorted(k for k, c in counts.items() if c < 2))
    if dropped:
        log.warning(
            "probe: leaving out %d label(s) with a single cell: %s", len(dropped), ", ".join(dropped[:10])
        )
    rows = np.flatnonzero(~np.isin(labels, dropped)) if dropped else np.arange(len(labels))
    n_classes = len(counts) - len(dropped)
    if n_classes < 2:
        raise ValueError(f"a probe needs at least 2 labels with 2+ cells each; got {dict(counts)}")
    # Each class needs a cell on each side: the test side must hold at least one cell per class.
    n_test = max(int(round(test_fraction * len(rows))), n_classes)
    if len(rows) - n_test < n_classes:
        raise ValueError(
            f"{len(rows)} labelled cells are too few for a stratified split over {n_classes} labels; "
            "evaluate more cells (--max-cells, --split all)"
        )
    train, test = train_test_split(rows, test_size=n_test, stratify=labels[rows], random_state=seed)
    return ProbeSplit(np.sort(train), np.sort(test), dropped)


def probe_embeddings(
    embeddings: np.ndarray, labels: list | np.ndarray, split: ProbeSplit, *, k: int = 5, seed: int = 0
) -> dict[str, float]:
    """Accuracy and macro-F1 on the test cells of a logistic regression and a k-NN (cosine) classifier."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x = np.asarray(embeddings, dtype=np.float64)
    y = np.asarray([str(v) for v in labels])
    if len(x) != len(y):
        raise ValueError(f"{len(x)} embeddings but {len(y)} labels; they must describe the same cells")
    x_train, y_train, x_test, y_test = x[split.train], y[split.train], x[split.test], y[split.test]
    # Standardizing first keeps the regularization strength meaningful across models of different scale.
    classifiers = {
        "logreg": make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=seed)),
        "knn": KNeighborsClassifier(n_neighbors=min(k, len(x_train)), metric="cosine"),
    }
    scores = {}
    for name, classifier in classifiers.items():
        predicted = classifier.fit(x_train, y_train).predict(x_test)
        scores[f"probe_{name}_accuracy"] = float(accuracy_score(y_test, predicted))
        scores[f"probe_{name}_macro_f1"] = float(
            f1_score(y_test, predicted, average="macro", zero_division=0)
        )
    return scores
