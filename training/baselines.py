"""Trivial baselines beside every held-out masked-LM evaluation: most frequent gene, by rank, and ln(V).

Counted once per corpus, split and max_length (rank 0 writes the cache, the others read it), scored on all ranks.
"""

from __future__ import annotations

import numpy as np
import torch

from common.collectives import all_reduce_sum, barrier
from dataset.baselines import FrequencyBaselines, cached_baselines, heldout_hits
from dataset.corpus import CellCorpus
from training.builders import DataBundle

BASELINE_NAMES = ("unigram", "rank_position", "uniform")


def masked_lm_baselines(data: DataBundle, batches: list[dict], is_main: bool) -> dict[str, float]:
    """The baselines' eval-record entries (e.g. `rank_position_accuracy`) on these held-out batches."""
    baselines = load_baselines(data.corpus, data.train_idx, data.vocab.special_ids, is_main)
    return flat_baselines(baseline_columns(baselines, batches))


def load_baselines(
    corpus: CellCorpus,
    train_idx: np.ndarray,
    special_ids: list[int],
    is_main: bool,
) -> FrequencyBaselines:
    """Rank 0 counts (or reads) the cached baselines first; the other ranks then read its cache."""
    baselines = cached_baselines(corpus, train_idx, special_ids) if is_main else None
    barrier()
    return baselines or cached_baselines(corpus, train_idx, special_ids)


def baseline_columns(baselines: FrequencyBaselines, batches: list[dict]) -> dict[str, dict[str, float]]:
    """{unigram, rank_position, uniform} -> metrics on the held-out masked tokens of every rank's `batches`."""
    hits = all_reduce_sum(torch.from_numpy(heldout_hits(baselines, batches)))
    return baselines.metrics(hits.numpy())


def flat_baselines(columns: dict[str, dict[str, float]]) -> dict[str, float]:
    """Eval-record keys such as `rank_position_accuracy` (`split_columns` reads them back)."""
    return {f"{name}_{key}": value for name, metrics in columns.items() for key, value in metrics.items()}


def split_columns(record: dict, names: tuple[str, ...]) -> dict[str, dict]:
    """Table columns {name: metrics} from a flat eval record whose keys start with `<name>_`."""
    return {
        name: {k[len(name) + 1 :]: v for k, v in record.items() if k.startswith(name + "_")} for name in names
    }
