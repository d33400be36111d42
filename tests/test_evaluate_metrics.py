"""Building blocks of evaluate.py: linear CKA and cosine, cell-type probes, gene-token mean embeddings.

Each test states a property a user relies on when reading the comparison table.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from evaluation.embeddings import (
    CellEmbeddings,
    extract_embeddings,
    read_embeddings,
    unmasked_input_ids,
    write_embeddings,
)
from evaluation.figures import plot_embedding_pca
from evaluation.probes import probe_embeddings, stratified_split
from evaluation.similarity import linear_cka, mean_cosine
from modeling_bert_te import BertForMaskedLM, BertTEConfig


def _random_embeddings(n: int = 200, dim: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, dim))


# ----------------------------------------------------------------------------- similarity
def test_cka_of_identical_embeddings_is_one():
    x = _random_embeddings()
    assert linear_cka(x, x) == pytest.approx(1.0)


def test_cka_ignores_rotation_and_isotropic_scaling():
    x = _random_embeddings()
    rotation, _ = np.linalg.qr(np.random.default_rng(1).normal(size=(16, 16)))
    assert linear_cka(x, 3.7 * x @ rotation) == pytest.approx(1.0)
    assert linear_cka(x, x + 5.0) == pytest.approx(1.0)  # centering: a shift changes nothing


def test_cka_compares_models_of_different_widths_and_ranks_unrelated_embeddings_low():
    x = _random_embeddings(dim=16)
    wider = np.concatenate([x, np.zeros((len(x), 8))], axis=1)  # a wider model holding the same information
    assert linear_cka(x, wider) == pytest.approx(1.0)
    unrelated = _random_embeddings(dim=24, seed=7)
    assert linear_cka(x, unrelated) < 0.3


def test_cka_refuses_different_cells():
    with pytest.raises(ValueError, match="different numbers of cells"):
        linear_cka(_random_embeddings(n=10), _random_embeddings(n=11))


def test_mean_cosine_is_one_for_same_direction_and_undefined_across_widths():
    x = _random_embeddings()
    assert mean_cosine(x, 2.0 * x) == pytest.approx(1.0)
    assert mean_cosine(x, -x) == pytest.approx(-1.0)
    assert mean_cosine(x, _random_embeddings(dim=8)) is None


# ----------------------------------------------------------------------------- probes
def _separable(n_per_class: int = 20, n_classes: int = 3, dim: int = 8):
    rng = np.random.default_rng(0)
    centers = np.eye(n_classes, dim) * 10.0
    labels = np.repeat([f"type{i}" for i in range(n_classes)], n_per_class)
    x = centers[np.repeat(np.arange(n_classes), n_per_class)] + rng.normal(
        size=(n_classes * n_per_class, dim)
    )
    return x, labels


def test_probes_classify_separable_cells_perfectly():
    x, labels = _separable()
    scores = probe_embeddings(x, labels, stratified_split(labels, seed=0))
    assert scores == {
        "probe_logreg_accuracy": 1.0,
        "probe_logreg_macro_f1": 1.0,
        "probe_knn_accuracy": 1.0,
        "probe_knn_macro_f1": 1.0,
    }


def test_probe_split_is_stratified_seeded_and_drops_single_cell_labels():
    x, labels = _separable(n_per_class=10)
    labels = np.append(labels, "lonely")
    split = stratified_split(labels, test_fraction=0.3, seed=3)
    assert split.dropped_labels == ("lonely",)
    assert set(labels[split.train]) == set(labels[split.test]) == {"type0", "type1", "type2"}
    assert not set(split.train) & set(split.test)
    again = stratified_split(labels, test_fraction=0.3, seed=3)
    assert np.array_equal(split.test, again.test)


def test_probe_split_refuses_a_single_label():
    with pytest.raises(ValueError, match="at least 2 labels"):
        stratified_split(["a"] * 10)


# ----------------------------------------------------------------------------- embeddings
def _tiny_model(vocab_size: int = 40) -> BertForMaskedLM:
    torch.manual_seed(0)
    return BertForMaskedLM(
        BertTEConfig(
            vocab_size=vocab_size,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=64,
        )
    )


def test_a_cells_embedding_does_not_depend_on_its_batch_padding():
    model = _tiny_model().eval()
    alone = {
        "input_ids": torch.tensor([[5, 6, 7]]),
        "attention_mask": torch.ones(1, 3, dtype=torch.long),
        "labels": torch.full((1, 3), -100),
        "cell_index": torch.tensor([0]),
    }
    padded = {
        "input_ids": torch.tensor([[5, 6, 7, 0, 0], [8, 9, 10, 11, 12]]),
        "attention_mask": torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]),
        "labels": torch.full((2, 5), -100),
        "cell_index": torch.tensor([0, 1]),
    }
    kwargs = dict(layer=-1, special_ids=(0, 1), device=torch.device("cpu"))
    a = extract_embeddings(model, [alone], **kwargs)
    b = extract_embeddings(model, [padded], **kwargs)
    torch.testing.assert_close(
        torch.from_numpy(a.vectors[0]), torch.from_numpy(b.vectors[0]), atol=1e-5, rtol=1e-5
    )
    assert b.vectors.shape == (2, 32)


def test_embeddings_see_the_cells_unmasked():
    batch = {"input_ids": torch.tensor([[1, 6, 1]]), "labels": torch.tensor([[5, -100, 7]])}
    assert unmasked_input_ids(batch).tolist() == [[5, 6, 7]]


def test_layer_out_of_range_names_the_valid_range():
    with pytest.raises(ValueError, match="out of range for a model of 2 layers"):
        extract_embeddings(_tiny_model(), [], layer=3, special_ids=(0, 1), device=torch.device("cpu"))


def test_embeddings_round_trip_through_parquet_with_metadata(tmp_path):
    emb = CellEmbeddings(np.array([4, 9]), np.arange(6, dtype=np.float32).reshape(2, 3), 0.1)
    path = write_embeddings(
        tmp_path / "e.parquet", emb, {"cell_type": ["B", "T"], "length": np.array([10, 20])}
    )
    index, vectors, metadata = read_embeddings(path)
    assert index.tolist() == [4, 9]
    assert np.array_equal(vectors, emb.vectors)
    assert metadata == {"cell_type": ["B", "T"], "length": [10, 20]}


def test_pca_figure_is_written_with_and_without_labels(tmp_path):
    x, labels = _separable()
    assert plot_embedding_pca(x, list(labels), "model", tmp_path / "a.png").stat().st_size > 1000
    assert plot_embedding_pca(x, None, "model", tmp_path / "b.png").stat().st_size > 1000
