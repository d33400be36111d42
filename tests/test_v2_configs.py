"""Geneformer V2 run configs: the published V2 shapes for pretraining, V2-vocabulary students for distillation.

Shapes and parameter counts are checked against the published config.json files in ../shared/data.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from modeling_bert_te import BertForMaskedLM, BertTEConfig
from tests.launch import REPO
from training.config import parse_config

V2 = REPO.parent / "shared" / "data" / "geneformer" / "V2"
SHAPE_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
              "max_position_embeddings", "hidden_act", "hidden_dropout_prob", "attention_probs_dropout_prob",
              "type_vocab_size", "layer_norm_eps", "pad_token_id")


def _run(config_dir: Path, name: str):
    with initialize_config_dir(config_dir=str(config_dir), version_base=None):
        return parse_config(compose(config_name=name, overrides=["output_dir=/tmp/unused"]))


def _parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # tied decoder weight counted once


@pytest.mark.parametrize(("name", "published"), [("v2_104m", "config_V2-104M.json"), ("v2_316m", "config_V2-316M.json")])
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
