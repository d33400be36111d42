"""evaluate.py end to end: a teacher and a student compared on the same cells, as a user runs it.

Built-in corpus with tiny models; real Genecorpus cells when ../shared/data is present; a 2-rank torchrun run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import evaluate
from dataset.builtin_corpus import write_builtin_corpus
from dataset.corpus import CellCorpus
from dataset.vocab import Vocabulary
from evaluation.embeddings import read_embeddings
from modeling_bert_te import BertForMaskedLM, BertTEConfig
from training.builders import build_data, fixed_eval_batches
from training.config import DataConfig, RunConfig
from training.distributed import DistributedContext

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
REAL_CELLS = SHARED_DATA / "genecorpus_500_samples.parquet"
V1_VOCAB = SHARED_DATA / "geneformer" / "V1" / "vocab.txt"
FAST = ["--max-length", "64", "--max-tokens", "1024"]


def _save_tiny(path, vocab: Vocabulary, hidden: int, seed: int):
    torch.manual_seed(seed)
    config = BertTEConfig(
        vocab_size=25426,
        hidden_size=hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=2048,
    )
    return BertForMaskedLM(config).save_pretrained(path, vocab)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A 300-cell built-in corpus (16 cell types), a 'teacher' (hidden 32) and a 'student' (hidden 16)."""
    root = tmp_path_factory.mktemp("evaluate")
    corpus = write_builtin_corpus(root / "corpus", n_cells=300, n_shards=1)
    vocab = Vocabulary.load(corpus / "vocab.txt")
    return {
        "root": root,
        "corpus": corpus,
        "cache": root / "cache",
        "teacher": _save_tiny(root / "teacher", vocab, 32, seed=0),
        "student": _save_tiny(root / "student", vocab, 16, seed=1),
    }


def _run(workspace, out, *extra: str) -> dict:
    argv = [
        str(workspace["teacher"]),
        str(workspace["student"]),
        "--data",
        str(workspace["corpus"]),
        "--out",
        str(out),
        "--cache-dir",
        str(workspace["cache"]),
        *FAST,
        *extra,
    ]
    return evaluate.main(argv)


def test_cli_compares_teacher_and_student_and_writes_json_table_embeddings_and_figures(
    workspace, tmp_path, capsys
):
    runs = tmp_path / "run" / "train.jsonl"
    runs.parent.mkdir()
    runs.write_text(
        "\n".join(
            json.dumps(r)
            for r in [
                {"kind": "train", "step": 1, "loss": 10.0, "lr": 1e-3},
                {"kind": "train", "step": 2, "loss": 9.0, "lr": 1e-3},
                {"kind": "eval", "step": 2, "loss": 9.5, "accuracy": 0.01},
            ]
        )
        + "\n"
    )
    results = _run(
        workspace,
        tmp_path / "out",
        "--split",
        "all",
        "--max-cells",
        "96",
        "--runs",
        f"teacher={runs.parent}",
        f"same={runs}",
    )

    out = tmp_path / "out"
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(results))
    teacher, student = results["models"]["teacher"], results["models"]["student"]
    assert (
        results["reference"] == "teacher"
        and results["cells"] == 96
        and results["label_column"] == "cell_type"
    )
    for model in (teacher, student):
        assert 0.0 <= model["accuracy"] <= model["top5_accuracy"] <= 1.0
        assert model["perplexity"] > 1.0 and model["cells_per_s"] > 0
        assert 0.0 <= model["probe_logreg_accuracy"] <= 1.0 and 0.0 <= model["probe_knn_macro_f1"] <= 1.0
    assert teacher["masked_tokens"] == student["masked_tokens"] > 0  # the same masked cells for both
    assert teacher["parameters"] > student["parameters"]
    assert "kl_to_reference" not in teacher and student["kl_to_reference"] > 0.0
    assert 0.0 < student["cka_to_first"] < 1.0
    assert student["cosine_to_first"] is None  # widths 32 and 16: coordinates do not correspond

    table = (out / "table.txt").read_text()
    assert table.strip() in capsys.readouterr().out
    header, *rows = table.splitlines()
    assert header.split() == ["metric", "teacher", "student", "unigram", "rank_position", "uniform"]
    assert (
        0.0 <= results["baselines"]["rank_position"]["accuracy"] <= 1.0
    )  # trivial baselines, same masked genes
    assert [r.split()[0] for r in rows][:5] == [
        "accuracy",
        "top5_accuracy",
        "perplexity",
        "kl_to_reference",
        "top1_agreement",
    ]
    assert {"parameters", "cells_per_s", "probe_logreg_accuracy", "probe_knn_accuracy", "cka_to_first"} <= {
        r.split()[0] for r in rows
    }

    index, vectors, metadata = read_embeddings(out / "embeddings" / "student.parquet")
    assert index.tolist() == list(range(96)) and vectors.shape == (96, 16)
    corpus_types = CellCorpus(
        workspace["corpus"], vocab_size=25426, max_length=128, cache_dir=workspace["cache"]
    ).column("cell_type")
    assert metadata["cell_type"] == corpus_types[:96]
    for png in ("pca_teacher.png", "pca_student.png", "training_curves.png"):
        assert (out / png).stat().st_size > 1000


