"""Put a model to work: embeddings (and a classifier's predictions) for new cells, streamed, resumable, torchrun-ready.

python embed.py MODEL_DIR cells.h5ad --out cells_embedded.h5ad --medians gene_median_dictionary.pkl
torchrun --nproc_per_node=8 embed.py MODEL_DIR corpus/ --out embeddings.parquet
"""

from __future__ import annotations

import argparse
import logging

import torch

from common.errors import run_cli
from embedding.job import DTYPES, embed
from model.cell_embeddings import POOLINGS
from training.distributed import init_distributed, shutdown_distributed


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "model",
        metavar="MODEL_DIR",
        help="exported model directory (masked-LM or classifier) with config.json, weights and vocab.txt",
    )
    p.add_argument(
        "input",
        metavar="INPUT",
        help="tokenized corpus (parquet file, shard dir, Arrow dir) or raw counts (.h5ad, .loom, .csv, .tsv)",
    )
    p.add_argument(
        "--out", required=True, help=".h5ad (a copy of an .h5ad input) or .parquet; appears when whole"
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace an existing --out (and any unfinished run)"
    )
    p.add_argument("--key", default="X_geneformer", help="obsm key of the embedding in an .h5ad output")
    p.add_argument(
        "--layer", type=int, default=-1, help="hidden state: 0 = embedding output, -1 = last layer"
    )
    p.add_argument(
        "--pooling",
        choices=POOLINGS,
        default="mean",
        help="mean over gene tokens, or the <cls> token (V2 vocabularies)",
    )
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="dtype of the stored vectors")
    p.add_argument("--max-tokens", type=int, default=16384, help="token budget of a batch")
    p.add_argument(
        "--chunk-cells",
        type=int,
        default=4096,
        help="cells per part file: the unit of work shared over ranks and kept on interruption",
    )
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16"),
        default="auto",
        help="auto = bf16 autocast on CUDA, fp32 on CPU",
    )
    p.add_argument("--threads", type=int, default=None, help="CPU threads per process (default: torch's)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--cache-dir", default=None, help="corpus index cache (default: the corpus reader's)")
    counts = p.add_argument_group("raw counts (as python -m dataset.prepare.tokenize)")
    counts.add_argument(
        "--medians",
        default=None,
        help="gene median table of the model's vocabulary (.pkl or TSV; default: gene_medians.tsv "
        "in MODEL_DIR)",
    )
    counts.add_argument(
        "--gene-names", default=None, help="symbol -> Ensembl id table when genes are symbols"
    )
    counts.add_argument(
        "--gene-mapping",
        default=None,
        help="alternate id -> vocabulary id table (Geneformer V2: ensembl_mapping_dict_gc104M.pkl)",
    )
    counts.add_argument("--gene-column", default=None, help="var column / loom row attribute with gene ids")
    counts.add_argument(
        "--layout",
        choices=("v1", "v2"),
        default=None,
        help="default: v2 when the model's vocabulary has <cls>, else v1",
    )
    counts.add_argument(
        "--counts-layer", default=None, help="matrix to read: X (default), raw, or a layer name"
    )
    counts.add_argument("--min-counts", type=float, default=0, help="leave out cells with fewer total counts")
    counts.add_argument("--min-genes", type=int, default=0, help="leave out cells with fewer expressed genes")
    counts.add_argument(
        "--allow-non-integer", action="store_true", help="tokenize non-integer values as they are"
    )
    args = p.parse_args(argv)
    for name in ("max_tokens", "chunk_cells"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def main(argv: list[str] | None = None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    ctx = init_distributed(args.device)
    logging.basicConfig(
        level=logging.INFO if ctx.is_main else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return embed(args, ctx)
    finally:
        shutdown_distributed()


if __name__ == "__main__":
    run_cli(main)
