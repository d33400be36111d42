"""Optimizer and schedule: no decay on biases and LayerNorm; warmup, then decay that ends at num_train_steps.

The schedule is a pure function of the step, so a resumed run never re-warms.
"""

from __future__ import annotations

import pytest

from modeling_bert_te import BertForMaskedLM, BertTEConfig
from training.config import TrainingConfig
from training.optim import lr_multiplier, parameter_groups


def test_biases_and_layernorm_are_not_decayed():
    model = BertForMaskedLM(
        BertTEConfig(
            vocab_size=40,
            hidden_size=8,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=16,
            max_position_embeddings=16,
        )
    )
    decay, no_decay = parameter_groups(model, 0.01)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all("LayerNorm" in names[id(p)] or "bias" in names[id(p)] for p in no_decay["params"])
    assert all(p.ndim == 2 for p in decay["params"]) and no_decay["weight_decay"] == 0.0


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_warmup_then_decay_to_the_floor_at_the_last_step(schedule):
    cfg = TrainingConfig(num_train_steps=100, warmup_steps=10, lr_schedule=schedule, min_lr_ratio=0.1)
    values = [lr_multiplier(step, cfg) for step in range(100)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(values[9:], values[10:], strict=False))  # never re-warms
    assert lr_multiplier(100, cfg) == pytest.approx(0.1)
    assert lr_multiplier(10_000, cfg) == pytest.approx(0.1)


def test_activation_checkpointing_gives_the_same_gradients():
    from training.parallelize import enable_activation_checkpointing

    config = BertTEConfig(
        vocab_size=40,
        hidden_size=8,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=16,
        max_position_embeddings=16,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    import torch

    torch.manual_seed(0)
    plain = BertForMaskedLM(config)
    checkpointed = BertForMaskedLM(config)
    checkpointed.load_state_dict(plain.state_dict())
    enable_activation_checkpointing(checkpointed.bert.encoder.layer)
    ids = torch.randint(2, 40, (2, 12))
    labels = torch.where(torch.rand(2, 12) < 0.3, ids, -100)
    labels[:, 0] = ids[:, 0]
    for model in (plain, checkpointed):
        model(ids, labels=labels).loss.backward()
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, atol=1e-6), name
