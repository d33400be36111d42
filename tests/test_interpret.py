"""Interpreting a model on one cell: attention maps are proper distributions that ignore padding, integrated
gradients satisfy completeness and exact answers on functions with known integrals, and the CLI writes PNGs and a TSV.
"""

from __future__ import annotations

import math

import pytest
import torch

from dataset.builtin_corpus import write_builtin_corpus
from dataset.vocab import Vocabulary
from interpret import cell as cell_cli
from interpret.attention_maps import attention_probs, save_attention_maps
from interpret.integrated_gradients import gene_attributions, integrated_gradients, masked_lm_target
from modeling_bert_te import BertForMaskedLM, BertTEConfig

VOCAB = Vocabulary.synthetic(25426)


def tiny_model(seed: int = 0) -> BertForMaskedLM:
    torch.manual_seed(seed)
    config = BertTEConfig(
        vocab_size=25426,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=256,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    model = BertForMaskedLM(config).eval()
    with (
        torch.no_grad()
    ):  # a random model's genes barely differ; larger (tied) embeddings give IG something to explain
        model.bert.embeddings.word_embeddings.weight.mul_(10.0)
    return model


def test_attention_rows_are_distributions_and_padding_gets_none():
    model = tiny_model()
    ids = torch.randint(2, 25426, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 7:] = 0
    probs = attention_probs(model, ids, mask)
    assert len(probs) == 2 and probs[0].shape == (2, 2, 12, 12)
    for p in probs:
        torch.testing.assert_close(p.sum(-1), torch.ones(2, 2, 12))
        assert float(p[1, :, :, 7:].abs().max()) == 0.0


def test_attention_probs_match_a_manual_recomputation_of_layer_zero():
    model = tiny_model()
    ids = torch.randint(2, 25426, (1, 9))
    emb = model.bert.embeddings(ids, torch.arange(9)[None])
    attn = model.bert.encoder.layer[0].attention.self

    def heads(x):  # [1, S, hidden] -> [1, heads, S, head_dim]
        return x.view(1, 9, attn.num_heads, attn.head_dim).transpose(1, 2)

    q, k = heads(attn.query(emb)), heads(attn.key(emb))
    expected = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(-1)
    torch.testing.assert_close(attention_probs(model, ids)[0], expected)


def test_heat_maps_are_written_per_layer(tmp_path):
    model = tiny_model()
    ids = torch.randint(2, 25426, (1, 30))
    paths = save_attention_maps(attention_probs(model, ids), ids, VOCAB, tmp_path, top_n=10)
    assert [p.name for p in paths] == ["attention_layer0.png", "attention_layer1.png"]
    assert all(p.stat().st_size > 1000 for p in paths)


def test_ig_is_exact_for_linear_and_quadratic_functions():
    x, base = torch.randn(5, 3), torch.randn(5, 3)
    w = torch.randn(5, 3)
    linear = integrated_gradients(lambda e: (e * w).sum((1, 2)), x, base, steps=1)
    torch.testing.assert_close(linear, (x - base) * w)  # the gradient is constant along the path
    quad = integrated_gradients(lambda e: (w * e**2).sum((1, 2)), x, torch.zeros_like(x), steps=3)
    torch.testing.assert_close(quad, w * x**2)  # trapezoid integrates a linear gradient exactly


def test_ig_of_the_masked_lm_logit_is_complete_and_agrees_with_finite_differences():
    model = tiny_model()
    ids = torch.randint(2, 25426, (16,))
    ids[5] = VOCAB.mask_id
    f = masked_lm_target(model, ids, position=5, gene_id=1234)
    x = model.bert.embeddings.word_embeddings.weight.detach()[ids]
    base = torch.zeros_like(x)
    attr = integrated_gradients(f, x, base, steps=64)
    with torch.no_grad():
        fx, fb = f(torch.stack([x, base])).tolist()
    assert abs(fx - fb) > 1e-3  # a non-trivial prediction to explain
    assert abs(float(attr.sum()) - (fx - fb)) < 0.02 * abs(fx - fb) + 1e-4
    # The gradient along the path at x, by central differences, matches autograd's (which IG integrates).
    direction = (x - base) / (x - base).norm()
    eps = 1e-3
    with torch.no_grad():
        up, down = f(torch.stack([x + eps * direction, x - eps * direction])).tolist()
    path = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(f(path[None]).sum(), path)
    assert abs((up - down) / (2 * eps) - float((grad * direction).sum())) < 1e-2 * max(
        1.0, abs(up - down) / eps
    )


def test_gene_table_is_sorted_and_named():
    model = tiny_model()
    ids = torch.randint(2, 25426, (12,))
    rows, delta, gap = gene_attributions(model, VOCAB, ids, position=3, gene_id=int(ids[3]), steps=32)
    assert [abs(r.attribution) for r in rows] == sorted((abs(r.attribution) for r in rows), reverse=True)
    assert {r.position for r in rows} == set(range(12))
    assert all(r.gene == VOCAB.tokens[r.token_id] for r in rows)
    assert abs(gap) < 0.05 * abs(delta) + 1e-3


def test_cli_writes_pngs_and_tsv(tmp_path):
    data = write_builtin_corpus(tmp_path / "corpus", n_cells=8, n_shards=1)
    model_dir = tiny_model().save_pretrained(tmp_path / "model", VOCAB)
    out = tmp_path / "out"
    rows = cell_cli.main(
        [
            str(model_dir),
            "--data",
            str(data),
            "--cell-index",
            "3",
            "--out",
            str(out),
            "--max-length",
            "48",
            "--top-genes",
            "8",
            "--steps",
            "8",
        ]
    )
    assert (out / "attention_layer0.png").is_file() and (out / "attention_layer1.png").is_file()
    lines = (out / "attributions.tsv").read_text().splitlines()
    assert lines[0] == "rank\tposition\ttoken_id\tgene\tattribution"
    assert len(lines) == 1 + len(rows) and len(rows) <= 48


def test_cli_rejects_a_cell_outside_the_corpus(tmp_path):
    data = write_builtin_corpus(tmp_path / "corpus", n_cells=4, n_shards=1)
    model_dir = tiny_model().save_pretrained(tmp_path / "model", VOCAB)
    with pytest.raises(ValueError, match="outside the corpus"):
        cell_cli.main(
            [str(model_dir), "--data", str(data), "--cell-index", "9", "--out", str(tmp_path / "o")]
        )
