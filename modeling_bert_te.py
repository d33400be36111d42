"""Geneformer-style BERT masked-LM with stock Hugging Face parameter names and optional Transformer Engine layers.

Loads stock `transformers` BertForMaskedLM directories and exports directories that stock `transformers` loads.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
import transformers
from torch import nn
from transformers.activations import ACT2FN

from common.device import host_to_device
from model.attention_layout import AttentionLayout, packed_layout, padded_layout, unpad
from model.bert_weights import (
    TIED_DECODER_KEY,
    check_against_config,
    load_weights,
    normalize_stock_state_dict,
    read_config_json,
    stock_to_te_state_dict,
    to_stock_state_dict,
)
from model.hf_dir import export_model_dir
from model.varlen_attention import flash_varlen_attention, flash_varlen_supported, grid_attention

if TYPE_CHECKING:
    from dataset.vocab import Vocabulary


# The sizes that define a model's shape (and its parameter count), each a positive integer.
SHAPE_FIELDS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "max_position_embeddings",
    "type_vocab_size",
)


class BertTEConfig(transformers.BertConfig):
    """BertConfig plus the recipe's switches; validates shapes so a bad yaml fails before any allocation."""

    model_type = "bert"

    def __init__(self, use_te_layers: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.use_te_layers = bool(use_te_layers)
        self.validate()

    @classmethod
    def from_model_dir(cls, model_dir: str | os.PathLike, **overrides: Any) -> BertTEConfig:
        """The config of a model directory, read through the guarded `read_config_json`; a bad field names the
        file."""
        config = read_config_json(model_dir)
        try:
            return cls(**{**config, **overrides})
        except (TypeError, ValueError) as error:
            raise ValueError(f"{Path(model_dir) / 'config.json'}: {error}") from None

    def validate(self) -> None:
        for field in SHAPE_FIELDS:
            value = getattr(self, field)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"model config field '{field}' must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"model config: hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                f"{self.num_attention_heads}; choose heads that divide the hidden size"
            )
        if self.hidden_act not in ACT2FN:
            raise ValueError(
                f"model config: hidden_act {self.hidden_act!r} is unknown; use e.g. 'relu' or 'gelu'"
            )
        if getattr(self, "position_embedding_type", "absolute") != "absolute":
            raise ValueError(
                "model config: only position_embedding_type 'absolute' is supported (as in Geneformer)"
            )


