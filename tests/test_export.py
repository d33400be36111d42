"""Behaviour of model.hf_dir: a directory stock `transformers` loads with the same logits and vocabulary.

Also atomicity and refusal to overwrite; tiny models keep it fast.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from dataset.vocab import Vocabulary
from model.bert_weights import stock_to_te_state_dict
from model.hf_dir import export_model_dir
from modeling_bert_te import BertForMaskedLM, BertTEConfig

TINY = dict(
    vocab_size=64,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    hidden_act="relu",
    max_position_embeddings=40,
)


def trained_like_model() -> BertForMaskedLM:
    torch.manual_seed(0)
    model = BertForMaskedLM(BertTEConfig(**TINY)).eval()
    with torch.no_grad():  # make every parameter distinctive, as after training
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(2, 64, (2, 12), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    return ids * mask, mask


@pytest.mark.parametrize("loader", [transformers.BertForMaskedLM, transformers.AutoModelForMaskedLM])
def test_export_loads_in_stock_transformers_with_no_missing_keys_and_same_logits(tmp_path, loader):
    model = trained_like_model()
    out = model.save_pretrained(tmp_path / "export", Vocabulary.synthetic(64))
    stock, info = loader.from_pretrained(out, output_loading_info=True)
    assert info["missing_keys"] == set() or not info["missing_keys"]
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    assert type(stock).__name__ == "BertForMaskedLM"
    ids, mask = batch()
    with torch.no_grad():
        diff = model(ids, mask).logits - stock.eval()(input_ids=ids, attention_mask=mask).logits
    assert diff[mask.bool()].abs().max() <= 1e-5


def test_export_config_says_stock_bert(tmp_path):
    out = export_model_dir(trained_like_model().state_dict(), BertTEConfig(**TINY), tmp_path / "m", None)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["BertForMaskedLM"] and config["model_type"] == "bert"
    assert config["hidden_act"] == "relu" and "use_te_layers" not in config
    assert not (out / "vocab.txt").exists()


def test_export_round_trips_through_from_pretrained(tmp_path):
    model = trained_like_model()
    out = model.save_pretrained(tmp_path / "m")
    again = BertForMaskedLM.from_pretrained(out).eval()
    ids, mask = batch()
    with torch.no_grad():
        assert torch.equal(again(ids, mask).logits, model(ids, mask).logits)


def test_auto_tokenizer_loads_the_gene_vocabulary(tmp_path):
    vocab = Vocabulary.synthetic(64)
    out = trained_like_model().save_pretrained(tmp_path / "m", vocab)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert len(tokenizer) == 64
    assert tokenizer.pad_token_id == 0 and tokenizer.mask_token_id == 1
    assert tokenizer.convert_tokens_to_ids(["SYNGENE000005", "SYNGENE000063"]) == [5, 63]
    encoded = tokenizer("SYNGENE000005 SYNGENE000063 SYNGENE000002", add_special_tokens=False)["input_ids"]
    assert encoded == [5, 63, 2]


def test_auto_tokenizer_of_a_v2_vocabulary_uses_cls_and_eos(tmp_path):
    vocab = Vocabulary(("<pad>", "<mask>", "<cls>", "<eos>") + tuple(f"ENSG{i:011d}" for i in range(60)))
    out = trained_like_model().save_pretrained(tmp_path / "m", vocab)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert len(tokenizer) == 64
    assert tokenizer("ENSG00000000007")["input_ids"] == [2, 11, 3]


def test_export_of_te_layer_state_dict_uses_stock_names(tmp_path):
    model = trained_like_model()
    sd = {k: v for k, v in model.state_dict().items() if k != "cls.predictions.decoder.weight"}
    te_sd = stock_to_te_state_dict(sd)
    out = export_model_dir(te_sd, model.config, tmp_path / "m", None)
    again = BertForMaskedLM.from_pretrained(out).eval()
    ids, mask = batch()
    with torch.no_grad():
        assert torch.equal(again(ids, mask).logits, model(ids, mask).logits)


def test_export_refuses_non_empty_directory_unless_overwrite(tmp_path):
    model = trained_like_model()
    target = tmp_path / "m"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not empty"):
        model.save_pretrained(target)
    assert (target / "notes.txt").read_text() == "keep me"
    model.save_pretrained(target, overwrite=True)
    assert (target / "model.safetensors").is_file() and not (target / "notes.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temporary directories left behind


def test_failed_export_leaves_no_directory(tmp_path, monkeypatch):
    import model.hf_dir as export

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(export, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        trained_like_model().save_pretrained(tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


def test_export_rejects_vocabulary_of_another_size(tmp_path):
    with pytest.raises(ValueError, match="vocab_size"):
        trained_like_model().save_pretrained(tmp_path / "m", Vocabulary.synthetic(100))
