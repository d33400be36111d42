"""Compare models (a teacher and its students, or any stock-layout BertForMaskedLM) on the same held-out cells.

Masked-LM metrics side by side, cell embeddings (parquet), their CKA / cosine to the first model, cell-type
probes, PCA figures and training curves; `torchrun` shares the cells over ranks. See `--help`.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from common.errors import run_cli
from dataset.collator import MLMCollator
from dataset.corpus import CellCorpus
from dataset.heldout import HeldoutBatches
from dataset.split import split_indices
from dataset.vocab import Vocabulary
from evaluation.embeddings import CellEmbeddings, check_layer, extract_embeddings, write_embeddings
from evaluation.figures import plot_embedding_pca
from evaluation.probes import probe_embeddings, stratified_split
from evaluation.similarity import linear_cka, mean_cosine
from model.cell_embeddings import inference_autocast
from modeling_bert_te import BertForMaskedLM, count_parameters
from training.baselines import baseline_columns, load_baselines
from training.builders import resolve_data_path, resolve_vocab
from training.config import DataConfig
from training.distributed import DistributedContext, init_distributed, shutdown_distributed
from training.entry import end_failed_run
from training.masked_lm_metrics import format_side_by_side, masked_lm_metrics
from training.plots import plot_training_curves

log = logging.getLogger("evaluate")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "models",
        nargs="+",
        metavar="MODEL_DIR",
        help="model directories; the first is the reference for KL, agreement, CKA and cosine",
    )
    p.add_argument(
        "--data",
        default=None,
        help="parquet file, shard directory or Arrow directory (default: the built-in corpus)",
    )
    p.add_argument(
        "--vocab", default=None, help="vocab.txt or token-dictionary .pkl (default: vocab.txt beside --data)"
    )
    p.add_argument(
        "--builtin-dir", default="outputs/builtin_corpus", help="where the built-in corpus is kept"
    )
    p.add_argument(
        "--builtin-cells", type=int, default=4000, help="size of the built-in corpus, as training's"
    )
    p.add_argument(
        "--out", default="outputs/evaluate", help="output directory (results.json, table.txt, PNGs)"
    )
    p.add_argument(
        "--split",
        choices=("heldout", "all"),
        default="heldout",
        help="'heldout': training's held-out cells; 'all': every cell (a corpus no model trained on)",
    )
    p.add_argument(
        "--heldout-fraction", type=float, default=0.02, help="as in training (data.heldout_fraction)"
    )
    p.add_argument("--seed", type=int, default=42, help="split seed, as in training (seed)")
    p.add_argument("--mask-seed", type=int, default=1234, help="masking seed, as training's eval.seed")
    p.add_argument("--max-cells", type=int, default=512, help="evaluate the first N chosen cells (0 = all)")
    p.add_argument("--max-tokens", type=int, default=16384, help="token budget of a batch")
    p.add_argument(
        "--max-length",
        type=int,
        default=None,
        help="truncate cells to this many tokens (default: the smallest max_position_embeddings)",
    )
    p.add_argument(
        "--label-column",
        default=None,
        help="corpus column for probes and colours (default: cell_type when present; 'none' = off)",
    )
    p.add_argument(
        "--layer", type=int, default=-1, help="hidden state for embeddings: 0 = embedding output, -1 = last"
    )
    p.add_argument("--probe-seed", type=int, default=0, help="seed of the probes' stratified split")
    p.add_argument(
        "--runs",
        nargs="*",
        default=[],
        metavar="NAME=PATH",
        help="runs to draw on one training-curves figure: a run's output_dir (its train.jsonl or "
        "distill.jsonl) or the metrics .jsonl file itself",
    )
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16"),
        default="auto",
        help="auto = bf16 autocast on CUDA, fp32 on CPU",
    )
    p.add_argument("--cache-dir", default=None, help="corpus index cache (default: the corpus reader's)")
    args = p.parse_args(argv)
    if args.max_cells < 0:
        p.error(f"--max-cells must be >= 0 (0 = all), got {args.max_cells}")
    return args


def model_names(dirs: list[str]) -> list[str]:
    """Short unique column names: the directory name, or more of the path where names collide."""
    paths = [Path(d).resolve() for d in dirs]
    for depth in range(1, max(len(p.parts) for p in paths) + 1):
        names = ["/".join(p.parts[-depth:]) for p in paths]
        if len(set(names)) == len(names):
            return names
    return [f"{i}:{p.name}" for i, p in enumerate(paths)]  # the same directory given twice


def _file_stem(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "model"


def load_models(dirs: list[str], device: torch.device) -> dict[str, nn.Module]:
    models = {}
    for name, model_dir in zip(model_names(dirs), dirs, strict=True):
        models[name] = BertForMaskedLM.from_pretrained(model_dir).to(device).eval()
    return models


def choose_cells(n_cells: int, args: argparse.Namespace) -> np.ndarray:
    """Corpus indices to evaluate: training's held-out cells (same fraction and seed) or all, capped."""
    if args.split == "heldout":
        cells = split_indices(n_cells, args.heldout_fraction, args.seed)[1]
    else:
        cells = np.arange(n_cells, dtype=np.int64)
    return cells[: args.max_cells] if args.max_cells else cells