@dataclass
class MaskedLMOutput:
    """What one forward returns; fields not requested are None."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    masked_labels: torch.Tensor | None = None
    masked_positions: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    qkv: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None


class BertEmbeddings(nn.Module):
    def __init__(self, config: BertTEConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(
            config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id
        )
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        # Geneformer has no segments: every token is type 0, as stock BERT assumes without token_type_ids.
        x = (
            self.word_embeddings(input_ids)
            + self.position_embeddings(position_ids)
            + self.token_type_embeddings.weight[0]
        )
        return self.dropout(self.LayerNorm(x))


class BertSelfAttention(nn.Module):
    def __init__(self, config: BertTEConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout_p = config.attention_probs_dropout_prob

    def forward(
        self, x: torch.Tensor, layout: AttentionLayout, want_qkv: bool = False
    ) -> tuple[torch.Tensor, tuple | None]:
        b, s, _ = x.shape
        # [B, S, heads, d]: the token-major layout both the packed kernels and SDPA (after a transpose) take.
        q, k, v = (
            proj(x).view(b, s, self.num_heads, self.head_dim) for proj in (self.query, self.key, self.value)
        )
        dropout_p = self.dropout_p if self.training else 0.0
        if layout.packed_index is None:
            ctx = F.scaled_dot_product_attention(
                q.transpose(1, 2),
                k.transpose(1, 2),
                v.transpose(1, 2),
                attn_mask=layout.key_mask,
                dropout_p=dropout_p,
            ).transpose(1, 2)
        elif flash_varlen_supported(q):
            ctx = flash_varlen_attention(q[0], k[0], v[0], layout.cu_seqlens, layout.max_seqlen, dropout_p)
        else:
            ctx = grid_attention(q[0], k[0], v[0], layout.packed_index, layout.packed_mask, dropout_p)
        qkv = tuple(t.transpose(1, 2) for t in (q, k, v)) if want_qkv else None  # [B, heads, S, d]
        return ctx.reshape(b, s, -1), qkv


class BertDenseLayerNorm(nn.Module):
    """dense -> dropout -> LayerNorm(x + residual): BERT's post-LN sublayer output (stock names)."""

    def __init__(self, in_size: int, config: BertTEConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(in_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class BertAttention(nn.Module):
    def __init__(self, config: BertTEConfig) -> None:
        super().__init__()
        self.self = BertSelfAttention(config)
        self.output = BertDenseLayerNorm(config.hidden_size, config)


class BertIntermediate(nn.Module):
    def __init__(self, config: BertTEConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.intermediate_act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.intermediate_act_fn(self.dense(x))


class BertLayer(nn.Module):
    def __init__(self, config: BertTEConfig) -> None:
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertDenseLayerNorm(config.intermediate_size, config)

    def forward(
        self, x: torch.Tensor, layout: AttentionLayout, want_qkv: bool = False
    ) -> tuple[torch.Tensor, tuple | None]:
        ctx, qkv = self.attention.self(x, layout, want_qkv)
        h = self.attention.output(ctx, x)
        return self.output(self.intermediate(h), h), qkv


class BertEncoder(nn.Module):
    def __init__(self, config: BertTEConfig) -> None:
        super().__init__()
        if config.use_te_layers:
            try:
                from model.te_layers import (
                    build_te_layer,  # Transformer Engine only when asked for: CPUs lack it
                )
            except ImportError as error:
                raise ImportError(
                    f"model.use_te_layers=true needs Transformer Engine on a CUDA machine ({error}); "
                    "use the container (it ships TE) or set model.use_te_layers=false"
                ) from error
            self.layer = nn.ModuleList(build_te_layer(config, i) for i in range(config.num_hidden_layers))
        else:
            self.layer = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))


class BertModel(nn.Module):
    def __init__(self, config: BertTEConfig) -> None:
        super().__init__()
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)
        self.max_positions = config.max_position_embeddings

    def encode(
        self,
        input_ids: torch.Tensor,
        layout: AttentionLayout,
        position_ids: torch.Tensor,
        longest: int,
        *,
        output_hidden_states: bool = False,
        qkv_index: int | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None, tuple | None]:
        """Embeddings and every encoder layer: (last hidden state, all hidden states if asked, q/k/v of one layer)."""
        if longest > self.max_positions:
            raise ValueError(
                f"sequence length {longest} exceeds max_position_embeddings {self.max_positions}; "
                "truncate cells or use a config with more positions"
            )
        h = self.embeddings(input_ids, position_ids)
        hidden_states = [h] if output_hidden_states else None
        qkv = None
        for i, layer in enumerate(self.encoder.layer):
            if getattr(layer, "gradient_checkpointing", False) and self.training and torch.is_grad_enabled():
                # Activation checkpointing: keep only the layer input, recompute the rest in backward.
                h, layer_qkv = torch.utils.checkpoint.checkpoint(
                    layer, h, layout, i == qkv_index, use_reentrant=False
                )
            else:
                h, layer_qkv = layer(h, layout, i == qkv_index)
            if layer_qkv is not None:
                qkv = layer_qkv
            if hidden_states is not None:
                hidden_states.append(h)
        return h, tuple(hidden_states) if hidden_states is not None else None, qkv


class BertPredictionHeadTransform(nn.Module):
    def __init__(self, config: BertTEConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.transform_act_fn = ACT2FN[config.hidden_act]
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.transform_act_fn(self.dense(x)))


class BertLMPredictionHead(nn.Module):
    def __init__(self, config: BertTEConfig) -> None:
        super().__init__()
        self.transform = BertPredictionHeadTransform(config)
        self.decoder = nn.Linear(
            config.hidden_size, config.vocab_size, bias=False
        )  # weight tied to embeddings
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.transform(x), self.decoder.weight, self.bias)


class BertOnlyMLMHead(nn.Module):
    def __init__(self, config: BertTEConfig) -> None:
        super().__init__()
        self.predictions = BertLMPredictionHead(config)


def _masked_positions(flat_labels: torch.Tensor, given: torch.Tensor | None) -> torch.Tensor:
    """Flat indices of the labelled tokens: `given` ones checked on the device without a sync, else found here.

    `given` may end with a tail of unlabelled positions (static-shape batches round their masked rows up so): their
    label is -100, so every loss ignores those rows."""
    if given is None:
        return torch.nonzero(flat_labels != -100, as_tuple=False).squeeze(
            1
        )  # waits for the GPU: sizes its output
    if given.dim() != 1 or given.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"masked_positions must be a 1-D integer tensor; got {given.dtype} of shape {tuple(given.shape)}"
        )
    given = host_to_device(given, flat_labels.device)
    labelled = flat_labels != -100
    n_labelled = labelled.sum()
    head = (
        torch.arange(given.numel(), device=given.device) < n_labelled
    )  # the rows that must list labelled tokens
    # Raised on the device when it runs (at the next sync on a GPU): no wait here.
    torch._assert_async(
        n_labelled <= given.numel(), "masked_positions does not list every labelled token (labels != -100)"
    )
    torch._assert_async(
        (labelled.index_select(0, given) == head).all(),
        "masked_positions lists a token without a label (before its unlabelled padding rows)",
    )
    torch._assert_async(
        ((given[1:] > given[:-1]) | ~head[1:]).all(), "masked_positions must be strictly increasing"
    )
    return given


