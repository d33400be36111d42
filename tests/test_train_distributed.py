"""train.py end to end: single process and 2-process torchrun (gloo) with DDP and FSDP2.

Loss falls on real cells, a stopped run resumes with identical losses, and the export loads in stock transformers.
"""

from __future__ import annotations

import math

import pytest
import torch

from tests.launch import REAL_CELLS, V1_VOCAB, eval_records, run_entry, train_losses

pytestmark = pytest.mark.slow


def _stock_logits_match(model_dir) -> None:
    transformers = pytest.importorskip("transformers")
    from modeling_bert_te import BertForMaskedLM

    stock = transformers.BertForMaskedLM.from_pretrained(model_dir).eval()
    ours = BertForMaskedLM.from_pretrained(model_dir).eval()
    ids = torch.randint(2, 1000, (2, 16))
    with torch.no_grad():
        assert torch.allclose(stock(input_ids=ids).logits, ours(ids).logits, atol=1e-5)


@pytest.mark.skipif(
    not REAL_CELLS.is_file(), reason="../shared/data/genecorpus_500_samples.parquet not present"
)
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_rank_training_learns_real_cells_and_exports(tmp_path, strategy):
    run_entry(
        "train.py",
        [
            f"data.path={REAL_CELLS}",
            f"data.vocab={V1_VOCAB}",
            f"training.strategy={strategy}",
            "training.num_train_steps=30",
            "training.warmup_steps=3",
            "training.lr=5e-3",
            "checkpoint.every_steps=15",
            "eval.every_steps=30",
            f"output_dir={tmp_path / 'run'}",
        ],
        nproc=2,
        tmp=tmp_path,
    )
    losses = train_losses(tmp_path / "run" / "train.jsonl")
    assert sorted(losses) == list(range(1, 31))
    final_eval = eval_records(tmp_path / "run" / "train.jsonl")[-1]
    assert final_eval["loss"] < math.log(25426) - 1.0, final_eval
    assert final_eval["uniform_loss"] == pytest.approx(
        math.log(25426)
    )  # the baselines ride in every eval record
    # On 500 real cells neither baseline must beat the other: each is a share of the same masked genes.
    assert all(0.0 <= final_eval[f"{name}_accuracy"] <= 1.0 for name in ("unigram", "rank_position"))
    checkpoint = tmp_path / "run" / "checkpoints" / "step_00000030"
    assert (checkpoint / "COMMITTED.json").is_file()
    _stock_logits_match(tmp_path / "run" / "final_model")
    # Any checkpoint exports offline, on one process, to the same weights as the run's own export.
    from safetensors.torch import load_file

    from checkpointing.export_checkpoint import export_checkpoint

    exported = load_file(export_checkpoint(checkpoint, tmp_path / "exported") / "model.safetensors")
    final = load_file(tmp_path / "run" / "final_model" / "model.safetensors")
    assert exported.keys() == final.keys() and all(torch.equal(exported[k], final[k]) for k in final)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_stop_and_go_gives_identical_losses(tmp_path, strategy):
    """6 steps straight vs 3 steps, stop, resume, 3 more: the same loss at every step, dropout on."""
    common = [
        f"training.strategy={strategy}",
        "training.num_train_steps=6",
        "training.warmup_steps=2",
        "checkpoint.every_steps=100",
        "eval.every_steps=100",
        "model.hidden_dropout_prob=0.1",
    ]
    run_entry("train.py", [*common, f"output_dir={tmp_path / 'straight'}"], nproc=2, tmp=tmp_path)
    stopped = [*common, f"output_dir={tmp_path / 'stopped'}"]
    run_entry("train.py", [*stopped, "training.stop_after_steps=3"], nproc=2, tmp=tmp_path)
    assert not (tmp_path / "stopped" / "final_model").exists()
    resumed = run_entry("train.py", stopped, nproc=2, tmp=tmp_path)
    assert "resumed from" in resumed.stderr and "step 3" in resumed.stderr
    straight = train_losses(tmp_path / "straight" / "train.jsonl")
    assert train_losses(tmp_path / "stopped" / "train.jsonl") == straight
    assert len(straight) == 6


def test_resume_on_a_different_number_of_ranks(tmp_path):
    out = [
        f"output_dir={tmp_path / 'run'}",
        "training.strategy=fsdp2",
        "training.num_train_steps=4",
        "training.warmup_steps=1",
        "checkpoint.every_steps=100",
        "eval.every_steps=100",
    ]
    run_entry("train.py", [*out, "training.stop_after_steps=2"], nproc=2, tmp=tmp_path)
    resumed = run_entry("train.py", out, nproc=1, tmp=tmp_path)
    assert "resumed from" in resumed.stderr
    assert sorted(train_losses(tmp_path / "run" / "train.jsonl")) == [1, 2, 3, 4]
    assert (tmp_path / "run" / "final_model" / "model.safetensors").is_file()


def test_packed_batches_give_the_losses_of_padded_batches(tmp_path):
    """The same cells and masks, packed without padding (cu_seqlens) or padded: the same losses, dropout off."""
    common = [
        "training.num_train_steps=3",
        "training.warmup_steps=1",
        "checkpoint.every_steps=100",
        "eval.every_steps=3",
        "model.hidden_dropout_prob=0.0",
        "model.attention_probs_dropout_prob=0.0",
    ]
    for packed in (False, True):
        run_entry(
            "train.py",
            [*common, f"data.packed={packed}", f"output_dir={tmp_path / str(packed)}"],
            tmp=tmp_path,
        )
    padded = train_losses(tmp_path / "False" / "train.jsonl")
    packed = train_losses(tmp_path / "True" / "train.jsonl")
    assert padded.keys() == packed.keys() and all(abs(padded[s] - packed[s]) < 1e-4 for s in padded)
    assert eval_records(tmp_path / "True" / "train.jsonl")[-1]["loss"] == pytest.approx(
        eval_records(tmp_path / "False" / "train.jsonl")[-1]["loss"], abs=1e-4
    )


def test_float8_on_two_fsdp2_ranks_with_packed_batches_trains_resumes_and_exports(tmp_path):
    """torchao FP8 on sharded layers, with packed batches rounded up to 16 tokens; the export is stock BERT."""
    pytest.importorskip("torchao.float8", reason="torchao is not installed")
    out = [
        f"output_dir={tmp_path / 'run'}",
        "model=tiny",
        "training.fp8=torchao",
        "training.fp8_layers=all",  # tiny GEMMs would stay in bf16 under the default filter
        "training.strategy=fsdp2",
        "data.packed=true",
        "training.num_train_steps=4",
        "training.warmup_steps=1",
        "checkpoint.every_steps=100",
        "eval.every_steps=100",
    ]
    first = run_entry("train.py", [*out, "training.stop_after_steps=2"], nproc=2, tmp=tmp_path)
    assert "12 of 12 encoder linears run in FP8" in first.stderr
    resumed = run_entry("train.py", out, nproc=2, tmp=tmp_path)
    assert "resumed from" in resumed.stderr
    losses = train_losses(tmp_path / "run" / "train.jsonl")
    assert sorted(losses) == [1, 2, 3, 4] and all(math.isfinite(loss) for loss in losses.values())
    _stock_logits_match(tmp_path / "run" / "final_model")
