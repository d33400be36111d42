"""Serving small: ONNX exports of a student and of a fine-tuned classifier (dynamic batch and length), fused for
onnxruntime or plain, equal PyTorch within 1e-4 through onnxruntime, store the tied embedding once, and their INT8
copies are smaller and close.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("onnx", reason="ONNX serving needs onnx: pip install onnx onnxruntime")
pytest.importorskip("onnxruntime", reason="ONNX serving needs onnxruntime: pip install onnx onnxruntime")

import onnx  # noqa: E402
from onnx import helper, numpy_helper  # noqa: E402

from finetuning.export import export_classifier_dir  # noqa: E402
from model.classifier import BertForCellClassification  # noqa: E402
from modeling_bert_te import BertForMaskedLM, BertTEConfig  # noqa: E402
from serving.export_onnx import (  # noqa: E402
    example_inputs,
    export_model,
    fusable_attention,
    main,
    run_session,
    session,
    store_repeats_once,
)

TINY = dict(
    vocab_size=25426,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    max_position_embeddings=2048,
)
LABELS = {0: "B cell", 1: "T cell", 2: "monocyte"}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    torch.manual_seed(0)
    return BertForMaskedLM(BertTEConfig(**TINY)).save_pretrained(tmp_path_factory.mktemp("serving") / "tiny")


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory):
    """A finetune.py-style export: stock BertForSequenceClassification layout with id2label."""
    torch.manual_seed(0)
    model = BertForCellClassification(
        BertTEConfig(**TINY, id2label=LABELS, label2id={v: k for k, v in LABELS.items()})
    )
    return export_classifier_dir(
        model.state_dict(), model.config, tmp_path_factory.mktemp("serving") / "cls", None
    )


def initializer_shapes(path) -> list[tuple[int, ...]]:
    return [tuple(init.dims) for init in onnx.load(str(path)).graph.initializer]


def op_types(path) -> set[str]:
    return {f"{n.domain or 'ai.onnx'}:{n.op_type}" for n in onnx.load(str(path)).graph.node}


# (batch, length, padding): none (PyTorch's unmasked fast path), right-padded, or holes and left padding, which a
# mask reduced to lengths would get wrong; lengths above and below the traced 16.
SHAPES = ((1, 5, "none"), (5, 33, "right"), (2, 64, "none"), (3, 130, "holes"), (8, 512, "right"))


def padded_batch(b: int, s: int, padding: str) -> tuple[torch.Tensor, torch.Tensor]:
    ids, mask = example_inputs(25426, b, s, seed=b)
    if padding == "none":
        mask = torch.ones_like(mask)
    elif padding == "holes":
        mask[0, :3] = 0  # left-padded
        mask[1, 1::4] = 0  # scattered holes
    return ids, mask


@pytest.fixture(scope="module")
def exported(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("serving") / "onnx"
    main([str(tiny_dir), "--out", str(out)])
    return out


def test_cli_writes_fp32_int8_and_report(exported):
    report = json.loads((exported / "export.json").read_text())
    assert report["max_abs_diff"] <= 1e-4
    assert (exported / "model.onnx").is_file() and (exported / "model.int8.onnx").is_file()
    assert report["int8_bytes"] < report["fp32_bytes"] / 2  # INT8 weights: about a quarter of fp32


def test_any_batch_and_length_matches_pytorch_padded_or_not(tiny_dir, exported):
    model = BertForMaskedLM.from_pretrained(tiny_dir).eval()
    sess = session(exported / "model.onnx")
    for b, s, padding in SHAPES[
        :4
    ]:  # full logits at 8 x 512 are 400 MB: the classifier test covers that shape
        ids, mask = padded_batch(b, s, padding)
        with torch.no_grad():
            expected = model(ids, mask).logits.numpy()
        got = run_session(sess, ids, mask)
        assert got.shape == (b, s, 25426)
        # padded positions carry no meaning; compare real tokens only
        keep = mask.numpy().astype(bool)
        np.testing.assert_allclose(got[keep], expected[keep], atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["exported", "classifier_exported"])
def test_attention_is_fused_for_onnxruntime(name, request):
    out = request.getfixturevalue(name)
    report = json.loads((out / "export.json").read_text())
    assert report["fused"]["Attention"] == TINY["num_hidden_layers"]
    assert report["fused"]["SkipLayerNormalization"] == 2 * TINY["num_hidden_layers"]
    assert "ai.onnx:Softmax" not in op_types(out / "model.onnx")  # no attention left unfused
    assert "com.microsoft:QAttention" in op_types(out / "model.int8.onnx")  # quantized after fusion


def test_unoptimized_export_is_plain_onnx_and_matches(tiny_dir, tmp_path):
    model = BertForMaskedLM.from_pretrained(tiny_dir).eval()
    report = export_model(tiny_dir, tmp_path / "plain", int8=False, optimize=False)
    assert report.fused == {} and report.max_abs_diff <= 1e-4
    assert all(op.startswith("ai.onnx:") for op in op_types(tmp_path / "plain" / "model.onnx"))
    ids, mask = padded_batch(3, 130, "holes")
    with torch.no_grad():
        expected = model(ids, mask).logits.numpy()
    keep = mask.numpy().astype(bool)
    got = run_session(session(tmp_path / "plain" / "model.onnx"), ids, mask)
    np.testing.assert_allclose(got[keep], expected[keep], atol=1e-4, rtol=0)


def test_fusable_attention_is_undone_after_the_export(tmp_path):
    """The symbolic registry is global: torch's own SDPA export (IsNaN guard) must be back afterwards."""

    class Attend(torch.nn.Module):
        def forward(self, q, mask):
            return torch.nn.functional.scaled_dot_product_attention(q, q, q, attn_mask=mask)

    args = (torch.randn(1, 2, 4, 8), torch.ones(1, 1, 1, 4, dtype=torch.bool))
    with fusable_attention(17):
        torch.onnx.export(Attend(), args, str(tmp_path / "inside.onnx"), dynamo=False, opset_version=17)
    torch.onnx.export(Attend(), args, str(tmp_path / "after.onnx"), dynamo=False, opset_version=17)
    assert "ai.onnx:IsNaN" not in op_types(tmp_path / "inside.onnx")
    assert "ai.onnx:IsNaN" in op_types(tmp_path / "after.onnx")


