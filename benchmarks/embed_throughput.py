"""Embedding cells/s of the 10m teacher and the 4m / 3m / 2m students on the same cells, and embed.py's peak memory.

Run: python -m benchmarks.embed_throughput [--cells 256] [--max-length 512] [--repeats 3] [--memory-cells 100000]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from dataset.builtin_corpus import write_builtin_corpus
from dataset.corpus import CellCorpus
from dataset.vocab import Vocabulary
from embedding.cells import CellChunk
from embedding.job import embed_chunk
from embedding.model_dir import open_model_dir
from model.cell_embeddings import inference_autocast
from modeling_bert_te import BertForMaskedLM, BertTEConfig, count_parameters

ROOT = Path(__file__).resolve().parents[1]

MODELS = ("10m", "4m", "3m", "2m")
# Runs embed.py in this process and prints its peak resident memory (KiB) as the last line. VmHWM, not
# ru_maxrss: Linux carries the parent's peak across fork and exec into ru_maxrss, so a child of this benchmark
# (which holds the corpus it wrote) would report the parent's memory as its own.
PEAK_RSS = (
    "import runpy, sys; sys.argv = sys.argv[1:]\n"
    "try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\n"
    "finally:\n    hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]\n"
    "    print('peak_rss_kib', hwm)"
)


def save_model(name: str, out: Path, vocab: Vocabulary, max_length: int) -> Path:
    """A randomly initialised model of hydra_config/model/<name>.yaml (speed does not depend on the weights)."""
    fields = yaml.safe_load((ROOT / "hydra_config" / "model" / f"{name}.yaml").read_text())
    torch.manual_seed(0)
    model = BertForMaskedLM(BertTEConfig(**{**fields, "max_position_embeddings": max_length}))
    return model.save_pretrained(out / name, vocab)


def time_models(
    dirs: dict[str, Path], cells: list[np.ndarray], args: argparse.Namespace, device: torch.device
) -> dict[str, list[float]]:
    """Seconds to embed all cells, the models alternated run by run so machine load hits each alike."""
    loaded = {name: open_model_dir(d) for name, d in dirs.items()}
    options = argparse.Namespace(max_tokens=args.max_tokens, layer=-1, pooling="mean", dtype="float32")
    chunk = CellChunk(0, np.arange(len(cells)), cells)
    autocast = inference_autocast("auto", device)
    for model in loaded.values():
        model.model.to(device)
        embed_chunk(model, CellChunk(0, np.arange(8), cells[:8]), options, device, autocast)  # warm-up
    seconds = {name: [] for name in loaded}
    for _ in range(args.repeats):
        for name, model in loaded.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            embed_chunk(model, chunk, options, device, autocast)
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds[name].append(time.perf_counter() - start)
    return seconds


def peak_memory(model_dir: Path, n_cells: int, work: Path, device: str) -> dict:
    """embed.py's peak RSS (and wall time) over `n_cells` built-in cells with a built index, written as parquet."""
    corpus = write_builtin_corpus(
        work / f"cells_{n_cells}", n_cells=n_cells, n_shards=max(1, n_cells // 50_000)
    )
    # The corpus index is built once per corpus (here, outside the measured run): embed.py's own memory is measured.
    CellCorpus(corpus, vocab_size=Vocabulary.synthetic().size, max_length=1, cache_dir=work / "cache")
    cmd = [
        sys.executable,
        "-c",
        PEAK_RSS,
        str(ROOT / "embed.py"),
        str(model_dir),
        str(corpus),
        "--out",
        str(work / f"out_{n_cells}.parquet"),
        "--no-progress",
        "--cache-dir",
        str(work / "cache"),
        "--device",
        device,
    ]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    kib = int(done.stdout.strip().splitlines()[-1].split()[-1])
    return {
        "cells": n_cells,
        "peak_rss_mib": round(kib / 1024, 1),
        "seconds": round(time.perf_counter() - start, 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cells", type=int, default=256, help="built-in corpus cells embedded per timed run")
    p.add_argument("--max-length", type=int, default=512, help="cells truncated to this many genes")
    p.add_argument("--max-tokens", type=int, default=16384, help="token budget of a batch")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument(
        "--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu"
    )
    p.add_argument(
        "--memory-cells",
        type=str,
        default="10000,100000",
        help="comma-separated cell counts for embed.py's peak memory; empty = skip",
    )
    p.add_argument(
        "--memory-model",
        choices=(*MODELS, "micro", "tiny"),
        default="2m",
        help="model of the memory runs (hydra_config/model/<name>.yaml)",
    )
    p.add_argument("--memory-length", type=int, default=64, help="genes a cell in the memory runs")
    p.add_argument("--json", default=None, help="also write the figures to this file")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        vocab = Vocabulary.synthetic()
        corpus_dir = write_builtin_corpus(work / "corpus", n_cells=args.cells, n_shards=1)
        corpus = CellCorpus(
            corpus_dir, vocab_size=vocab.size, max_length=args.max_length, cache_dir=work / "cache"
        )
        cells = corpus.get_many(range(len(corpus)))
        dirs = {name: save_model(name, work / "models", vocab, args.max_length) for name in MODELS}
        seconds = time_models(dirs, cells, args, device)
        rows = {}
        for name in MODELS:
            median = statistics.median(seconds[name])
            rows[name] = {
                "parameters": count_parameters(open_model_dir(dirs[name]).model),
                "cells_per_s": round(len(cells) / median, 1),
            }
        teacher = rows["10m"]["cells_per_s"]
        print(
            f"{len(cells)} built-in cells (mean {np.mean([len(c) for c in cells]):.0f} genes, truncated to "
            f"{args.max_length}), {args.device}, {torch.get_num_threads()} threads, median of {args.repeats}"
        )
        print(f"{'model':>6} {'parameters':>12} {'cells/s':>9} {'x 10m':>6}")
        for name, row in rows.items():
            row["speedup_vs_10m"] = round(row["cells_per_s"] / teacher, 2)
            print(
                f"{name:>6} {row['parameters']:>12,} {row['cells_per_s']:>9,.1f} {row['speedup_vs_10m']:>6.2f}"
            )
        memory = []
        if args.memory_cells:
            small = save_model(args.memory_model, work / "memory_model", vocab, args.memory_length)
            for n in (int(x) for x in args.memory_cells.split(",")):
                memory.append(peak_memory(small, n, work, args.device))
                print(
                    f"embed.py over {n:,} cells ({args.memory_model}, {args.memory_length} genes a cell): peak RSS "
                    f"{memory[-1]['peak_rss_mib']} MiB, {memory[-1]['seconds']} s"
                )
        if args.json:
            Path(args.json).write_text(
                json.dumps({"throughput": rows, "memory": memory, "args": vars(args)}, indent=2) + "\n"
            )


if __name__ == "__main__":
    main()
