"""Interpreting a trained model on one cell: attention maps per layer and head, and gene saliency by
integrated gradients on the input embeddings. See `python -m interpret.cell --help`.
"""
