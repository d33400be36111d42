"""embed.py as a user runs it: embeddings and predictions of new cells from a corpus or raw counts.

Tiny models on small made-up corpora and count files; 2-process torchrun and a killed run are launched for real.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import scipy.sparse as sp
import torch

import embed
import evaluate
from dataset.prepare.tokenize import tokenize_counts
from dataset.vocab import Vocabulary
from embedding.outputs import RECORD_KEY
from evaluation.embeddings import read_embeddings
from finetuning.export import export_classifier_dir
from finetuning.task import classification_metrics
from model.classifier import BertForCellClassification
from modeling_bert_te import BertForMaskedLM, BertTEConfig
from tests.launch import REPO, launch_env

GENES = tuple(f"ENSG{i:011d}" for i in range(1, 41))
V1 = Vocabulary(("<pad>", "<mask>") + GENES)
V2 = Vocabulary(("<pad>", "<mask>", "<cls>", "<eos>") + GENES)


def _save_model(path: Path, vocab: Vocabulary, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    config = BertTEConfig(
        vocab_size=vocab.size,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
    )
    return BertForMaskedLM(config).save_pretrained(path, vocab)


def _write_corpus(path: Path, vocab: Vocabulary, n_cells: int, seed: int = 0) -> Path:
    """A parquet corpus of cells of 3-40 distinct genes (V2: between <cls> and <eos>), vocab.txt beside it."""
    rng = np.random.default_rng(seed)
    first = vocab.first_gene_id
    cells = []
    for _ in range(n_cells):
        genes = rng.choice(
            np.arange(first, vocab.size), size=int(rng.integers(3, 41)), replace=False
        ).tolist()
        cells.append([vocab.cls_id, *genes, vocab.eos_id] if vocab.cls_id is not None else genes)
    path.mkdir(parents=True)
    table = pa.table(
        {
            "input_ids": cells,
            "length": [len(c) for c in cells],
            "cell_id": [f"cell{i}" for i in range(n_cells)],
            "cell_type": [f"type{i % 3}" for i in range(n_cells)],
        }
    )
    pq.write_table(table, path / "part-00000.parquet")
    vocab.save(path / "vocab.txt")
    return path


def _cells_of(corpus: Path) -> list[list[int]]:
    return pq.read_table(corpus / "part-00000.parquet").column("input_ids").to_pylist()


def _run(model: Path, cells: Path, out: Path, *extra: str) -> Path:
    return embed.main(
        [
            str(model),
            str(cells),
            "--out",
            str(out),
            "--no-progress",
            "--cache-dir",
            str(out.parent / "cache"),
            *extra,
        ]
    )


def _read(path: Path) -> tuple[pa.Table, np.ndarray]:
    table = pq.read_table(path)
    vectors = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))
    return table, vectors


@torch.no_grad()
def _direct_mean(model_dir: Path, cells: list[list[int]], vocab: Vocabulary, layer: int = -1) -> np.ndarray:
    """Mean over gene tokens of one padded forward pass per cell, computed by hand."""
    model = BertForMaskedLM.from_pretrained(model_dir).eval()
    out = []
    for cell in cells:
        hidden = model(torch.tensor([cell]), output_hidden_states=True).hidden_states[layer][0]
        genes = ~torch.isin(torch.tensor(cell), torch.tensor(vocab.special_ids))
        out.append(hidden[genes].mean(0).numpy())
    return np.stack(out)


@pytest.fixture(scope="module")
def v1(tmp_path_factory):
    root = tmp_path_factory.mktemp("embed")
    return {
        "root": root,
        "model": _save_model(root / "model", V1),
        "corpus": _write_corpus(root / "corpus", V1, 60),
    }


def test_embeddings_equal_a_direct_forward_pass_in_input_order_with_metadata(v1, tmp_path):
    out = _run(
        v1["model"], v1["corpus"], tmp_path / "cells.parquet", "--chunk-cells", "16", "--max-tokens", "256"
    )
    table, vectors = _read(out)
    cells = _cells_of(v1["corpus"])
    np.testing.assert_allclose(vectors, _direct_mean(v1["model"], cells, V1), atol=1e-5)
    assert table.column("cell_id").to_pylist() == [f"cell{i}" for i in range(60)]
    assert table.column("cell_index").to_pylist() == list(range(60))
    assert table.column("cell_type").to_pylist()[:4] == ["type0", "type1", "type2", "type0"]
    assert all(table.column("embedded").to_pylist())


def test_the_output_records_model_hash_layer_pooling_and_vocabulary(v1, tmp_path):
    import hashlib

    out = _run(v1["model"], v1["corpus"], tmp_path / "cells.parquet", "--layer", "1", "--dtype", "float16")
    made = json.loads(pq.read_schema(out).metadata[RECORD_KEY.encode()])
    weights = (v1["model"] / "model.safetensors").read_bytes()
    assert made["weights_sha256"] == hashlib.sha256(weights).hexdigest()
    assert (made["layer"], made["pooling"], made["dtype"], made["vocabulary"]["size"]) == (
        1,
        "mean",
        "float16",
        42,
    )
    assert made["model"] == str(v1["model"].resolve()) and made["finished_at"]
    table, vectors = _read(out)
    assert vectors.dtype == np.float16
    cells = _cells_of(v1["corpus"])
    np.testing.assert_allclose(vectors, _direct_mean(v1["model"], cells, V1, layer=1), atol=2e-3)


def test_cls_pooling_takes_the_first_token_of_v2_cells(tmp_path):
    model = _save_model(tmp_path / "model", V2)
    corpus = _write_corpus(tmp_path / "corpus", V2, 10)
    _, vectors = _read(_run(model, corpus, tmp_path / "cells.parquet", "--pooling", "cls"))
    mlm = BertForMaskedLM.from_pretrained(model).eval()
    for cell, vector in zip(_cells_of(corpus), vectors, strict=True):
        with torch.no_grad():
            first = mlm(torch.tensor([cell]), output_hidden_states=True).hidden_states[-1][0, 0]
        np.testing.assert_allclose(vector, first.numpy(), atol=1e-5)


def test_cls_pooling_of_a_v1_model_is_refused(v1, tmp_path):
    with pytest.raises(ValueError, match="--pooling cls needs a model whose vocabulary has <cls>"):
        _run(v1["model"], v1["corpus"], tmp_path / "cells.parquet", "--pooling", "cls")


def test_evaluate_and_embed_give_the_same_vectors_for_the_same_cells(v1, tmp_path):
    evaluate.main(
        [
            str(v1["model"]),
            "--data",
            str(v1["corpus"]),
            "--split",
            "all",
            "--max-cells",
            "0",
            "--out",
            str(tmp_path / "evaluate"),
            "--cache-dir",
            str(tmp_path / "cache"),
            "--max-length",
            "64",
            "--label-column",
            "none",
        ]
    )
    index, from_evaluate, _ = read_embeddings(tmp_path / "evaluate" / "embeddings" / "model.parquet")
    _, from_embed = _read(_run(v1["model"], v1["corpus"], tmp_path / "cells.parquet"))
    np.testing.assert_allclose(from_embed[index], from_evaluate, atol=1e-5)


# ----------------------------------------------------------------------------- raw counts
def _counts_h5ad(path: Path, n_cells: int = 30, seed: int = 0) -> Path:
    """Integer counts over the vocabulary genes and 5 unknown ones; cell 3 has only unknown genes, cell 7 one count."""
    rng = np.random.default_rng(seed)
    genes = [*GENES, *(f"ENSG9{i:010d}" for i in range(5))]
    counts = rng.poisson(0.6, size=(n_cells, len(genes))).astype(np.float32)
    counts[3, : len(GENES)] = 0
    counts[3, len(GENES)] = 4
    counts[7] = 0
    counts[7, 0] = 1
    adata = anndata.AnnData(
        X=sp.csr_matrix(counts),
        obs=pd.DataFrame(
            {"cell_type": [f"t{i % 2}" for i in range(n_cells)]}, index=[f"bc{i}" for i in range(n_cells)]
        ),
        var=pd.DataFrame({"symbol": [f"S{i}" for i in range(len(genes))]}, index=genes),
    )
    adata.obsm["X_pca"] = rng.normal(size=(n_cells, 3))
    adata.write_h5ad(path)
    return path


def _medians(path: Path) -> Path:
    path.write_text("gene\tmedian\n" + "".join(f"{g}\t{1 + i / 10}\n" for i, g in enumerate(GENES)))
    return path


def test_h5ad_round_trip_keeps_obs_var_obsm_and_marks_filtered_cells(v1, tmp_path):
    source = _counts_h5ad(tmp_path / "cells.h5ad")
    medians = _medians(tmp_path / "medians.tsv")
    out = _run(
        v1["model"],
        source,
        tmp_path / "embedded.h5ad",
        "--medians",
        str(medians),
        "--min-counts",
        "2",
        "--chunk-cells",
        "8",
    )
    before, after = anndata.read_h5ad(source), anndata.read_h5ad(out)
    assert list(after.obs_names) == list(before.obs_names)
    pd.testing.assert_frame_equal(after.var, before.var)
    assert (after.obs["cell_type"] == before.obs["cell_type"]).all()
    np.testing.assert_array_equal(after.obsm["X_pca"], before.obsm["X_pca"])
    embedded = after.obs["X_geneformer_embedded"].to_numpy()
    assert (
        not embedded[3] and not embedded[7] and embedded.sum() == 28
    )  # no vocabulary gene; below --min-counts
    assert np.isnan(after.obsm["X_geneformer"][[3, 7]]).all()
    # The kept cells' vectors are those of the corpus the tokenizer writes for the same counts and settings.
    corpus = tmp_path / "corpus"
    tokenize_counts(source, corpus, vocab=v1["model"] / "vocab.txt", medians=medians, min_counts=2)
    cells = _cells_of(corpus)
    np.testing.assert_allclose(
        after.obsm["X_geneformer"][embedded], _direct_mean(v1["model"], cells, V1), atol=1e-5
    )
    assert json.loads(after.uns[RECORD_KEY]["X_geneformer"])["tokenizer"]["min_counts"] == 2


def test_h5ad_counts_give_parquet_with_obs_columns_when_asked_for_parquet(v1, tmp_path):
    source = _counts_h5ad(tmp_path / "cells.h5ad")
    table, vectors = _read(
        _run(
            v1["model"],
            source,
            tmp_path / "cells.parquet",
            "--medians",
            str(_medians(tmp_path / "medians.tsv")),
        )
    )
    assert table.column("cell_id").to_pylist() == [f"bc{i}" for i in range(30)]
    assert table.column("cell_type").to_pylist()[:3] == ["t0", "t1", "t0"]
    assert not table.column("embedded").to_pylist()[3] and np.isnan(vectors[3]).all()


def test_csv_counts_give_parquet_with_every_cell_id(v1, tmp_path):
    adata = anndata.read_h5ad(_counts_h5ad(tmp_path / "cells.h5ad"))
    frame = pd.DataFrame(adata.X.toarray().astype(int), index=adata.obs_names, columns=adata.var_names)
    frame.index.name = "barcode"
    frame.to_csv(tmp_path / "cells.csv")
    out = _run(
        v1["model"],
        tmp_path / "cells.csv",
        tmp_path / "cells.parquet",
        "--medians",
        str(_medians(tmp_path / "medians.tsv")),
    )
    table, vectors = _read(out)
    assert table.column("cell_id").to_pylist() == [f"bc{i}" for i in range(30)]
    assert table.column("embedded").to_pylist().count(False) == 1 and np.isnan(vectors[3]).all()


# ----------------------------------------------------------------------------- classifier
def test_classifier_predictions_are_the_finetuned_models_held_out_predictions(v1, tmp_path):
    torch.manual_seed(0)
    classifier = BertForCellClassification.from_masked_lm_dir(
        v1["model"], {0: "type0", 1: "type1", 2: "type2"}, seed=3
    )
    export_dir = export_classifier_dir(
        classifier.state_dict(), classifier.config, tmp_path / "classifier", V1
    )
    table = pq.read_table(_run(export_dir, v1["corpus"], tmp_path / "cells.parquet"))
    probabilities = np.stack(table.column("probabilities").to_numpy(zero_copy_only=False))
    cells = _cells_of(v1["corpus"])
    model = BertForCellClassification.from_pretrained(export_dir).eval()
    width = max(map(len, cells))
    ids = torch.tensor([c + [0] * (width - len(c)) for c in cells])
    mask = (ids != 0).long()
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits
    np.testing.assert_allclose(probabilities, torch.softmax(logits, -1).numpy(), atol=1e-5)
    predicted = table.column("predicted_label").to_pylist()
    assert predicted == [f"type{i}" for i in logits.argmax(-1).tolist()]
    truth = torch.tensor([i % 3 for i in range(60)])
    scores = classification_metrics(
        model, [{"input_ids": ids, "attention_mask": mask, "labels": truth}], 3, torch.device("cpu")
    )
    assert scores["accuracy"] == pytest.approx(
        np.mean([p == f"type{t}" for p, t in zip(predicted, truth.tolist(), strict=True)])
    )


def test_an_h5ad_output_takes_a_classifiers_predictions_and_a_second_embedding_under_another_key(
    v1, tmp_path
):
    # The copy is edited in place on disk, chunk by chunk; what it held before stays as it was.
    torch.manual_seed(0)
    classifier = BertForCellClassification.from_masked_lm_dir(v1["model"], {0: "type0", 1: "type1"}, seed=3)
    export_dir = export_classifier_dir(
        classifier.state_dict(), classifier.config, tmp_path / "classifier", V1
    )
    source, medians = _counts_h5ad(tmp_path / "cells.h5ad"), _medians(tmp_path / "medians.tsv")
    first = _run(export_dir, source, tmp_path / "first.h5ad", "--medians", str(medians), "--chunk-cells", "8")
    second = _run(v1["model"], first, tmp_path / "second.h5ad", "--medians", str(medians), "--key", "X_mlm")
    before, after = anndata.read_h5ad(source), anndata.read_h5ad(second)
    assert list(after.obs_names) == list(before.obs_names)
    np.testing.assert_array_equal(after.obsm["X_pca"], before.obsm["X_pca"])
    assert (after.X != before.X).nnz == 0
    labels = after.obs["X_geneformer_predicted_label"]
    assert list(labels.cat.categories) == ["type0", "type1"] and labels.isna().sum() == 1  # cell 3: no gene
    probabilities = after.obsm["X_geneformer_probabilities"]
    kept = after.obs["X_geneformer_embedded"].to_numpy()
    assert labels[kept].tolist() == [f"type{i}" for i in probabilities[kept].argmax(1)]
    np.testing.assert_array_equal(after.obs["X_mlm_embedded"].to_numpy(), kept)
    assert after.obsm["X_mlm"].shape == after.obsm["X_geneformer"].shape and set(after.uns[RECORD_KEY]) == {
        "X_geneformer",
        "X_mlm",
    }


# ----------------------------------------------------------------------------- bad input
def test_an_existing_output_is_kept_unless_overwrite_is_given(v1, tmp_path):
    out = tmp_path / "cells.parquet"
    out.write_text("precious")
    with pytest.raises(FileExistsError, match="pass --overwrite"):
        _run(v1["model"], v1["corpus"], out)
    assert out.read_text() == "precious"
    _run(v1["model"], v1["corpus"], out, "--overwrite")
    assert pq.read_table(out).num_rows == 60


def test_a_model_directory_without_weights_or_vocabulary_is_named(v1, tmp_path):
    for missing, message in (("model.safetensors", "holds no weights"), ("vocab.txt", "has no vocab.txt")):
        broken = tmp_path / f"without_{missing}"
        broken.mkdir()
        for f in v1["model"].iterdir():
            if f.name != missing:
                (broken / f.name).write_bytes(f.read_bytes())
        with pytest.raises(FileNotFoundError, match=message):
            _run(broken, v1["corpus"], tmp_path / "cells.parquet")
    assert not list(tmp_path.glob("*cells.parquet*"))


def test_a_corpus_of_another_vocabulary_is_refused(v1, tmp_path):
    other = Vocabulary(("<pad>", "<mask>") + tuple(reversed(GENES)))
    corpus = _write_corpus(tmp_path / "other", other, 5)
    with pytest.raises(ValueError, match="tokenized with another vocabulary"):
        _run(v1["model"], corpus, tmp_path / "cells.parquet")


def test_normalized_counts_and_counts_without_vocabulary_genes_are_refused(v1, tmp_path):
    medians = _medians(tmp_path / "medians.tsv")
    adata = anndata.read_h5ad(_counts_h5ad(tmp_path / "cells.h5ad"))
    adata.X = sp.csr_matrix(np.log1p(adata.X.toarray()))
    adata.write_h5ad(tmp_path / "normalized.h5ad")
    with pytest.raises(ValueError, match="look normalized"):
        _run(v1["model"], tmp_path / "normalized.h5ad", tmp_path / "a.parquet", "--medians", str(medians))
    adata.var_names = [f"GENE{i}" for i in range(adata.n_vars)]
    adata.write_h5ad(tmp_path / "symbols.h5ad")
    with pytest.raises(ValueError, match="is in the vocabulary"):
        _run(v1["model"], tmp_path / "symbols.h5ad", tmp_path / "b.parquet", "--medians", str(medians))
    assert not list(tmp_path.glob("*.parquet")) and not list(tmp_path.glob(".*.parquet*"))


@pytest.mark.slow
def test_a_user_error_is_one_line_and_exit_code_2(v1, tmp_path):
    out = tmp_path / "cells.parquet"
    out.write_text("precious")
    done = subprocess.run(
        [sys.executable, str(REPO / "embed.py"), str(v1["model"]), str(v1["corpus"]), "--out", str(out)],
        capture_output=True,
        text=True,
        env=launch_env(),
        timeout=120,
    )
    assert done.returncode == 2
    assert (
        done.stderr.strip().splitlines()[-1]
        == f"error: output {out} exists; choose another --out or pass --overwrite"
    )


# ----------------------------------------------------------------------------- scale
@pytest.mark.slow
def test_two_process_torchrun_equals_one_process(v1, tmp_path):
    one = _run(v1["model"], v1["corpus"], tmp_path / "one.parquet", "--chunk-cells", "8")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(REPO / "embed.py"),
        str(v1["model"]),
        str(v1["corpus"]),
        "--out",
        str(tmp_path / "two.parquet"),
        "--chunk-cells",
        "8",
        "--no-progress",
        "--cache-dir",
        str(tmp_path / "cache"),
    ]
    done = subprocess.run(cmd, cwd=tmp_path, env=launch_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    assert pq.read_table(tmp_path / "two.parquet").equals(pq.read_table(one))


KILL_SHIM = """
import os, signal
_replace = os.replace
def replace(src, dst, *args, **kwargs):
    result = _replace(src, dst, *args, **kwargs)
    if str(dst).endswith(os.environ["EMBED_KILL_AFTER"]):
        os.kill(os.getpid(), signal.SIGKILL)
    return result
os.replace = replace
"""


@pytest.mark.slow
def test_a_killed_run_continues_on_relaunch_and_gives_the_same_output(v1, tmp_path):
    reference = _read(_run(v1["model"], v1["corpus"], tmp_path / "reference.parquet", "--chunk-cells", "8"))[
        1
    ]
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(KILL_SHIM)
    out = tmp_path / "cells.parquet"
    cmd = [
        sys.executable,
        str(REPO / "embed.py"),
        str(v1["model"]),
        str(v1["corpus"]),
        "--out",
        str(out),
        "--chunk-cells",
        "8",
        "--no-progress",
        "--cache-dir",
        str(tmp_path / "cache"),
    ]
    env = launch_env(
        {"PYTHONPATH": os.pathsep.join([str(shim), str(REPO)]), "EMBED_KILL_AFTER": "part-0000003.npz"}
    )
    killed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert killed.returncode == -9 and not out.exists()
    partial = tmp_path / ".cells.parquet.partial"
    assert sorted(p.name for p in partial.glob("part-*")) == [f"part-000000{k}.npz" for k in range(4)]
    done = subprocess.run(cmd, env=launch_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "4 chunks done" in done.stderr and not partial.exists()
    np.testing.assert_array_equal(_read(out)[1], reference)
