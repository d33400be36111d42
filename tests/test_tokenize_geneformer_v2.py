"""Real counts through the tokenizer as Geneformer V2 users get them: id mapping, truncation, cell ids, float noise.

Cells are celltypist's sample and scanpy's PBMC68k (real counts); dictionaries are Geneformer's (../shared/data).
"""

from __future__ import annotations

import csv
import importlib.util
import logging
import pickle
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import scipy.sparse as sp

from dataset.corpus import CellCorpus
from dataset.prepare.tokenize import tokenize_counts
from dataset.vocab import Vocabulary

anndata = pytest.importorskip("anndata")

V1 = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "geneformer" / "V1"
V2 = V1.parent / "V2"
N_CELLS = 100  # of 559: enough cells with alternate ids and long cells, and a test of seconds
MATR3 = "ENSG00000015479"  # GENCODE v44 lists MATR3 first under ENSG00000280987, which the mapping sends here


def _package_file(package: str, *parts: str) -> Path | None:
    spec = importlib.util.find_spec(package)  # locate without importing it (both pull in heavy dependencies)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))).joinpath(*parts)
    return path if path.is_file() else None


def _celltypist_file(name: str) -> Path | None:
    return _package_file("celltypist", "data", "samples", name)


def _trusted_pickle(name: str) -> dict:
    with (V2 / name).open("rb") as handle:
        return pickle.load(handle)  # Geneformer's own dictionary, read here only to build the expected result


@pytest.fixture(scope="module")
def symbol_cells() -> pd.DataFrame:
    """Real counts as stored (float noise included), genes named by symbol as in the sample."""
    matrix = _celltypist_file("sample_cell_by_gene.csv")
    if matrix is None or _celltypist_file("GENCODEv44_Gene_id2name.csv") is None:
        pytest.skip("celltypist sample counts not installed (pip install --no-deps celltypist)")
    if not (V2 / "ensembl_mapping_dict_gc104M.pkl").is_file():
        pytest.skip(f"Geneformer V2 dictionaries not found under {V2}")
    return pd.read_csv(matrix, index_col=0, nrows=N_CELLS)


@pytest.fixture(scope="module")
def cells(symbol_cells) -> pd.DataFrame:
    """The same counts with genes renamed to their first GENCODE v44 Ensembl id."""
    first_id: dict[str, str] = {}
    with _celltypist_file("GENCODEv44_Gene_id2name.csv").open() as handle:
        for gene_id, symbol in csv.reader(handle):
            first_id.setdefault(symbol, gene_id.split(".")[0])
    frame = symbol_cells.loc[:, [s in first_id for s in symbol_cells.columns]]
    frame.columns = [first_id[s] for s in frame.columns]
    return frame


def _h5ad(frame: pd.DataFrame, path: Path) -> Path:
    anndata.AnnData(
        X=sp.csr_matrix(frame.to_numpy(np.float32)),
        obs=pd.DataFrame(index=frame.index.astype(str)),
        var=pd.DataFrame(index=frame.columns.astype(str)),
    ).write_h5ad(path)
    return path


def _tokenize_v2(source: Path, out: Path, **options) -> dict:
    return tokenize_counts(
        source,
        out,
        vocab=V2 / "token_dictionary_gc104M.pkl",
        medians=V2 / "gene_median_dictionary_gc104M.pkl",
        layout="v2",
        **options,
    )


def _rows(out: Path) -> pd.DataFrame:
    return pq.read_table(sorted(out.glob("*.parquet"))).to_pandas()


def _ids(out: Path) -> list[list[int]]:
    return [list(map(int, x)) for x in _rows(out)["input_ids"]]


def _published_v2_encoding(frame: pd.DataFrame) -> list[list[int]]:
    """Geneformer V2's tokenizer, step by step: ids upper-cased through the mapping (restricted to vocabulary
    genes), counts of ids that meet summed, count / cell total * 10,000 / median, ranked, 4,094 genes in
    <cls> ... <eos>; cells without a vocabulary gene dropped."""
    token_of = {k: int(v) for k, v in _trusted_pickle("token_dictionary_gc104M.pkl").items()}
    medians = _trusted_pickle("gene_median_dictionary_gc104M.pkl")
    mapping = {k: v for k, v in _trusted_pickle("ensembl_mapping_dict_gc104M.pkl").items() if v in token_of}
    counts = np.rint(frame.to_numpy())
    mapped = [mapping.get(g.upper()) for g in frame.columns]
    genes = sorted({g for g in mapped if g is not None})
    column_of = {g: j for j, g in enumerate(genes)}
    summed = np.zeros((len(counts), len(genes)))
    for j, gene in enumerate(mapped):
        if gene is not None:
            summed[:, column_of[gene]] += counts[:, j]
    tokens = np.array([token_of[g] for g in genes])
    norm = np.array([float(medians[g]) for g in genes])
    cells = []
    for row, total in zip(summed, counts.sum(axis=1), strict=True):
        nonzero = np.flatnonzero(row)
        if len(nonzero):
            values = row[nonzero] / total * 10_000 / norm[nonzero]
            cells.append([token_of["<cls>"], *tokens[nonzero][np.argsort(-values)][:4094], token_of["<eos>"]])
    return cells


