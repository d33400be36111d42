"""Distributed checkpoints (save, commit, resume, prune) and export of plain model directories.

Checkpoints are torch.distributed.checkpoint directories; exports load in stock transformers.
"""