def test_a_model_compared_with_itself_agrees_fully(workspace, tmp_path):
    teacher = str(workspace["teacher"])
    results = evaluate.main(
        [
            teacher,
            teacher,
            "--data",
            str(workspace["corpus"]),
            "--out",
            str(tmp_path),
            "--cache-dir",
            str(workspace["cache"]),
            "--split",
            "all",
            "--max-cells",
            "40",
            *FAST,
        ]
    )
    first, second = results["models"].values()
    assert second["kl_to_reference"] == pytest.approx(0.0, abs=1e-6)
    assert second["top1_agreement"] == 1.0
    assert second["cka_to_first"] == pytest.approx(1.0) and second["cosine_to_first"] == pytest.approx(1.0)
    assert first["accuracy"] == second["accuracy"]


def test_default_cells_are_trainings_heldout_cells_with_trainings_eval_masks(workspace):
    args = evaluate.parse_args([str(workspace["teacher"]), "--data", str(workspace["corpus"])])
    ctx = DistributedContext(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    run = RunConfig(
        data=DataConfig(path=str(workspace["corpus"]), num_workers=0, cache_dir=str(workspace["cache"]))
    )
    training_batches = fixed_eval_batches(build_data(run, ctx, vocab_size=25426, max_length=2048))
    data = build_data(run, ctx, vocab_size=25426, max_length=2048)
    ours = evaluate.fixed_batches(
        data.corpus, data.vocab, evaluate.choose_cells(len(data.corpus), args), args, ctx
    )
    assert len(ours) == len(training_batches) > 0
    for a, b in zip(ours, training_batches, strict=True):
        for key in ("cell_index", "input_ids", "labels", "attention_mask"):
            assert torch.equal(a[key], b[key]), key


def test_builtin_corpus_is_the_default_data(workspace, tmp_path):
    results = evaluate.main(
        [
            str(workspace["teacher"]),
            "--builtin-dir",
            str(tmp_path / "builtin"),
            "--builtin-cells",
            "300",
            "--out",
            str(tmp_path / "out"),
            "--cache-dir",
            str(workspace["cache"]),
            *FAST,
        ]
    )
    assert "-300cells-seed0" in results["data"]
    assert results["cells"] == 6  # 2% of 300 held out, as in training
    assert results["probe_skipped"]  # six cells of 16 types are too few for a stratified probe


def test_user_errors_name_the_fix(workspace, tmp_path):
    with pytest.raises(ValueError, match="no such column.*cell_type"):
        _run(workspace, tmp_path, "--label-column", "donor")
    small_vocab = tmp_path / "vocab.txt"
    Vocabulary.synthetic(100).save(small_vocab)
    with pytest.raises(ValueError, match="100 tokens but the model has vocab_size 25426"):
        _run(workspace, tmp_path, "--vocab", str(small_vocab))
    with pytest.raises(ValueError, match="out of range for a model of 2 layers"):
        _run(workspace, tmp_path, "--layer", "5")
    with pytest.raises(FileNotFoundError, match="train.jsonl / distill.jsonl"):
        _run(workspace, tmp_path, "--runs", f"x={tmp_path / 'missing.jsonl'}")


@pytest.mark.skipif(
    not (REAL_CELLS.is_file() and V1_VOCAB.is_file()),
    reason="../shared/data/genecorpus_500_samples.parquet or geneformer/V1/vocab.txt not present",
)
def test_real_genecorpus_cells_with_the_v1_vocabulary(workspace, tmp_path):
    results = evaluate.main(
        [
            str(workspace["teacher"]),
            str(workspace["student"]),
            "--data",
            str(REAL_CELLS),
            "--vocab",
            str(V1_VOCAB),
            "--out",
            str(tmp_path),
            "--cache-dir",
            str(workspace["cache"]),
            "--split",
            "all",
            "--max-cells",
            "12",
            *FAST,
        ]
    )
    assert results["cells"] == 12 and results["label_column"] is None and results["probe_skipped"]
    student = results["models"]["student"]
    assert student["masked_tokens"] > 12 * 64 * 0.1  # about 15% of 12 cells truncated to 64 genes
    assert np.isfinite(student["kl_to_reference"]) and 0.0 < student["cka_to_first"] <= 1.0
    assert (tmp_path / "pca_student.png").is_file()


@pytest.mark.slow
def test_two_rank_torchrun_gives_the_single_process_embeddings(workspace, tmp_path):
    common = [
        str(workspace["teacher"]),
        str(workspace["student"]),
        "--data",
        str(workspace["corpus"]),
        "--cache-dir",
        str(workspace["cache"]),
        "--split",
        "all",
        "--max-cells",
        "64",
        *FAST,
    ]
    single = evaluate.main([*common, "--out", str(tmp_path / "one")])
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(REPO / "evaluate.py"),
        *common,
        "--out",
        str(tmp_path / "two"),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert two["world_size"] == 2 and 0 < two["cells"] <= single["cells"]
    assert two["models"]["student"]["masked_tokens"] > 0
    index1, vectors1, _ = read_embeddings(tmp_path / "one" / "embeddings" / "student.parquet")
    index2, vectors2, _ = read_embeddings(tmp_path / "two" / "embeddings" / "student.parquet")
    rows = np.searchsorted(index1, index2)
    assert np.array_equal(index1[rows], index2)  # every cell rank 0 gathered was a cell of the single run
    np.testing.assert_allclose(vectors2, vectors1[rows], atol=1e-5)
