"""One optimizer step: the loss is the mean over every masked token of all micro-batches, not a mean of means.

Runs in one process; the world-size scaling is the same code path the 2-rank tests exercise.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from modeling_bert_te import BertForMaskedLM, BertTEConfig
from training.run import masked_lm_loss
from training.step import train_step


def _model():
    torch.manual_seed(0)
    return BertForMaskedLM(
        BertTEConfig(
            vocab_size=50,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=32,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
    )


def _batch(n_cells, length, mask_share, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 50, (n_cells, length), generator=g)
    labels = torch.where(torch.rand(n_cells, length, generator=g) < mask_share, ids, -100)
    labels[:, 0] = ids[:, 0]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def test_accumulated_micro_batches_give_the_gradient_of_the_global_token_mean():
    batches = [_batch(2, 16, 0.5, 1), _batch(3, 8, 0.15, 2)]  # very different masked-token counts
    model, reference = _model(), _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    metrics = train_step(
        model,
        masked_lm_loss,
        optimizer,
        batches,
        device=torch.device("cpu"),
        world_size=1,
        grad_clip=0.0,
        autocast=contextlib.nullcontext,
    )

    logits, labels = [], []
    for batch in batches:
        out = reference(**batch)
        logits.append(out.logits)
        labels.append(out.masked_labels)
    global_mean = F.cross_entropy(torch.cat(logits), torch.cat(labels))
    global_mean.backward()

    assert abs(metrics["loss"] - global_mean.item()) < 1e-5
    assert metrics["masked_tokens"] == sum(int((b["labels"] != -100).sum()) for b in batches)
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_a_non_finite_loss_is_flagged():
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    def nan_loss(m, batch):
        terms = masked_lm_loss(m, batch)
        return {**terms, "loss": terms["loss"] * float("nan")}

    metrics = train_step(
        model,
        nan_loss,
        optimizer,
        [_batch(2, 8, 0.3, 0)],
        device=torch.device("cpu"),
        world_size=1,
        grad_clip=1.0,
        autocast=contextlib.nullcontext,
    )
    assert metrics["finite"] is False
