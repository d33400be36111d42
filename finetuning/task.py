"""The classification job for the shared loop: summed cross-entropy over cells, held-out accuracy and macro-F1.

Predictions of all ranks meet in one confusion matrix (summed across ranks), from which sklearn scores them.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import f1_score
from torch import nn

from common.collectives import all_reduce_sum
from common.device import move_batch


def classification_loss(model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
    """Cross-entropy summed over the batch's labelled cells (the loop divides by the global cell count)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits
    ce = F.cross_entropy(logits.float(), batch["labels"], ignore_index=-100, reduction="sum")
    return {"loss": ce, "ce": ce.detach()}


def scores_from_confusion(confusion: np.ndarray) -> dict[str, float]:
    """Accuracy and macro-F1 (sklearn; classes absent from both truth and prediction are left out)."""
    n = confusion.shape[0]
    truth, predicted = np.divmod(np.arange(n * n), n)
    weights = confusion.reshape(-1).astype(np.float64)
    present = sorted(set(np.flatnonzero(confusion.sum(0) + confusion.sum(1))))
    total = float(weights.sum())
    return {
        "accuracy": float(np.trace(confusion)) / max(total, 1.0),
        "macro_f1": float(
            f1_score(
                truth, predicted, labels=present, average="macro", sample_weight=weights, zero_division=0
            )
        )
        if total
        else 0.0,
        "cells": total,
    }


@torch.no_grad()
def classification_metrics(
    model: nn.Module, batches: list[dict], num_labels: int, device: torch.device
) -> dict[str, float]:
    """Held-out loss, accuracy and macro-F1 over every rank's cells."""
    was_training = model.training
    model.eval()
    confusion = torch.zeros(num_labels, num_labels, dtype=torch.float64)
    ce_sum = torch.zeros(1, dtype=torch.float64)
    try:
        for batch in batches:
            batch = move_batch(batch, device)
            logits = model(
                input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")
            ).logits.float()
            labels = batch["labels"]
            ce_sum += F.cross_entropy(logits, labels, reduction="sum").item()
            pairs = (labels * num_labels + logits.argmax(-1)).cpu()
            confusion += (
                torch.bincount(pairs, minlength=num_labels * num_labels).view(num_labels, -1).double()
            )
    finally:
        model.train(was_training)
    confusion = all_reduce_sum(confusion.reshape(-1)).view(num_labels, num_labels)
    ce = float(all_reduce_sum(ce_sum).item())
    scores = scores_from_confusion(confusion.numpy().astype(np.int64))
    return {"loss": ce / max(scores["cells"], 1.0), **scores}


def majority_class_accuracy(train_labels: np.ndarray, batches: list[dict]) -> dict[str, float]:
    """The trivial baseline of the eval record: accuracy of always predicting the training cells' most common class."""
    labelled = train_labels[train_labels >= 0]
    if len(labelled) == 0:
        raise ValueError("no labelled training cells; check finetune.label_column and data.heldout_fraction")
    majority = int(np.bincount(labelled).argmax())
    counts = torch.zeros(2, dtype=torch.float64)
    for batch in batches:
        labels = batch["labels"]
        counts += torch.tensor(
            [float((labels == majority).sum()), float((labels >= 0).sum())], dtype=torch.float64
        )
    hits, cells = all_reduce_sum(counts).tolist()
    return {"majority_class_accuracy": hits / max(cells, 1.0)}
