"""The packed training step asks the GPU nothing back: no reads of device values, no data-dependent sizes.

Each such read makes the host wait for the GPU's queue to drain, which starves launch-bound models (`10m`). The
models here live on the meta device, which has shapes but no values: any step that needs a device value fails.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.device import move_batch
from dataset.batch import packed_kwargs
from dataset.collator import MLMCollator
from dataset.vocab import Vocabulary
from distillation.losses import masked_mean
from distillation.task import DistillationLoss, StudentWithProjections, default_layer_map
from modeling_bert_te import BertForMaskedLM, BertTEConfig
from training.config import DistillConfig

VOCAB = Vocabulary.synthetic(64)
TINY = dict(
    vocab_size=64,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    hidden_act="relu",
    max_position_embeddings=40,
)
META = torch.device("meta")


def packed_batch(lengths=(5, 12, 9, 30)) -> dict:
    rng = np.random.default_rng(0)
    cells = [rng.integers(VOCAB.first_gene_id, VOCAB.size, n) for n in lengths]
    return MLMCollator(VOCAB, packed=True, seed=1)(cells, epoch=0, batch_index=0, rank=0)


def meta_model(**overrides) -> BertForMaskedLM:
    with META:
        return BertForMaskedLM(BertTEConfig(**{**TINY, **overrides}))


def forward_backward(model: BertForMaskedLM, batch: dict) -> None:
    out = model(batch["input_ids"], labels=batch["labels"], **packed_kwargs(batch))
    out.loss.backward()


@pytest.mark.parametrize("token_multiple", [1, 16])
def test_packed_masked_lm_step_reads_nothing_back_from_the_device(token_multiple):
    model = meta_model()
    model.token_multiple = token_multiple  # FP8's filler cells are planned from host-side sizes too
    forward_backward(model, move_batch(packed_batch(), META))
    assert model.bert.embeddings.word_embeddings.weight.grad.shape == (64, 32)


@pytest.mark.parametrize("host_value, device_read", [("masked_positions", "nonzero"), ("max_seqlen", "item")])
def test_without_the_collators_host_side_values_the_step_would_wait(host_value, device_read):
    # Without them the model finds the masked tokens, or the longest cell, on the device and reads the answer.
    batch = move_batch(packed_batch(), META)
    del batch[host_value]
    with pytest.raises((NotImplementedError, RuntimeError), match=device_read):
        forward_backward(meta_model(), batch)


def test_distillation_step_with_every_loss_term_reads_nothing_back():
    cfg = DistillConfig(kd_weight=1.0, mlm_weight=0.5, hidden_weight=1.0, relation_weight=1.0)
    teacher = meta_model(num_hidden_layers=3).eval()
    student = meta_model(hidden_size=16, num_attention_heads=2, intermediate_size=32)
    layer_map = default_layer_map(2, 3)
    with META:
        trained = StudentWithProjections(student, teacher_width=32, n_projections=len(layer_map))
    loss_fn = DistillationLoss(teacher, cfg, layer_map, n_student_heads=2)
    terms = loss_fn(trained, move_batch(packed_batch(), META))
    terms["loss"].backward()
    assert {"kd", "mlm", "hidden", "relation"} <= set(terms)


def test_host_side_positions_give_the_same_loss_as_positions_found_on_the_device():
    torch.manual_seed(0)
    model = BertForMaskedLM(BertTEConfig(**TINY)).eval()
    batch = packed_batch()
    given = model(batch["input_ids"], labels=batch["labels"], **packed_kwargs(batch))
    found = model(
        batch["input_ids"],
        labels=batch["labels"],
        cu_seqlens=batch["cu_seqlens"],
        max_seqlen=batch["max_seqlen"],
    )
    assert torch.equal(given.masked_positions, found.masked_positions)
    assert torch.equal(given.loss, found.loss)


def test_positions_that_disagree_with_the_labels_are_an_error():
    model = BertForMaskedLM(BertTEConfig(**TINY)).eval()
    batch = packed_batch()
    positions = batch.pop("masked_positions")
    with pytest.raises(RuntimeError, match="does not list every labelled token"):
        model(
            batch["input_ids"], labels=batch["labels"], **packed_kwargs(batch), masked_positions=positions[1:]
        )
    unlabelled = int(torch.nonzero(batch["labels"][0] == -100)[0])
    wrong = positions.clone()
    wrong[0] = unlabelled
    with pytest.raises(RuntimeError, match="lists a token without a label"):
        model(batch["input_ids"], labels=batch["labels"], **packed_kwargs(batch), masked_positions=wrong)
    repeated = torch.cat([positions[:1], positions[:-1]])
    with pytest.raises(RuntimeError, match="strictly increasing"):
        model(batch["input_ids"], labels=batch["labels"], **packed_kwargs(batch), masked_positions=repeated)
    with pytest.raises(ValueError, match="goes with packed input"):
        model(batch["input_ids"], labels=batch["labels"], masked_positions=positions)


def test_masked_mean_equals_the_mean_over_the_selected_tokens():
    values = torch.randn(3, 7, 5)
    mask = torch.rand(3, 7) > 0.4
    assert torch.allclose(masked_mean(values, mask), values[mask].mean())
    assert torch.allclose(masked_mean(values[..., 0], mask), values[..., 0][mask].mean())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="synchronisation debugging needs a CUDA GPU")
def test_packed_step_on_a_gpu_never_synchronises():
    model = BertForMaskedLM(BertTEConfig(**TINY)).cuda()
    batch = move_batch(packed_batch(), torch.device("cuda"))
    forward_backward(model, batch)  # warm-up: first calls may allocate and load kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            forward_backward(model, batch)
    finally:
        torch.cuda.set_sync_debug_mode("default")
