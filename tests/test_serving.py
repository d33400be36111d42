"""Serving a student small: ONNX export with dynamic batch and length equals PyTorch within 1e-4 through
onnxruntime, and the dynamically quantized INT8 copy is smaller and still predicts like the original.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("onnx", reason="ONNX serving needs onnx: pip install onnx onnxruntime")
pytest.importorskip("onnxruntime", reason="ONNX serving needs onnxruntime: pip install onnx onnxruntime")

from modeling_bert_te import BertForMaskedLM, BertTEConfig  # noqa: E402
from serving.export_onnx import example_inputs, export_model, main, run_session, session  # noqa: E402


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    torch.manual_seed(0)
    config = BertTEConfig(vocab_size=25426, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                          intermediate_size=64, max_position_embeddings=2048)
    return BertForMaskedLM(config).save_pretrained(tmp_path_factory.mktemp("serving") / "tiny")


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
    for b, s, pad in ((1, 5, False), (5, 33, True), (2, 64, False)):
        ids, mask = example_inputs(25426, b, s, seed=b)
        if not pad:
            mask = torch.ones_like(mask)  # no padding: the model's unmasked fast path must agree with the graph
        with torch.no_grad():
            expected = model(ids, mask).logits.numpy()
        got = run_session(sess, ids, mask)
        assert got.shape == (b, s, 25426)
        # padded positions carry no meaning; compare real tokens only
        keep = mask.numpy().astype(bool)
        np.testing.assert_allclose(got[keep], expected[keep], atol=1e-4, rtol=0)


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
