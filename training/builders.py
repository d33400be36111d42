"""Build the pieces of a run from its typed config: vocabulary, corpus, loaders, model, optimizer, logger.

Shared by train.py and distill.py (and evaluate.py), so both read data and export models the same way.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from common.collectives import barrier
from dataset.builtin_corpus import ensure_builtin_corpus
from dataset.collator import MLMCollator
from dataset.corpus import CellCorpus
from dataset.heldout import HeldoutBatches
from dataset.loader import CellBatchLoader
from dataset.sampler import TokenBudgetSampler
from dataset.split import split_indices
from dataset.static_shape import StaticShape
from dataset.vocab import Vocabulary
from modeling_bert_te import BertForMaskedLM, BertTEConfig
from training.config import DataConfig, RunConfig
from training.distributed import DistributedContext

log = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parents[1]


def model_config_from_dict(model: dict) -> BertTEConfig:
    config = BertTEConfig(**model)
    config.validate()
    return config


def model_config_by_name(name: str) -> dict:
    """The flat dict of hydra_config/model/<name>.yaml."""
    path = REPO_ROOT / "hydra_config" / "model" / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise ValueError(f"no model config '{name}' ({path}); known: {', '.join(known)}")
    return OmegaConf.to_container(OmegaConf.load(path), resolve=True)


def resolve_data_path(cfg: DataConfig, ctx: DistributedContext) -> Path:
    """The corpus to read; the built-in corpus is generated once (by rank 0) when no path is given."""
    if cfg.path is not None:
        path = Path(cfg.path)
        if not path.exists():
            raise FileNotFoundError(
                f"config 'data.path': {path} does not exist; give a parquet file, a directory "
                "of parquet shards or a save_to_disk Arrow directory (null = built-in corpus)"
            )
        return path
    if ctx.is_main:
        ensure_builtin_corpus(cfg.builtin_dir, n_cells=cfg.builtin_cells)
    barrier()
    return ensure_builtin_corpus(cfg.builtin_dir, n_cells=cfg.builtin_cells)


def resolve_vocab(cfg: DataConfig, data_path: Path, vocab_size: int) -> Vocabulary:
    """The data's vocabulary (data.vocab, or vocab.txt beside the data); it must match the model's size."""
    if cfg.vocab is not None:
        path = Path(cfg.vocab)
    else:
        folder = data_path if data_path.is_dir() else data_path.parent
        path = folder / "vocab.txt"
        if not path.is_file():
            raise FileNotFoundError(
                f"no vocabulary for {data_path}: set data.vocab to the corpus's vocab.txt or "
                "Geneformer token_dictionary .pkl (ids must match the tokenized cells)"
            )
    vocab = Vocabulary.load(path)
    if vocab.size != vocab_size:
        raise ValueError(
            f"vocabulary {path} has {vocab.size} tokens but the model has vocab_size {vocab_size}; "
            "use the model config that matches the corpus (or override model.vocab_size)"
        )
    return vocab


@dataclass
class DataBundle:
    corpus: CellCorpus
    vocab: Vocabulary
    train_idx: np.ndarray
    heldout_idx: np.ndarray
    train_loader: CellBatchLoader
    eval_loader: CellBatchLoader | HeldoutBatches  # anything with epoch_batches(epoch) over held-out cells


def open_run_corpus(
    cfg: DataConfig, ctx: DistributedContext, vocab_size: int, max_length: int
) -> tuple[Path, Vocabulary, CellCorpus]:
    """The run's corpus path, vocabulary and corpus, its index prepared by rank 0 first."""
    path = resolve_data_path(cfg, ctx)
    vocab = resolve_vocab(cfg, path, vocab_size)
    corpus = CellCorpus.open_on_all_ranks(
        path,
        is_main=ctx.is_main,
        vocab_size=vocab_size,
        max_length=max_length,
        cache_dir=cfg.cache_dir,
        ends=vocab.cell_ends,
    )
    return path, vocab, corpus


def build_data(run: RunConfig, ctx: DistributedContext, *, vocab_size: int, max_length: int) -> DataBundle:
    cfg = run.data
    path, vocab, corpus = open_run_corpus(cfg, ctx, vocab_size, max_length)
    train_idx, heldout_idx = split_indices(len(corpus), cfg.heldout_fraction, run.seed)
    eval_cells = heldout_idx[: run.eval.max_cells]
    collator = _collator(cfg, vocab, run.seed, _static_shape(run, max_length))
    train_loader = train_batches(corpus, corpus.lengths, train_idx, collator, run, ctx)
    eval_loader = HeldoutBatches(
        corpus,
        eval_cells,
        _collator(cfg, vocab, run.eval.seed).fixed_masks,
        max_tokens=cfg.max_tokens,
        max_cells=cfg.max_cells,
        pad_to_multiple_of=cfg.pad_to_multiple_of,
        rank=ctx.rank,
        world_size=ctx.world_size,
    )
    return DataBundle(corpus, vocab, train_idx, heldout_idx, train_loader, eval_loader)


def sampler_settings(cfg: DataConfig, ctx: DistributedContext) -> dict:
    """The token budget and rank layout every sampler of a run shares."""
    return dict(
        max_tokens=cfg.max_tokens,
        max_cells=cfg.max_cells,
        rank=ctx.rank,
        world_size=ctx.world_size,
        pad_to_multiple_of=cfg.pad_to_multiple_of,
    )


def train_batches(
    cells: object,
    lengths: np.ndarray,
    train_idx: np.ndarray,
    collator: object,
    run: RunConfig,
    ctx: DistributedContext,
) -> CellBatchLoader:
    """The shuffled, resumable training batches of `cells` (a corpus or a labelled view of one)."""
    sampler = TokenBudgetSampler(lengths, train_idx, seed=run.seed, **sampler_settings(run.data, ctx))
    return CellBatchLoader(
        cells,
        sampler,
        collator,
        num_workers=run.data.num_workers,
        rank=ctx.rank,
        pin_memory=ctx.device.type == "cuda",
    )


def _collator(
    cfg: DataConfig, vocab: Vocabulary, seed: int, static_shape: StaticShape | None = None
) -> MLMCollator:
    return MLMCollator(
        vocab,
        mask_prob=cfg.mask_prob,
        pad_to_multiple_of=cfg.pad_to_multiple_of,
        packed=cfg.packed,
        static_shape=static_shape,
        seed=seed,
    )


def _static_shape(run: RunConfig, max_length: int) -> StaticShape | None:
    """Training batches' fixed shape under training.cuda_graphs (held-out batches are never captured)."""
    if not run.training.cuda_graphs:
        return None
    return StaticShape.for_budget(run.data.max_tokens, run.data.max_cells, max_length)


def fixed_eval_batches(data: DataBundle) -> list[dict]:
    """Held-out batches with fixed masks, built once so every evaluation scores the same tokens."""
    return list(data.eval_loader.epoch_batches(epoch=0))


def autocast_factory(
    dtype: torch.dtype,
    device: torch.device,
    strategy: str,
) -> Callable[[], contextlib.AbstractContextManager]:
    """Autocast for replicated (DDP / single-process) bf16 runs; FSDP2 casts through its mixed-precision policy."""
    if dtype == torch.float32 or strategy == "fsdp2":
        return contextlib.nullcontext
    return functools.partial(torch.autocast, device_type=device.type, dtype=dtype)


def build_model(config: BertTEConfig, seed: int) -> BertForMaskedLM:
    torch.manual_seed(seed)  # the same initial weights on every rank
    return BertForMaskedLM(config)
