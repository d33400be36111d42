"""distill.py end to end: a tiny teacher distils into a smaller student under 2-process torchrun.

Also: resume gives identical losses, a stock transformers teacher is accepted, a foreign vocabulary is refused.
"""

from __future__ import annotations

import json

import pytest
import torch

from dataset.vocab import Vocabulary
from tests.launch import eval_records, run_entry, train_losses

pytestmark = pytest.mark.slow

TINY_TEACHER = ["distill.teacher_steps=8", "distill.teacher_lr=5e-3"]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """A tiny teacher pretrained on the built-in corpus by train.py and exported in stock layout."""
    tmp = tmp_path_factory.mktemp("teacher")
    run_entry(
        "train.py",
        [
            "training.num_train_steps=8",
            "training.warmup_steps=1",
            "training.lr=5e-3",
            "checkpoint.every_steps=100",
            "eval.every_steps=100",
            f"output_dir={tmp / 'run'}",
        ],
        tmp=tmp,
    )
    return tmp / "run" / "final_model", tmp


def _distil(tmp, teacher, overrides, nproc=2, check=True):
    return run_entry(
        "distill.py",
        [
            f"distill.teacher={teacher}",
            "training.num_train_steps=6",
            "training.warmup_steps=1",
            "checkpoint.every_steps=100",
            "eval.every_steps=6",
            *overrides,
        ],
        nproc=nproc,
        tmp=tmp,
        check=check,
    )


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_distils_with_every_loss_term_and_exports_a_plain_student(teacher_dir, tmp_path, strategy):
    teacher, shared = teacher_dir
    out = tmp_path / "student"
    _distil(
        shared,
        teacher,
        [
            f"training.strategy={strategy}",
            f"output_dir={out}",
            "distill.hidden_weight=1.0",
            "distill.relation_weight=1.0",
        ],
    )
    records = [json.loads(line) for line in (out / "distill.jsonl").read_text().splitlines()]
    first_train = next(r for r in records if r["kind"] == "train")
    assert {"kd", "mlm", "hidden", "relation", "loss"} <= set(first_train)
    final = eval_records(out / "distill.jsonl")[-1]
    assert {
        "teacher_accuracy",
        "student_accuracy",
        "student_kl_to_reference",
        "student_top1_agreement",
    } <= set(final)
    report = json.loads((out / "distill_eval.json").read_text())
    assert report["parameters"]["student"] < report["parameters"]["teacher"]
    assert set(report["results"]) == {"teacher", "student", "unigram", "rank_position", "uniform"}
    assert report["results"]["rank_position"]["accuracy"] == final["rank_position_accuracy"]
    transformers = pytest.importorskip("transformers")
    student = transformers.BertForMaskedLM.from_pretrained(out / "final_model")
    assert student.config.hidden_size == 24  # the micro student, without the projections
    assert not any("projection" in name for name in student.state_dict())


def test_resumed_distillation_matches_uninterrupted(teacher_dir, tmp_path):
    teacher, shared = teacher_dir
    _distil(shared, teacher, [f"output_dir={tmp_path / 'straight'}"])
    _distil(shared, teacher, [f"output_dir={tmp_path / 'stopped'}", "training.stop_after_steps=3"])
    _distil(shared, teacher, [f"output_dir={tmp_path / 'stopped'}"])
    straight = train_losses(tmp_path / "straight" / "distill.jsonl")
    assert train_losses(tmp_path / "stopped" / "distill.jsonl") == straight
    manifest = json.loads(
        next((tmp_path / "stopped" / "checkpoints").glob("step_*/COMMITTED.json")).read_text()
    )
    assert len(manifest["meta"]["teacher_sha256"]) == 64  # the teacher is recorded, not saved
    assert not any("teacher" in f for f in manifest["files"])


def test_a_stock_transformers_teacher_in_the_v1_shape_is_accepted(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=25426,
        hidden_size=256,
        num_hidden_layers=6,
        num_attention_heads=4,
        intermediate_size=512,
        hidden_act="relu",
        max_position_embeddings=2048,
    )
    torch.manual_seed(0)
    transformers.BertForMaskedLM(config).save_pretrained(tmp_path / "geneformer_v1_shape")
    _distil(
        tmp_path,
        tmp_path / "geneformer_v1_shape",
        [f"output_dir={tmp_path / 'out'}", "training.num_train_steps=2"],
        nproc=1,
    )
    assert (tmp_path / "out" / "final_model" / "model.safetensors").is_file()


def test_a_teacher_with_another_vocabulary_is_refused(teacher_dir, tmp_path):
    teacher, _ = teacher_dir
    foreign = tmp_path / "foreign_teacher"
    foreign.mkdir()
    for f in teacher.iterdir():
        (foreign / f.name).write_bytes(f.read_bytes())
    tokens = list(Vocabulary.load(teacher / "vocab.txt").tokens)
    tokens[5], tokens[6] = tokens[6], tokens[5]
    Vocabulary(tuple(tokens)).save(foreign / "vocab.txt")
    result = _distil(tmp_path, foreign, [f"output_dir={tmp_path / 'out'}"], nproc=1, check=False)
    assert result.returncode == 2
    assert "vocabulary mismatch" in result.stderr and "id 5" in result.stderr


def test_without_a_teacher_distill_pretrains_one_first(tmp_path):
    """The quick start: distill.py with no teacher trains one on the same data, then distils and reports."""
    run_entry(
        "distill.py",
        [
            "distill.teacher_steps=3",
            "training.num_train_steps=3",
            "training.warmup_steps=1",
            "checkpoint.every_steps=100",
            "eval.every_steps=3",
            f"output_dir={tmp_path / 'out'}",
        ],
        tmp=tmp_path,
    )
    teacher = tmp_path / "out" / "teacher" / "final_model"
    assert (teacher / "model.safetensors").is_file()
    report = json.loads((tmp_path / "out" / "distill_eval.json").read_text())
    assert report["parameters"]["student"] < report["parameters"]["teacher"]
    manifest = json.loads((tmp_path / "out" / "checkpoints" / "step_00000003" / "COMMITTED.json").read_text())
    assert manifest["meta"]["teacher_dir"] == str(teacher.resolve())
