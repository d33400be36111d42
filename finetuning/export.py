"""Export a trained cell classifier as a stock `BertForSequenceClassification` directory (atomic write).

config.json carries id2label / label2id, so stock `transformers` loads it and names its predictions.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from checkpointing.export import _RECIPE_ONLY_FIELDS, _write_tokenizer
from dataset.vocab import Vocabulary
from modeling_bert_te import BertTEConfig, to_stock_state_dict


def export_classifier_dir(state_dict: dict[str, torch.Tensor], config: BertTEConfig, out_dir: Path,
                          vocab: Vocabulary | None) -> Path:
    """model.safetensors (stock names incl. pooler and classifier) + config.json + tokenizer files, replacing out_dir."""
    out_dir = Path(out_dir)
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous().clone()
               for k, v in to_stock_state_dict(state_dict, config).items()}
    expected = {"bert.pooler.dense.weight", "classifier.weight", "classifier.bias"}
    if not expected <= set(tensors):
        raise ValueError(f"classifier state dict lacks {sorted(expected - set(tensors))}")
    config_dict = {k: v for k, v in config.to_dict().items() if k not in _RECIPE_ONLY_FIELDS}
    config_dict.update(architectures=["BertForSequenceClassification"], model_type="bert",
                       problem_type="single_label_classification",
                       id2label={str(k): v for k, v in config.id2label.items()},
                       label2id={v: int(k) for k, v in config.id2label.items()})
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config_dict, indent=2, sort_keys=True) + "\n")
        if vocab is not None:
            _write_tokenizer(vocab, tmp)
        if out_dir.exists():
            # Move the old directory aside first so that the rename below is a single atomic step.
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.rename(out_dir, old / "dir")
            os.rename(tmp, out_dir)
            shutil.rmtree(old)
        else:
            os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
