"""Export a trained cell classifier as a stock `BertForSequenceClassification` directory (atomic write).

config.json carries id2label / label2id, so stock `transformers` loads it and names its predictions.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dataset.vocab import Vocabulary
from model.bert_weights import to_stock_state_dict
from model.hf_dir import RECIPE_ONLY_FIELDS, write_model_dir
from modeling_bert_te import BertTEConfig


def export_classifier_dir(
    state_dict: dict[str, torch.Tensor], config: BertTEConfig, out_dir: Path, vocab: Vocabulary | None
) -> Path:
    """model.safetensors (stock names incl. pooler and classifier) + config.json + tokenizer files, replacing out_dir."""
    out_dir = Path(out_dir)
    tensors = {
        k: v.detach().to("cpu", torch.float32).contiguous().clone()
        for k, v in to_stock_state_dict(state_dict).items()
    }
    expected = {"bert.pooler.dense.weight", "classifier.weight", "classifier.bias"}
    if not expected <= set(tensors):
        raise ValueError(f"classifier state dict lacks {sorted(expected - set(tensors))}")
    config_dict = {k: v for k, v in config.to_dict().items() if k not in RECIPE_ONLY_FIELDS}
    config_dict.update(
        architectures=["BertForSequenceClassification"],
        model_type="bert",
        problem_type="single_label_classification",
        id2label={str(k): v for k, v in config.id2label.items()},
        label2id={v: int(k) for k, v in config.id2label.items()},
    )
    return write_model_dir(out_dir, tensors, config_dict, vocab)
