"""Static-shape packed batches (training.cuda_graphs): fixed tensor shapes whatever the cells, and the same losses
and gradients as the dynamic packed path on the same cells. CPUs capture no graph, but the shapes are the same.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dataset.collator import MLMCollator
from dataset.static_shape import StaticShape
from dataset.vocab import Vocabulary
from distillation.task import DistillationLoss, StudentWithProjections, default_layer_map
from modeling_bert_te import BertForMaskedLM, BertTEConfig
from training.config import DistillConfig, parse_config
from training.parallelize import parallelize
from training.run import masked_lm_loss

VOCAB = Vocabulary.synthetic(64)
TINY = dict(
    vocab_size=64,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    hidden_act="relu",
    max_position_embeddings=48,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)
SHAPE = StaticShape.for_budget(max_tokens=160, max_cells=8, max_seqlen=48)


def cells(lengths, seed=0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(VOCAB.first_gene_id, VOCAB.size, n) for n in lengths]


def collate(lengths, static: bool, seed=0, shape=SHAPE) -> dict:
    collator = MLMCollator(VOCAB, packed=True, static_shape=shape if static else None, seed=3)
    return collator(cells(lengths, seed), epoch=0, batch_index=0, rank=0)


def model(seed=0, **overrides) -> BertForMaskedLM:
    torch.manual_seed(seed)
    return BertForMaskedLM(BertTEConfig(**{**TINY, **overrides}))


def test_every_static_batch_has_the_same_shapes_whatever_its_cells():
    small = collate(
        [5, 12, 9], static=True, shape=StaticShape(tokens=160, cells=12, max_seqlen=48, masked_multiple=64)
    )
    large = collate(
        [48, 40, 30, 20, 11, 7],
        static=True,
        seed=1,
        shape=StaticShape(tokens=160, cells=12, max_seqlen=48, masked_multiple=64),
    )
    for key in ("input_ids", "attention_mask", "labels", "cu_seqlens", "masked_positions"):
        assert small[key].shape == large[key].shape, key
    assert small["input_ids"].shape == (1, 160) and small["cu_seqlens"].shape == (13,)
    assert small["max_seqlen"] == large["max_seqlen"] == 48


def test_filler_tokens_carry_no_label_and_count_as_no_real_tokens():
    batch = collate([5, 12, 9], static=True)
    assert int(batch["attention_mask"].sum()) == 26
    assert bool((batch["labels"][0, 26:] == -100).all())
    cu = batch["cu_seqlens"]
    assert cu[:4].tolist() == [0, 5, 17, 26] and int(cu[-1]) == 160
    assert int((cu[1:] - cu[:-1]).max()) <= 48  # filler cells are no longer than the longest allowed cell


def test_static_shape_pretraining_loss_and_gradients_equal_the_dynamic_path_on_the_same_cells():
    dynamic, static = collate([5, 12, 9, 30], static=False), collate([5, 12, 9, 30], static=True)
    assert static["masked_positions"].numel() > dynamic["masked_positions"].numel()  # padded masked rows
    grads = []
    for batch in (dynamic, static):
        m = model()
        terms = masked_lm_loss(m, batch)
        terms["loss"].backward()
        grads.append((terms["loss"].detach(), m.bert.encoder.layer[0].intermediate.dense.weight.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[0][1], grads[1][1])


def test_static_shape_distillation_terms_equal_the_dynamic_path_on_the_same_cells():
    cfg = DistillConfig(kd_weight=1.0, mlm_weight=0.5, hidden_weight=1.0)
    layer_map = default_layer_map(2, 3)
    results = []
    for static in (False, True):
        teacher = model(seed=1, num_hidden_layers=3).eval()
        student = StudentWithProjections(
            model(seed=2, hidden_size=16, num_attention_heads=2, intermediate_size=32),
            teacher_width=32,
            n_projections=len(layer_map),
        )
        loss_fn = DistillationLoss(teacher, cfg, layer_map, n_student_heads=2)
        results.append(loss_fn(student, collate([5, 12, 9, 30], static=static)))
    for name in ("loss", "kd", "mlm", "hidden"):
        torch.testing.assert_close(results[0][name], results[1][name], msg=name)


def test_a_batch_larger_than_the_static_shape_is_refused_naming_the_fix():
    with pytest.raises(ValueError, match="data.max_tokens"):
        collate([48, 48, 48, 20], static=True)
    with pytest.raises(ValueError, match="data.max_cells"):
        collate([1] * 20, static=True, shape=StaticShape(tokens=160, cells=10, max_seqlen=48))


def _run_config(**training) -> dict:
    return {
        "model": TINY,
        "data": {"packed": True, "max_cells": 64},
        "training": {"cuda_graphs": True, **training},
    }


def test_cuda_graphs_are_refused_where_they_cannot_apply():
    with pytest.raises(ValueError, match="training.device.*training.cuda_graphs=false"):
        parse_config(_run_config(device="cpu"))
    with pytest.raises(ValueError, match="data.packed"):
        parse_config({**_run_config(), "data": {"packed": False, "max_cells": 64}})
    with pytest.raises(ValueError, match="data.max_cells"):
        parse_config({**_run_config(), "data": {"packed": True}})
    with pytest.raises(ValueError, match="training.strategy"):
        parse_config(_run_config(strategy="fsdp2"))


def test_cuda_graphs_on_a_cpu_device_are_refused_before_any_step():
    with pytest.raises(ValueError, match="this run is on cpu"):
        parallelize(
            model(), [], strategy="ddp", device=torch.device("cpu"), dtype=torch.float32, cuda_graphs=True
        )


def test_a_static_batch_step_reads_nothing_back_from_the_device():
    """On the meta device (shapes, no values), any read of a device value fails: a captured graph allows none."""
    from common.device import move_batch

    with torch.device("meta"):
        meta = BertForMaskedLM(BertTEConfig(**TINY))
    masked_lm_loss(meta, move_batch(collate([5, 12, 9, 30], static=True), torch.device("meta")))[
        "loss"
    ].backward()
    assert meta.bert.embeddings.word_embeddings.weight.grad.shape == (64, 32)


def test_empty_cells_are_accepted_only_after_the_real_ones():
    m = model().eval()
    ids = torch.randint(VOCAB.first_gene_id, VOCAB.size, (1, 20))
    trailing = m(ids, cu_seqlens=torch.tensor([0, 8, 20, 20, 20], dtype=torch.int32)).logits
    torch.testing.assert_close(
        trailing, m(ids, cu_seqlens=torch.tensor([0, 8, 20], dtype=torch.int32)).logits
    )
    with pytest.raises(ValueError, match="empty cells only at the end"):
        m(ids, cu_seqlens=torch.tensor([0, 8, 8, 20], dtype=torch.int32))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
def test_replayed_cuda_graph_steps_train_like_eager_steps():
    """Three optimizer steps on static batches: captured (training.cuda_graphs) and eager losses agree."""
    from training.parallelize import capture_cuda_graphs
    from training.step import mark_graph_step

    cuda = torch.device("cuda")
    batches = [collate([5, 12, 9, 30], static=True, seed=s) for s in range(3)]
    losses = {}
    for captured in (False, True):
        m = model().to(cuda)
        if captured:
            capture_cuda_graphs(m)
        optimizer = torch.optim.SGD(m.parameters(), lr=0.1)
        losses[captured] = []
        for batch in batches:
            mark_graph_step()
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = masked_lm_loss(
                    m, {k: v.to(cuda) if torch.is_tensor(v) else v for k, v in batch.items()}
                )["loss"]
            loss.backward()
            optimizer.step()
            losses[captured].append(loss.item())
    assert losses[True] == pytest.approx(losses[False], rel=2e-2)