def test_alternate_ensembl_ids_reach_the_v2_vocabulary_through_the_gene_mapping(tmp_path, cells):
    source = _h5ad(cells, tmp_path / "gencode.h5ad")
    manifest = _tokenize_v2(source, tmp_path / "mapped", gene_mapping=V2 / "ensembl_mapping_dict_gc104M.pkl")
    mapped = _ids(tmp_path / "mapped")
    assert mapped == _published_v2_encoding(cells)

    token_of = _trusted_pickle("token_dictionary_gc104M.pkl")
    mapping = _trusted_pickle("ensembl_mapping_dict_gc104M.pkl")
    renamed = [g for g in cells.columns if mapping.get(g) in token_of and mapping[g] != g]
    genes = manifest["genes"][0]
    assert genes["renamed_by_gene_mapping"] == len(renamed) > 0
    targets = [mapping[g] for g in cells.columns if mapping.get(g) in token_of]
    assert genes["columns_in_vocabulary"] == len(targets)
    assert genes["duplicate_columns_summed"] == len(targets) - len(
        set(targets)
    )  # ids that meet one gene: summed
    assert manifest["gene_mapping"] == str((V2 / "ensembl_mapping_dict_gc104M.pkl").resolve())

    _tokenize_v2(source, tmp_path / "plain")  # without the mapping, MATR3 under its alternate id is lost
    plain = _ids(tmp_path / "plain")
    matr3 = int(token_of[MATR3])
    assert sum(matr3 in cell for cell in mapped) > 0
    assert not any(matr3 in cell for cell in plain)


def test_gene_symbols_go_through_the_same_gene_mapping(tmp_path, symbol_cells):
    frame = symbol_cells.iloc[:30]
    manifest = _tokenize_v2(
        _h5ad(frame, tmp_path / "symbols.h5ad"),
        tmp_path / "out",
        gene_mapping=V2 / "ensembl_mapping_dict_gc104M.pkl",
    )
    assert _ids(tmp_path / "out") == _published_v2_encoding(frame)
    assert manifest["genes"][0]["mapped_to_ensembl"] > 0.5 * len(frame.columns)


def test_truncated_v2_cells_keep_cls_and_eos_in_the_tokenizer_and_the_corpus_reader(tmp_path, cells, caplog):
    source = _h5ad(cells, tmp_path / "gencode.h5ad")
    mapping = V2 / "ensembl_mapping_dict_gc104M.pkl"
    _tokenize_v2(source, tmp_path / "full", gene_mapping=mapping)
    with caplog.at_level(logging.INFO):
        manifest = _tokenize_v2(source, tmp_path / "short", gene_mapping=mapping, max_length=512)
    full, short = _ids(tmp_path / "full"), _ids(tmp_path / "short")
    cut = sum(len(cell) > 512 for cell in full)
    assert 0 < cut < len(full)
    assert manifest["cells"]["truncated"] == cut and manifest["max_tokens"] == 512
    assert f"{cut} of {len(full)} cells" in caplog.text
    # The top 510 genes, between <cls> and <eos>: the same cells as the full encoding, cut in the middle.
    assert short == [cell if len(cell) <= 512 else [*cell[:511], cell[-1]] for cell in full]
    assert all(cell[0] == 2 and cell[-1] == 3 for cell in short)
    with pytest.raises(ValueError, match="--max-length 2 leaves no gene"):  # <cls> and <eos> alone
        _tokenize_v2(source, tmp_path / "none", gene_mapping=mapping, max_length=2)

    vocab = Vocabulary.load(tmp_path / "full" / "vocab.txt")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        corpus = CellCorpus(
            tmp_path / "full",
            vocab_size=vocab.size,
            max_length=512,
            cache_dir=tmp_path / "cache",
            ends=vocab.cell_ends,
        )
    assert [list(map(int, corpus[i])) for i in range(len(corpus))] == short
    assert corpus.n_truncated == cut and f"{cut} of {len(full)} cells" in caplog.text


def _write_loom(frame: pd.DataFrame, path: Path) -> Path:
    """A loom file as loompy writes it (genes x cells, cell names in CellID), written with h5py."""
    with h5py.File(path, "w") as handle:
        handle.create_dataset("matrix", data=np.rint(frame.to_numpy()).T.astype(np.float32))
        handle.create_group("layers")
        handle.create_group("row_attrs").create_dataset("ensembl_id", data=np.array(frame.columns, dtype="S"))
        handle.create_group("col_attrs").create_dataset("CellID", data=np.array(frame.index, dtype="S"))
    return path


