"""Evaluation of trained models beyond masked-LM loss: cell embeddings, their similarity, probes, figures.

Used by evaluate.py; the masked-LM metrics themselves live in training/masked_lm_metrics.py.
"""
