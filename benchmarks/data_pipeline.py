"""Data pipeline benchmark: padding share, collated-batch throughput, memory and index time at scale.

Run: python -m benchmarks.data_pipeline [--cells 1000000] [--workdir /tmp/data_bench] (--cells 0 skips scale).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from dataset.builtin_corpus import write_builtin_corpus
from dataset.collator import MLMCollator
from dataset.corpus import CellCorpus
from dataset.loader import CellBatchLoader
from dataset.sampler import TokenBudgetSampler
from dataset.vocab import Vocabulary


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def pad_share(lengths: np.ndarray, batches: list[np.ndarray], multiple: int) -> float:
    padded = sum(len(b) * int(-(-lengths[b].max() // multiple) * multiple) for b in batches)
    return 1 - sum(int(lengths[b].sum()) for b in batches) / padded


def padding(corpus: CellCorpus, max_tokens: int) -> None:
    lengths = corpus.lengths
    sampler = TokenBudgetSampler.every_cell(lengths, max_tokens)
    budget = pad_share(lengths, sampler.global_batches(0), 8)
    # Fixed-size random batches with the same mean cell count per batch, padded to the longest cell.
    size = max(1, round(len(corpus) / len(sampler.global_batches(0))))
    order = np.random.default_rng(0).permutation(len(corpus))
    fixed = pad_share(lengths, [order[i : i + size] for i in range(0, len(order), size)], 8)
    print(
        f"padding  token-budget sampler: {100 * budget:.2f}% pad tokens (target <= 3%)   "
        f"fixed-size random batches of {size}: {100 * fixed:.2f}%"
    )


def throughput(corpus: CellCorpus, vocab: Vocabulary, max_tokens: int, seconds: float = 5.0) -> None:
    sampler = TokenBudgetSampler.every_cell(corpus.lengths, max_tokens)
    for packed in (False, True):
        loader = CellBatchLoader(corpus, sampler, MLMCollator(vocab, packed=packed), rank=0)
        next(loader)
        tokens, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            tokens += int(next(loader)["attention_mask"].sum())
        rate = tokens / (time.perf_counter() - start)
        print(
            f"throughput  one process, read + mask + collate ({'packed' if packed else 'padded'}): "
            f"{rate / 1e6:.2f}M tokens/s (target >= 1M)"
        )


def scale(n_cells: int, workdir: Path, max_tokens: int, vocab: Vocabulary) -> None:
    data, cache = workdir / f"corpus-{n_cells}", workdir / "cache"
    if not (data / "vocab.txt").exists():
        start = time.perf_counter()
        shutil.rmtree(data, ignore_errors=True)
        # In a child process, so the generator's memory does not blur this process's RSS figures.
        subprocess.run(
            [
                sys.executable,
                "-m",
                "dataset.builtin_corpus",
                "--out",
                str(data),
                "--cells",
                str(n_cells),
                "--shards",
                str(max(1, n_cells // 50_000)),
            ],
            check=True,
            cwd=Path(__file__).resolve().parents[1],
        )
        print(f"scale  generated {n_cells} cells in {time.perf_counter() - start:.1f} s")
    shutil.rmtree(cache, ignore_errors=True)
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # index preparation on one core
    start = time.perf_counter()
    corpus = CellCorpus(data, vocab_size=vocab.size, max_length=2048, cache_dir=cache)
    index_s = time.perf_counter() - start
    tokens = corpus.meta["n_tokens"]
    print(
        f"scale  index preparation for {len(corpus)} cells / {tokens / 1e6:.0f}M tokens on one core: "
        f"{index_s:.1f} s (target <= 60 s)"
    )
    # Memory in a fresh process that opens the prepared index: index building leaves freed memory behind here.
    subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.data_pipeline",
            "--epoch-rss",
            str(data),
            "--workdir",
            str(workdir),
            "--max-tokens",
            str(max_tokens),
        ],
        check=True,
    )


def epoch_rss(data: Path, cache: Path, max_tokens: int, vocab: Vocabulary) -> None:
    """RSS from before opening the corpus to the peak of one full collated epoch (every cell read once)."""
    before = rss_mb()
    corpus = CellCorpus(data, vocab_size=vocab.size, max_length=2048, cache_dir=cache)
    sampler = TokenBudgetSampler.every_cell(corpus.lengths, max_tokens)
    loader = CellBatchLoader(corpus, sampler, MLMCollator(vocab), rank=0)
    opened, seen, start = rss_mb(), 0, time.perf_counter()
    peak = opened
    for _ in range(len(sampler)):
        seen += len(next(loader)["cell_index"])
        peak = max(peak, rss_mb())
    print(
        f"scale  iterated {seen} cells (one epoch, collated) in {time.perf_counter() - start:.0f} s; RSS "
        f"{before:.0f} MB before opening the corpus, {opened:.0f} MB once open, peak {peak:.0f} MB: increase "
        f"{peak - before:.0f} MB (target <= 300 MB)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cells", type=int, default=1_000_000, help="cells of the scale test (0 skips it)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/data_pipeline_bench"))
    parser.add_argument("--max-tokens", type=int, default=16_384)
    parser.add_argument("--epoch-rss", type=Path, help=argparse.SUPPRESS)  # the scale step's child process
    args = parser.parse_args()
    vocab = Vocabulary.synthetic()
    if args.epoch_rss:
        epoch_rss(args.epoch_rss, args.workdir / "cache", args.max_tokens, vocab)
        return
    small = write_builtin_corpus(args.workdir / "builtin", n_cells=4000)
    corpus = CellCorpus(small, vocab_size=vocab.size, max_length=2048, cache_dir=args.workdir / "cache-small")
    padding(corpus, args.max_tokens)
    throughput(corpus, vocab, args.max_tokens)
    if args.cells:
        scale(args.cells, args.workdir, args.max_tokens, vocab)


if __name__ == "__main__":
    main()
