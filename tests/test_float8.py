"""Portable FP8 (torchao float8 on nn.Linear): which layers convert, and that training still works on CPU.

Transformer Engine FP8 (training.fp8=te) needs TE and a GPU: its test here is skipped elsewhere.
"""

from __future__ import annotations

import functools
import importlib.util

import pytest
import torch

from modeling_bert_te import BertForMaskedLM, BertTEConfig
from training.float8 import apply_float8
from training.float8_filter import MIN_FP8_TOKENS, fp8_layer_filter, summarize_layers

pytest.importorskip("torchao.float8", reason="torchao is not installed")


def _model(hidden=32, intermediate=64):
    torch.manual_seed(0)
    return BertForMaskedLM(
        BertTEConfig(
            vocab_size=100,
            hidden_size=hidden,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=intermediate,
            max_position_embeddings=64,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
    )


def convert_all(model: BertForMaskedLM) -> list[str]:
    """Every FP8-capable layer, as training.fp8_layers=all does: tiny models are far below what gains on a GPU."""
    return apply_float8(model, tokens=64, layers="all")


def test_encoder_linears_convert_and_names_stay_stock():
    model = _model()
    names_before = list(model.state_dict())
    converted = convert_all(model)
    assert len(converted) == 2 * 6  # q, k, v, attention output, intermediate, output per layer
    assert all("encoder.layer." in fqn for fqn in converted)
    assert type(model.cls.predictions.decoder) is torch.nn.Linear  # the tied decoder stays high precision
    assert list(model.state_dict()) == names_before


def test_dimensions_fp8_cannot_take_are_left_alone(caplog):
    caplog.set_level("INFO")
    model = _model(hidden=24, intermediate=48)
    assert convert_all(model) == []
    assert "left in bf16" in caplog.text
    assert model.token_multiple == 1  # nothing runs in FP8, so no filler cells


def test_float8_training_step_tracks_the_full_precision_loss():
    ids = torch.randint(2, 100, (4, 32))
    labels = torch.where(torch.rand(4, 32) < 0.3, ids, -100)
    reference, fp8 = _model(), _model()
    convert_all(fp8)
    ref_loss = reference(ids, labels=labels).loss
    fp8_loss = fp8(ids, labels=labels).loss
    fp8_loss.backward()
    assert torch.isfinite(fp8_loss) and abs(fp8_loss.item() - ref_loss.item()) < 0.05
    assert fp8.bert.encoder.layer[0].attention.self.query.weight.grad.abs().sum() > 0


def test_float8_aligns_packed_tokens_for_the_weight_gradient_gemm():
    """Packed cells of 7 + 10 tokens reach the FP8 linears as 32 rows: FP8 GEMMs contract over tokens in 16s."""
    model = _model()
    convert_all(model)
    assert model.token_multiple == 16
    rows = []
    model.bert.encoder.layer[0].output.dense.register_forward_hook(
        lambda m, args, out: rows.append(args[0].shape[1])
    )
    ids = torch.randint(2, 100, (1, 17))
    labels = torch.where(torch.arange(17) % 3 == 0, ids, -100)
    loss = model(ids, labels=labels, cu_seqlens=torch.tensor([0, 7, 17], dtype=torch.int32)).loss
    loss.backward()
    assert rows == [32] and torch.isfinite(loss)


def _linear_fqns(hidden: int, intermediate: int) -> dict[str, torch.nn.Linear]:
    model = BertForMaskedLM(
        BertTEConfig(
            vocab_size=32,
            hidden_size=hidden,
            num_hidden_layers=1,
            num_attention_heads=4,
            intermediate_size=intermediate,
            max_position_embeddings=8,
        )
    )
    return {fqn: m for fqn, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def _chosen(hidden: int, intermediate: int, tokens: int, scaling: str) -> set[str]:
    keep = fp8_layer_filter(tokens, scaling)
    return {
        fqn.split("layer.0.")[-1] for fqn, m in _linear_fqns(hidden, intermediate).items() if keep(m, fqn)
    }


def test_small_models_keep_every_layer_in_bf16_where_fp8_would_lose():
    assert _chosen(256, 512, 32768, "tensorwise") == set()  # 10m: every GEMM too small to gain
    assert _chosen(256, 512, 32768, "rowwise") == set()


def test_at_the_106m_shape_only_the_widening_feed_forward_gemm_runs_tensorwise_fp8():
    assert _chosen(768, 3072, 32768, "tensorwise") == {"intermediate.dense"}
    assert _chosen(768, 3072, 32768, "rowwise") == set()  # rowwise's per-row scales need larger GEMMs still


def test_at_the_4b_shape_every_encoder_gemm_runs_in_fp8_with_either_scaling():
    every = {
        "attention.self.query",
        "attention.self.key",
        "attention.self.value",
        "attention.output.dense",
        "intermediate.dense",
        "output.dense",
    }
    assert _chosen(3072, 12288, 16384, "tensorwise") == every
    assert _chosen(3072, 12288, 16384, "rowwise") == every


def test_too_few_tokens_per_micro_batch_keep_even_large_layers_in_bf16():
    assert _chosen(3072, 12288, MIN_FP8_TOKENS // 2, "tensorwise") == set()


def test_the_log_lists_the_fp8_layers_once_per_role(caplog):
    caplog.set_level("INFO")
    convert_all(_model())
    assert "12 of 12 encoder linears run in FP8" in caplog.text
    assert "bert.encoder.layer.{0-1}.intermediate.dense" in caplog.text
    assert (
        summarize_layers(["a.encoder.layer.0.x", "a.encoder.layer.1.x", "a.encoder.layer.3.x"])
        == "a.encoder.layer.{0-1,3}.x"
    )


@pytest.mark.parametrize("scaling", ["tensorwise", "rowwise"])
def test_either_scaling_trains_and_tracks_the_full_precision_loss(scaling):
    ids = torch.randint(2, 100, (4, 32))
    labels = torch.where(torch.rand(4, 32) < 0.3, ids, -100)
    reference, fp8 = _model(), _model()
    apply_float8(fp8, tokens=128, scaling=scaling, layers="all")
    loss = fp8(ids, labels=labels).loss
    loss.backward()
    assert abs(loss.item() - reference(ids, labels=labels).loss.item()) < 0.05
    assert fp8.bert.encoder.layer[1].output.dense.weight.grad.abs().sum() > 0


def test_an_unknown_scaling_or_layer_choice_is_refused_by_name():
    from training.config import ConfigError, TrainingConfig

    with pytest.raises(ConfigError, match="training.fp8_scaling"):
        TrainingConfig(fp8="torchao", fp8_scaling="blockwise").validate()
    with pytest.raises(ConfigError, match="training.fp8_layers"):
        TrainingConfig(fp8="torchao", fp8_layers="some").validate()


def test_te_fp8_is_refused_on_cpu_with_the_portable_alternative():
    from training.float8 import check_te_fp8_device

    with pytest.raises(ValueError, match="training.fp8=torchao"):
        check_te_fp8_device("delayed", torch.device("cpu"))


def test_nested_contexts_enter_in_order_and_exit_in_reverse():
    import contextlib

    from training.float8 import nest_contexts

    events = []

    def recorder(name):
        @contextlib.contextmanager
        def context():
            events.append(f"enter {name}")
            yield
            events.append(f"exit {name}")

        return context

    with nest_contexts(recorder("bf16"), recorder("fp8"))():
        events.append("forward")
    assert events == ["enter bf16", "enter fp8", "forward", "exit fp8", "exit bf16"]


TE_FP8_MISSING = (
    importlib.util.find_spec("transformer_engine") is None
    or not torch.cuda.is_available()
    or torch.cuda.get_device_capability() < (8, 9)
)


@pytest.mark.gpu
@pytest.mark.skipif(TE_FP8_MISSING, reason="TE FP8 needs transformer_engine and an Ada/Hopper or newer GPU")
@pytest.mark.parametrize("recipe", ["delayed", "current"])
def test_te_fp8_step_tracks_the_bf16_loss(recipe):
    from training.float8 import align_packed_tokens, nest_contexts, te_fp8_autocast

    config = BertTEConfig(
        vocab_size=128,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        use_te_layers=True,
    )
    torch.manual_seed(0)
    model = BertForMaskedLM(config).cuda()
    align_packed_tokens(model)  # as training.fp8=te does
    ids = torch.randint(3, 128, (2, 32), device="cuda")
    mask = torch.ones_like(ids)
    mask[1, 13:] = 0  # 45 real tokens, run unpadded: filler cells round them up to FP8's multiple of 16
    labels = torch.where(torch.rand(2, 32, device="cuda") < 0.3, ids, -100).masked_fill(mask == 0, -100)
    bf16 = functools.partial(torch.autocast, device_type="cuda", dtype=torch.bfloat16)
    with bf16():
        reference = model(ids, mask, labels).loss.item()
    with nest_contexts(bf16, te_fp8_autocast(recipe, torch.device("cuda")))():
        loss = model(ids, mask, labels).loss
    loss.backward()
    assert abs(loss.item() - reference) < 0.05 * reference
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


FP8_GPU_MISSING = not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9)


@pytest.mark.gpu
@pytest.mark.skipif(FP8_GPU_MISSING, reason="FP8 GEMMs need an Ada/Hopper or newer GPU")
@pytest.mark.parametrize("scaling", ["tensorwise", "rowwise"])
def test_torchao_fp8_on_a_gpu_tracks_the_bf16_loss_with_either_scaling(scaling):
    cuda = torch.device("cuda")
    ids = torch.randint(2, 100, (4, 32), device=cuda)
    labels = torch.where(torch.rand(4, 32, device=cuda) < 0.3, ids, -100)
    reference, fp8 = _model().to(cuda), _model()
    apply_float8(fp8, tokens=128, scaling=scaling, layers="all")
    fp8.to(cuda)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        expected = reference(ids, labels=labels).loss.item()
        loss = fp8(ids, labels=labels).loss
    loss.backward()
    assert abs(loss.item() - expected) < 0.05 * expected
    assert fp8.bert.encoder.layer[0].intermediate.dense.weight.grad.abs().sum() > 0