def test_cell_ids_join_corpus_rows_back_to_the_cells_after_filtering(tmp_path, cells):
    frame = cells.iloc[:40]
    frame = frame.loc[:, frame.to_numpy().sum(axis=0) > 0.5]  # all-zero genes change nothing and slow the CSV
    expressed = (frame.to_numpy() > 0.5).sum(axis=1)
    min_genes = int(np.median(expressed))
    passing = frame.index[expressed >= min_genes].astype(str).tolist()
    assert 0 < len(passing) < len(frame)
    frame.to_csv(tmp_path / "cells.csv")
    sources = {
        "h5ad": _h5ad(frame, tmp_path / "cells.h5ad"),
        "loom": _write_loom(frame, tmp_path / "cells.loom"),
        "csv": tmp_path / "cells.csv",
    }
    encodings = {}
    for name, source in sources.items():
        _tokenize_v2(source, tmp_path / name, min_genes=min_genes, chunk_size=16)
        rows = _rows(tmp_path / name)
        assert rows["cell_id"].tolist() == passing, name
        encodings[name] = _ids(tmp_path / name)
    assert encodings["loom"] == encodings["h5ad"] == encodings["csv"]
    # A corpus row is the encoding of the cell its cell_id names in the input.
    _tokenize_v2(_h5ad(frame.loc[[passing[-1]]], tmp_path / "one.h5ad"), tmp_path / "one")
    assert _ids(tmp_path / "one") == encodings["h5ad"][-1:]


def test_counts_within_float_noise_of_an_integer_are_rounded_and_counted(tmp_path, cells):
    frame = cells.iloc[:20]
    frame = frame.loc[:, frame.to_numpy().sum(axis=0) > 0.5]
    noisy = frame.to_numpy()
    assert (noisy != np.rint(noisy)).any()  # the sample stores counts as 0.999999999999999 and the like
    frame.to_csv(tmp_path / "noisy.csv")
    frame.round().to_csv(tmp_path / "whole.csv")
    manifest = _tokenize_v2(tmp_path / "noisy.csv", tmp_path / "noisy")
    _tokenize_v2(tmp_path / "whole.csv", tmp_path / "whole")
    assert _ids(tmp_path / "noisy") == _ids(tmp_path / "whole")
    assert manifest["counts"]["rounded_near_integer"] == int((noisy != np.rint(noisy)).sum())
    assert manifest["cells"]["rounded_near_integer"] == int((noisy != np.rint(noisy)).any(axis=1).sum())
    assert manifest["cells"]["non_integer"] == 0


def test_a_count_of_one_half_is_still_refused(tmp_path, cells):
    frame = cells.iloc[:5].round()
    frame = frame.loc[:, frame.to_numpy().sum(axis=0) > 0]
    frame.iloc[3, int(np.flatnonzero(frame.iloc[3].to_numpy())[0])] = 0.5
    frame.to_csv(tmp_path / "half.csv")
    with pytest.raises(ValueError, match=r"half\.csv.*non-integer.*cell row 3.*0\.5.*--allow-non-integer"):
        _tokenize_v2(tmp_path / "half.csv", tmp_path / "out")
    assert not (tmp_path / "out").exists()


# The bundled file is in an old AnnData format, which anndata warns about.
@pytest.mark.filterwarnings("ignore::Warning")
def test_pbmc68k_counts_recovered_from_log_data_are_refused_with_the_fix_and_tokenize_once_rounded(tmp_path):
    pbmc = _package_file("scanpy", "datasets", "10x_pbmc68k_reduced.h5ad")
    if pbmc is None:
        pytest.skip("scanpy's bundled PBMC68k file not installed (pip install --no-deps scanpy)")
    if not (V1 / "gene_name_id_dict_gc30M.pkl").is_file():
        pytest.skip(f"Geneformer V1 dictionaries not found under {V1}")
    cells = anndata.read_h5ad(pbmc)
    # .raw.X is log1p of counts normalized to 10,000 (stored as float32): the counts come back only roughly.
    recovered = sp.csr_matrix(cells.raw.X).astype(np.float64)
    recovered.data = np.expm1(recovered.data)
    recovered = sp.csr_matrix(recovered.multiply(cells.obs["n_counts"].to_numpy()[:, None] / 1e4))
    obs = cells.obs[["bulk_labels"]].astype(str)
    anndata.AnnData(X=recovered, obs=obs, var=pd.DataFrame(index=cells.raw.var_names)).write_h5ad(
        tmp_path / "r.h5ad"
    )
    tables = dict(
        vocab=V1 / "token_dictionary_gc30M.pkl",
        medians=V1 / "gene_median_dictionary_gc30M.pkl",
        gene_names=V1 / "gene_name_id_dict_gc30M.pkl",
    )
    with pytest.raises(ValueError, match=r"r\.h5ad.*non-integer.*within 0\.1 of an integer.*np\.rint"):
        tokenize_counts(tmp_path / "r.h5ad", tmp_path / "out", **tables)
    recovered.data = np.rint(recovered.data)
    anndata.AnnData(X=recovered, obs=obs, var=pd.DataFrame(index=cells.raw.var_names)).write_h5ad(
        tmp_path / "c.h5ad"
    )
    manifest = tokenize_counts(tmp_path / "c.h5ad", tmp_path / "out", obs_columns=["bulk_labels"], **tables)
    rows = _rows(tmp_path / "out")
    assert manifest["cells"]["kept"] == len(cells) == 700
    assert rows["cell_id"].tolist() == cells.obs_names.tolist()
    assert rows["bulk_labels"].tolist() == obs["bulk_labels"].tolist()
