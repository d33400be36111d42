"""Trivial masked-LM baselines: the most frequent gene, the most frequent gene at each rank, and ln(V).

Counted once from the training cells (streamed from the corpus index), cached beside it, scored on held-out masks.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass

import numpy as np

from dataset.collator import IGNORE_INDEX
from dataset.corpus import CellCorpus

_CHUNK_TOKENS = 1 << 22  # tokens read per step while counting: flat memory for any corpus size


@dataclass(frozen=True)
class FrequencyBaselines:
    """`unigram`: the training cells' most frequent gene; `by_rank[r]`: their most frequent gene at
    position r (rank-value encoding makes position informative); -1 where no training cell reaches r."""

    unigram: int
    by_rank: np.ndarray
    vocab_size: int

    @property
    def uniform_loss(self) -> float:
        return math.log(self.vocab_size)

    def batch_hits(self, batch: dict) -> np.ndarray:
        """[masked tokens, unigram hits, rank-position hits] of one collated batch (padded or packed)."""
        labels = batch["labels"].cpu().numpy()
        if "cu_seqlens" in batch:  # packed: a token's rank is its offset from its cell's start
            flat = labels.reshape(-1)
            cu = batch["cu_seqlens"].cpu().numpy().astype(np.int64)
            where = np.flatnonzero(flat != IGNORE_INDEX)
            ranks = where - cu[np.searchsorted(cu, where, side="right") - 1]
            genes = flat[where]
        else:
            rows, ranks = np.nonzero(labels != IGNORE_INDEX)
            genes = labels[rows, ranks]
        guess = np.full(len(ranks), -1, dtype=np.int64)
        known = ranks < len(self.by_rank)
        guess[known] = self.by_rank[ranks[known]]
        return np.array(
            [len(genes), np.count_nonzero(genes == self.unigram), np.count_nonzero(genes == guess)],
            dtype=np.float64,
        )

    def metrics(self, hits: np.ndarray) -> dict[str, dict[str, float]]:
        """Per-baseline metrics from summed `batch_hits`, keyed like a model's column of the side-by-side table."""
        n, unigram, by_rank = hits.tolist()
        if n == 0:
            raise ValueError(
                "the held-out split has no masked token to score; raise data.heldout_fraction or "
                "eval.max_cells (or data.mask_prob)"
            )
        return {
            "unigram": {"accuracy": unigram / n},
            "rank_position": {"accuracy": by_rank / n},
            "uniform": {"loss": self.uniform_loss, "perplexity": float(self.vocab_size)},
        }


def count_baselines(
    corpus: CellCorpus,
    train_idx: np.ndarray,
    special_ids: list[int] | tuple[int, ...],
) -> FrequencyBaselines:
    """Counts (rank, gene) over the training cells' first `corpus.max_length` tokens, special tokens excluded
    (they are never masked). Reads the index's flat token file in chunks of consecutive cells."""
    if len(train_idx) == 0:
        raise ValueError(
            "no training cells to count baselines from; lower data.heldout_fraction or use more cells"
        )
    n_ranks, vocab = int(corpus.lengths.max()), corpus.vocab_size
    counts = np.zeros(
        (n_ranks, vocab), dtype=np.int32
    )  # 200 MB at 2,048 ranks x 25k genes, whatever the corpus
    tokens = np.memmap(corpus.index_dir / "tokens.bin", dtype=corpus.meta["token_dtype"], mode="r")
    offsets = np.memmap(corpus.index_dir / "offsets.bin", dtype=np.int64, mode="r")
    is_train = np.zeros(len(corpus), dtype=bool)
    is_train[train_idx] = True
    special = np.asarray(special_ids, dtype=np.int64)
    for a, b in _chunks(np.asarray(offsets), _CHUNK_TOKENS):
        lengths = np.diff(offsets[a : b + 1]).astype(np.int64)
        flat = np.asarray(tokens[offsets[a] : offsets[b]], dtype=np.int64)
        ranks = np.arange(len(flat)) - np.repeat(offsets[a:b] - offsets[a], lengths)
        keep = np.repeat(is_train[a:b], lengths) & (ranks < corpus.max_length) & ~np.isin(flat, special)
        keys, n = np.unique(ranks[keep] * vocab + flat[keep], return_counts=True)
        counts.reshape(-1)[keys] += n.astype(counts.dtype)
    by_rank = counts.argmax(1).astype(np.int64)
    by_rank[counts.max(1) == 0] = -1
    return FrequencyBaselines(unigram=int(counts.sum(0).argmax()), by_rank=by_rank, vocab_size=vocab)


def _chunks(offsets: np.ndarray, budget: int):
    """(first cell, end cell) ranges of consecutive cells holding about `budget` tokens each."""
    n = len(offsets) - 1
    a = 0
    while a < n:
        b = int(np.searchsorted(offsets, offsets[a] + budget, side="right")) - 1
        b = min(max(b, a + 1), n)
        yield a, b
        a = b


def cached_baselines(
    corpus: CellCorpus,
    train_idx: np.ndarray,
    special_ids: list[int] | tuple[int, ...],
) -> FrequencyBaselines:
    """`count_baselines`, cached beside the corpus index and keyed by the training cells and max_length."""
    key = hashlib.sha1(np.asarray(train_idx, dtype=np.int64).tobytes())
    key.update(f"{corpus.max_length}:{corpus.vocab_size}:{sorted(special_ids)}".encode())
    path = corpus.index_dir / f"baselines-{key.hexdigest()[:16]}.npz"
    if path.is_file():
        with np.load(path) as saved:
            return FrequencyBaselines(int(saved["unigram"]), saved["by_rank"], int(saved["vocab_size"]))
    baselines = count_baselines(corpus, train_idx, special_ids)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.npz")
    np.savez(tmp, unigram=baselines.unigram, by_rank=baselines.by_rank, vocab_size=baselines.vocab_size)
    os.replace(tmp, path)  # readers see no cache or a whole one
    return baselines


def heldout_hits(baselines: FrequencyBaselines, batches: list[dict]) -> np.ndarray:
    """Summed `batch_hits` of this process's held-out batches (sum over ranks before `metrics`)."""
    total = np.zeros(3, dtype=np.float64)
    for batch in batches:
        total += baselines.batch_hits(batch)
    return total
