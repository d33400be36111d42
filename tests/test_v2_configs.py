"""Geneformer V2 run configs: the published V2 shapes for pretraining, V2-vocabulary students for distillation.

Shapes and parameter counts are checked against the published config.json files in ../shared/data.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from dataset.vocab import Vocabulary
from modeling_bert_te import BertForMaskedLM, BertTEConfig
from tests.launch import REPO, run_entry
from training.config import parse_config

V2 = REPO.parent / "shared" / "data" / "geneformer" / "V2"
SHAPE_KEYS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "max_position_embeddings",
    "hidden_act",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "type_vocab_size",
    "layer_norm_eps",
    "pad_token_id",
)


def _run(config_dir: Path, name: str):
    with initialize_config_dir(config_dir=str(config_dir), version_base=None):
        return parse_config(compose(config_name=name, overrides=["output_dir=/tmp/unused"]))


def _parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # tied decoder weight counted once


@pytest.mark.parametrize(
    ("name", "published"), [("v2_104m", "config_V2-104M.json"), ("v2_316m", "config_V2-316M.json")]
)
def test_v2_pretraining_configs_have_the_published_shapes_and_parameter_counts(name, published):
    if not (V2 / published).is_file():
        pytest.skip(f"published Geneformer V2 config {V2 / published} not found")
    transformers = pytest.importorskip("transformers")
    reference = json.loads((V2 / published).read_text())
    model = _run(REPO / "hydra_config", name).model
    assert {k: model[k] for k in SHAPE_KEYS} == {k: reference[k] for k in SHAPE_KEYS}
    with torch.device("meta"):
        ours = BertForMaskedLM(BertTEConfig(**model))
        stock = transformers.BertForMaskedLM(transformers.BertConfig(**reference))
    assert _parameters(ours) == _parameters(stock) == {"v2_104m": 104_386_867, "v2_316m": 316_354_867}[name]


@pytest.mark.parametrize(("name", "body"), [("v2_4m", "4m"), ("v2_3m", "3m"), ("v2_2m", "2m")])
def test_v2_students_are_the_v1_student_bodies_with_the_v2_vocabulary_and_positions(name, body):
    run = _run(REPO / "hydra_config" / "distill", name)
    v1 = _run(REPO / "hydra_config" / "distill", body)
    assert run.distill is not None and run.distill.teacher_model == "v2_104m"
    assert (run.model["vocab_size"], run.model["max_position_embeddings"]) == (20275, 4096)
    body_keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act")
    assert {k: run.model[k] for k in body_keys} == {k: v1.model[k] for k in body_keys}
    with torch.device("meta"):
        students = [BertForMaskedLM(BertTEConfig(**r.model)) for r in (run, v1)]
    # Fewer vocabulary rows (20,275 vs 25,426), twice the positions: the first outweighs the second.
    assert _parameters(students[0]) < _parameters(students[1])


@pytest.mark.slow
def test_v1_cells_with_a_v2_teacher_are_refused_before_any_step(tmp_path):
    if not (V2 / "token_dictionary_gc104M.pkl").is_file():
        pytest.skip(f"Geneformer V2 token dictionary not found under {V2}")
    vocab = Vocabulary.load(V2 / "token_dictionary_gc104M.pkl")
    teacher = BertTEConfig(
        vocab_size=vocab.size,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        hidden_act="relu",
        max_position_embeddings=4096,
    )
    BertForMaskedLM(teacher).save_pretrained(tmp_path / "teacher", vocab)
    overrides = [
        f"distill.teacher={tmp_path / 'teacher'}",
        f"output_dir={tmp_path / 'out'}",
        "--config-name",
        "v2_4m",
    ]  # hydra takes the option after the overrides; data: the built-in V1 cells
    result = run_entry("distill.py", overrides, tmp=tmp_path, check=False)
    assert result.returncode == 2
    assert "25426 tokens but the model has vocab_size 20275" in result.stderr
    assert (
        not list((tmp_path / "out").glob("checkpoints/*")) and not (tmp_path / "out" / "final_model").exists()
    )
