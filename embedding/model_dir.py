"""Open any exported model directory for embedding: a masked-LM (train.py, distill.py, stock BERT) or a classifier.

It must hold config.json, weights and vocab.txt; the weights' SHA-256 goes into the output's record.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from dataset.vocab import Vocabulary
from model.bert_weights import read_config_json, weights_path
from model.classifier import BertForCellClassification
from modeling_bert_te import BertForMaskedLM


@dataclass
class EmbeddingModel:
    model: nn.Module
    vocab: Vocabulary
    path: Path
    weights_file: Path
    weights_sha256: str
    labels: list[str] | None  # class names of a classifier, in class-id order; None for a masked-LM

    @property
    def max_length(self) -> int:
        return int(self.model.config.max_position_embeddings)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _is_classifier(config: dict) -> bool:
    return any("SequenceClassification" in a for a in config.get("architectures") or [])


def open_model_dir(path: str | Path) -> EmbeddingModel:
    """The model of `path` in eval mode with its vocabulary; errors name the missing file and the fix."""
    path = Path(path)
    config = read_config_json(path)
    weights = weights_path(path)
    if not (path / "vocab.txt").is_file():
        raise FileNotFoundError(
            f"model directory {path} has no vocab.txt; copy the vocabulary the model was "
            "trained with into it as vocab.txt (one token a line)"
        )
    vocab = Vocabulary.load(path / "vocab.txt")
    if vocab.size != config.get("vocab_size"):
        raise ValueError(
            f"{path / 'vocab.txt'} has {vocab.size} tokens but config.json has vocab_size "
            f"{config.get('vocab_size')}; put the model's own vocabulary beside it"
        )
    if _is_classifier(config):
        model = BertForCellClassification.from_pretrained(path)
        labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    else:
        model, labels = BertForMaskedLM.from_pretrained(path), None
    return EmbeddingModel(model.eval(), vocab, path, weights, file_sha256(weights), labels)
