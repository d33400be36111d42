"""Tokenized cell corpora: reading, splitting, batching, masking and tokenizing raw counts.

Everything between cells on disk and a batch of tensors lives here.
"""
