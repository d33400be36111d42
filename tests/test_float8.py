"""Portable FP8 (torchao float8 on nn.Linear): which layers convert, and that training still works on CPU.

Transformer Engine FP8 needs a GPU and is tested in tests/test_model.py where TE is installed.
"""

from __future__ import annotations

import pytest
import torch

from modeling_bert_te import BertForMaskedLM, BertTEConfig
from training.float8 import apply_float8

pytest.importorskip("torchao.float8", reason="torchao is not installed")


def _model(hidden=32, intermediate=64):
    torch.manual_seed(0)
    return BertForMaskedLM(BertTEConfig(vocab_size=100, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
                                        intermediate_size=intermediate, max_position_embeddings=64,
                                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))


def test_encoder_linears_convert_and_names_stay_stock():
    model = _model()
    names_before = list(model.state_dict())
    converted = apply_float8(model)
    assert len(converted) == 2 * 6  # q, k, v, attention output, intermediate, output per layer
    assert all("encoder.layer." in fqn for fqn in converted)
    assert type(model.cls.predictions.decoder) is torch.nn.Linear  # the tied decoder stays high precision
    assert list(model.state_dict()) == names_before


def test_dimensions_fp8_cannot_take_are_left_alone(caplog):
    caplog.set_level("INFO")
    model = _model(hidden=24, intermediate=48)
    assert apply_float8(model) == []
    assert "left in higher precision" in caplog.text


def test_float8_training_step_tracks_the_full_precision_loss():
    ids = torch.randint(2, 100, (4, 32))
    labels = torch.where(torch.rand(4, 32) < 0.3, ids, -100)
    reference, fp8 = _model(), _model()
    apply_float8(fp8)
    ref_loss = reference(ids, labels=labels).loss
    fp8_loss = fp8(ids, labels=labels).loss
    fp8_loss.backward()
    assert torch.isfinite(fp8_loss) and abs(fp8_loss.item() - ref_loss.item()) < 0.05
    assert fp8.bert.encoder.layer[0].attention.self.query.weight.grad.abs().sum() > 0
