"""Tokenizer throughput (cells/s on one core) and peak memory against chunk size, on a synthetic .h5ad; and the
time to read a wide CSV's header (`--csv FILE`, default celltypist's 559 x 32,786 sample when installed).

`python -m benchmarks.tokenize_throughput --cells 20000 --genes 20000 --chunk-sizes 256,1024,4096`
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ONE_CORE = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def write_counts(path: Path, n_cells: int, n_genes: int, genes_per_cell: tuple[int, int], seed: int) -> None:
    """CSR counts: 2,000-3,000 expressed genes per cell, heavy-tailed counts, Ensembl-like gene ids."""
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    popularity = rng.pareto(1.0, n_genes) + 1e-3
    popularity /= popularity.sum()
    nnz = rng.integers(genes_per_cell[0], genes_per_cell[1] + 1, n_cells)
    indptr = np.concatenate([[0], np.cumsum(nnz)])
    indices = np.empty(indptr[-1], dtype=np.int32)
    for i in range(n_cells):
        indices[indptr[i] : indptr[i + 1]] = np.sort(rng.choice(n_genes, nnz[i], replace=False, p=popularity))
    data = (rng.geometric(0.45, indptr[-1])).astype(np.float32)
    matrix = sp.csr_matrix((data, indices, indptr), shape=(n_cells, n_genes))
    var = pd.DataFrame(index=[f"ENSG{i:011d}" for i in range(n_genes)])
    obs = pd.DataFrame(
        {"cell_type": rng.choice(["T", "B", "NK", "Mono"], n_cells)},
        index=[f"cell{i}" for i in range(n_cells)],
    )
    ad.AnnData(X=matrix, obs=obs, var=var).write_h5ad(path)


def write_tables(directory: Path, n_genes: int, seed: int) -> tuple[Path, Path]:
    rng = np.random.default_rng(seed + 1)
    genes = [f"ENSG{i:011d}" for i in range(n_genes)]
    vocab = directory / "vocab.txt"
    vocab.write_text("\n".join(["<pad>", "<mask>", *genes]) + "\n")
    medians = directory / "medians.tsv"
    medians.write_text(
        "".join(f"{g}\t{float(m)!r}\n" for g, m in zip(genes, rng.lognormal(0.5, 0.6, n_genes), strict=True))
    )
    return vocab, medians


def run_once(h5ad: Path, vocab: Path, medians: Path, out: Path, chunk_size: int) -> dict:
    """Tokenize in a fresh process so peak RSS (VmHWM: ru_maxrss would include the parent's, inherited at fork)
    belongs to this chunk size alone; imports happen before timing."""
    code = (
        "import json,resource,time,anndata;from dataset.prepare.tokenize import tokenize_counts;"
        "cpu=lambda:sum(resource.getrusage(resource.RUSAGE_SELF)[:2]);"
        f"t=time.perf_counter();c=cpu();m=tokenize_counts({str(h5ad)!r},{str(out)!r},vocab={str(vocab)!r},"
        f"medians={str(medians)!r},obs_columns=['cell_type'],chunk_size={chunk_size});"
        "s=time.perf_counter()-t;c=cpu()-c;"
        "print(json.dumps({'seconds':s,'cpu_seconds':c,'cells':m['cells']['kept'],"
        "'peak_rss_mb':int(open('/proc/self/status').read().split('VmHWM:')[1].split()[0])/1024}))"
    )
    env = {**os.environ, **ONE_CORE, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    # taskset pins the run to one core where available, so the figure is a one-core figure.
    prefix = ["taskset", "-c", "0"] if sys.platform.startswith("linux") else []
    done = subprocess.run([*prefix, sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"tokenizer run failed:\n{done.stderr}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["cells_per_s"] = result["cells"] / result["seconds"]
    # Per CPU-second of the (single-threaded) process: the one-core rate even on a busy machine.
    result["cells_per_cpu_s"] = result["cells"] / result["cpu_seconds"]
    result["chunk_size"] = chunk_size
    return result


def celltypist_sample() -> Path | None:
    spec = importlib.util.find_spec("celltypist")  # its files, without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "samples" / "sample_cell_by_gene.csv"
    return path if path.is_file() else None


def csv_header_figures(path: Path) -> dict:
    """Seconds to learn a CSV's gene names: the tokenizer's reader (csv module) against pandas' nrows=0 read."""
    import pandas as pd

    from dataset.prepare.count_readers import open_counts

    started = time.perf_counter()
    source = open_counts(path)
    reader_s = time.perf_counter() - started
    started = time.perf_counter()
    header = pd.read_csv(path, index_col=0, nrows=0)
    pandas_s = time.perf_counter() - started
    assert list(header.columns) == source.gene_names or header.columns.has_duplicates
    return {
        "csv": str(path),
        "genes": len(source.gene_names),
        "open_counts_s": round(reader_s, 4),
        "pandas_nrows0_s": round(pandas_s, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cells", type=int, default=20_000)
    parser.add_argument("--genes", type=int, default=20_000)
    parser.add_argument("--chunk-sizes", default="256,1024,4096")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--input", type=Path, help="reuse (or create once) this .h5ad instead of a temporary one"
    )
    parser.add_argument("--csv", type=Path, help="CSV for the header figure (default: celltypist's sample)")
    parser.add_argument("--csv-only", action="store_true", help="only the CSV header figure")
    args = parser.parse_args()
    csv_path = args.csv or celltypist_sample()
    if csv_path is not None:
        print(json.dumps(csv_header_figures(csv_path)))
    if args.csv_only:
        return
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        tmp = Path(tmp)
        h5ad = args.input or tmp / "counts.h5ad"
        started = time.perf_counter()
        if not h5ad.is_file():
            write_counts(h5ad, args.cells, args.genes, (2000, 3000), args.seed)
        vocab, medians = write_tables(tmp, args.genes, args.seed)
        print(f"wrote {h5ad} ({h5ad.stat().st_size / 2**20:.0f} MiB) in {time.perf_counter() - started:.0f}s")
        for i, chunk_size in enumerate(int(c) for c in args.chunk_sizes.split(",")):
            result = run_once(h5ad, vocab, medians, tmp / f"out{i}", chunk_size)
            print(json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in result.items()}))
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"(this driver process peaked at {baseline:.0f} MB while writing the input)")


if __name__ == "__main__":
    main()
