"""Weight files that are truncated or corrupted after export are refused by name, never half-loaded.

Every weight file the recipe reads goes through one guarded loader (model.bert_weights.load_weights).
"""

from __future__ import annotations

import json

import pytest
import torch

from model.bert_weights import CHECKSUMS_NAME, load_weights
from modeling_bert_te import BertForMaskedLM, BertTEConfig
from tests.launch import run_entry


def _export(tmp_path):
    torch.manual_seed(0)
    model = BertForMaskedLM(
        BertTEConfig(
            vocab_size=64,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=32,
        )
    )
    return model.save_pretrained(tmp_path / "model")


def _flip_tensor_bytes(weights_file) -> None:
    """Invert 64 bytes inside the tensor data of a safetensors file; its size stays the same."""
    data = bytearray(weights_file.read_bytes())
    header_end = 8 + int.from_bytes(data[:8], "little")
    start = header_end + 1000
    data[start : start + 64] = bytes(255 - b for b in data[start : start + 64])
    weights_file.write_bytes(bytes(data))


def test_an_export_records_the_checksum_of_every_file(tmp_path):
    out = _export(tmp_path)
    record = json.loads((out / CHECKSUMS_NAME).read_text())["crc32c"]
    assert set(record) == {p.name for p in out.iterdir()} - {CHECKSUMS_NAME}
    assert set(load_weights(out)) >= {"bert.embeddings.word_embeddings.weight"}


def test_bytes_flipped_in_exported_weights_fail_the_checksum_by_file_name(tmp_path):
    out = _export(tmp_path)
    _flip_tensor_bytes(out / "model.safetensors")
    with pytest.raises(ValueError, match="model.safetensors fails its crc32c checksum") as error:
        BertForMaskedLM.from_pretrained(out)
    assert str(out / "model.safetensors") in str(error.value)
    assert "export the model again" in str(error.value)


def test_a_truncated_stock_model_safetensors_is_named_with_the_fix(tmp_path):
    out = _export(tmp_path)
    (out / CHECKSUMS_NAME).unlink()  # a stock Hugging Face directory records no checksums
    weights = out / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5])
    with pytest.raises(ValueError, match="model.safetensors: unreadable weights") as error:
        load_weights(out)
    assert str(weights) in str(error.value) and "truncated or corrupt" in str(error.value)


def test_a_truncated_pytorch_model_bin_is_named_with_the_fix(tmp_path):
    out = tmp_path / "bin_model"
    out.mkdir()
    torch.save({"w": torch.zeros(1000)}, out / "pytorch_model.bin")
    (out / "pytorch_model.bin").write_bytes((out / "pytorch_model.bin").read_bytes()[:300])
    with pytest.raises(ValueError, match="pytorch_model.bin: unreadable weights"):
        load_weights(out)


def test_a_truncated_stock_config_json_is_named_with_the_fix(tmp_path):
    out = _export(tmp_path)
    (out / CHECKSUMS_NAME).unlink()  # as a stock directory: the reader itself must name the file
    config = out / "config.json"
    config.write_text(config.read_text()[:40])
    with pytest.raises(ValueError, match="config.json: unreadable") as error:
        BertForMaskedLM.from_pretrained(out)
    assert str(config) in str(error.value) and "truncated or corrupt" in str(error.value)


def test_an_edited_exported_config_json_fails_its_checksum(tmp_path):
    out = _export(tmp_path)
    config = out / "config.json"
    config.write_text(config.read_text().replace('"num_hidden_layers": 1', '"num_hidden_layers": 2'))
    with pytest.raises(ValueError, match="config.json fails its crc32c checksum"):
        BertTEConfig.from_model_dir(out)


def test_a_bad_field_in_config_json_names_the_file_and_the_field(tmp_path):
    out = _export(tmp_path)
    (out / CHECKSUMS_NAME).unlink()
    config = out / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "num_attention_heads": 3}))
    with pytest.raises(ValueError, match="hidden_size 32 is not divisible by num_attention_heads 3") as error:
        BertForMaskedLM.from_pretrained(out)
    assert str(config) in str(error.value)


@pytest.mark.slow
def test_a_truncated_teacher_ends_distill_with_one_line_and_exit_code_2(tmp_path):
    teacher = _export(tmp_path)
    (
        teacher / CHECKSUMS_NAME
    ).unlink()  # as a stock Hugging Face teacher: the reader itself must name the file
    weights = teacher / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    result = run_entry(
        "distill.py",
        [
            f"distill.teacher={teacher}",
            "training.num_train_steps=2",
            "training.warmup_steps=1",
            f"output_dir={tmp_path / 'run'}",
        ],
        tmp=tmp_path,
        check=False,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "Error executing job" not in result.stderr
    assert f"ERROR run: {weights}: unreadable weights" in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "run" / "final_model").exists()


def test_export_checkpoint_refuses_a_checkpoint_whose_bytes_changed(tmp_path):
    from checkpointing.checkpointer import Checkpointer, TrainState
    from checkpointing.export_checkpoint import export_checkpoint
    from tests.test_checkpointer import _flip_bytes_inside, _Loader

    model = BertForMaskedLM.from_pretrained(_export(tmp_path))
    optimizer = torch.optim.AdamW(model.parameters())
    state = TrainState(
        model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0), _Loader(), 2
    )
    meta = {"model_config": model.config.to_dict(), "export_prefix": ""}
    step_dir = Checkpointer(tmp_path / "checkpoints", rank=0, meta=meta).save(state)
    assert (export_checkpoint(step_dir, tmp_path / "good") / "model.safetensors").is_file()
    shard = _flip_bytes_inside(step_dir, "word_embeddings")
    with pytest.raises(ValueError, match=f"{shard} fails its crc32c checksum"):
        export_checkpoint(step_dir, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
