"""finetune.py end to end: a tiny pretrained model learns the built-in corpus's cell types, resumes after a stop,
exports a directory stock `transformers.BertForSequenceClassification` loads with equal logits, and keeps frozen
layers frozen under 2-process FSDP2. Also the stratified split, the collator and the scores on their own.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from sklearn.metrics import f1_score

from dataset.vocab import Vocabulary
from finetuning.data import ClassificationCollator, LabelledCells
from finetuning.labels import UNLABELLED, CellLabels, stratified_split
from finetuning.task import scores_from_confusion
from model.classifier import BertForCellClassification
from tests.launch import run_entry, train_losses

# Enough steps and cells per batch for a tiny model to separate the corpus's 16 cell types (chance: 1/16).
FINETUNE = [
    "training.num_train_steps=40",
    "training.warmup_steps=3",
    "training.lr=1e-2",
    "data.max_tokens=2048",
    "data.heldout_fraction=0.2",
    "eval.max_cells=64",
    "eval.every_steps=20",
    "checkpoint.every_steps=100",
]


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    """One process: pretrain a tiny model (finetune.model_dir=null), fine-tune, stop at step 20, relaunch."""
    tmp = tmp_path_factory.mktemp("finetune")
    args = [*FINETUNE, "finetune.pretrain_steps=5", f"output_dir={tmp / 'run'}"]
    run_entry("finetune.py", [*args, "training.stop_after_steps=20"], tmp=tmp, timeout=120)
    stopped = train_losses(tmp / "run" / "finetune.jsonl")
    run_entry("finetune.py", args, tmp=tmp, timeout=120)
    return tmp, stopped


@pytest.mark.slow
def test_a_stopped_finetuning_resumes_where_it_stopped(single_run):
    tmp, stopped = single_run
    assert sorted(stopped) == list(range(1, 21))
    losses = train_losses(tmp / "run" / "finetune.jsonl")
    assert sorted(losses) == list(range(1, 41))
    assert {s: losses[s] for s in stopped} == stopped
    steps = sorted(p.name for p in (tmp / "run" / "checkpoints").glob("step_*"))
    assert steps == ["step_00000020", "step_00000040"]
    # The relaunch reused the pretrained model instead of pretraining again.
    assert [p.name for p in (tmp / "run" / "pretrained" / "checkpoints").glob("step_*")] == ["step_00000005"]


@pytest.mark.slow
def test_finetuned_classifier_beats_chance_on_held_out_cells(single_run):
    tmp, _ = single_run
    report = json.loads((tmp / "run" / "finetune_eval.json").read_text())
    assert report["step"] == 40 and report["cells"] >= 32
    assert report["accuracy"] > 2 / 16  # twice chance on 16 balanced cell types
    assert (
        report["accuracy"] > 2 * report["majority_class_accuracy"]
    )  # the trivial baseline, in the same record
    assert 0.0 < report["macro_f1"] <= 1.0


@pytest.mark.slow
def test_export_loads_in_stock_transformers_with_equal_logits(single_run):
    transformers = pytest.importorskip("transformers")
    tmp, _ = single_run
    export = tmp / "run" / "final_model"
    stock, info = transformers.BertForSequenceClassification.from_pretrained(export, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    config = json.loads((export / "config.json").read_text())
    assert config["architectures"] == ["BertForSequenceClassification"]
    assert config["id2label"]["0"] == "cell_type_0" and config["label2id"] == {
        v: int(k) for k, v in config["id2label"].items()
    }
    ours = BertForCellClassification.from_pretrained(export).eval()
    stock.eval()
    torch.manual_seed(0)
    ids = torch.randint(Vocabulary.synthetic().first_gene_id, 25426, (3, 64))
    mask = torch.ones_like(ids)
    ids[1, 40:], mask[1, 40:] = 0, 0  # a padded cell
    with torch.no_grad():
        expected = stock(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(ours(ids, mask).logits, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_frozen_layers_stay_unchanged_under_two_process_fsdp2(single_run, tmp_path):
    tmp, _ = single_run
    base = tmp / "run" / "pretrained" / "final_model"
    out = tmp_path / "frozen"
    run_entry(
        "finetune.py",
        [
            *FINETUNE,
            "training.num_train_steps=10",
            f"finetune.model_dir={base}",
            "finetune.freeze_layers=1",
            "training.strategy=fsdp2",
            f"output_dir={out}",
        ],
        nproc=2,
        tmp=tmp,
        timeout=120,
    )
    before, after = (
        load_file(base / "model.safetensors"),
        load_file(out / "final_model" / "model.safetensors"),
    )
    frozen = [k for k in before if k.startswith(("bert.embeddings.", "bert.encoder.layer.0."))]
    trained = [k for k in before if k.startswith("bert.encoder.layer.1.")]
    assert frozen and trained
    for key in frozen:
        torch.testing.assert_close(after[key], before[key], atol=0, rtol=0, msg=key)
    assert any(not torch.equal(after[k], before[k]) for k in trained)
    assert json.loads((out / "finetune_eval.json").read_text())["cells"] > 0


def test_stratified_split_holds_out_every_class_and_skips_unlabelled_cells():
    labels = CellLabels.from_column(["b", "a", None, "a", "b", "", "a", "c"] * 10, "cell_type")
    assert labels.names == ["a", "b", "c"]
    train, heldout = stratified_split(labels.ids, 0.2, seed=3)
    assert not set(train) & set(heldout)
    assert set(train) | set(heldout) == set(np.flatnonzero(labels.ids != UNLABELLED))
    assert np.bincount(labels.ids[heldout]).tolist() == [6, 4, 2]  # 20% of 30, 20 and 10 cells
    again = stratified_split(labels.ids, 0.2, seed=3)
    assert np.array_equal(again[1], heldout)


def test_a_column_with_a_single_class_is_refused():
    with pytest.raises(ValueError, match="at least two"):
        CellLabels.from_column(["t"] * 5, "cell_type")


def test_collator_pads_cells_and_gives_one_label_per_cell():
    vocab = Vocabulary.synthetic(100)
    cells = LabelledCells([np.arange(10, 15), np.arange(10, 13)])
    cells.labels = np.array([2, 0])
    batch = ClassificationCollator(vocab, pad_to_multiple_of=8)(cells, epoch=0, batch_index=0, rank=0)
    assert batch["input_ids"].shape == (2, 8) and batch["labels"].tolist() == [2, 0]
    assert batch["attention_mask"].sum(1).tolist() == [5, 3]
    assert (batch["input_ids"][1, 3:] == vocab.pad_id).all()


def test_scores_match_sklearn_on_the_cells_behind_a_confusion_matrix():
    rng = np.random.default_rng(0)
    truth, predicted = rng.integers(0, 4, 200), rng.integers(0, 4, 200)
    confusion = np.zeros((5, 5), dtype=np.int64)  # class 4 never occurs: left out of the macro average
    np.add.at(confusion, (truth, predicted), 1)
    scores = scores_from_confusion(confusion)
    assert scores["accuracy"] == pytest.approx(float((truth == predicted).mean()))
    assert scores["macro_f1"] == pytest.approx(f1_score(truth, predicted, average="macro"))