def test_int8_predicts_like_fp32(tiny_dir, exported):
    ids, mask = example_inputs(25426, 3, 32, seed=7)
    fp32 = run_session(session(exported / "model.onnx"), ids, mask)
    int8 = run_session(session(exported / "model.int8.onnx"), ids, mask)
    keep = mask.numpy().astype(bool)
    # A random tiny model has nearly flat logits, so ask for close values rather than equal argmaxes.
    assert np.abs(int8[keep] - fp32[keep]).max() < 0.05


def test_hidden_state_output_for_embeddings(tiny_dir, tmp_path):
    report = export_model(tiny_dir, tmp_path / "hidden", output="hidden", int8=False)
    assert report.int8_path is None and report.max_abs_diff <= 1e-4
    ids, mask = example_inputs(25426, 2, 12)
    assert run_session(session(tmp_path / "hidden" / "model.onnx"), ids, mask).shape == (2, 12, 32)


def test_missing_model_dir_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        export_model(tmp_path / "nope", tmp_path / "out")


def test_tied_embedding_is_stored_once_in_fp32_and_int8(exported):
    for name in ("model.onnx", "model.int8.onnx"):
        shapes = initializer_shapes(exported / name)
        # The decoder is tied to the word embeddings: one [V,H] initializer, no [H,V] copy.
        assert shapes.count((25426, 32)) + shapes.count((32, 25426)) == 1, name
    report = json.loads((exported / "export.json").read_text())
    assert report["fp32_bytes"] < 0.6 * report["fp32_bytes_unshared"]  # the embedding is most of a tiny model


def test_int8_weights_use_seven_bits_so_avx2_kernels_cannot_saturate(exported):
    """CPUs without VNNI add pairs of u8 x s8 products in int16: 8-bit weights can saturate it, 7-bit ones cannot."""
    weights = [
        numpy_helper.to_array(init)
        for init in onnx.load(str(exported / "model.int8.onnx")).graph.initializer
        if init.data_type == onnx.TensorProto.INT8
    ]
    assert weights and sum(w.size for w in weights) > 25426 * 32  # the embedding and every layer's weights
    assert all(abs(int(w.min())) <= 64 and int(w.max()) <= 64 for w in weights)  # 8 bits would reach 127


def test_repeated_initializers_become_nodes_with_equal_outputs(tmp_path):
    weight = np.arange(4096 * 2, dtype=np.float32).reshape(4096, 2)
    inits = [
        numpy_helper.from_array(a, n)
        for a, n in ((weight, "w"), (weight.copy(), "w_again"), (weight.T.copy(), "w_t"))
    ]
    graph = helper.make_graph(
        [
            helper.make_node("Add", ["w", "w_again"], ["sum"]),
            helper.make_node("MatMul", ["sum", "w_t"], ["out"]),
        ],
        "repeats",
        [],
        [helper.make_tensor_value_info("out", onnx.TensorProto.FLOAT, [4096, 4096])],
        inits,
    )
    path = tmp_path / "repeats.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    expected = session(path).run(None, {})[0]
    assert store_repeats_once(path) == 2
    assert [init.name for init in onnx.load(str(path)).graph.initializer] == ["w"]
    np.testing.assert_array_equal(session(path).run(None, {})[0], expected)


@pytest.fixture(scope="module")
def classifier_exported(classifier_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("serving") / "cls_onnx"
    main([str(classifier_dir), "--out", str(out)])
    return out


def test_classifier_logits_match_pytorch_for_any_batch_and_length(classifier_dir, classifier_exported):
    model = BertForCellClassification.from_pretrained(classifier_dir).eval()
    sess = session(classifier_exported / "model.onnx")
    assert [o.name for o in sess.get_outputs()] == ["logits"]
    for b, s, padding in SHAPES:
        ids, mask = padded_batch(b, s, padding)
        with torch.no_grad():
            expected = model(ids, mask).logits.numpy()
        got = run_session(sess, ids, mask)
        assert got.shape == (b, len(LABELS))
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


def test_classifier_int8_is_smaller_and_close(classifier_exported):
    report = json.loads((classifier_exported / "export.json").read_text())
    assert report["max_abs_diff"] <= 1e-4 and report["int8_bytes"] < report["fp32_bytes"] / 2
    ids, mask = example_inputs(25426, 4, 24, seed=3)
    fp32 = run_session(session(classifier_exported / "model.onnx"), ids, mask)
    int8 = run_session(session(classifier_exported / "model.int8.onnx"), ids, mask)
    # Random pooler and head weights amplify quantization error; ask that INT8 keeps the logits' pattern.
    assert int8.shape == fp32.shape and np.corrcoef(int8.ravel(), fp32.ravel())[0, 1] > 0.9


def test_classifier_has_no_hidden_output(classifier_dir, tmp_path):
    with pytest.raises(ValueError, match="logits only"):
        export_model(classifier_dir, tmp_path / "out", output="hidden", int8=False)
