"""The batch format the collator writes and the model reads: which keys a batch carries and how they become
forward arguments. Padded batches carry [B, S] tensors; packed ones add cu_seqlens, max_seqlen, masked_positions.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100  # the label of every token that is not masked: no loss there
PACKED_KEYS = ("cu_seqlens", "max_seqlen", "masked_positions")


def packed_kwargs(batch: dict) -> dict:
    """Extra forward arguments of a packed (THD) batch; empty for a padded one."""
    return {key: batch[key] for key in PACKED_KEYS if key in batch}


def model_inputs(batch: dict) -> dict[str, torch.Tensor | int | None]:
    """The masked-LM forward arguments of a collated batch (padded or packed)."""
    return {
        "input_ids": batch["input_ids"],
        "attention_mask": batch.get("attention_mask"),
        "labels": batch["labels"],
        **packed_kwargs(batch),
    }


def labelled_rows(masked_labels: torch.Tensor) -> torch.Tensor:
    """Which rows of a forward's masked rows carry a label: all of them, except the padding rows a static-shape
    batch adds to keep the head's shape fixed (counted on the device: no wait)."""
    return masked_labels != IGNORE_INDEX
