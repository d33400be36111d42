"""Untrusted files never run code: pickled dictionaries and .bin weights refuse objects, nothing uses remote code.

Each malicious file carries a payload that would create a marker file; the test checks it was never created.
"""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from dataset.safe_pickle import UnsafePickleError, load_restricted_pickle
from dataset.vocab import Vocabulary
from modeling_bert_te import BertForMaskedLM, BertTEConfig
from tests.launch import REPO


class _Payload:
    """Unpickling this calls os.system(...), which would create `marker`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_malicious_token_dictionary_is_refused_without_running_its_payload(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "token_dictionary.pkl"
    path.write_bytes(pickle.dumps({"<pad>": 0, "<mask>": 1, "ENSG00000000003": _Payload(marker)}))
    with pytest.raises(UnsafePickleError, match=r"refused to load '(posix|os)\.system'"):
        load_restricted_pickle(path)
    with pytest.raises(UnsafePickleError):
        Vocabulary.load(path)  # the path a user's token dictionary takes
    assert not marker.exists()


def test_a_plain_token_dictionary_still_loads(tmp_path):
    path = tmp_path / "token_dictionary.pkl"
    path.write_bytes(pickle.dumps({"<pad>": 0, "<mask>": 1, "ENSG00000000003": 2}))
    assert load_restricted_pickle(path)["ENSG00000000003"] == 2


def test_malicious_pytorch_model_bin_is_refused_by_from_pretrained(tmp_path):
    config = BertTEConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
    )
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    config.save_pretrained(str(model_dir))
    marker = tmp_path / "pwned"
    weights = BertForMaskedLM(config).state_dict()
    weights["bert.embeddings.extra"] = _Payload(marker)
    torch.save(weights, model_dir / "pytorch_model.bin")  # torch.save pickles the payload object as is
    with pytest.raises(ValueError, match=r"pytorch_model.bin: refused, it holds more than tensors"):
        BertForMaskedLM.from_pretrained(model_dir)
    assert not marker.exists()


def test_safetensors_is_preferred_over_a_bin_beside_it(tmp_path):
    config = BertTEConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
    )
    model_dir = BertForMaskedLM(config).save_pretrained(tmp_path / "model")
    marker = tmp_path / "pwned"
    torch.save({"x": _Payload(marker)}, model_dir / "pytorch_model.bin")
    BertForMaskedLM.from_pretrained(model_dir)  # reads model.safetensors, never opens the .bin
    assert not marker.exists()


def test_no_code_path_enables_trust_remote_code():
    """Loading a model directory must never execute Python shipped inside it."""
    sources = [*REPO.glob("*.py"), *REPO.glob("*/*.py"), *(REPO / "hydra_config").rglob("*.yaml")]
    offenders = [
        str(p.relative_to(REPO))
        for p in sources
        if p.parent.name != "tests" and "trust_remote_code" in p.read_text(errors="replace")
    ]
    assert offenders == []
