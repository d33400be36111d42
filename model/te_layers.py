"""Transformer Engine encoder layer computing the same post-LN BERT layer as modeling_bert_te.BertLayer.

Imported only when `use_te_layers=True`: importing this module imports transformer_engine (GPU machines only).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import transformer_engine.pytorch as te

if TYPE_CHECKING:
    from modeling_bert_te import BertTEConfig

# Hugging Face activation name -> TE's. TE's "gelu" is the tanh approximation, so erf "gelu" has no exact match.
_TE_ACTIVATIONS = {"relu": "relu", "gelu_new": "gelu", "gelu_pytorch_tanh": "gelu", "gelu_fast": "gelu"}


def te_activation(hidden_act: str) -> str:
    if hidden_act not in _TE_ACTIVATIONS:
        raise ValueError(
            f"hidden_act {hidden_act!r} has no exact Transformer Engine counterpart; "
            f"use one of {sorted(_TE_ACTIVATIONS)} or set use_te_layers=false"
        )
    return _TE_ACTIVATIONS[hidden_act]


class TEBertLayer(te.TransformerLayer):
    """Post-LN: `output_layernorm` drops the pre-attention LN and normalises the layer output (BERT's output.LayerNorm);
    `apply_residual_connection_post_layernorm` makes the MLP residual the normalised attention sum (attention.output.LayerNorm).
    Parameter names map to stock BERT names through bert_weights.stock_to_te_state_dict / to_stock_state_dict.
    """

    def forward(self, x: torch.Tensor, layout, want_qkv: bool = False):  # type: ignore[override]
        qkv = self._qkv(x) if want_qkv else None
        if layout.packed_index is not None:
            self._set_format("thd")
            cu = layout.cu_seqlens.to(device=x.device, dtype=torch.int32)
            out = super().forward(
                x[0],
                attention_mask=None,
                self_attn_mask_type="padding",
                cu_seqlens_q=cu,
                cu_seqlens_kv=cu,
                max_seqlen_q=layout.max_seqlen,
                max_seqlen_kv=layout.max_seqlen,
            )
            return out.unsqueeze(0), qkv
        self._set_format("bshd")
        if layout.key_mask is None:
            return super().forward(x, attention_mask=None, self_attn_mask_type="no_mask"), qkv
        # TE's boolean masks mark positions to drop (True = masked out), the inverse of SDPA's.
        return super().forward(x, attention_mask=~layout.key_mask, self_attn_mask_type="padding"), qkv

    def _set_format(self, fmt: str) -> None:
        # One layer serves padded and packed batches; TE reads the layout from these attributes at call time.
        self.attn_input_format = fmt
        self.self_attention.qkv_format = fmt
        self.self_attention.core_attention.qkv_format = fmt

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v [B, heads, S, d] recomputed from the fused projection (no input LN in post-LN layout)."""
        mixed = torch.nn.functional.linear(x, self.self_attention.qkv.weight, self.self_attention.qkv.bias)
        b, s, _ = x.shape
        heads = self.self_attention.num_attention_heads
        q, k, v = mixed.view(b, s, 3, heads, -1).unbind(2)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


def build_te_layer(config: BertTEConfig, layer_index: int) -> TEBertLayer:
    std = config.initializer_range

    def init(weight: torch.Tensor) -> None:
        torch.nn.init.normal_(weight, mean=0.0, std=std)

    return TEBertLayer(
        hidden_size=config.hidden_size,
        ffn_hidden_size=config.intermediate_size,
        num_attention_heads=config.num_attention_heads,
        layernorm_epsilon=config.layer_norm_eps,
        hidden_dropout=config.hidden_dropout_prob,
        attention_dropout=config.attention_probs_dropout_prob,
        init_method=init,
        output_layer_init_method=init,
        layer_number=layer_index + 1,
        self_attn_mask_type="padding",
        apply_residual_connection_post_layernorm=True,
        output_layernorm=True,
        layer_type="encoder",
        fuse_qkv_params=True,
        qkv_weight_interleaved=False,  # fused qkv = [query; key; value] rows, so the name mapping is a concat/split
        bias=True,
        activation=te_activation(config.hidden_act),
        normalization="LayerNorm",
        attn_input_format="bshd",
        params_dtype=torch.float32,
    )