def fixed_batches(
    corpus: CellCorpus,
    vocab: Vocabulary,
    cells: np.ndarray,
    args: argparse.Namespace,
    ctx: DistributedContext,
) -> list[dict]:
    """This rank's share of the cells in token-budget batches; each cell's mask is fixed by (--mask-seed, its id),
    so the tokens scored are training's, whatever --max-tokens and the number of ranks."""
    collate = MLMCollator(vocab, seed=args.mask_seed).fixed_masks
    return list(
        HeldoutBatches(
            corpus,
            cells,
            collate,
            max_tokens=args.max_tokens,
            max_cells=None,
            pad_to_multiple_of=8,
            rank=ctx.rank,
            world_size=ctx.world_size,
        ).epoch_batches()
    )


def open_corpus(
    path: Path,
    args: argparse.Namespace,
    max_length: int,
    vocab_size: int,
    ctx: DistributedContext,
    ends: tuple[int, int] | None = None,
) -> CellCorpus:
    return CellCorpus.open_on_all_ranks(
        path,
        is_main=ctx.is_main,
        vocab_size=vocab_size,
        max_length=max_length,
        cache_dir=args.cache_dir,
        ends=ends,
    )


def gather_embeddings(local: CellEmbeddings, ctx: DistributedContext) -> CellEmbeddings | None:
    """Every rank's embeddings on rank 0, ordered by corpus index (None on other ranks)."""
    if not ctx.is_distributed:
        return local.sorted()
    parts = [None] * ctx.world_size if ctx.is_main else None
    dist.gather_object(local, parts, dst=0)
    if not ctx.is_main:
        return None
    parts = [p for p in parts if len(p.cell_index)]
    merged = CellEmbeddings(
        np.concatenate([p.cell_index for p in parts]),
        np.concatenate([p.vectors for p in parts]),
        max(p.seconds for p in parts),
    )
    return merged.sorted()


def resolve_labels(corpus: CellCorpus, requested: str | None) -> str | None:
    """The label column to probe: the one asked for (which must exist), else cell_type when present."""
    if requested is not None and requested.lower() == "none":
        return None
    if requested is None:
        if "cell_type" in corpus.column_names:
            return "cell_type"
        log.info(
            "no cell_type column in %s (columns: %s): probes and label colours are off; "
            "pass --label-column to name another",
            corpus.path,
            corpus.column_names,
        )
        return None
    if requested not in corpus.column_names:
        raise ValueError(
            f"--label-column {requested}: {corpus.path} has no such column; "
            f"columns are {corpus.column_names} (or pass --label-column none)"
        )
    return requested


def evaluate(args: argparse.Namespace, ctx: DistributedContext) -> dict | None:
    """Runs every measurement; returns the results on rank 0 (None elsewhere) after writing them to --out."""
    models = load_models(args.models, ctx.device)
    names = list(models)
    for model in models.values():
        check_layer(model, args.layer)
    vocab_sizes = {name: m.config.vocab_size for name, m in models.items()}
    if len(set(vocab_sizes.values())) != 1:
        raise ValueError(
            f"models have different vocabularies {vocab_sizes}; KL and agreement need one vocabulary"
        )
    data_cfg = DataConfig(
        path=args.data, vocab=args.vocab, builtin_dir=args.builtin_dir, builtin_cells=args.builtin_cells
    )
    data_path = resolve_data_path(data_cfg, ctx)
    vocab = resolve_vocab(data_cfg, data_path, next(iter(vocab_sizes.values())))
    max_length = args.max_length or min(m.config.max_position_embeddings for m in models.values())
    corpus = open_corpus(data_path, args, max_length, vocab.size, ctx, ends=vocab.cell_ends)
    cells = choose_cells(len(corpus), args)
    label_column = resolve_labels(corpus, args.label_column)
    batches = fixed_batches(corpus, vocab, cells, args, ctx)
    autocast = inference_autocast(args.precision, ctx.device)

    with autocast():
        mlm = masked_lm_metrics(models, batches, ctx.device)
    train_cells = split_indices(len(corpus), args.heldout_fraction, args.seed)[0]
    baselines = baseline_columns(load_baselines(corpus, train_cells, vocab.special_ids, ctx.is_main), batches)
    embeddings = {}
    for name, model in models.items():
        local = extract_embeddings(
            model,
            batches,
            layer=args.layer,
            special_ids=vocab.special_ids,
            device=ctx.device,
            autocast=autocast,
        )
        embeddings[name] = gather_embeddings(local, ctx)
    if not ctx.is_main:
        return None

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    index = embeddings[names[0]].cell_index
    metadata = {col: _take(corpus.column(col), index) for col in corpus.column_names if col != "input_ids"}
    labels = metadata.get(label_column) if label_column else None
    # cells/s: the inference forward pass of the embedding extraction (all ranks' cells over the slowest rank's time).
    extra = {
        name: {
            "parameters": count_parameters(models[name]),
            "cells_per_s": len(index) / max(embeddings[name].seconds, 1e-9),
        }
        for name in names
    }
    files = {}
    for name in names:
        stem = _file_stem(name)
        files[name] = {
            "embeddings": str(
                write_embeddings(out / "embeddings" / f"{stem}.parquet", embeddings[name], metadata)
            ),
            "pca_png": str(
                plot_embedding_pca(
                    embeddings[name].vectors, labels, f"{name} (layer {args.layer})", out / f"pca_{stem}.png"
                )
            ),
        }
    probes = _probe(embeddings, labels, args.probe_seed)
    for name in names:
        extra[name].update(probes.get(name, {}))
        if name != names[0]:
            extra[name]["cka_to_first"] = linear_cka(embeddings[names[0]].vectors, embeddings[name].vectors)
            extra[name]["cosine_to_first"] = mean_cosine(
                embeddings[names[0]].vectors, embeddings[name].vectors
            )
    table = format_side_by_side(
        {**{name: _table_rows(mlm[name], extra[name]) for name in names}, **baselines}
    )
    print(table, flush=True)
    (out / "table.txt").write_text(table + "\n")
    results = {
        "models": {
            name: {"dir": str(args.models[i]), **mlm[name], **extra[name], **files[name]}
            for i, name in enumerate(names)
        },
        "reference": names[0],
        "baselines": baselines,  # counted from training's split of the corpus, scored on the same masked tokens
        "data": str(data_path),
        "split": args.split,
        "cells": len(index),
        "layer": args.layer,
        "label_column": label_column,
        "probe_skipped": probes.get("skipped"),
        "world_size": ctx.world_size,
        "args": vars(args),
    }
    if args.runs:
        results["training_curves_png"] = str(
            plot_training_curves(_parse_runs(args.runs), out / "training_curves.png")
        )
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    log.info("wrote %s, %s and figures to %s", out / "results.json", out / "table.txt", out)
    return results


