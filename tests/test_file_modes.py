"""Exports, checkpoints and corpora get the permissions the user's umask gives, though written via temporary paths.

With umask 0022 colleagues on a shared cluster can read them; with 0077 they stay private.
"""

from __future__ import annotations

import os
import stat

import pytest
import torch

from checkpointing.checkpointer import Checkpointer
from dataset.builtin_corpus import ensure_builtin_corpus
from modeling_bert_te import BertForMaskedLM, BertTEConfig
from tests.test_checkpointer import _state


@pytest.fixture(params=[0o022, 0o077], ids=["umask0022", "umask0077"])
def umask(request):
    previous = os.umask(request.param)
    yield request.param
    os.umask(previous)


def _modes(root):
    """(path, permission bits) of `root` and everything below it."""
    paths = [root, *root.rglob("*")]
    return {p: stat.S_IMODE(p.stat().st_mode) for p in paths}


def _assert_umask_modes(root, umask):
    for path, mode in _modes(root).items():
        expected = (0o777 if path.is_dir() else 0o666) & ~umask
        assert mode == expected, f"{path}: mode {oct(mode)}, the umask {oct(umask)} gives {oct(expected)}"


def test_an_exported_model_directory_follows_the_umask(tmp_path, umask):
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
    out = model.save_pretrained(tmp_path / "final_model")
    assert (out / "model.safetensors").is_file()
    _assert_umask_modes(out, umask)


def test_a_committed_checkpoint_follows_the_umask(tmp_path, umask):
    state = _state()
    state.step = 2
    directory = Checkpointer(tmp_path / "checkpoints", rank=0).save(state)
    assert (directory / "COMMITTED.json").is_file()
    _assert_umask_modes(tmp_path / "checkpoints", umask)


def test_the_built_in_corpus_follows_the_umask(tmp_path, umask):
    out = ensure_builtin_corpus(tmp_path / "builtin", n_cells=20)
    _assert_umask_modes(out, umask)