class BertForMaskedLM(nn.Module):
    """BERT masked-LM; parameter names are those of `transformers.BertForMaskedLM` (without pooler)."""

    def __init__(self, config: BertTEConfig) -> None:
        super().__init__()
        if not isinstance(config, BertTEConfig):
            config = (
                BertTEConfig(**config.to_dict())
                if isinstance(config, transformers.PretrainedConfig)
                else BertTEConfig(**dict(config))
            )
        self.config = config
        self.bert = BertModel(config)
        self.cls = BertOnlyMLMHead(config)
        self.cls.predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight
        # Packed (and internally unpadded) batches are rounded up to this many tokens with filler cells: FP8 GEMMs
        # need token counts divisible by 16 (see training.float8.align_packed_tokens). 1 = no filler.
        self.token_multiple = 1
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        """Hugging Face BERT initialisation: N(0, initializer_range) weights, zero biases, unit LayerNorm."""
        std = self.config.initializer_range
        if module is self.cls.predictions.decoder:
            return  # tied to the word embeddings, which are initialised (with a zero padding row) already
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.padding_idx is not None and module.weight.device.type != "meta":
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, BertLMPredictionHead):
            nn.init.zeros_(module.bias)
        # TE layers initialise themselves with the same N(0, initializer_range) (see model/te_layers.py).

    def tie_weights(self) -> None:
        """Re-tie the decoder to the word embeddings (needed after `to_empty` or a state-dict swap)."""
        self.cls.predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        *,
        output_hidden_states: bool = False,
        return_qkv_layer: int | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
        masked_positions: torch.Tensor | None = None,
        full_logits: bool = False,
    ) -> MaskedLMOutput:
        """Packed input gives `cu_seqlens` (and `max_seqlen`); its `masked_positions`, the flat indices of the
        labelled tokens found on the host (see dataset.collator), spare the GPU the sync of finding them here."""
        if masked_positions is not None and (cu_seqlens is None or labels is None):
            raise ValueError(
                "masked_positions goes with packed input and its labels (cu_seqlens and labels given)"
            )
        if cu_seqlens is not None and input_ids.dim() == 1:
            input_ids = input_ids.unsqueeze(0)
            labels = labels.unsqueeze(0) if labels is not None and labels.dim() == 1 else labels
        if input_ids.dim() != 2:
            raise ValueError(
                f"input_ids must be [batch, seq] (or [1, total] when packed); got shape {tuple(input_ids.shape)}"
            )
        qkv_index = self._layer_index(return_qkv_layer)
        token_index = None  # set when a padded batch runs unpadded: slot of each kept token in the B*S grid
        if (
            cu_seqlens is None
            and labels is not None
            and attention_mask is not None
            and not full_logits
            and not output_hidden_states
            and qkv_index is None
        ):
            unpadded = unpad(input_ids, attention_mask, labels)
            if unpadded is not None:
                # Only masked rows leave the model, so pad tokens need no compute at all: run packed.
                input_ids, labels, cu_seqlens, max_seqlen, token_index = unpadded
        h, hidden_states, qkv = self._encode(
            input_ids, attention_mask, cu_seqlens, max_seqlen, output_hidden_states, qkv_index
        )
        out = MaskedLMOutput(hidden_states=hidden_states, qkv=qkv)
        if labels is None:
            out.logits = self.cls.predictions(h)
            return out
        return self._masked_lm(out, h, labels, token_index, full_logits, masked_positions)

    def _layer_index(self, return_qkv_layer: int | None) -> int | None:
        """The encoder layer whose q/k/v to return (negative counts from the end), checked against the depth."""
        if return_qkv_layer is None:
            return None
        n_layers = len(self.bert.encoder.layer)
        index = return_qkv_layer + n_layers if return_qkv_layer < 0 else return_qkv_layer
        if not 0 <= index < n_layers:
            raise ValueError(f"return_qkv_layer {return_qkv_layer} is out of range for {n_layers} layers")
        return index

    def _encode(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        cu_seqlens: torch.Tensor | None,
        max_seqlen: int | None,
        output_hidden_states: bool,
        qkv_index: int | None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None, tuple | None]:
        """Encoder outputs of a padded [B, S] batch, or of packed cells [1, T] when `cu_seqlens` is given."""
        b, s = input_ids.shape
        if cu_seqlens is None:
            layout, position_ids = padded_layout(input_ids, attention_mask)
            longest = s
        else:
            if b != 1:
                raise ValueError(
                    f"packed input (cu_seqlens given) must have input_ids of shape [1, T]; got {tuple(input_ids.shape)}"
                )
            layout, position_ids = packed_layout(
                cu_seqlens, max_seqlen, s, input_ids.device, self.token_multiple
            )
            longest = layout.max_seqlen
        filler = position_ids.shape[1] - s
        if filler:
            input_ids = F.pad(input_ids, (0, filler), value=self.config.pad_token_id or 0)
        h, hidden_states, qkv = self.bert.encode(
            input_ids,
            layout,
            position_ids,
            longest,
            output_hidden_states=output_hidden_states,
            qkv_index=qkv_index,
        )
        if filler:  # the filler cells leave the model nowhere: not in logits, hidden states or q/k/v
            h = h[:, :s]
            hidden_states = tuple(t[:, :s] for t in hidden_states) if hidden_states is not None else None
            qkv = tuple(t[:, :, :s] for t in qkv) if qkv is not None else None
        return h, hidden_states, qkv

    def _masked_lm(
        self,
        out: MaskedLMOutput,
        h: torch.Tensor,
        labels: torch.Tensor,
        token_index: torch.Tensor | None,
        full_logits: bool,
        masked_positions: torch.Tensor | None = None,
    ) -> MaskedLMOutput:
        """Logits and cross-entropy at the masked positions (labels != -100) of `h` [B, S, H]."""
        head = self.cls.predictions
        rows = h.shape[0] * h.shape[1]
        flat_labels = labels.reshape(-1).to(h.device)
        positions = _masked_positions(flat_labels, masked_positions)
        out.masked_positions = positions if token_index is None else token_index[positions]
        out.masked_labels = flat_labels.index_select(0, positions)
        if full_logits:
            out.logits = head(h)
            masked_logits = out.logits.reshape(rows, -1).index_select(0, positions)
        else:
            # Decoding only masked rows: full-vocabulary logits at every position would dominate compute.
            masked_logits = head(h.reshape(rows, -1).index_select(0, positions))
            out.logits = masked_logits
        if positions.numel() == 0:
            out.loss = masked_logits.sum() * 0.0  # keeps the graph (DDP) without a 0/0 NaN
        else:
            out.loss = F.cross_entropy(masked_logits.float(), out.masked_labels)
        return out

    # ------------------------------------------------------------------ saving / loading
    def stock_state_dict(self) -> dict[str, torch.Tensor]:
        """State dict in stock `transformers` names (TE layer parameters converted)."""
        return to_stock_state_dict(self.state_dict())

    def save_pretrained(
        self, out_dir: str | os.PathLike, vocab: Vocabulary | None = None, *, overwrite: bool = False
    ) -> Path:
        return export_model_dir(self.state_dict(), self.config, Path(out_dir), vocab, overwrite=overwrite)

    @classmethod
    def from_pretrained(
        cls, model_dir: str | os.PathLike, *, config: BertTEConfig | None = None, **config_overrides: Any
    ) -> BertForMaskedLM:
        """Load a stock `transformers` BertForMaskedLM directory (config.json + safetensors or .bin)."""
        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            raise FileNotFoundError(f"model directory {model_dir} does not exist")
        if config is None:
            config = BertTEConfig.from_model_dir(model_dir, **config_overrides)
        state_dict = load_weights(model_dir)
        model = cls(config)
        model.load_stock_state_dict(state_dict, source=str(model_dir))
        return model

    def load_stock_state_dict(self, state_dict: dict[str, torch.Tensor], source: str = "state dict") -> None:
        """Load stock-named weights, checking them against the config; errors name what is wrong."""
        sd = normalize_stock_state_dict(state_dict)
        check_against_config(sd, self.config, source)
        expected = set(to_stock_state_dict(self.state_dict()))
        present = set(sd)
        missing = sorted(expected - present - {TIED_DECODER_KEY})
        unexpected = sorted(present - expected)
        if missing or unexpected:
            raise ValueError(
                f"{source}: weights do not match a BERT masked-LM of this config: "
                f"missing {missing[:10]}{'...' if len(missing) > 10 else ''}, "
                f"unexpected {unexpected[:10]}{'...' if len(unexpected) > 10 else ''}"
            )
        sd.pop(TIED_DECODER_KEY, None)
        if self.config.use_te_layers:
            sd = stock_to_te_state_dict(sd)
        result = self.load_state_dict(sd, strict=False)
        bad_missing = [
            k for k in result.missing_keys if k != TIED_DECODER_KEY and not k.endswith("_extra_state")
        ]
        if bad_missing or result.unexpected_keys:
            raise ValueError(f"{source}: could not load {bad_missing} / unexpected {result.unexpected_keys}")
        self.tie_weights()


def count_parameters(model: nn.Module) -> int:
    """Number of parameters, each shared (tied) tensor counted once."""
    return sum(p.numel() for p in model.parameters())
