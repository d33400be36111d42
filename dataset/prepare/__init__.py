"""Preparing corpora from raw counts: readers of .h5ad / .loom / CSV counts, gene tables and medians, rank-value
encoding, and the tokenizer CLI (`python -m dataset.prepare.tokenize`) that writes a corpus training reads.
"""
