"""Config validation: every bad value fails before any heavy work, with one line naming the key.

Also checks that every shipped run config composes and validates.
"""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from tests.launch import REPO
from training.config import ConfigError, parse_config

TRAIN_CONFIGS = ["l0_sanity", "10m", "106m", "316m", "4b"]
DISTILL_CONFIGS = ["l0_sanity", "4m", "3m", "2m"]


def _compose(config_dir, name, overrides=()):
    # output_dir defaults to a ${hydra:...} interpolation that only a launched job can resolve.
    with initialize_config_dir(config_dir=str(config_dir), version_base=None):
        return compose(config_name=name, overrides=["output_dir=/tmp/unused", *overrides])


@pytest.mark.parametrize("name", TRAIN_CONFIGS)
def test_every_training_config_validates(name):
    run = parse_config(_compose(REPO / "hydra_config", name))
    assert run.model["vocab_size"] == 25426 and run.distill is None


@pytest.mark.parametrize("name", DISTILL_CONFIGS)
def test_every_distillation_config_validates(name):
    run = parse_config(_compose(REPO / "hydra_config" / "distill", name))
    assert run.distill is not None and run.distill.kd_weight > 0


@pytest.mark.parametrize(
    ("override", "names"),
    [
        ("training.strategy=zero3", ["training.strategy", "ddp, fsdp2"]),
        ("training.num_train_steps=0", ["training.num_train_steps"]),
        ("data.max_tokens=-5", ["data.max_tokens"]),
        ("data.mask_prob=1.5", ["data.mask_prob"]),
        ("training.warmup_steps=1000", ["training.warmup_steps"]),
        ("training.nonfinite=ignore", ["training.nonfinite", "stop, skip"]),
        ("training.lr=fast", ["training.lr"]),
    ],
)
def test_bad_values_name_the_key_and_the_allowed_values(override, names):
    with pytest.raises(ConfigError) as error:
        parse_config(_compose(REPO / "hydra_config", "l0_sanity", [override]))
    for name in names:
        assert name in str(error.value)


def test_unknown_keys_are_refused():
    with pytest.raises(ConfigError, match="unknown config key 'training.learning_rate'"):
        parse_config(_compose(REPO / "hydra_config", "l0_sanity", ["+training.learning_rate=0.1"]))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("+model.hiden_size=64", "unknown config key 'model.hiden_size'; did you mean 'model.hidden_size'?"),
        ("+model.fp8=true", "unknown config key 'model.fp8'"),
        ("model.hidden_size=wide", "config 'model.hidden_size': Value 'wide'"),
        ("model.use_te_layers=maybe", "config 'model.use_te_layers'"),
    ],
)
def test_model_keys_are_checked_against_the_model_schema(override, message):
    with pytest.raises(ConfigError) as error:
        parse_config(_compose(REPO / "hydra_config", "l0_sanity", [override]))
    assert message in str(error.value) and "\n" not in str(error.value)


def test_the_model_section_keeps_only_the_keys_it_sets_with_their_checked_types():
    run = parse_config(
        _compose(REPO / "hydra_config", "l0_sanity", ["model.hidden_size=48", "model.num_attention_heads=4"])
    )
    assert run.model["hidden_size"] == 48 and isinstance(run.model["hidden_size"], int)
    assert set(run.model) == set(OmegaConf.load(REPO / "hydra_config" / "model" / "tiny.yaml"))


def test_every_model_schema_key_is_a_field_of_the_exported_config():
    from dataclasses import fields

    from modeling_bert_te import BertTEConfig
    from training.config import ModelConfig

    exported = BertTEConfig().to_dict()
    assert [f.name for f in fields(ModelConfig) if f.name not in exported] == []


def test_heads_must_divide_hidden():
    from training.builders import model_config_from_dict

    run = parse_config(_compose(REPO / "hydra_config", "l0_sanity", ["model.num_attention_heads=3"]))
    with pytest.raises(ValueError, match="num_attention_heads"):
        model_config_from_dict(run.model)


@pytest.mark.parametrize(
    ("override", "names"),
    [
        ("training.fp8=te", ["training.fp8", "model.use_te_layers=true"]),
        ("training.fp8_recipe=fp4", ["training.fp8_recipe", "delayed, current, mxfp8"]),
        (
            "training.fp8=te model.use_te_layers=true model.intermediate_size=520",
            ["training.fp8", "divisible by 16", "'intermediate_size': 520", "training.fp8=torchao"],
        ),
    ],
)
def test_fp8_options_are_checked(override, names):
    with pytest.raises(ConfigError) as error:
        parse_config(
            _compose(REPO / "hydra_config", "10m", [*override.split(), "data.pad_to_multiple_of=16"])
        )
    for name in names:
        assert name in str(error.value)


def test_fp8_needs_16_token_padding_only_for_padded_batches():
    # Packed batches are rounded up to 16 tokens inside the model; padded ones must be padded to 16 by the collator.
    run = parse_config(_compose(REPO / "hydra_config", "10m", ["training.fp8=torchao", "data.packed=true"]))
    assert run.data.pad_to_multiple_of == 8
    with pytest.raises(ConfigError, match="data.pad_to_multiple_of.*data.packed=true"):
        parse_config(_compose(REPO / "hydra_config", "10m", ["training.fp8=torchao", "data.packed=false"]))


def test_mxfp8_needs_widths_and_padding_divisible_by_32():
    # MXFP8 scales blocks of 32 values; delayed and current scaling need 16.
    te = ["training.fp8=te", "model.use_te_layers=true", "model.intermediate_size=528"]
    assert parse_config(_compose(REPO / "hydra_config", "10m", te)).training.fp8_alignment() == 16
    with pytest.raises(ConfigError, match="divisible by 32"):
        parse_config(_compose(REPO / "hydra_config", "10m", [*te, "training.fp8_recipe=mxfp8"]))
    with pytest.raises(ConfigError, match="data.pad_to_multiple_of.*multiple of 32"):
        parse_config(
            _compose(
                REPO / "hydra_config",
                "10m",
                [
                    "training.fp8=te",
                    "model.use_te_layers=true",
                    "training.fp8_recipe=mxfp8",
                    "data.packed=false",
                    "data.pad_to_multiple_of=16",
                ],
            )
        )


def test_relation_loss_refuses_packed_batches():
    # Packed cells share one row; relations over it would mix cells, so the combination is refused.
    with pytest.raises(ConfigError, match="distill.relation_weight.*data.packed=false"):
        parse_config(_compose(REPO / "hydra_config" / "distill", "4m", ["distill.relation_weight=1.0"]))
    run = parse_config(
        _compose(
            REPO / "hydra_config" / "distill", "4m", ["distill.relation_weight=1.0", "data.packed=false"]
        )
    )
    assert run.distill.relation_weight == 1.0
