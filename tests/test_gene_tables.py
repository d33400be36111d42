"""Gene tables for the tokenizer: Ensembl versions, symbol tables in either column order, medians and vocabularies.

Also the real Geneformer dictionaries, when ../shared/data has them, load through the restricted unpickler.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from dataset.prepare.gene_tables import (
    build_column_map,
    load_medians,
    load_symbol_table,
    load_vocabulary,
    strip_ensembl_version,
    to_ensembl_ids,
    vocabulary_from_genes,
)
from dataset.vocab import Vocabulary

V1 = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "geneformer" / "V1"


def test_ensembl_versions_are_stripped_but_par_y_copies_stay_distinct():
    assert strip_ensembl_version("ENSG00000141510.17") == "ENSG00000141510"
    assert strip_ensembl_version("ENSMUSG00000059552.9") == "ENSMUSG00000059552"
    assert strip_ensembl_version("ENSG00000182378.14_PAR_Y") == "ENSG00000182378.14_PAR_Y"
    assert strip_ensembl_version("TP53") == "TP53"


def test_symbol_tables_in_either_column_order(tmp_path):
    (tmp_path / "gencode.csv").write_text(
        "ENSG00000141510.17,TP53\nENSG00000000001,DUP\nENSG00000000002,DUP\n"
    )
    (tmp_path / "names.tsv").write_text("symbol\tensembl\nTP53\tENSG00000141510\n")
    gencode = load_symbol_table(tmp_path / "gencode.csv")
    assert gencode == {"TP53": "ENSG00000141510", "DUP": "ENSG00000000001"}  # first listed id wins
    assert load_symbol_table(tmp_path / "names.tsv") == {"TP53": "ENSG00000141510"}
    assert to_ensembl_ids(["tp53", "ENSG00000000003.2", "UNKNOWN"], gencode) == [
        "ENSG00000141510",
        "ENSG00000000003",
        None,
    ]
    assert to_ensembl_ids(["TP53"], None) == [None]


def test_medians_and_vocabulary_from_tsv(tmp_path):
    (tmp_path / "m.tsv").write_text("gene\tmedian\nENSG00000000001.3\t2.5\n")
    assert load_medians(tmp_path / "m.tsv") == {"ENSG00000000001": 2.5}
    (tmp_path / "bad.tsv").write_text("ENSG00000000001\t0\n")
    with pytest.raises(ValueError, match=r"bad\.tsv.*ENSG00000000001.*> 0"):
        load_medians(tmp_path / "bad.tsv")
    (tmp_path / "v.tsv").write_text("token\tid\n<pad>\t0\n<mask>\t1\nENSG00000000001\t2\n")
    assert load_vocabulary(tmp_path / "v.tsv").tokens == ("<pad>", "<mask>", "ENSG00000000001")


def test_column_map_orders_slots_by_token_id_and_sums_duplicates():
    vocab = Vocabulary(("<pad>", "<mask>", "ENSG2", "ENSG1"))
    column_map = build_column_map(
        ["ENSG1", None, "ENSG2", "ENSG1", "ENSG9"], vocab, {"ENSG1": 1.0, "ENSG2": 2.0}, source="x"
    )
    assert column_map.token_ids.tolist() == [2, 3] and column_map.medians.tolist() == [2.0, 1.0]
    assert column_map.target.tolist() == [1, -1, 0, 1, -1]
    assert column_map.has_duplicates
    with pytest.raises(ValueError, match="no median.*--compute-medians"):
        build_column_map(["ENSG1"], vocab, {}, source="x")


def test_built_vocabulary_has_geneformer_specials():
    assert vocabulary_from_genes(["B", "A"], layout="v1").tokens == ("<pad>", "<mask>", "A", "B")
    assert vocabulary_from_genes(["A"], layout="v2").tokens == ("<pad>", "<mask>", "<cls>", "<eos>", "A")


def test_real_geneformer_dictionaries_load_safely():
    if not (V1 / "gene_name_id_dict_gc30M.pkl").is_file():
        pytest.skip(f"Geneformer V1 dictionaries not found under {V1}")
    vocab = load_vocabulary(V1 / "token_dictionary_gc30M.pkl")
    assert vocab.size == 25_426 and vocab.tokens == load_vocabulary(V1 / "vocab.txt").tokens
    medians = load_medians(V1 / "gene_median_dictionary_gc30M.pkl")
    assert len(medians) == 25_424 and all(m > 0 for m in medians.values())
    symbols = load_symbol_table(V1 / "gene_name_id_dict_gc30M.pkl")
    assert symbols["MT-RNR1"] == "ENSG00000211459"
