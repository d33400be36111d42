"""Batches of labelled cells for classification: padded token ids plus one class id per cell as `labels`.

The shared loop counts `labels != -100` to normalise the loss, so a [B] label tensor makes it a mean over cells.
"""

from __future__ import annotations

import numpy as np
import torch

from dataset.corpus import CellCorpus
from dataset.loader import CellBatchLoader
from dataset.sampler import TokenBudgetSampler
from dataset.vocab import Vocabulary
from finetuning.labels import CellLabels, stratified_split
from training.builders import DataBundle, open_run_corpus, sampler_settings, train_batches
from training.config import RunConfig
from training.distributed import DistributedContext


class LabelledCells(list):
    """The cells of one micro-batch (a list, as the loader expects) carrying their class ids in `.labels`."""

    labels: np.ndarray


class LabelledCorpus:
    """The corpus as the loader reads it, with each read batch of cells tagged with the cells' class ids."""

    def __init__(self, corpus: CellCorpus, label_ids: np.ndarray) -> None:
        self.corpus, self.label_ids = corpus, label_ids

    def get_many(self, indices) -> LabelledCells:
        cells = LabelledCells(self.corpus.get_many(indices))
        cells.labels = self.label_ids[np.asarray(indices, dtype=np.int64)]
        return cells


class ClassificationCollator:
    """Pads cells to the longest (rounded up to `pad_to_multiple_of`); `labels` [B] are the cells' class ids."""

    def __init__(self, vocab: Vocabulary, *, pad_to_multiple_of: int = 8) -> None:
        self.pad_id, self.pad_to_multiple_of = vocab.pad_id, pad_to_multiple_of

    def __call__(
        self, cells: LabelledCells, *, epoch: int, batch_index: int, rank: int
    ) -> dict[str, torch.Tensor]:
        if not isinstance(cells, LabelledCells):
            raise TypeError(
                "ClassificationCollator needs cells read through LabelledCorpus (they carry the labels)"
            )
        m = self.pad_to_multiple_of
        width = -(-max(len(c) for c in cells) // m) * m
        input_ids = np.full((len(cells), width), self.pad_id, dtype=np.int64)
        attention_mask = np.zeros((len(cells), width), dtype=np.int64)
        for row, cell in enumerate(cells):
            input_ids[row, : len(cell)] = cell
            attention_mask[row, : len(cell)] = 1
        return {
            "input_ids": torch.from_numpy(input_ids),
            "attention_mask": torch.from_numpy(attention_mask),
            "labels": torch.from_numpy(np.asarray(cells.labels, dtype=np.int64)),
        }


def build_classification_data(
    run: RunConfig, ctx: DistributedContext, *, vocab_size: int, max_length: int
) -> tuple[DataBundle, CellLabels]:
    """Corpus, labels, stratified split and loaders (train: shuffled; held-out: fixed order, first eval.max_cells)."""
    cfg = run.data
    if cfg.packed:
        raise ValueError(
            "config 'data.packed': fine-tuning batches are padded (the pooler reads each cell's first "
            "token); set data.packed=false"
        )
    path, vocab, corpus = open_run_corpus(cfg, ctx, vocab_size, max_length)
    column = run.finetune.label_column
    if column not in corpus.column_names:
        raise ValueError(
            f"config 'finetune.label_column': {path} has no column '{column}'; "
            f"its columns are {corpus.column_names}"
        )
    labels = CellLabels.from_column(corpus.column(column), column)
    train_idx, heldout_idx = stratified_split(labels.ids, cfg.heldout_fraction, run.seed)
    if len(heldout_idx) == 0:
        raise ValueError(
            "no held-out cells: every class has a single labelled cell; raise data.heldout_fraction "
            "or label more cells"
        )
    # Evaluate every k-th held-out cell rather than the first ones: corpus files are often sorted by cell type.
    eval_cells = heldout_idx[
        np.linspace(0, len(heldout_idx) - 1, min(run.eval.max_cells, len(heldout_idx)))
        .round()
        .astype(np.int64)
    ]
    view = LabelledCorpus(corpus, labels.ids)
    collator = ClassificationCollator(vocab, pad_to_multiple_of=cfg.pad_to_multiple_of)
    sampler_args = sampler_settings(cfg, ctx)
    train_loader = train_batches(view, corpus.lengths, train_idx, collator, run, ctx)
    eval_loader = CellBatchLoader(
        view,
        TokenBudgetSampler(
            corpus.lengths, np.unique(eval_cells), seed=run.eval.seed, shuffle=False, **sampler_args
        ),
        collator,
        num_workers=0,
        rank=ctx.rank,
    )
    return DataBundle(corpus, vocab, train_idx, heldout_idx, train_loader, eval_loader), labels
