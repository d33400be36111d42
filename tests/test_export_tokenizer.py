"""The tokenizer of an exported model, as `AutoTokenizer.from_pretrained(final_model)` gives it, for V1 and V2.

V1 adds no special tokens, V2 wraps cells in <cls> ... <eos>, and a gene outside the vocabulary is an error.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from dataset.vocab import Vocabulary
from modeling_bert_te import BertForMaskedLM, BertTEConfig

transformers = pytest.importorskip("transformers")

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
V1_VOCAB = DATA / "geneformer" / "V1" / "vocab.txt"
V2_VOCAB = DATA / "geneformer" / "V2" / "token_dictionary_gc104M.pkl"
V1_CELLS = DATA / "genecorpus_500_samples.parquet"


def _exported(vocab_file: Path, out: Path):
    if not vocab_file.is_file():
        pytest.skip(f"Geneformer vocabulary {vocab_file} not found")
    vocab = Vocabulary.load(vocab_file)
    config = BertTEConfig(
        vocab_size=vocab.size,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        hidden_act="relu",
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model_dir = BertForMaskedLM(config).save_pretrained(out, vocab)
    return vocab, model_dir, transformers.AutoTokenizer.from_pretrained(model_dir)


def _first_cell_genes(vocab: Vocabulary, n: int) -> tuple[list[int], str]:
    if not V1_CELLS.is_file():
        pytest.skip(f"Genecorpus sample {V1_CELLS} not found")
    ids = pq.read_table(V1_CELLS, columns=["input_ids"]).column("input_ids")[0].as_py()[:n]
    return ids, " ".join(vocab.tokens[i] for i in ids)


def test_a_v1_export_tokenizes_a_real_cell_without_any_special_token(tmp_path):
    vocab, model_dir, tokenizer = _exported(V1_VOCAB, tmp_path / "v1")
    ids, text = _first_cell_genes(vocab, 40)
    encoded = tokenizer(text)  # the default add_special_tokens=True must not wrap the cell
    assert encoded["input_ids"] == ids
    assert encoded["attention_mask"] == [1] * len(ids)
    assert tokenizer.cls_token is None and tokenizer.pad_token_id == 0 and tokenizer.mask_token_id == 1
    padded = tokenizer([text, " ".join(text.split()[:5])], padding=True, return_tensors="pt")
    assert padded["attention_mask"][1].tolist() == [1] * 5 + [0] * 35  # padding only at the end, masked out
    stock = transformers.BertForMaskedLM.from_pretrained(model_dir)
    assert stock(**padded).logits.shape == (2, 40, vocab.size)


def test_a_v2_export_wraps_cells_in_cls_and_eos_and_keeps_them_when_truncating(tmp_path):
    vocab, _, tokenizer = _exported(V2_VOCAB, tmp_path / "v2")
    genes = [vocab.tokens[i] for i in range(10, 20)]
    gene_ids = list(range(10, 20))
    assert tokenizer(" ".join(genes))["input_ids"] == [vocab.cls_id, *gene_ids, vocab.eos_id]
    assert tokenizer(genes, is_split_into_words=True)["input_ids"] == [vocab.cls_id, *gene_ids, vocab.eos_id]
    assert tokenizer(" ".join(genes), add_special_tokens=False)["input_ids"] == gene_ids
    cut = tokenizer(" ".join(genes), truncation=True, max_length=6)["input_ids"]
    assert cut == [vocab.cls_id, *gene_ids[:4], vocab.eos_id]


@pytest.mark.parametrize("vocab_file", [V1_VOCAB, V2_VOCAB], ids=["v1", "v2"])
def test_a_gene_outside_the_vocabulary_is_an_error_not_a_silent_pad(tmp_path, vocab_file):
    vocab, _, tokenizer = _exported(vocab_file, tmp_path / "m")
    known = vocab.tokens[-1]
    for unknown in ("MATR3", "ENSG99999999999"):  # a gene symbol, an id no vocabulary has
        assert unknown not in tokenizer.get_vocab()
        with pytest.raises(Exception, match="Missing"):
            tokenizer(f"{known} {unknown}")
    assert tokenizer(known, add_special_tokens=False)["input_ids"] == [vocab.size - 1]
