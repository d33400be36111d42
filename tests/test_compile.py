"""training.compile: each encoder layer is compiled once with dynamic shapes, so token-budget batches of ever-changing
lengths reuse one graph instead of recompiling, and the compiled model computes what the eager one does.
"""

from __future__ import annotations

import pytest
import torch

from modeling_bert_te import BertForMaskedLM, BertTEConfig
from training.parallelize import compile_layers

pytestmark = pytest.mark.slow  # inductor compiles C++ on the CPU: tens of seconds


def _model() -> BertForMaskedLM:
    torch.manual_seed(0)
    return BertForMaskedLM(
        BertTEConfig(
            vocab_size=64,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=64,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
    )


def _packed_batch(lengths: list[int], seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 64, (1, sum(lengths)), generator=g)
    labels = torch.where(torch.rand(ids.shape, generator=g) < 0.3, ids, -100)
    labels[0, 0] = ids[0, 0]  # at least one masked token
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return {"input_ids": ids, "labels": labels, "cu_seqlens": cu, "max_seqlen": max(lengths)}


def _train_on(eager: BertForMaskedLM, compiled: BertForMaskedLM, shapes: list[list[int]], seed: int) -> None:
    for offset, lengths in enumerate(shapes):
        batch = _packed_batch(lengths, seed + offset)
        want = eager(**batch).loss
        got = compiled(**batch).loss
        got.backward()
        assert abs(got.item() - want.item()) <= 1e-4


def test_changing_lengths_reuse_one_graph_and_match_eager():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    eager, compiled = _model(), _model()
    compile_layers(compiled.bert.encoder.layer)
    graphs_before = counters["stats"]["unique_graphs"]
    # Totals and longest cells all differ; a one-cell batch may add one graph (dynamo specialises sizes 0 and 1).
    _train_on(eager, compiled, [[7, 12, 3], [30], [5, 5, 5, 9, 2], [17, 40], [11]], seed=0)
    warmed = counters["stats"]["unique_graphs"] - graphs_before
    assert 1 <= warmed <= 2  # one graph serves both layers: not one per layer, not one per length
    _train_on(eager, compiled, [[3, 4], [50], [9, 9, 9, 9, 9, 9], [21]], seed=10)
    assert counters["stats"]["unique_graphs"] - graphs_before == warmed  # new lengths: no recompilation
    grad = compiled.bert.encoder.layer[1].intermediate.dense.weight.grad
    assert grad is not None and torch.isfinite(grad).all()
