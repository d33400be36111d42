"""Interpret one cell: attention heat maps per layer and head over its top genes, and integrated-gradients
saliency of each gene for the masked-LM prediction of one masked gene, as PNGs and a TSV.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from common.errors import run_cli
from dataset.builtin_corpus import ensure_builtin_corpus
from dataset.corpus import CellCorpus
from dataset.vocab import Vocabulary
from interpret.attention_maps import attention_probs, save_attention_maps, top_gene_positions
from interpret.integrated_gradients import METHODS, GeneAttribution, gene_attributions
from modeling_bert_te import BertForMaskedLM

log = logging.getLogger("interpret.cell")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("model_dir", metavar="MODEL_DIR", help="exported BertForMaskedLM directory")
    p.add_argument(
        "--data",
        default=None,
        help="parquet file, shard directory or Arrow directory (default: built-in corpus)",
    )
    p.add_argument(
        "--vocab", default=None, help="vocab.txt or token-dictionary .pkl (default: vocab.txt beside --data)"
    )
    p.add_argument(
        "--builtin-dir", default="outputs/builtin_corpus", help="where the built-in corpus is kept"
    )
    p.add_argument("--cell-index", type=int, default=0, help="row of the cell in the corpus")
    p.add_argument("--out", default="outputs/interpret", help="output directory (PNGs, attributions.tsv)")
    p.add_argument(
        "--max-length", type=int, default=None, help="truncate the cell (default: the model's positions)"
    )
    p.add_argument("--top-genes", type=int, default=20, help="genes shown in the heat maps and printed table")
    p.add_argument(
        "--mask-rank",
        type=int,
        default=0,
        help="which gene to mask and predict: its rank in the cell (0 = the most expressed gene)",
    )
    p.add_argument("--steps", type=int, default=32, help="integrated-gradients steps")
    p.add_argument("--method", choices=METHODS, default="trapezoid")
    p.add_argument("--baseline", choices=("pad", "zero"), default="pad", help="the <pad> embedding or zeros")
    return p.parse_args(argv)


def load_cell(args: argparse.Namespace, model: BertForMaskedLM) -> tuple[torch.Tensor, Vocabulary]:
    data = Path(args.data) if args.data else ensure_builtin_corpus(args.builtin_dir)
    if not data.exists():
        raise FileNotFoundError(
            f"--data {data} does not exist; give a parquet file, shard directory or Arrow directory"
        )
    vocab_path = Path(args.vocab) if args.vocab else (data if data.is_dir() else data.parent) / "vocab.txt"
    if not vocab_path.is_file():
        raise FileNotFoundError(
            f"no vocabulary at {vocab_path}: pass --vocab (the corpus's vocab.txt or token dictionary)"
        )
    vocab = Vocabulary.load(vocab_path)
    if vocab.size != model.config.vocab_size:
        raise ValueError(
            f"vocabulary {vocab_path} has {vocab.size} tokens, the model {model.config.vocab_size}; "
            "use the vocabulary the model was trained with"
        )
    corpus = CellCorpus(
        data,
        vocab_size=vocab.size,
        max_length=args.max_length or model.config.max_position_embeddings,
        ends=vocab.cell_ends,
    )
    if not 0 <= args.cell_index < len(corpus):
        raise ValueError(
            f"--cell-index {args.cell_index} is outside the corpus ({len(corpus)} cells in {data})"
        )
    return torch.as_tensor(corpus[args.cell_index], dtype=torch.long), vocab


def write_tsv(rows: list[GeneAttribution], path: Path) -> None:
    lines = ["rank\tposition\ttoken_id\tgene\tattribution"]
    lines += [f"{i}\t{r.position}\t{r.token_id}\t{r.gene}\t{r.attribution:.6g}" for i, r in enumerate(rows)]
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> list[GeneAttribution]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    model = BertForMaskedLM.from_pretrained(args.model_dir).eval()
    cell, vocab = load_cell(args, model)
    out = Path(args.out)
    pngs = save_attention_maps(
        attention_probs(model, cell[None]), cell[None], vocab, out, top_n=args.top_genes
    )

    genes = top_gene_positions(cell, vocab, args.mask_rank + 1)
    if len(genes) <= args.mask_rank:
        raise ValueError(f"--mask-rank {args.mask_rank}: the cell has only {len(genes)} genes")
    position = genes[args.mask_rank]
    true_gene = int(cell[position])
    masked = cell.clone()
    masked[position] = vocab.mask_id
    rows, delta, gap = gene_attributions(
        model,
        vocab,
        masked,
        position,
        true_gene,
        steps=args.steps,
        baseline=args.baseline,
        method=args.method,
    )
    write_tsv(rows, out / "attributions.tsv")
    log.info("cell %d (%d genes): wrote %s", args.cell_index, len(cell), ", ".join(str(p) for p in pngs))
    log.info(
        "integrated gradients of the logit of %s masked at position %d: f(x) - f(baseline) = %.4f, "
        "completeness gap %.2e; %s",
        vocab.tokens[true_gene],
        position,
        delta,
        gap,
        out / "attributions.tsv",
    )
    log.info("%-5s %-8s %-16s %s", "rank", "position", "gene", "attribution")
    for i, r in enumerate(rows[: args.top_genes]):
        log.info("%-5d %-8d %-16s %+.4g", i, r.position, r.gene, r.attribution)
    return rows


if __name__ == "__main__":
    run_cli(main)