# Table rows, in reading order; a model without a value (the reference's KL to itself) shows "-".
TABLE_ROWS = (
    "accuracy",
    "top5_accuracy",
    "perplexity",
    "kl_to_reference",
    "top1_agreement",
    "masked_tokens",
    "parameters",
    "cells_per_s",
    "probe_logreg_accuracy",
    "probe_logreg_macro_f1",
    "probe_knn_accuracy",
    "probe_knn_macro_f1",
    "cka_to_first",
    "cosine_to_first",
)


def _table_rows(mlm: dict, extra: dict) -> dict:
    merged = {**mlm, **extra}
    return {key: merged.get(key) for key in TABLE_ROWS if key in merged or key in _ALWAYS_SHOWN}


_ALWAYS_SHOWN = ("kl_to_reference", "top1_agreement", "cka_to_first", "cosine_to_first")


def _take(column: list | np.ndarray, index: np.ndarray) -> list | np.ndarray:
    return column[index] if isinstance(column, np.ndarray) else [column[i] for i in index]


def _probe(embeddings: dict[str, CellEmbeddings], labels: list | None, seed: int) -> dict:
    if labels is None:
        return {"skipped": "no label column"}
    try:
        split = stratified_split(labels, seed=seed)
    except ValueError as error:  # too few labelled cells is a property of the data, not a failed run
        log.warning("probes skipped: %s", error)
        return {"skipped": str(error)}
    return {name: probe_embeddings(e.vectors, labels, split, seed=seed) for name, e in embeddings.items()}


def _parse_runs(runs: list[str]) -> dict[str, Path]:
    parsed = {}
    for item in runs:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(
                f"--runs {item!r}: expected NAME=PATH (a run's output_dir or its .jsonl metrics file)"
            )
        parsed[name] = _metrics_file(name, Path(path))
    return parsed


def _metrics_file(name: str, path: Path) -> Path:
    if path.is_dir():
        found = [path / f for f in ("train.jsonl", "distill.jsonl") if (path / f).is_file()]
        if len(found) != 1:
            raise FileNotFoundError(
                f"--runs {name}: {path} holds {len(found)} of train.jsonl / distill.jsonl; "
                "name the metrics file itself"
            )
        return found[0]
    if not path.is_file():
        raise FileNotFoundError(
            f"--runs {name}: {path} does not exist; give a run's output_dir or its "
            "train.jsonl / distill.jsonl metrics file"
        )
    return path


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    if args.runs:
        _parse_runs(args.runs)  # fail before any model loads
    ctx = init_distributed(args.device)
    logging.basicConfig(
        level=logging.INFO if ctx.is_main else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        result = evaluate(args, ctx)
    except BaseException as error:
        if ctx.is_distributed:
            end_failed_run(error)  # no teardown of a live process group under an error: it can hang
        raise  # one process: run_cli reports a user error in one line
    shutdown_distributed()
    return result


if __name__ == "__main__":
    run_cli(main)
