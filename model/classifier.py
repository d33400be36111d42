"""Cell classifier in the stock `transformers.BertForSequenceClassification` layout, built from a model directory.

Parameters: `bert.embeddings.*`, `bert.encoder.layer.N.*`, `bert.pooler.dense.*`, `classifier.*`; the pooled
embedding is the first token's last hidden state through dense + tanh, exactly as stock BERT pools.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from model.attention_layout import padded_layout
from model.bert_weights import load_weights, stock_to_te_state_dict
from modeling_bert_te import BertForMaskedLM, BertModel, BertTEConfig


class BertPooler(nn.Module):
    def __init__(self, config: BertTEConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, first_token: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(first_token))


class BertBody(BertModel):
    """The masked-LM model's body plus stock BERT's pooler (names `bert.*`, `bert.pooler.dense`)."""

    def __init__(self, config: BertTEConfig) -> None:
        super().__init__(config)
        self.pooler = BertPooler(config)


@dataclass
class ClassifierOutput:
    logits: torch.Tensor  # [B, num_labels]
    loss: torch.Tensor | None = (
        None  # mean cross-entropy over the batch's labelled cells, when labels are given
    )


class BertForCellClassification(nn.Module):
    """A sequence-classification head on the pooled cell embedding of our BERT body."""

    def __init__(self, config: BertTEConfig) -> None:
        super().__init__()
        if not config.id2label or config.num_labels < 2:
            raise ValueError("the classifier config needs id2label with at least two classes")
        self.config = config
        self.bert = BertBody(config)
        dropout = getattr(config, "classifier_dropout", None)
        self.dropout = nn.Dropout(config.hidden_dropout_prob if dropout is None else dropout)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)

    @classmethod
    def from_masked_lm_dir(
        cls, model_dir: str | Path, id2label: dict[int, str], *, seed: int
    ) -> BertForCellClassification:
        """Body from an exported (stock-layout) masked-LM directory; a new pooler and classifier, N(0, 0.02)."""
        mlm = BertForMaskedLM.from_pretrained(model_dir)
        config = BertTEConfig.from_dict(
            {**mlm.config.to_dict(), "id2label": id2label, "label2id": {v: k for k, v in id2label.items()}}
        )
        torch.manual_seed(seed)  # the same new head on every rank
        model = cls(config)
        model.bert.embeddings = mlm.bert.embeddings
        model.bert.encoder = mlm.bert.encoder
        for linear in (model.bert.pooler.dense, model.classifier):
            nn.init.normal_(linear.weight, std=config.initializer_range)
            nn.init.zeros_(linear.bias)
        return model

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> BertForCellClassification:
        """Load a classifier exported by finetune.py (or any stock BertForSequenceClassification directory)."""
        model_dir = Path(model_dir)
        config = BertTEConfig.from_model_dir(model_dir)
        # Buffers stock BERT may save alongside the weights; they carry nothing to learn.
        sd = {
            k: v
            for k, v in load_weights(model_dir).items()
            if k not in ("bert.embeddings.position_ids", "bert.embeddings.token_type_ids")
        }
        model = cls(config)
        if config.use_te_layers:
            sd = stock_to_te_state_dict(sd)
        result = model.load_state_dict(sd, strict=False)
        missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
        if missing or result.unexpected_keys:
            raise ValueError(
                f"{model_dir}: weights do not match a BERT sequence classifier of its config: "
                f"missing {missing[:10]}, unexpected {result.unexpected_keys[:10]}"
            )
        return model

    def freeze(self, n_layers: int) -> None:
        """Freeze the embeddings and the first `n_layers` encoder layers (0 = train everything)."""
        total = len(self.bert.encoder.layer)
        if not 0 <= n_layers <= total:
            raise ValueError(f"finetune.freeze_layers={n_layers} but the model has {total} encoder layers")
        if n_layers == 0:
            return
        for module in (self.bert.embeddings, *self.bert.encoder.layer[:n_layers]):
            module.requires_grad_(False)

    def classify_first_tokens(self, first_token: torch.Tensor) -> torch.Tensor:
        """Class logits [B, num_labels] from each cell's first-token last hidden state [B, H]."""
        # Stock BERT pools the first token (a <cls> in V2 vocabularies, the top-ranked gene in V1).
        return self.classifier(self.dropout(self.bert.pooler(first_token)))

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> ClassifierOutput:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq]; got shape {tuple(input_ids.shape)}")
        layout, position_ids = padded_layout(input_ids, attention_mask)
        h, _, _ = self.bert.encode(input_ids, layout, position_ids, input_ids.shape[1])
        out = ClassifierOutput(logits=self.classify_first_tokens(h[:, 0]))
        if labels is not None:
            out.loss = F.cross_entropy(out.logits.float(), labels, ignore_index=-100)
        return out
