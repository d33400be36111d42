"""Tokenizing raw counts: hand-worked rank-value encodings, readers, real counts, errors and atomic output.

Each test reads as a promise to users of `python -m dataset.prepare.tokenize` / `tokenize_counts`.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import logging
import os
import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import scipy.sparse as sp

from dataset.prepare.gene_medians import NonzeroMedians
from dataset.prepare.tokenize import main, tokenize_counts
from dataset.safe_pickle import UnsafePickleError

anndata = pytest.importorskip("anndata")

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
V1 = SHARED / "geneformer" / "V1"

# Hand-made example. Columns: G1 (version .5), G2, G1 again (version .7: same gene), G3, an off-vocabulary
# gene, G4. Vocabulary ids: G1=2, G2=3, G3=4, G4=5. Medians chosen so every value below is exact in float64.
GENES = [
    "ENSG00000000001.5",
    "ENSG00000000002",
    "ENSG00000000001.7",
    "ENSG00000000003",
    "ENSG00000000099",
    "ENSG00000000004",
]
VOCAB_GENES = ["ENSG00000000001", "ENSG00000000002", "ENSG00000000003", "ENSG00000000004"]
MEDIANS = {"ENSG00000000001": 2.0, "ENSG00000000002": 1.0, "ENSG00000000003": 4.0, "ENSG00000000004": 1.0}
COUNTS = np.array(
    [
        # total 16 (the off-vocabulary count of 1 counts in the total). G1 = 2 + 2 = 4 -> 4/16*1e4/2 = 1250;
        # G2 = 3/16*1e4/1 = 1875; G3 = 8/16*1e4/4 = 1250 (ties G1: lower token id first); G4 = 0 -> left out.
        [2, 3, 2, 8, 1, 0],
        # only the off-vocabulary gene: no token, the cell is left out (as Geneformer does)
        [0, 0, 0, 0, 7, 0],
        # total 2: G2 = 1/2*1e4/1 = 5000, G4 = 5000: a tie, token 3 before token 5
        [0, 1, 0, 0, 0, 1],
        # total 10: G3 = 6/10*1e4/4 = 1500, G1 = 4/10*1e4/2 = 2000 -> G1, G3
        [4, 0, 0, 6, 0, 0],
    ],
    dtype=np.float32,
)
EXPECTED_V1 = [[3, 2, 4], [3, 5], [2, 4]]
CELL_TYPES = ["T", "B", "NK", "Mono"]


def _write_tables(directory: Path, *, v2: bool = False) -> tuple[Path, Path]:
    specials = ["<pad>", "<mask>", "<cls>", "<eos>"] if v2 else ["<pad>", "<mask>"]
    vocab = directory / ("vocab_v2.txt" if v2 else "vocab.txt")
    vocab.write_text("\n".join(specials + VOCAB_GENES) + "\n")
    medians = directory / "medians.tsv"
    medians.write_text("gene\tmedian\n" + "".join(f"{g}\t{m}\n" for g, m in MEDIANS.items()))
    return vocab, medians


def _adata(counts: np.ndarray = COUNTS, genes: list[str] = GENES, sparse: bool = True):
    obs = pd.DataFrame(
        {"cell_type": CELL_TYPES[: len(counts)], "donor": np.arange(len(counts))},
        index=[f"cell{i}" for i in range(len(counts))],
    )
    return anndata.AnnData(
        X=sp.csr_matrix(counts) if sparse else counts, obs=obs, var=pd.DataFrame(index=genes)
    )


def _read(out: Path) -> pd.DataFrame:
    shards = sorted(out.glob("*.parquet"))
    return pq.read_table(shards).to_pandas()


def _ids(frame: pd.DataFrame) -> list[list[int]]:
    return [list(map(int, x)) for x in frame["input_ids"]]


@pytest.fixture
def tables(tmp_path: Path) -> tuple[Path, Path]:
    return _write_tables(tmp_path)


def test_v1_encoding_worked_by_hand(tmp_path, tables):
    vocab, medians = tables
    _adata().write_h5ad(tmp_path / "cells.h5ad")
    manifest = tokenize_counts(
        tmp_path / "cells.h5ad", tmp_path / "out", vocab=vocab, medians=medians, obs_columns=["cell_type"]
    )
    frame = _read(tmp_path / "out")
    assert _ids(frame) == EXPECTED_V1
    assert frame["length"].tolist() == [3, 2, 2]
    assert frame["cell_type"].tolist() == ["T", "NK", "Mono"]
    assert (
        pq.read_schema(next((tmp_path / "out").glob("*.parquet"))).field("input_ids").type.value_type
        == "int64"
    )
    assert (tmp_path / "out" / "vocab.txt").read_text().split() == ["<pad>", "<mask>", *VOCAB_GENES]
    assert manifest["cells"] == {
        "read": 4,
        "kept": 3,
        "filtered_min_counts": 0,
        "filtered_min_genes": 0,
        "no_vocabulary_genes": 1,
        "truncated": 0,
        "non_integer": 0,
        "rounded_near_integer": 0,
    }
    assert frame["cell_id"].tolist() == ["cell0", "cell2", "cell3"]  # the obs index, always kept
    genes = manifest["genes"][0]
    assert (genes["columns"], genes["columns_in_vocabulary"], genes["vocabulary_genes_present"]) == (6, 5, 4)
    assert genes["duplicate_columns_summed"] == 1
    # counts of kept cells: 16 + 2 + 10 = 28, of which 27 are in vocabulary genes
    assert manifest["counts"]["share_in_vocabulary"] == pytest.approx(27 / 28)
    assert json.loads((tmp_path / "out" / "manifest.json").read_text()) == manifest


def test_v2_layout_wraps_genes_in_cls_and_eos(tmp_path):
    vocab, medians = _write_tables(tmp_path, v2=True)
    _adata().write_h5ad(tmp_path / "cells.h5ad")
    tokenize_counts(tmp_path / "cells.h5ad", tmp_path / "out", vocab=vocab, medians=medians, layout="v2")
    # V2 ids: <cls>=2, <eos>=3, genes G1..G4 = 4..7
    assert _ids(_read(tmp_path / "out")) == [[2, 5, 4, 6, 3], [2, 5, 7, 3], [2, 4, 6, 3]]


@pytest.mark.parametrize(("layout", "max_genes", "specials"), [("v1", 2048, 2), ("v2", 4094, 4)])
def test_long_cells_are_truncated_to_the_model_input(tmp_path, layout, max_genes, specials):
    n_genes = max_genes + 6
    genes = [f"ENSG{i:011d}" for i in range(1, n_genes + 1)]
    names = ["<pad>", "<mask>", "<cls>", "<eos>"][:specials]
    (tmp_path / "vocab.txt").write_text("\n".join(names + genes) + "\n")
    (tmp_path / "medians.tsv").write_text("".join(f"{g}\t1.0\n" for g in genes))
    counts = np.arange(1, n_genes + 1, dtype=np.float32)[
        None, :
    ]  # gene i has count i: highest id ranks first
    anndata.AnnData(X=sp.csr_matrix(counts), var=pd.DataFrame(index=genes)).write_h5ad(tmp_path / "c.h5ad")
    manifest = tokenize_counts(
        tmp_path / "c.h5ad",
        tmp_path / "out",
        vocab=tmp_path / "vocab.txt",
        medians=tmp_path / "medians.tsv",
        layout=layout,
    )
    ids = _ids(_read(tmp_path / "out"))[0]
    gene_ids = list(range(specials + n_genes - 1, specials - 1, -1))[:max_genes]
    assert ids == (gene_ids if layout == "v1" else [2, *gene_ids, 3])
    assert len(ids) == (2048 if layout == "v1" else 4096)
    assert manifest["cells"]["truncated"] == 1


def _write_loom(path: Path) -> None:
    """A loom file as loompy writes it (genes x cells); written with h5py, since importing loompy takes seconds."""
    import h5py

    with h5py.File(path, "w") as handle:
        handle.create_dataset("matrix", data=COUNTS.T, chunks=(2, 2))
        handle.create_group("layers")
        handle.create_group("row_attrs").create_dataset("ensembl_id", data=np.array(GENES, dtype="S"))
        col_attrs = handle.create_group("col_attrs")
        col_attrs.create_dataset("cell_type", data=np.array(CELL_TYPES, dtype="S"))
        col_attrs.create_dataset("donor", data=np.arange(len(COUNTS)))
        handle.attrs["LOOM_SPEC_VERSION"] = "3.0.0"


def _write_all_formats(directory: Path) -> dict[str, tuple[Path, dict]]:
    """The same counts as dense/sparse/CSC .h5ad, an .h5ad layer, .loom, CSV and TSV."""
    paths = {}
    _adata(sparse=False).write_h5ad(directory / "dense.h5ad")
    paths["dense"] = (directory / "dense.h5ad", {})
    _adata().write_h5ad(directory / "csr.h5ad")
    paths["csr"] = (directory / "csr.h5ad", {})
    csc = _adata()
    csc.X = sp.csc_matrix(csc.X)
    csc.write_h5ad(directory / "csc.h5ad")
    paths["csc"] = (directory / "csc.h5ad", {})
    layered = _adata()
    layered.layers["counts"] = layered.X.copy()
    layered.X = layered.X.multiply(0.5).tocsr()  # normalized values in X, counts in a layer
    layered.write_h5ad(directory / "layer.h5ad")
    paths["layer"] = (directory / "layer.h5ad", {"layer": "counts"})
    _write_loom(directory / "cells.loom")
    paths["loom"] = (directory / "cells.loom", {})
    frame = pd.DataFrame(COUNTS.astype(int), columns=GENES, index=[f"cell{i}" for i in range(len(COUNTS))])
    frame.to_csv(directory / "cells.csv")
    frame.to_csv(directory / "cells.tsv", sep="\t")
    paths["csv"] = (directory / "cells.csv", {})
    paths["tsv"] = (directory / "cells.tsv", {})
    return paths


def test_every_reader_gives_the_same_corpus(tmp_path, tables):
    vocab, medians = tables
    for name, (path, options) in _write_all_formats(tmp_path).items():
        tokenize_counts(path, tmp_path / f"out_{name}", vocab=vocab, medians=medians, chunk_size=3, **options)
        assert _ids(_read(tmp_path / f"out_{name}")) == EXPECTED_V1, name


def test_obs_columns_come_through_from_h5ad_and_loom(tmp_path, tables):
    vocab, medians = tables
    paths = _write_all_formats(tmp_path)
    for name in ("csr", "loom"):
        tokenize_counts(
            paths[name][0],
            tmp_path / f"o_{name}",
            vocab=vocab,
            medians=medians,
            obs_columns=["cell_type", "donor"],
            chunk_size=2,
        )
        frame = _read(tmp_path / f"o_{name}")
        assert frame["cell_type"].tolist() == ["T", "NK", "Mono"], name
        assert frame["donor"].tolist() == [0, 2, 3], name


def test_symbols_map_through_a_gene_name_table(tmp_path, tables):
    vocab, medians = tables
    symbols = ["A1", "B2", "a1", "C3", "NOPE", "D4"]  # "a1": case-insensitive duplicate of A1
    (tmp_path / "names.csv").write_text(
        "".join(f"{g},{s}\n" for g, s in zip(VOCAB_GENES, ["A1", "B2", "C3", "D4"], strict=True))
    )
    _adata(genes=symbols).write_h5ad(tmp_path / "sym.h5ad")
    manifest = tokenize_counts(
        tmp_path / "sym.h5ad",
        tmp_path / "out",
        vocab=vocab,
        medians=medians,
        gene_names=tmp_path / "names.csv",
    )
    assert _ids(_read(tmp_path / "out")) == EXPECTED_V1
    assert manifest["genes"][0]["mapped_to_ensembl"] == 5


def test_a_gene_mapping_table_sends_alternate_ids_to_vocabulary_genes(tmp_path, tables):
    vocab, medians = tables
    mapping = tmp_path / "mapping.tsv"  # keys are matched upper-cased, versions stripped on both sides
    mapping.write_text("alias\tensembl_id\nensg00000000099\tENSG00000000004.3\n")
    _adata().write_h5ad(tmp_path / "cells.h5ad")
    manifest = tokenize_counts(
        tmp_path / "cells.h5ad", tmp_path / "out", vocab=vocab, medians=medians, gene_mapping=mapping
    )
    # The off-vocabulary column now counts for G4 (token 5): cell 0 gains G4 = 1/16*1e4 = 625, last; cell 1,
    # empty before, is G4 alone.
    assert _ids(_read(tmp_path / "out")) == [[3, 2, 4, 5], [5], [3, 5], [2, 4]]
    assert manifest["genes"][0]["renamed_by_gene_mapping"] == 1
    assert manifest["genes"][0]["duplicate_columns_summed"] == 2  # G1 twice, G4 twice


def test_empty_cells_are_left_out(tmp_path, tables):
    vocab, medians = tables
    empty = np.zeros((1, len(GENES)), dtype=np.float32)
    counts = np.vstack([empty, COUNTS[:1], empty, COUNTS[2:], empty, empty])
    anndata.AnnData(X=sp.csr_matrix(counts), var=pd.DataFrame(index=GENES)).write_h5ad(tmp_path / "e.h5ad")
    manifest = tokenize_counts(
        tmp_path / "e.h5ad", tmp_path / "out", vocab=vocab, medians=medians, chunk_size=4
    )
    assert _ids(_read(tmp_path / "out")) == [EXPECTED_V1[0], *EXPECTED_V1[1:]]
    assert manifest["cells"]["no_vocabulary_genes"] == 4


def test_cell_filters(tmp_path, tables):
    vocab, medians = tables
    _adata().write_h5ad(tmp_path / "cells.h5ad")
    manifest = tokenize_counts(
        tmp_path / "cells.h5ad",
        tmp_path / "out",
        vocab=vocab,
        medians=medians,
        min_counts=3,
        min_genes=3,
        obs_columns=["cell_type"],
    )
    assert _read(tmp_path / "out")["cell_type"].tolist() == ["T"]
    # totals 16, 7, 2, 10 and expressed genes (all columns) 5, 1, 2, 2: cell 2 has too few counts,
    # cells 1 and 3 too few genes; a cell failing both is counted under min_counts.
    cells = manifest["cells"]
    assert (cells["filtered_min_counts"], cells["filtered_min_genes"], cells["kept"]) == (1, 2, 1)


def test_computed_medians_are_exact_nonzero_medians(tmp_path):
    rng = np.random.default_rng(0)
    counts = rng.poisson(rng.gamma(0.5, 4.0, (300, 40))).astype(np.float32)
    counts[:, 5] = 0  # never expressed: not in the built vocabulary
    genes = [f"ENSG{i:011d}" for i in range(40)]
    anndata.AnnData(X=sp.csr_matrix(counts), var=pd.DataFrame(index=genes)).write_h5ad(tmp_path / "c.h5ad")
    manifest = tokenize_counts(tmp_path / "c.h5ad", tmp_path / "out", compute_medians=True, chunk_size=64)
    counts = counts.astype(np.float64)
    normalized = counts / counts.sum(axis=1, keepdims=True) * 10_000
    expected = {
        g: float(np.median(normalized[normalized[:, j] > 0, j]))
        for j, g in enumerate(genes)
        if (normalized[:, j] > 0).any()
    }
    table = pd.read_csv(tmp_path / "out" / "gene_medians.tsv", sep="\t").set_index("gene")["median"].to_dict()
    assert table.keys() == expected.keys() and genes[5] not in table
    np.testing.assert_allclose([table[g] for g in expected], list(expected.values()), rtol=1e-12)
    vocab = (tmp_path / "out" / "vocab.txt").read_text().split()
    assert vocab == ["<pad>", "<mask>", *sorted(expected)]
    assert manifest["vocabulary"]["source"] == "built from genes seen in the input"


def test_streaming_median_matches_numpy_median():
    rng = np.random.default_rng(1)
    genes = rng.integers(0, 50, 20_000)
    values = np.exp(rng.normal(0, 2, 20_000))
    values[:500] = 3.0  # many equal values
    values[500:700] = rng.uniform(1e6, 1e7, 200)  # beyond the histogram's range: still exact
    values[700:900] = rng.uniform(1e-9, 1e-8, 200)
    medians = NonzeroMedians(51)
    for step in (medians.count, medians.collect):
        for part in np.array_split(np.arange(20_000), 7):
            step(genes[part], values[part])
    result = medians.result()
    expected = [np.median(values[genes == g]) for g in range(50)]
    np.testing.assert_array_equal(result[:50], expected)
    assert np.isnan(result[50])


def _find_celltypist_file(name: str) -> Path | None:
    spec = importlib.util.find_spec("celltypist")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "data" / "samples" / name
    return path if path.is_file() else None


def _reference_encoding(counts: np.ndarray, ensembl: list[str | None], token_of: dict, medians: dict) -> list:
    """Straightforward Geneformer V1 encoding, one dense cell at a time."""
    cells = []
    for row in counts:
        total = row.sum()  # over all genes of the cell, also those outside the vocabulary
        summed: dict[str, float] = {}
        for j in np.flatnonzero(row):
            if ensembl[j] in token_of:
                summed[ensembl[j]] = summed.get(ensembl[j], 0.0) + float(row[j])
        genes = sorted(summed, key=token_of.__getitem__)
        values = np.array([summed[g] / total * 10_000 / medians[g] for g in genes])
        tokens = np.array([token_of[g] for g in genes], dtype=np.int64)
        assert len(np.unique(values)) == len(values)  # no exact ties, so Geneformer's own argsort agrees
        if len(tokens):
            cells.append(tokens[np.argsort(-values)][:2048].tolist())
    return cells


@pytest.fixture(scope="module")
def celltypist_counts() -> tuple[pd.DataFrame, Path]:
    matrix = _find_celltypist_file("sample_cell_by_gene.csv")
    names = _find_celltypist_file("GENCODEv44_Gene_id2name.csv")
    if matrix is None or names is None:
        pytest.skip("celltypist sample counts not installed (pip install --no-deps celltypist)")
    frame = pd.read_csv(matrix, index_col=0, nrows=80)  # 80 of 559 cells keep the test fast; all 32,786 genes
    # The sample stores counts recovered from log-normalized data (0.999999999999999, 3.00000000000001):
    # integers up to float noise, which the tokenizer refuses until they are rounded.
    return frame.round(), names


def test_real_counts_match_a_reference_implementation(tmp_path, celltypist_counts):
    if not (V1 / "token_dictionary_gc30M.pkl").is_file():
        pytest.skip(f"Geneformer V1 dictionaries not found under {V1}")
    frame, names = celltypist_counts
    anndata.AnnData(
        X=sp.csr_matrix(frame.to_numpy(np.float32)),
        obs=pd.DataFrame(index=frame.index.astype(str)),
        var=pd.DataFrame(index=frame.columns.astype(str)),
    ).write_h5ad(tmp_path / "real.h5ad")
    manifest = tokenize_counts(
        tmp_path / "real.h5ad",
        tmp_path / "out",
        vocab=V1 / "token_dictionary_gc30M.pkl",
        medians=V1 / "gene_median_dictionary_gc30M.pkl",
        gene_names=names,
        chunk_size=32,
    )

    symbol_to_id: dict[str, str] = {}
    with names.open() as handle:
        for gene_id, symbol in csv.reader(handle):
            symbol_to_id.setdefault(symbol, gene_id.split(".")[0])
    with (V1 / "token_dictionary_gc30M.pkl").open("rb") as handle:
        token_of = {k: int(v) for k, v in pickle.load(handle).items() if k.startswith("ENSG")}  # trusted file
    with (V1 / "gene_median_dictionary_gc30M.pkl").open("rb") as handle:
        medians = {k: float(v) for k, v in pickle.load(handle).items()}
    upper = {k.upper(): v for k, v in symbol_to_id.items()}
    ensembl = [symbol_to_id.get(s) or upper.get(s.upper()) for s in frame.columns]
    expected = _reference_encoding(frame.to_numpy(), ensembl, token_of, medians)

    assert _ids(_read(tmp_path / "out")) == expected
    assert manifest["cells"]["kept"] == len(expected) == 80
    share = manifest["counts"]["share_in_vocabulary"]
    assert 0.5 < share < 1.0, share


def test_real_counts_with_computed_medians_and_v2_layout(tmp_path, celltypist_counts):
    frame, names = celltypist_counts
    cells = frame.iloc[:16]
    cells.loc[:, cells.sum(axis=0) > 0].to_csv(tmp_path / "real.csv")  # all-zero genes change nothing
    manifest = tokenize_counts(
        tmp_path / "real.csv", tmp_path / "out", gene_names=names, compute_medians=True, layout="v2"
    )
    ids = _ids(_read(tmp_path / "out"))
    vocab = (tmp_path / "out" / "vocab.txt").read_text().split()
    assert vocab[:4] == ["<pad>", "<mask>", "<cls>", "<eos>"]
    assert all(cell[0] == 2 and cell[-1] == 3 and len(set(cell[1:-1])) == len(cell) - 2 for cell in ids)
    assert manifest["cells"]["kept"] == 16


def test_reads_into_the_training_corpus(tmp_path, tables):
    corpus_module = pytest.importorskip("dataset.corpus")
    vocab, medians = tables
    _adata().write_h5ad(tmp_path / "cells.h5ad")
    tokenize_counts(
        tmp_path / "cells.h5ad", tmp_path / "out", vocab=vocab, medians=medians, obs_columns=["cell_type"]
    )
    corpus = corpus_module.CellCorpus(
        tmp_path / "out", vocab_size=6, max_length=2048, cache_dir=tmp_path / "cache"
    )
    assert len(corpus) == 3
    assert [list(map(int, corpus[i])) for i in range(3)] == EXPECTED_V1
    assert list(corpus.column("cell_type")) == ["T", "NK", "Mono"]


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("role", ["vocab", "medians", "gene_names", "gene_mapping"])
def test_malicious_pickle_is_refused_without_running(tmp_path, tables, role):
    vocab, medians = tables
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps({"ENSG00000000001": _Payload(marker)}))
    _adata().write_h5ad(tmp_path / "cells.h5ad")
    options = {"vocab": vocab, "medians": medians, role: evil}
    with pytest.raises(UnsafePickleError, match="evil.pkl"):
        tokenize_counts(tmp_path / "cells.h5ad", tmp_path / "out", **options)
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


def test_non_integer_counts_fail_unless_allowed(tmp_path, tables, caplog):
    vocab, medians = tables
    _adata(counts=COUNTS * 0.5).write_h5ad(tmp_path / "norm.h5ad")
    with pytest.raises(ValueError, match=r"norm\.h5ad.*non-integer.*--layer.*--allow-non-integer"):
        tokenize_counts(tmp_path / "norm.h5ad", tmp_path / "out", vocab=vocab, medians=medians)
    assert not (tmp_path / "out").exists()
    with caplog.at_level(logging.WARNING):
        manifest = tokenize_counts(
            tmp_path / "norm.h5ad", tmp_path / "out", vocab=vocab, medians=medians, allow_non_integer=True
        )
    assert manifest["cells"]["non_integer"] == 3
    assert "non-integer" in caplog.text


def test_negative_counts_are_an_error(tmp_path, tables):
    vocab, medians = tables
    counts = COUNTS.copy()
    counts[3, 0] = -1
    _adata(counts=counts).write_h5ad(tmp_path / "neg.h5ad")
    with pytest.raises(ValueError, match=r"neg\.h5ad.*negative.*row 3"):
        tokenize_counts(
            tmp_path / "neg.h5ad", tmp_path / "out", vocab=vocab, medians=medians, allow_non_integer=True
        )


def test_clear_errors_for_user_mistakes(tmp_path, tables):
    vocab, medians = tables
    _adata().write_h5ad(tmp_path / "cells.h5ad")
    with pytest.raises(ValueError, match=r"cells\.h5ad.*'tissue'.*available.*cell_type.*--obs-columns"):
        tokenize_counts(
            tmp_path / "cells.h5ad", tmp_path / "o", vocab=vocab, medians=medians, obs_columns=["tissue"]
        )
    _adata(genes=["A", "B", "C", "D", "E", "F"]).write_h5ad(tmp_path / "symbols.h5ad")
    with pytest.raises(ValueError, match=r"symbols\.h5ad.*none of the 6 genes.*--gene-names"):
        tokenize_counts(tmp_path / "symbols.h5ad", tmp_path / "o", vocab=vocab, medians=medians)
    (tmp_path / "broken.h5ad").write_bytes(b"not an hdf5 file")
    with pytest.raises(ValueError, match=r"broken\.h5ad.*cannot read"):
        tokenize_counts(tmp_path / "broken.h5ad", tmp_path / "o", vocab=vocab, medians=medians)
    with pytest.raises(ValueError, match=r"cells\.h5ad.*layers/counts.*--layer"):
        tokenize_counts(tmp_path / "cells.h5ad", tmp_path / "o", vocab=vocab, medians=medians, layer="counts")
    with pytest.raises(ValueError, match="--compute-medians"):
        tokenize_counts(tmp_path / "cells.h5ad", tmp_path / "o", vocab=vocab)
    with pytest.raises(ValueError, match="--medians needs --vocab"):
        tokenize_counts(tmp_path / "cells.h5ad", tmp_path / "o", medians=medians)
    with pytest.raises(ValueError, match="<cls>"):
        tokenize_counts(tmp_path / "cells.h5ad", tmp_path / "o", vocab=vocab, medians=medians, layout="v2")
    with pytest.raises(FileNotFoundError, match="missing.h5ad"):
        tokenize_counts(tmp_path / "missing.h5ad", tmp_path / "o", vocab=vocab, medians=medians)
    assert not (tmp_path / "o").exists()


def test_output_is_never_half_written_or_overwritten(tmp_path, tables):
    vocab, medians = tables
    counts = np.vstack([COUNTS, COUNTS])
    counts[-1, 0] = 0.5  # a problem in the last chunk, after earlier chunks were written
    obs = pd.DataFrame(index=[f"c{i}" for i in range(len(counts))])
    anndata.AnnData(X=sp.csr_matrix(counts), obs=obs, var=pd.DataFrame(index=GENES)).write_h5ad(
        tmp_path / "l.h5ad"
    )
    with pytest.raises(ValueError, match="non-integer"):
        tokenize_counts(
            tmp_path / "l.h5ad",
            tmp_path / "out",
            vocab=vocab,
            medians=medians,
            chunk_size=2,
            cells_per_shard=1,
        )
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith((".out", "out"))) == []
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty.*--overwrite"):
        tokenize_counts(
            tmp_path / "l.h5ad", tmp_path / "out", vocab=vocab, medians=medians, allow_non_integer=True
        )
    tokenize_counts(
        tmp_path / "l.h5ad",
        tmp_path / "out",
        vocab=vocab,
        medians=medians,
        allow_non_integer=True,
        overwrite=True,
        cells_per_shard=2,
    )
    assert not (tmp_path / "out" / "keep.txt").exists()
    assert len(list((tmp_path / "out").glob("part-*.parquet"))) == 3


def test_command_line(tmp_path, tables, capsys):
    vocab, medians = tables
    _adata().write_h5ad(tmp_path / "cells.h5ad")
    code = main(
        [
            str(tmp_path / "cells.h5ad"),
            "--out",
            str(tmp_path / "out"),
            "--vocab",
            str(vocab),
            "--medians",
            str(medians),
            "--obs-columns",
            "cell_type,donor",
            "--chunk-size",
            "2",
        ]
    )
    assert code == 0
    assert _ids(_read(tmp_path / "out")) == EXPECTED_V1
    assert main([str(tmp_path / "cells.h5ad"), "--out", str(tmp_path / "out2"), "--vocab", str(vocab)]) == 2
    assert "--compute-medians" in capsys.readouterr().err


@pytest.mark.parametrize(("max_genes", "v2"), [(50, False), (50, True), (1000, False)])
def test_ranking_rule_on_random_cells_with_ties_and_near_ties(max_genes, v2):
    """Value descending, exactly equal values by token id, also for values equal to ~1e-13 (and across chunks)."""
    from dataset.prepare.gene_tables import GeneColumnMap
    from dataset.prepare.rank_value import aggregate_to_vocabulary, encode_chunk

    rng = np.random.default_rng(3)
    n_genes = 300
    near_one = np.nextafter(1.0, 2.0) + 1e-13
    medians = rng.choice(
        [1.0, 2.0, near_one, 0.5], n_genes
    )  # few distinct medians: many ties, some near-ties
    token_ids = np.arange(10, 10 + n_genes)
    column_map = GeneColumnMap(
        target=rng.permutation(n_genes),
        token_ids=token_ids,
        medians=medians,
        gene_ids=tuple(map(str, range(n_genes))),
        n_columns=n_genes,
        n_mapped_to_ensembl=n_genes,
    )
    counts = sp.random(
        40, n_genes, density=0.4, format="csr", random_state=4, data_rvs=lambda k: rng.integers(1, 4, k)
    )
    counts.data = counts.data.astype(np.float64)
    totals = np.asarray(counts.sum(axis=1)).ravel()
    aggregated = aggregate_to_vocabulary(counts, column_map)
    specials = {"cls_id": 0, "eos_id": 1} if v2 else {}
    encoded = encode_chunk(aggregated, totals, column_map, max_genes=max_genes, **specials)
    dense = np.zeros((40, n_genes))
    dense[:, column_map.target] = counts.toarray()
    for i in range(40):
        slots = np.flatnonzero(dense[i])
        values = dense[i, slots] / totals[i] * 10_000 / medians[slots]
        expected = [t for _, t in sorted(zip(-values, token_ids[slots], strict=True))[:max_genes]]
        expected = [0, *expected, 1] if v2 else expected
        assert encoded.tokens[encoded.offsets[i] : encoded.offsets[i + 1]].tolist() == expected


def test_near_tie_at_the_truncation_point_keeps_the_larger_value():
    """Two values equal to 1e-13 straddle the cut: the larger one is kept even though its token id is higher."""
    from dataset.prepare.gene_tables import GeneColumnMap
    from dataset.prepare.rank_value import aggregate_to_vocabulary, encode_chunk

    medians = np.array([1.0, 1.0 + 1e-13, 1.0])  # token 11's value is a hair below token 12's
    column_map = GeneColumnMap(
        target=np.arange(3),
        token_ids=np.array([10, 11, 12]),
        medians=medians,
        gene_ids=("a", "b", "c"),
        n_columns=3,
        n_mapped_to_ensembl=3,
    )
    counts = sp.csr_matrix(np.array([[5.0, 2.0, 2.0]]))
    encoded = encode_chunk(
        aggregate_to_vocabulary(counts, column_map), np.array([9.0]), column_map, max_genes=2
    )
    assert encoded.tokens.tolist() == [10, 12]


@pytest.mark.parametrize(
    "case", ["zeros_and_unmapped_columns", "duplicate_columns", "ids_past_16_bits", "tiny_median"]
)
def test_sort_key_ranking_equals_a_plain_per_cell_sort(case):
    """The sort-key path and its exact fallbacks (ids that do not fit the key, values that overflow) against a
    plain sort of each cell, on float32 counts with many equal values."""
    from dataset.prepare.gene_tables import GeneColumnMap
    from dataset.prepare.rank_value import aggregate_to_vocabulary, encode_chunk

    rng = np.random.default_rng(7)
    n_columns, n_slots, max_genes = 60, 50, 30
    target = (
        rng.permutation(n_columns) % n_slots if case == "duplicate_columns" else rng.permutation(n_columns)
    )
    target = np.where(target < n_slots, target, -1)  # unmapped columns in every case but duplicates
    token_ids = (
        np.sort(rng.choice(70_000 if case == "ids_past_16_bits" else 30_000, n_slots, replace=False)) + 4
    )
    medians = rng.choice([0.5, 1.0, 1.5, 3.0], n_slots)
    if case == "tiny_median":
        medians[3] = 1e-320  # its values overflow to inf: no sort key for them
    column_map = GeneColumnMap(
        target=target,
        token_ids=token_ids,
        medians=medians,
        gene_ids=tuple(map(str, range(n_slots))),
        n_columns=n_columns,
        n_mapped_to_ensembl=n_columns,
    )
    counts = sp.random(
        25, n_columns, density=0.7, format="csr", random_state=8, data_rvs=lambda k: rng.integers(0, 4, k)
    ).astype(np.float32)  # explicit zeros too
    totals = np.asarray(counts.sum(axis=1), dtype=np.float64).ravel()
    with np.errstate(over="ignore"):
        encoded = encode_chunk(
            aggregate_to_vocabulary(counts, column_map), totals, column_map, max_genes=max_genes
        )
    for i in range(counts.shape[0]):
        per_slot = np.zeros(n_slots)
        row = counts[i]
        for column, count in zip(row.indices, row.data, strict=True):
            if target[column] >= 0:
                per_slot[target[column]] += count
        slots = np.flatnonzero(per_slot)
        with np.errstate(over="ignore"):
            values = per_slot[slots] / totals[i] * 10_000 / medians[slots]
        expected = [int(t) for _, t in sorted(zip(-values, token_ids[slots], strict=True))][:max_genes]
        assert encoded.tokens[encoded.offsets[i] : encoded.offsets[i + 1]].tolist() == expected


@pytest.mark.parametrize(
    "values",
    [[0, 3, 1], [0.0, -0.0, 2.0], [1.5, 2.0, 0.0], [1.0, np.nan, 0.0], [1.0, np.inf, 0.0], [2.0, -1.0, 0.0]],
)
@pytest.mark.parametrize("dtype", [np.uint16, np.int32, np.float16, np.float32, np.float64])
def test_count_check_in_the_stored_dtype_agrees_with_float64(values, dtype):
    """Checking counts before the float64 copy accepts and rejects exactly what the float64 check does."""
    from dataset.prepare.count_checks import check_counts

    with np.errstate(invalid="ignore"):
        stored = np.array(values, dtype=np.float64).astype(dtype)

    def check(data, allow):
        matrix = sp.csr_matrix((data, np.arange(3), np.array([0, 1, 3])), shape=(2, 3))
        try:
            return check_counts(matrix, "x.h5ad: X", 0, allow_non_integer=allow)
        except ValueError as error:
            return str(error)

    for allow in (False, True):
        assert check(stored, allow) == check(stored.astype(np.float64), allow)
